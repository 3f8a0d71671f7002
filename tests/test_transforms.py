import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from conftest import require_data
from scripts.transforms import AddSectionAxisd, CropRegiond, SetSpacingd, ValidateVolumed


def _volume(shape=(1, 6, 5, 4), value=None, spacing=(1.0, 1.0, 1.0)):
    data = torch.arange(float(np.prod(shape))).reshape(shape) if value is None else torch.full(shape, value)
    return MetaTensor(
        data, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)), meta={"filename_or_obj": "v.tif"}
    )


def test_add_section_axis_makes_a_depth_one_volume_with_4x4_affine():
    page = MetaTensor(torch.rand(1, 8, 6), affine=torch.tensor([[-2.0, 0, 5], [0, -3.0, 7], [0, 0, 1]]))
    out = AddSectionAxisd("image", section_thickness=50.0)({"image": page})["image"]
    assert out.shape == (1, 8, 6, 1)
    assert out.affine.tolist() == [[-2, 0, 0, 5], [0, -3, 0, 7], [0, 0, 50, 0], [0, 0, 0, 1]]
    assert out.meta["section_axis_added"]
    # the reader's record of the grid follows (MONAI Label restores and writes predictions from it)
    assert out.meta["spatial_shape"].tolist() == [8, 6, 1]
    assert out.meta["original_affine"].tolist() == out.affine.tolist()
    volume = _volume()
    assert AddSectionAxisd("image")({"image": volume})["image"] is volume


def test_set_spacing_prefers_item_spacing_and_keeps_direction():
    volume = _volume()
    volume.affine = torch.tensor([[-1.0, 0, 0, 3], [0, -1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    out = SetSpacingd("image", spacing=[4, 4, 50])({"image": volume, "spacing": [10, 10, 40]})["image"]
    assert torch.diagonal(out.affine)[:3].tolist() == [-10, -10, 40]
    assert out.affine[0, 3] == 3
    default = SetSpacingd("image", spacing=[4, 4, 50])({"image": _volume()})["image"]
    assert torch.diagonal(default.affine)[:3].tolist() == [4, 4, 50]
    with pytest.raises(ValueError, match="v.tif.*spacing"):
        SetSpacingd("image", spacing=[4, 4])({"image": _volume()})


def test_crop_region_crops_all_keys_and_names_bad_region():
    d = {"image": _volume(), "label": _volume(), "region": [[1, 4], [0, 5], [2, 4]]}
    out = CropRegiond(["image", "label"])(d)
    assert out["image"].shape == (1, 3, 5, 2)
    assert torch.equal(out["image"], d["image"][:, 1:4, :, 2:4])
    assert out["image"].affine[0, 3] == 1 and out["image"].affine[2, 3] == 2
    with pytest.raises(ValueError, match="v.tif.*does not fit"):
        CropRegiond("image")({"image": _volume(), "region": [[0, 7], [0, 5], [0, 4]]})


@pytest.mark.parametrize(
    "image, label, message",
    [
        (_volume(value=float("nan")), None, "NaN"),
        (_volume(value=3.0), None, "constant"),
        (_volume(), _volume(shape=(1, 6, 5, 3), value=0.0), "label shape"),
        (_volume(), _volume(value=7.0), r"values \[7.0\] outside the class list"),
    ],
)
def test_validate_volume_names_the_problem(image, label, message):
    data = {"image": image} if label is None else {"image": image, "label": label}
    with pytest.raises(ValueError, match=message):
        ValidateVolumed(num_classes=7)(data)


def test_validate_volume_accepts_ignore_index():
    label = _volume(value=0.0)
    label[0, 0, 0, 0] = 255
    ValidateVolumed(num_classes=2, ignore_index=255)({"image": _volume(), "label": label})


def test_real_tiff_axis_order_is_x_y_z():
    (image_path,) = require_data("isbi2012/images.tif")
    import itk

    pages = itk.GetArrayFromImage(itk.imread(str(image_path)))  # (z, y, x) as stored
    loaded = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(image_path))
    volume = AddSectionAxisd("image")({"image": loaded})["image"]
    assert volume.shape == (1, 512, 512, 20)
    np.testing.assert_array_equal(np.asarray(volume[0]), pages.transpose(2, 1, 0))


def test_real_single_page_becomes_depth_one_volume():
    (image_path,) = require_data("platelet/50-slice0-image.tif")
    loaded = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(image_path))
    volume = AddSectionAxisd("image", section_thickness=50.0)({"image": loaded})["image"]
    assert volume.shape == (1, 800, 800, 1)
    assert float(volume.affine[2, 2]) == 50.0


def test_class_frequency_sampler_shares_follow_the_power_of_the_counts():
    from monai.transforms import ClassesToIndicesd

    from scripts.transforms import RandCropByClassFrequencyd

    label = torch.zeros(1, 64, 64, 1)
    label[0, :8, :8] = 1  # 64 voxels of class 1 against 4032 of class 0; class 2 absent
    data = ClassesToIndicesd("label", num_classes=3, indices_postfix="_idx")({"label": label, "image": label.clone()})
    centres = {}
    for power in (0.0, 0.5, 1.0):
        sampler = RandCropByClassFrequencyd(
            ["image", "label"], "label", [4, 4, 1], num_classes=3, indices_key="label_idx", num_samples=400, power=power
        )
        sampler.set_random_state(0)
        windows = sampler(data)
        centres[power] = np.mean([float(w["label"].max()) for w in windows])  # share of windows on class 1
        assert all(w["label"].shape == (1, 4, 4, 1) for w in windows)
    expected = {0.0: 0.5, 0.5: 8 / (8 + 4032**0.5), 1.0: 64 / 4096}
    for power, share in centres.items():
        assert abs(share - expected[power]) < 0.06, (power, share, expected[power])

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import LoadImage, RandAffined

from conftest import BUNDLE, require_data
from scripts.augmentation import RandBrightnessContrastd, RandSectionElasticd
from scripts.section_defects import RandCutBlurd, RandMissingSectiond, RandSectionBlurd, RandSectionShiftd

KEYS = ("image", "label", "weight")


def _meta(array: torch.Tensor) -> MetaTensor:
    affine = torch.diag(torch.tensor([2.0, 2.0, 50.0, 1.0], dtype=torch.float64))
    return MetaTensor(array, affine=affine, meta={"filename_or_obj": "window.tif"})


def _window(shape=(1, 32, 32, 4), seed=0, label_dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, shape, generator=g)
    return {
        "image": _meta(torch.rand(shape, generator=g)),
        "label": _meta(label.to(label_dtype)),
        "weight": _meta(torch.rand(shape, generator=g) + 0.5),
    }


def _checkerboard(shape=(1, 64, 64, 3), square=8) -> torch.Tensor:
    x = torch.arange(shape[1])[:, None, None] // square
    y = torch.arange(shape[2])[None, :, None] // square
    z = torch.zeros(shape[3], dtype=torch.long)[None, None, :]
    return ((x + y + z) % 2).float().expand(shape[1:]).unsqueeze(0).clone()


TRANSFORMS = {
    "elastic": lambda p: RandSectionElasticd(KEYS, grid=(6, 6), magnitude=4.0, prob=p),
    "missing": lambda p: RandMissingSectiond("image", prob=p, max_sections=2),
    "shift": lambda p: RandSectionShiftd(KEYS, prob=p, max_shift=(4, 4), weight_key="weight"),
    "blur": lambda p: RandSectionBlurd("image", prob=p, sigma_range=(1.0, 2.0)),
    "cutblur": lambda p: RandCutBlurd("image", prob=p),
    "brightness_contrast": lambda p: RandBrightnessContrastd("image", prob=p),
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.int64])
def test_shapes_dtypes_meta_and_label_values_are_kept(name, label_dtype):
    data = _window(label_dtype=label_dtype)
    transform = TRANSFORMS[name](1.0)
    transform.set_random_state(3)
    out = transform(data)
    for key in KEYS:
        assert isinstance(out[key], MetaTensor)
        assert out[key].shape == data[key].shape and out[key].dtype == data[key].dtype
        assert torch.equal(out[key].affine, data[key].affine)
        assert out[key].meta["filename_or_obj"] == "window.tif"
    label = out["label"].as_tensor()
    assert set(label.unique().tolist()) <= set(data["label"].unique().tolist())
    assert torch.equal(label, label.round())
    assert torch.isfinite(out["image"]).all() and (out["weight"] >= 0).all()


@pytest.mark.parametrize("name", TRANSFORMS)
def test_reproducible_under_set_random_state(name):
    first = TRANSFORMS[name](1.0).set_random_state(7)(_window())
    second = TRANSFORMS[name](1.0).set_random_state(7)(_window())
    for key in KEYS:
        assert torch.equal(first[key], second[key])
    assert not torch.equal(first["image"], _window()["image"]), f"{name} did nothing at prob=1"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_prob_zero_is_identity(name):
    data = _window()
    out = TRANSFORMS[name](0.0).set_random_state(0)(data)
    for key in KEYS:
        assert torch.equal(out[key], data[key])


def test_elastic_keeps_image_and_label_aligned_on_a_checkerboard():
    label = _meta(_checkerboard())
    data = {"image": _meta(label.as_tensor() * 10.0), "label": label}
    transform = RandSectionElasticd(["image", "label"], grid=(8, 8), magnitude=6.0, mode=("bilinear", "nearest"))
    for seed in range(3):
        out = transform.set_random_state(seed)(data)
        warped_label = out["label"].as_tensor()
        assert (warped_label != label.as_tensor()).float().mean() > 0.05, "the field did not move the data"
        mismatch = ((out["image"].as_tensor() > 5.0).float() != warped_label).float().mean()
        assert mismatch < 0.02


def test_elastic_applies_one_field_to_every_section_and_every_key():
    section = torch.rand(2, 40, 36, 1, generator=torch.Generator().manual_seed(1))
    image = _meta(section.expand(2, 40, 36, 5).clone())
    transform = RandSectionElasticd("image", grid=(20, 20), magnitude=3.0, mode="bilinear").set_random_state(0)
    out = transform({"image": image, "copy": image.clone()})["image"].as_tensor()
    assert not torch.allclose(out, image.as_tensor())
    for z in range(1, 5):
        assert torch.equal(out[..., z], out[..., 0])
    both = RandSectionElasticd(["image", "copy"], magnitude=3.0, mode="bilinear").set_random_state(0)
    out2 = both({"image": image, "copy": image.clone()})
    assert torch.equal(out2["image"], out2["copy"]) and torch.equal(out2["image"].as_tensor(), out)


def test_elastic_grid_spacing_and_bad_modes():
    transform = RandSectionElasticd("image", grid_spacing=(40, 40), mode="bilinear").set_random_state(0)
    transform({"image": torch.rand(1, 200, 120, 2)})
    assert transform.coarse_field.shape == (2, 6, 4)
    with pytest.raises(ValueError, match="one per key"):
        RandSectionElasticd(["image", "label"])
    with pytest.raises(ValueError, match="mode must be"):
        RandSectionElasticd("image", mode="cubic")


@pytest.mark.parametrize("fill", ["mean", "zero", "neighbour"])
def test_missing_section_changes_exactly_the_chosen_image_sections(fill):
    data = _window(shape=(2, 16, 16, 8))
    transform = RandMissingSectiond("image", prob=1.0, max_sections=3, fill=fill)
    for seed in range(4):
        out = transform.set_random_state(seed)(data)
        image, before = out["image"].as_tensor(), data["image"].as_tensor()
        changed = [z for z in range(8) if not torch.equal(image[..., z], before[..., z])]
        assert changed == transform.sections and 1 <= len(changed) <= 3
        assert torch.equal(out["label"], data["label"]) and torch.equal(out["weight"], data["weight"])
        for z, source in zip(transform.sections, transform.sources):
            if fill == "zero":
                assert (image[..., z] == 0).all()
            elif fill == "mean":
                assert torch.allclose(image[..., z], before.mean(dim=(1, 2, 3))[:, None, None].expand(2, 16, 16))
            else:
                assert source not in transform.sections and torch.equal(image[..., z], before[..., source])


@pytest.mark.parametrize("kind", ["step", "single"])
def test_section_shift_moves_image_label_and_weight_together(kind):
    data = _window(shape=(1, 24, 20, 6))
    data["image"] = _meta(data["label"].as_tensor() * 10.0 + 1.0)
    transform = RandSectionShiftd(KEYS, prob=1.0, max_shift=(5, 3), kind=kind, weight_key="weight")
    for seed in range(4):
        out = transform.set_random_state(seed)(data)
        sx, sy = transform.shift
        assert (sx, sy) != (0, 0) and abs(sx) <= 5 and abs(sy) <= 3
        assert len(transform.sections) == 1 if kind == "single" else transform.sections[-1] == 5
        assert torch.equal((out["image"] - 1.0) / 10.0, out["label"]), "image and label no longer aligned"
        for z in range(6):
            if z not in transform.sections:
                for key in KEYS:
                    assert torch.equal(out[key][..., z], data[key][..., z])
                continue
            xs, ys = slice(max(sx, 0), 24 + min(sx, 0)), slice(max(sy, 0), 20 + min(sy, 0))
            src_x, src_y = slice(max(-sx, 0), 24 + min(-sx, 0)), slice(max(-sy, 0), 20 + min(-sy, 0))
            assert torch.equal(out["label"][0, xs, ys, z], data["label"][0, src_x, src_y, z])
            vacant = torch.ones(24, 20, dtype=torch.bool)
            vacant[xs, ys] = False
            assert (out["weight"][0, :, :, z][vacant] == 0).all()


def test_section_blur_blurs_one_section_only():
    data = _window(shape=(1, 32, 32, 5))
    transform = RandSectionBlurd("image", prob=1.0, sigma_range=(1.5, 2.5)).set_random_state(2)
    out = transform(data)
    z = transform.section
    for k in range(5):
        assert torch.equal(out["image"][..., k], data["image"][..., k]) == (k != z)
    assert out["image"][..., z].std() < 0.5 * data["image"][..., z].std()
    assert abs(float(out["image"][..., z].mean() - data["image"][..., z].mean())) < 0.02
    assert torch.equal(out["label"], data["label"])


def test_cutblur_changes_only_its_cuboid():
    data = _window(shape=(1, 32, 32, 6))
    transform = RandCutBlurd("image", prob=1.0, size_range=(0.3, 0.6), factor_range=(3, 4)).set_random_state(1)
    out = transform(data)
    inside = torch.zeros(1, 32, 32, 6, dtype=torch.bool)
    inside[(slice(None), *transform.region)] = True
    assert torch.equal(out["image"][~inside], data["image"][~inside])
    assert out["image"][inside].std() < data["image"][inside].std()
    assert torch.equal(out["label"], data["label"])


def test_brightness_contrast_follows_the_paper_definition():
    data = _window()
    transform = RandBrightnessContrastd("image", prob=1.0).set_random_state(5)
    out = transform(data)["image"]
    image = data["image"]
    assert abs(transform.shift) <= 0.12 and abs(transform.scale - 1.0) <= 0.2
    expected = (image + transform.shift * float(image.max() - image.min())) * transform.scale
    assert torch.allclose(out, expected)


def test_single_section_windows():
    data = _window(shape=(1, 24, 24, 1))
    for transform in (RandMissingSectiond("image", prob=1.0), RandSectionShiftd(KEYS, prob=1.0)):
        out = transform(data)
        for key in KEYS:
            assert torch.equal(out[key], data[key])
    for name in ("elastic", "blur", "cutblur"):
        out = TRANSFORMS[name](1.0).set_random_state(0)(data)
        assert out["image"].shape == (1, 24, 24, 1) and not torch.equal(out["image"], data["image"])


def test_numpy_input_stays_numpy():
    data = {k: v.numpy() for k, v in _window().items()}
    out = RandSectionElasticd(KEYS, grid=(4, 4), magnitude=3.0).set_random_state(0)(data)
    assert isinstance(out["label"], np.ndarray) and out["label"].dtype == data["label"].dtype


def contrast(image, label) -> float:
    """Mean intensity of cell interior (label 0) minus that of membrane (label 1, dark in ISBI 2012)."""
    return float(image[label == 0].mean() - image[label == 1].mean())


def test_elastic_on_a_real_em_crop_keeps_labels_binary_and_aligned():
    images, labels = require_data("isbi2012/images.tif", "isbi2012/labels.tif")
    loader = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)
    image, label = loader(images), loader(labels)
    assert image.shape == (1, 512, 512, 20) and label.shape == (1, 512, 512, 20)
    crop = (slice(None), slice(200, 328), slice(100, 228), slice(5, 10))
    data = {"image": image[crop], "label": label[crop]}

    before = contrast(data["image"], data["label"])
    assert before > 30.0
    for kwargs in ({"grid_spacing": (40, 40)}, {"grid": (20, 20), "magnitude": 5.0}):
        transform = RandSectionElasticd(["image", "label"], mode=("bilinear", "nearest"), **kwargs)
        out = transform.set_random_state(0)(data)
        assert out["label"].shape == (1, 128, 128, 5)
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
        assert (out["label"] != data["label"]).float().mean() > 0.02, "the field did not move the data"
        after = contrast(out["image"], out["label"])
        assert after > 0.8 * before
        # a label displaced by 3 voxels against the same image loses most of the contrast: alignment is what counts
        assert after > 1.5 * contrast(out["image"], torch.roll(out["label"], shifts=(3, 3), dims=(1, 2)))


def test_configured_rotation_and_scaling_keep_real_em_labels_aligned():
    """train.json's RandAffined (``affine_prob``, on in ``study/augment_strong``) turns and scales image, label and
    weight map together in xy, each section alike, and keeps labels integer."""
    images, labels = require_data("isbi2012/images.tif", "isbi2012/labels.tif")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("train.json", "variants/study/augment_strong.json")])
    parser.update({"bundle_root": str(BUNDLE), "affine_prob": 1.0})
    (affine,) = [t for t in parser.get_parsed_content("augmentation") if isinstance(t, RandAffined)]
    loader = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)
    crop = (slice(None), slice(200, 328), slice(100, 228), slice(5, 8))
    image, label = loader(images)[crop], loader(labels)[crop]
    data = {"image": image, "label": label, "weight": label + 1.0}

    before = contrast(image, label)
    for seed in range(3):
        out = affine.set_random_state(seed)(data)
        assert out["label"].shape == (1, 128, 128, 3)
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out["weight"], out["label"] + 1.0), "the weight map moved apart from the label"
        assert (out["label"] != label).float().mean() > 0.05, "the transform did not move the data"
        after = contrast(out["image"], out["label"])
        assert after > 0.8 * before
        assert after > 1.5 * contrast(out["image"], torch.roll(out["label"], shifts=(3, 3), dims=(1, 2)))
        # one rotation for every section: the label's change between sections is what it was, give or take
        for z in range(2):
            moved = (out["label"][..., z] != out["label"][..., z + 1]).float().mean()
            assert abs(moved - (label[..., z] != label[..., z + 1]).float().mean()) < 0.05

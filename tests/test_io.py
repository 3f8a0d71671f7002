import json

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

import scripts.io
from scripts.io import (
    InputError,
    SaveVolumed,
    atomic_path,
    load_class_schema,
    load_datalist,
    output_path,
    volume_suffix,
    write_csv_atomically,
    write_volume_atomically,
)
from scripts.transforms import AddSectionAxisd

LOAD = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)


def _write_datalist(tmp_path, content):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_volume_suffix_and_output_path():
    assert volume_suffix("a/b.NII.GZ") == ".nii.gz"
    assert output_path("/d/stack.tif", "/out", "seg") == output_path("x/stack.tif", "/out", "seg")
    assert str(output_path("/d/vol.nii.gz", "/out", "prob", ".nii.gz")).endswith("/out/vol_prob.nii.gz")
    with pytest.raises(ValueError, match="b.jpg: unsupported volume format"):
        volume_suffix("a/b.jpg")


def test_load_datalist_resolves_and_checks(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"")
    path = _write_datalist(tmp_path, {"training": [{"image": "a.tif", "label": "a.tif"}], "validation": []})
    items = load_datalist(path, tmp_path, "training")
    assert items[0]["image"] == str(tmp_path / "a.tif")
    with pytest.raises(ValueError, match="'validation' is empty"):
        load_datalist(path, tmp_path, "validation")
    with pytest.raises(InputError, match="no key 'testing'"):
        load_datalist(path, tmp_path, "testing")
    missing = _write_datalist(tmp_path, {"training": [{"image": "a.tif", "label": "b.tif"}]})
    with pytest.raises(InputError, match=r"'training'\[0\]\['label'\] = .*b.tif not found"):
        load_datalist(missing, tmp_path, "training")
    with pytest.raises(InputError, match="datalist .*nope.json not found"):
        load_datalist(tmp_path / "nope.json", tmp_path)


def test_class_schema_comes_from_metadata():
    from conftest import BUNDLE

    schema = load_class_schema(BUNDLE / "configs" / "metadata.json")
    assert schema["names"][2] == "mitochondrion" and len(schema["names"]) == 7
    assert schema["organelles"] == [2, 3, 4, 5, 6]


def test_tiff_round_trip_keeps_page_order(tmp_path):
    pages = np.random.default_rng(0).integers(0, 7, (4, 12, 10), dtype=np.uint8)  # (z, y, x)
    itk.imwrite(itk.GetImageFromArray(pages), str(tmp_path / "in.tif"))
    volume = LOAD(str(tmp_path / "in.tif"))
    assert volume.shape == (1, 10, 12, 4)
    SaveVolumed("label", tmp_path / "out", "seg")({"label": volume})
    back = itk.GetArrayFromImage(itk.imread(str(tmp_path / "out" / "in_seg.tif")))
    np.testing.assert_array_equal(back, pages)


def test_single_page_tiff_is_written_back_as_a_single_page(tmp_path):
    page = np.random.default_rng(0).integers(0, 7, (12, 10), dtype=np.uint8)
    itk.imwrite(itk.GetImageFromArray(page), str(tmp_path / "page.tif"))
    volume = AddSectionAxisd("label")({"label": LOAD(str(tmp_path / "page.tif"))})["label"]
    assert volume.shape == (1, 10, 12, 1)
    SaveVolumed("label", tmp_path, "seg")({"label": volume})
    back = itk.GetArrayFromImage(itk.imread(str(tmp_path / "page_seg.tif")))
    assert back.shape == (12, 10)
    np.testing.assert_array_equal(back, page)


def test_nifti_round_trip_keeps_affine(tmp_path):
    affine = np.array([[0.004, 0, 0, 1.0], [0, 0.004, 0, 2.0], [0, 0, 0.05, 3.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).integers(0, 3, (16, 12, 4)).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    SaveVolumed("label", tmp_path / "out", "seg")({"label": LOAD(str(tmp_path / "vol.nii.gz"))})
    written = nib.load(tmp_path / "out" / "vol_seg.nii.gz")
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), data)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_write(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(scripts.io.ITKWriter, "write", broken_write)
    volume = MetaTensor(torch.zeros(1, 4, 4, 2), affine=torch.eye(4))
    with pytest.raises(OSError, match="disk full"):
        write_volume_atomically(volume, volume.meta, tmp_path / "out.tif", np.uint8)
    assert list(tmp_path.iterdir()) == []


def test_mha_round_trip_keeps_spacing_and_order(tmp_path):
    pages = np.random.default_rng(1).integers(0, 5, (3, 9, 7), dtype=np.uint8)
    image = itk.GetImageFromArray(pages)
    image.SetSpacing((4.0, 5.0, 50.0))
    itk.imwrite(image, str(tmp_path / "vol.mha"))
    volume = LOAD(str(tmp_path / "vol.mha"))
    assert volume.shape == (1, 7, 9, 3)
    np.testing.assert_allclose(volume.pixdim.tolist(), [4.0, 5.0, 50.0])
    SaveVolumed("label", tmp_path / "out", "seg")({"label": volume})
    written = itk.imread(str(tmp_path / "out" / "vol_seg.mha"))
    np.testing.assert_array_equal(itk.GetArrayFromImage(written), pages)
    np.testing.assert_allclose(tuple(written.GetSpacing()), (4.0, 5.0, 50.0))


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.csv"
    write_csv_atomically([{"class": "cell", "iou": 0.75}], target)
    assert target.read_text().splitlines() == ["class,iou", "cell,0.75"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".csv" and tmp.parent == tmp_path  # beside the target, same suffix for writers
        tmp.write_text("half-writ")
        raise RuntimeError("killed mid-write")
    assert target.read_text().splitlines() == ["class,iou", "cell,0.75"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"], "no temporary file left"

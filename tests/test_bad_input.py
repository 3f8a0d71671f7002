"""Bad input stops with a message naming the file and the problem, before any training or inference starts."""

import json

import itk
import numpy as np
import pytest

from bundle_cli import TINY, bundle_run
from conftest import require_shared


def _write_pages(path, pages):
    itk.imwrite(itk.GetImageFromArray(np.ascontiguousarray(pages)), str(path))


@pytest.fixture
def real_pair(tmp_path):
    """A small real platelet crop (image, labels) written as TIFF pages in a fresh dataset directory."""
    image_path, label_path = require_shared("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    image = itk.GetArrayFromImage(itk.imread(str(image_path)))[..., :128, :128]
    label = itk.GetArrayFromImage(itk.imread(str(label_path)))[..., :128, :128]
    return tmp_path, image.reshape(1, 128, 128), label.reshape(1, 128, 128)


def _train(tmp_path, image, label, datalist=None):
    _write_pages(tmp_path / "image.tif", image)
    _write_pages(tmp_path / "label.tif", label)
    item = {"image": "image.tif", "label": "label.tif"}
    datalist = datalist if datalist is not None else {"training": [item], "validation": [item]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    overrides = {**TINY, "train_window": [64, 64, 1], "val_window": [64, 64, 1], "max_epochs": 1}
    overrides.update(
        dataset_dir=str(tmp_path), datalist=str(tmp_path / "datalist.json"), ckpt_dir=str(tmp_path / "models")
    )
    result = bundle_run(
        "training", ["configs/train.json"], {**overrides, "output_dir": str(tmp_path / "eval")}, check=False
    )
    assert result.returncode != 0, "bad input was accepted"
    assert not (tmp_path / "models").exists(), "training started on bad input"
    return result.stdout + result.stderr


def test_missing_file(real_pair):
    tmp_path, image, label = real_pair
    datalist = {"training": [{"image": "image.tif", "label": "nowhere.tif"}], "validation": []}
    log = _train(tmp_path, image, label, datalist)
    assert "['label'] = " in log and "nowhere.tif not found" in log


def test_empty_datalist(real_pair):
    tmp_path, image, label = real_pair
    log = _train(tmp_path, image, label, {"training": [], "validation": []})
    assert "datalist.json: the list under 'training' is empty" in log


def test_image_and_label_of_different_shapes(real_pair):
    tmp_path, image, label = real_pair
    log = _train(tmp_path, image, label[:, :100, :])
    assert "label.tif: label shape (128, 100, 1) differs from image" in log and "image.tif" in log


def test_label_values_outside_class_list(real_pair):
    tmp_path, image, label = real_pair
    label = label.copy()
    label[0, :4, :4] = 9
    log = _train(tmp_path, image, label)
    assert "label.tif: label 'label' has values [9.0] outside the class list 0..6" in log


def test_nan_image(real_pair):
    tmp_path, image, label = real_pair
    image = image.astype(np.float32)
    image[0, 5, 5] = np.nan
    log = _train(tmp_path, image, label)
    assert "image.tif: image 'image' contains NaN" in log


def test_constant_image(real_pair):
    tmp_path, image, label = real_pair
    log = _train(tmp_path, np.full_like(image, 17), label)
    assert "image.tif: image 'image' is constant" in log


def test_inference_on_missing_input_names_it(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"testing": [{"image": "gone.tif"}]}))
    result = bundle_run(
        "inference",
        ["configs/inference.json"],
        {"dataset_dir": str(tmp_path), "datalist": str(tmp_path / "datalist.json"), "output_dir": str(tmp_path / "o")},
        check=False,
    )
    assert result.returncode != 0 and "gone.tif not found" in result.stderr
    assert not (tmp_path / "o").exists()


def test_window_larger_than_volume_is_padded(real_pair):
    """A training window deeper than the volume (5 sections on a single page) is padded, with zero weight."""
    tmp_path, image, label = real_pair
    _write_pages(tmp_path / "image.tif", image)
    _write_pages(tmp_path / "label.tif", label)
    item = {"image": "image.tif", "label": "label.tif"}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item]}))
    overrides = {**TINY, "train_window": [160, 96, 5], "val_window": [160, 160, 5], "max_epochs": 1}
    overrides.update(dataset_dir=str(tmp_path), datalist=str(tmp_path / "datalist.json"), ckpt_dir=str(tmp_path / "m"))
    bundle_run("training", ["configs/train.json"], {**overrides, "output_dir": str(tmp_path / "eval")})
    assert (tmp_path / "m" / "model.pt").is_file()

"""Bad input stops with a message naming the file and the problem, before any training or inference starts."""

import json
from pathlib import Path

import itk
import monai
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_cli import TINY, bundle_run
from conftest import BUNDLE, CONFIG_NETWORK, require_data
from scripts.networks import HybridUNet2D3D
from scripts.preflight import check_overrides, check_window_size


def _write_pages(path, pages):
    itk.imwrite(itk.GetImageFromArray(np.ascontiguousarray(pages)), str(path))


@pytest.fixture
def real_pair(tmp_path):
    """A small real platelet crop (image, labels) written as TIFF pages in a fresh dataset directory."""
    image_path, label_path = require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
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
    return _last_line(result)


def _last_line(result):
    """What a user reads: the last line of stderr."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


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


def _infer(tmp_path, name="image.tif", **overrides):
    """Standard inference on ``tmp_path/name``; returns the last line of stderr of the run, which must fail."""
    (tmp_path / "datalist.json").write_text(json.dumps({"testing": [{"image": name}]}))
    result = bundle_run(
        "inference",
        ["configs/inference.json"],
        {
            "dataset_dir": str(tmp_path),
            "datalist": str(tmp_path / "datalist.json"),
            "output_dir": str(tmp_path / "o"),
            **overrides,
        },
        check=False,
    )
    assert result.returncode != 0, "bad input was accepted"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir()), "inference wrote output"
    return _last_line(result)


def test_inference_on_missing_input_names_it(tmp_path):
    assert "gone.tif not found" in _infer(tmp_path, "gone.tif")


def test_huge_intensities_are_refused_before_they_overflow(real_pair):
    tmp_path, image, label = real_pair
    huge = (image.astype(np.float32) / float(image.max()) * np.float32(3e38)).astype(np.float32)  # finite in float32
    assert "image.tif: image 'image' has intensities up to" in _train(tmp_path, huge, label)
    _write_pages(tmp_path / "image.tif", huge)
    assert "standard deviation overflows float32" in _infer(tmp_path)


def test_truncated_stack_is_refused_not_read_as_its_first_pages(tmp_path):
    (image_path,) = require_data("isbi2012/images.tif")
    data = image_path.read_bytes()
    (tmp_path / "image.tif").write_bytes(data[: len(data) // 2])
    last = _infer(tmp_path)
    assert "image.tif (testing[0]['image']): truncated: page" in last and "copy or export the file again" in last


def test_truncated_single_page_is_refused(tmp_path):
    (image_path,) = require_data("platelet/50-slice0-image.tif")  # its directory precedes its pixels
    data = image_path.read_bytes()
    (tmp_path / "image.tif").write_bytes(data[: len(data) // 2])
    assert "image.tif (testing[0]['image']): truncated: page 1's pixels end" in _infer(tmp_path)


def test_rgb_float64_and_empty_files_are_named_with_what_to_do(real_pair):
    tmp_path, image, _ = real_pair
    itk.imwrite(
        itk.GetImageFromArray(np.stack([image[0]] * 3, -1).astype(np.uint8), is_vector=True), str(tmp_path / "rgb.tif")
    )
    assert "rgb.tif (testing[0]['image']): 3 channels per pixel" in _infer(tmp_path, "rgb.tif")
    import tifffile

    tifffile.imwrite(tmp_path / "f64.tif", image.astype(np.float64))
    assert "float64 pixels, which ITK (the bundle's reader) cannot read: save it as 32-bit float" in _infer(
        tmp_path, "f64.tif"
    )
    (tmp_path / "empty.tif").touch()
    assert "empty.tif (testing[0]['image']): the file is empty (0 bytes)" in _infer(tmp_path, "empty.tif")


def test_unlabelled_value_255_suggests_the_ignore_label(real_pair):
    tmp_path, image, label = real_pair
    label = label.copy()
    label[0, :4, :4] = 255
    assert "set --ignore_label 255" in _train(tmp_path, image, label)


def test_unknown_or_mistyped_overrides_are_named(real_pair):
    tmp_path, image, label = real_pair
    _write_pages(tmp_path / "image.tif", image)
    assert "--overlapp is not a key of ['configs/inference.json']; did you mean --overlap?" in _infer(
        tmp_path, overlapp=0.5
    )
    assert "--overlap: expected a number, got 'abc'" in _infer(tmp_path, overlap="abc")
    assert "--save_probabilities false: write True or False" in _infer(tmp_path, save_probabilities="false")
    argv = [str(Path(monai.__file__).parent / "bundle" / "__main__.py"), "run", "training"]
    train = str([str(BUNDLE / "configs" / "train.json")])
    check_overrides([*argv, "--config_file", train, "--save_minutes", "0.5"])  # minutes: any number, not only whole
    assert "--infer_window: expected 3 values like [1024, 1024, 1], got [64, 64]" in _infer(
        tmp_path, infer_window=[64, 64]
    )


def test_unwritable_output_dir_is_refused_before_inference(real_pair):
    tmp_path, image, _ = real_pair
    _write_pages(tmp_path / "image.tif", image)
    (tmp_path / "a_file").write_text("not a folder")
    last = _infer(tmp_path, output_dir=str(tmp_path / "a_file" / "out"))
    assert f"--output_dir {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is not a writable directory" in last


def test_checkpoint_of_another_width_names_the_checkpoint_and_the_setting(real_pair):
    tmp_path, image, _ = real_pair
    _write_pages(tmp_path / "image.tif", image)
    torch.manual_seed(0)
    torch.save({"model": HybridUNet2D3D(out_channels=7, features=8, **CONFIG_NETWORK).state_dict()}, tmp_path / "w.pt")
    last = _infer(tmp_path, ckpt_path=str(tmp_path / "w.pt"))
    assert f"checkpoint {tmp_path / 'w.pt'} does not fit this network" in last
    assert "(set --network_features 8)" in last


def test_a_rerun_cleans_leftovers_and_reports_the_output_it_replaces(real_pair):
    tmp_path, image, _ = real_pair
    _write_pages(tmp_path / "image.tif", image)
    (tmp_path / "datalist.json").write_text(json.dumps({"testing": [{"image": "image.tif"}]}))
    out = tmp_path / "o"
    out.mkdir()
    leftover = out / ".image_prob.nii.gz.999999999.partial.nii.gz"  # what a kill during a save leaves
    leftover.touch()
    overrides = {
        "dataset_dir": str(tmp_path),
        "datalist": str(tmp_path / "datalist.json"),
        "output_dir": str(out),
        "save_probabilities": True,
    }
    bundle_run("inference", ["configs/inference.json"], overrides)
    assert not leftover.exists()
    assert sorted(p.name for p in out.iterdir()) == ["image_prob.nii.gz", "image_seg.tif"]
    again = bundle_run("inference", ["configs/inference.json"], overrides)
    assert f"replacing the existing {out / 'image_seg.tif'}" in again.stdout + again.stderr


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


@pytest.mark.parametrize("norm, warns", [("instance", True), ("group", True), ("batch", False), (None, False)])
def test_window_smaller_than_the_training_window_warns_for_per_window_normalisation(norm, warns, caplog):
    network = HybridUNet2D3D(1, 3, features=8, num_scales=2, norm=norm)
    check_window_size([128, 256, 1], [256, 256, 1], network, "infer_window")
    message = "--infer_window [128, 256, 1] is smaller in x or y than the training window [256, 256, 1]"
    assert (message in caplog.text) is warns, caplog.text
    caplog.clear()
    check_window_size([256, 320, 5], [256, 256, 1], network, "infer_window")  # as large in x and y: no warning
    assert not caplog.text


def test_training_warns_before_it_starts_when_validation_windows_are_smaller(tmp_path, caplog):
    """train.json's pre-flight passes both windows: validating the real platelet rows on 128 x 128 windows warns."""
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(tmp_path / "m"), "output_dir": str(tmp_path / "e")})
    parser["val_window"] = [128, 128, 1]
    parser.get_parsed_content("preflight")
    assert "--val_window [128, 128, 1] is smaller in x or y than the training window [256, 256, 1]" in caplog.text
    assert "--train_window" not in caplog.text  # the hint for inference of another checkpoint is not given here

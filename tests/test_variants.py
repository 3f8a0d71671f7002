"""Every architecture of the paper (ablations, baselines) builds, trains two steps on the real ISBI stack and
infers, through the same ``monai.bundle run`` commands as the default network."""

import json

import itk
import numpy as np
import pytest
import torch

from bundle_cli import TINY, TRAINING_ONLY, bundle_run
from conftest import SAMPLE_DATA, require_data

VARIANTS = {
    "ablation_no_3x3x3": 3,
    "ablation_no_multiloss": 3,
    "ablation_no_pyramid": 3,
    "baseline_unet2d": 3,
    "baseline_unet3d_thin": 3,
    "baseline_unet3d_thick": 8,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.slow
def test_variant_trains_two_steps_and_infers_on_isbi(variant, tmp_path):
    require_data("isbi2012/images.tif", "isbi2012/labels.tif")
    depth = VARIANTS[variant]
    window, whole = [64, 64, depth], [208, 208, depth]  # validate and infer with few, large windows
    files = ["configs/variants/isbi2012.json", f"configs/variants/{variant}.json"]
    overrides = {
        "dataset_dir": str(SAMPLE_DATA),
        "output_dir": str(tmp_path),
        "train_window": window,
        "val_window": whole,
        "infer_window": whole,
        "windows_per_volume": 2,
        "batch_size": 1,
        "max_epochs": 1,
        "val_interval": 2,
    }
    # narrow versions of each architecture: the test is about building, training and inferring, not accuracy
    if variant.startswith("ablation"):
        overrides["network_def#features"] = 8
    elif variant == "baseline_unet2d":
        overrides["network_def#network#features"] = [8, 16, 32, 64, 128, 8]
    else:
        overrides["network_def#filters"] = [8, 16, 32, 64]
    training = {key: value for key, value in overrides.items() if key != "infer_window"}
    bundle_run("training", ["configs/train.json", *files], {**training, "ckpt_dir": str(tmp_path / "m")})
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 2
    inference = {key: value for key, value in overrides.items() if key not in TRAINING_ONLY}
    bundle_run(
        "inference", ["configs/inference.json", *files], {**inference, "ckpt_path": str(tmp_path / "m" / "model.pt")}
    )
    seg = itk.GetArrayFromImage(itk.imread(str(tmp_path / "images_seg.tif")))
    assert seg.shape == (20, 512, 512) and set(np.unique(seg)) <= {0, 1}


EM_DEFECTS = ("missing_section", "section_shift", "section_blur", "cutblur")


def test_optional_augmentations_switch_on_through_the_config(tmp_path):
    """The EM defects (missing section, misalignment, section blur, CutBlur) and the rotation, scaling, gamma and noise
    of ``study/augment_strong``, all switched on, train on real ISBI windows of 5 sections."""
    require_data("isbi2012/images.tif", "isbi2012/labels.tif")
    overrides = {
        "dataset_dir": str(SAMPLE_DATA),
        "output_dir": str(tmp_path),
        "ckpt_dir": str(tmp_path / "m"),
        "network_def#features": 8,
        "train_window": [64, 64, 5],
        "val_window": [64, 64, 5],
        "windows_per_volume": 2,
        "batch_size": 1,
        "max_epochs": 1,
        "val_interval": 2,
        **{f"{name}_prob": 1.0 for name in (*EM_DEFECTS, "affine", "gamma", "noise")},
    }
    bundle_run("training", ["configs/train.json", "configs/variants/isbi2012.json"], overrides)
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("dataset", ["drosophila_vnc", "cdeep3m_mito"])
def test_licensed_data_set_variant_trains_and_validates(dataset, tmp_path):
    """The Drosophila VNC and CDeep3M variants (data under non-commercial licences, read from ../shared/data) train
    a few steps on their training sections and validate on their held-back ones."""
    require_data(f"{dataset}/images.tif", f"{dataset}/labels.tif")
    overrides = {**TINY, "val_window": [512, 512, 1], "max_epochs": 2, "val_interval": 4}
    overrides.update(output_dir=str(tmp_path / "eval"), ckpt_dir=str(tmp_path / "m"))
    bundle_run("training", ["configs/train.json", f"configs/variants/{dataset}.json"], overrides)
    assert json.loads((tmp_path / "eval" / "training_summary.json").read_text())["steps"] == 4
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)  # written by the validation at step 4
    classes = 5 if dataset == "drosophila_vnc" else 2
    assert state["predictor_3d.weight"].shape[0] == classes

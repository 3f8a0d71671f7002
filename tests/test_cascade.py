"""Coarse-to-fine cascade: stage-1 probabilities as input channels, both stages trained and run through the CLI."""

import json

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import DynUNet
from monai.transforms import Randomizable

from bundle_cli import bundle_run
from conftest import BUNDLE, SAMPLE_DATA, require_data
from scripts.cascade import CoarseProbabilitiesd
from scripts.io import InputError

VARIANTS = BUNDLE / "configs" / "variants"
COARSE_TINY = {"coarse_network_def#filters": [8, 16, 32, 64]}
# one training step per stage, no edge term (the weight map is not under test), validation and inference in one window
STEP = {"windows_per_volume": 2, "batch_size": 2, "max_epochs": 1, "val_interval": 100, "train#weight_map#edge": False}
DATASETS = {
    "platelet": {
        "variant": [],
        "image": "platelet/50-slice0-image.tif",
        "seg": "50-slice0-image_seg.tif",
        "classes": 7,
        "datalist": "configs/datalists/platelet.json",
        # coarse grid (4 x 4 x 1): 200 x 140 training, 200 x 60 validation, 200 x 200 whole
        "stage1": {"train_window": [64, 64, 1], "val_window": [200, 64, 1]},
        "stage2": {"train_window": [128, 128, 1], "val_window": [800, 240, 1]},
        "coarse_window": [200, 200, 1],
        "infer_window": [800, 800, 1],
    },
    "isbi2012": {
        "variant": ["configs/variants/isbi2012.json"],
        "image": "isbi2012/images.tif",
        "seg": "images_seg.tif",
        "classes": 2,
        "datalist": "configs/datalists/isbi2012.json",
        # network grid 8 x 8 x 50 nm (half the variant's resolution, to keep the test short): 256 x 256 x 20;
        # coarse grid (32 x 32 x 50 nm): 64 x 64 x 20
        "overrides": {"target_spacing": [8.0, 8.0, 50.0]},
        "stage1": {"train_window": [32, 32, 5], "val_window": [64, 64, 5]},
        "stage2": {"train_window": [64, 64, 3], "val_window": [256, 256, 5]},
        "coarse_window": [64, 64, 20],
        "infer_window": [256, 256, 20],
    },
}


def _tiny_coarse_network(num_classes: int) -> DynUNet:
    parser = ConfigParser()
    parser.read_config(str(VARIANTS / "cascade_stage1.json"))
    parser["num_classes"] = num_classes
    for key, value in COARSE_TINY.items():
        parser[key] = value
    return parser.get_parsed_content("coarse_network_def")


def test_stage_files_share_the_coarse_definition():
    stage1, stage2 = (json.loads((VARIANTS / f"cascade_stage{i}.json").read_text()) for i in (1, 2))
    assert stage1["coarse_factor"] == stage2["coarse_factor"]
    assert stage1["coarse_network_def"] == stage2["coarse_network_def"]


def test_coarse_probabilities_are_stage_one_on_the_down_sampled_image(tmp_path):
    torch.manual_seed(0)
    network = _tiny_coarse_network(3)
    torch.save(network.state_dict(), tmp_path / "coarse.pt")
    affine = torch.diag(torch.tensor([10.0, 10.0, 50.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.randn(1, 64, 96, 3), affine=affine, meta={"filename_or_obj": "v.tif"})
    transform = CoarseProbabilitiesd("image", _tiny_coarse_network(3), tmp_path / "coarse.pt", [4, 4, 1], [16, 16, 3])
    assert not isinstance(transform, Randomizable)  # cached once per volume by the CacheDataset
    out = transform({"image": image})["image"]
    assert out.shape == (4, 64, 96, 3)
    assert torch.equal(out[:1], image.as_tensor()) and torch.equal(out.affine, affine)
    torch.testing.assert_close(out[1:].sum(0), torch.ones(64, 96, 3))
    torch.testing.assert_close(transform({"image": image})["image"], out)  # deterministic

    # stage 1 on what it trains on (cascade_stage1.json's down-sampling), in one window, up-sampled to the image
    parser = ConfigParser()
    parser.read_config(str(VARIANTS / "cascade_stage1.json"))
    (stage1_zoom,) = parser.get_parsed_content("image_features")
    coarse = stage1_zoom({"image": image.clone()})["image"]
    assert coarse.shape == (1, 16, 24, 3)
    with torch.no_grad():
        expected = torch.softmax(network.eval()(coarse.as_tensor()[None]), 1)
    expected = torch.nn.functional.interpolate(expected, size=(64, 96, 3), mode="trilinear", align_corners=False)
    whole = CoarseProbabilitiesd("image", _tiny_coarse_network(3), tmp_path / "coarse.pt", [4, 4, 1], [16, 24, 3])
    torch.testing.assert_close(whole({"image": image})["image"][1:], expected[0], rtol=1e-4, atol=1e-5)

    with pytest.raises(InputError, match="missing.pt not found: train stage 1 first"):
        CoarseProbabilitiesd("image", network, tmp_path / "missing.pt", [4, 4, 1], [16, 16, 3])


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.slow
def test_both_stages_train_and_one_inference_call_runs_both(dataset, tmp_path):
    case = DATASETS[dataset]
    require_data(case["image"])
    common = {"dataset_dir": str(SAMPLE_DATA), **COARSE_TINY, **case.get("overrides", {})}
    bundle_run(
        "training",
        ["configs/train.json", *case["variant"], "configs/variants/cascade_stage1.json"],
        {**common, **STEP, **case["stage1"], "output_dir": str(tmp_path / "e1"), "ckpt_dir": str(tmp_path / "coarse")},
    )
    stage2 = {
        **common,
        "network_def#features": 8,
        "coarse_checkpoint": str(tmp_path / "coarse" / "model.pt"),
        "coarse_window": case["coarse_window"],
    }
    bundle_run(
        "training",
        ["configs/train.json", *case["variant"], "configs/variants/cascade_stage2.json"],
        {**stage2, **STEP, **case["stage2"], "output_dir": str(tmp_path / "e2"), "ckpt_dir": str(tmp_path / "fine")},
    )
    fine = torch.load(tmp_path / "fine" / "model.pt", weights_only=True)
    first_conv = next(weight for weight in fine.values() if weight.ndim == 5)  # the stem's
    assert first_conv.shape[1] == 1 + case["classes"]  # image + stage-1 probabilities

    bundle_run(
        "inference",
        ["configs/inference.json", *case["variant"], "configs/variants/cascade_stage2.json"],
        {
            **stage2,
            "output_dir": str(tmp_path / "out"),
            "ckpt_path": str(tmp_path / "fine" / "model.pt"),
            "infer_window": case["infer_window"],
        },
    )
    source, seg = itk.imread(str(SAMPLE_DATA / case["image"])), itk.imread(str(tmp_path / "out" / case["seg"]))
    assert itk.GetArrayFromImage(seg).shape == itk.GetArrayFromImage(source).shape
    assert set(np.unique(itk.GetArrayFromImage(seg))) <= set(range(case["classes"]))
    # the geometry is the input's: the datalist's voxel size in x and y, the file's origin
    spacing = json.loads((BUNDLE / case["datalist"]).read_text())["testing"][0]["spacing"]
    np.testing.assert_allclose(np.asarray(itk.spacing(seg))[:2], spacing[:2])  # TIFF keeps no z spacing
    np.testing.assert_allclose(np.asarray(itk.origin(seg)), np.asarray(itk.origin(source)))

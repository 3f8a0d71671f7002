"""The FIB-SEM recipe variants train and infer through the CLI on real EM (platelet slice, ISBI stack)."""

import itk
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle_cli import TINY, TRAINING_ONLY, bundle_run
from conftest import BUNDLE, SAMPLE_DATA, require_data

UNET = ["configs/variants/fibsem_unet.json"]
EFFICIENTNET = ["configs/variants/fibsem_unet.json", "configs/variants/fibsem_efficientnet.json"]
DATASETS = {
    "platelet": ([], "50-slice0-image_seg.tif", (800, 800), range(7)),
    "isbi2012": (["configs/variants/isbi2012.json"], "images_seg.tif", (20, 512, 512), range(2)),
}
RECIPE_TINY = {
    **{key: value for key, value in TINY.items() if not key.startswith("network_def")},
    "train_window": [64, 64, 1],
    "val_window": [224, 224, 1],
    "infer_window": [224, 224, 1],
    "windows_per_volume": 2,
    "max_epochs": 1,
    "val_interval": 1,
    "grain_filter_areas": [20, 80],
}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("variant", [UNET, EFFICIENTNET], ids=["unet_bn_dropout", "efficientnet_b4"])
@pytest.mark.slow
def test_variant_trains_and_infers(variant, dataset, tmp_path):
    require_data("platelet/50-slice0-image.tif", "isbi2012/images.tif")
    data_variant, seg_name, seg_shape, classes = DATASETS[dataset]
    common = {"dataset_dir": str(SAMPLE_DATA), "output_dir": str(tmp_path)}
    overrides = {**RECIPE_TINY, **common}
    if variant == UNET:  # a narrow U-Net; EfficientNet-B4 keeps its own widths
        overrides["network_def#network#features"] = [8, 8, 16, 32, 64, 8]
    train = ["configs/train.json", *data_variant, *variant]
    training = {key: value for key, value in overrides.items() if key != "infer_window"}
    bundle_run("training", train, {**training, "ckpt_dir": str(tmp_path / "models")})
    infer = ["configs/inference.json", *data_variant, *variant]
    inference = {key: value for key, value in overrides.items() if key not in TRAINING_ONLY}
    bundle_run("inference", infer, {**inference, "ckpt_path": str(tmp_path / "models" / "model.pt")})
    seg = itk.GetArrayFromImage(itk.imread(str(tmp_path / seg_name)))
    assert seg.shape == seg_shape
    assert set(np.unique(seg)) <= set(classes)


def test_augmentation_is_rot90_and_flips_of_image_label_and_weight():
    """Meyer et al. augment by rot90 and flips only: train.json's list with its intensity and elastic terms off."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / f) for f in ["configs/train.json", "configs/variants/paper_recipe.json", *UNET]])
    parser["bundle_root"] = str(BUNDLE)
    active = [t for t in parser.get_parsed_content("augmentation") if t.prob > 0]  # even after the paper's recipe
    assert sorted(type(t).__name__ for t in active) == ["RandFlipd"] * 3 + ["RandRotate90d"]
    assert all(set(t.keys) == {"image", "label", "weight"} for t in active)

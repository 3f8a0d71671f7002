"""torch.distributed through the bundle's CLI, as ``torchrun`` starts it (gloo on a CPU): block-wise inference
shared out over two processes equals one process; data-parallel training (configs/multi_gpu_train.json)."""

import pytest
import torch
import zarr
from numpy.testing import assert_array_equal

from bundle_cli import TINY, TORCHRUN_2, bundle_run
from conftest import CONFIG_NETWORK, SAMPLE_DATA, require_data
from scripts.networks import HybridUNet2D3D

pytestmark = pytest.mark.slow  # end-to-end runs through the CLI


def test_two_process_blockwise_inference_equals_one_process(tmp_path):
    require_data("isbi2012/images.tif")
    torch.manual_seed(0)
    torch.save(HybridUNet2D3D(out_channels=2, features=4, **CONFIG_NETWORK).state_dict(), tmp_path / "model.pt")
    common = {
        "dataset_dir": str(SAMPLE_DATA),
        "datalist": "$@bundle_root + '/configs/datalists/isbi2012.json'",
        "class_names": ["cell interior", "membrane"],
        "target_spacing": [4.0, 4.0, 50.0],
        "network_def#features": 4,
        "ckpt_path": str(tmp_path / "model.pt"),
        "infer_window": [128, 128, 5],
        "block_size": [256, 256, 10],  # 8 blocks: 4 for each rank
        "save_uncertainty": True,
    }
    configs = ["configs/inference.json", "configs/large_volume.json"]
    results = {}
    for name, launcher in (("one", None), ("two", TORCHRUN_2)):
        bundle_run("inference", configs, {**common, "output_dir": str(tmp_path / name)}, launcher=launcher)
        results[name] = zarr.open_group(tmp_path / name / "images_seg.zarr", mode="r")
    assert len(list((tmp_path / "two" / "images_seg.zarr.blocks").glob("*.done"))) == 8
    for array in ("labels", "uncertainty"):
        assert_array_equal(results["two"][array][...], results["one"][array][...])
    assert results["one"]["labels"].shape == (20, 512, 512)


def test_two_process_data_parallel_training_through_the_cli(tmp_path):
    require_data("platelet/50-slice0-image.tif")
    overrides = {
        **TINY,
        "dataset_dir": str(SAMPLE_DATA),
        "windows_per_volume": 4,  # 2 steps of 2 windows per rank
        "max_epochs": 1,
        "output_dir": str(tmp_path / "eval"),
        "ckpt_dir": str(tmp_path / "models"),
    }
    result = bundle_run(
        "training", ["configs/train.json", "configs/multi_gpu_train.json"], overrides, launcher=TORCHRUN_2
    )
    log = result.stdout + result.stderr
    assert log.count("train_loss: ") == 2, log[-3000:]  # rank 0 logs; rank 1 trains silently
    assert "val_miou_all" in log
    for name in ("model.pt", "model_last.pt"):  # saved once, without DDP's "module." prefix
        state = torch.load(tmp_path / "models" / name, weights_only=True)
        HybridUNet2D3D(out_channels=7, features=TINY["network_def#features"], **CONFIG_NETWORK).load_state_dict(
            state.get("model", state)
        )

"""MONAI's bundle tools accept the bundle: metadata schema, network in/out, TorchScript export."""

import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, REPO

SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def _monai_bundle(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_verify_metadata_offline():
    if not SCHEMA.is_file():
        pytest.skip(f"metadata schema {SCHEMA} not found beside the checkout")
    result = _monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA))
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_verify_net_in_out():
    result = _monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--n",
        "2",
    )
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_torchscript_export_matches_eager(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    _monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(tmp_path / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    image = torch.randn(1, 1, 64, 48, 3)
    with torch.inference_mode():
        eager = network.eval()(image)
        scripted = exported(image)
    assert eager.shape == (1, 7, 64, 48, 3)
    torch.testing.assert_close(scripted, eager, rtol=1e-4, atol=1e-5)


def test_weight_map_is_cached_before_any_random_transform():
    """W is computed once per volume (inside the CacheDataset's deterministic part), never per training step."""
    from monai.transforms import Randomizable

    from scripts.weights import WeightMapd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    assert any(isinstance(t, WeightMapd) for t in transforms)
    assert not any(isinstance(t, Randomizable) for t in transforms), "a random transform would stop the caching"
    assert parser["train#dataset#_target_"] == "CacheDataset" and parser["train#dataset#cache_rate"] == 1.0

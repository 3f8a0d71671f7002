"""Precision chosen from the machine (``scripts.precision``)."""

import pytest
import torch

from scripts import precision
from scripts.networks import HybridUNet2D3D


def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert precision.resolve_precision("auto", "cpu") == "float32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("float32", "cpu") == "float32"
    assert precision.resolve_precision("auto", "cuda") == "float32"  # CUDA: the configs' amp switch instead
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp16", "cpu")


def test_bf16_hooks_run_the_forward_in_bf16_and_keep_the_checkpoint_keys(capsys):
    torch.manual_seed(0)
    plain = HybridUNet2D3D(features=4, out_channels=3).eval()
    keys = list(plain.state_dict())
    fast = precision.with_precision(HybridUNet2D3D(features=4, out_channels=3).eval(), "bf16", "cpu")
    fast.load_state_dict(plain.state_dict())
    assert "precision: bf16" in capsys.readouterr().out
    assert list(fast.state_dict()) == keys
    x = torch.randn(1, 1, 32, 32, 1)
    out = fast(x)
    assert out.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # the context is left after the forward
    torch.testing.assert_close(out.float(), plain(x), atol=0.1, rtol=0.1)
    assert precision.with_precision(plain, "float32", "cpu")(x).dtype == torch.float32


def test_blockwise_inference_follows_the_precision_setting():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE

    assert precision.blockwise_bf16("auto", "cpu") == (precision.resolve_precision("auto", "cpu") == "bf16")
    assert precision.blockwise_bf16("bf16", "cpu") and not precision.blockwise_bf16("float32", "cpu")
    for asked in ("float32", "bf16"):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs/inference.json"), str(BUNDLE / "configs/large_volume.json")])
        parser.update({"bundle_root": str(BUNDLE), "precision": asked, "device": "cpu"})
        assert parser.get_parsed_content("bf16") == (asked == "bf16")

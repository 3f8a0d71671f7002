"""The pretrained model that ships in ``bundle/models/``: what a user gets right after cloning.

``python -m tools.release`` trained it and wrote ``docs/results.json``; these tests check that the shipped files
are the ones listed, load as users load them, and still give the figures the model card states."""

import hashlib
import json

import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.bundle import ConfigParser, load

from bundle_cli import bundle_run
from conftest import BUNDLE, CONFIG_NETWORK, REPO, SAMPLE_DATA, require_data
from scripts.io import InputError
from scripts.networks import HybridUNet2D3D

RESULTS = json.loads((BUNDLE / "docs" / "results.json").read_text())


def _inference_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    return parser.get_parsed_content("network_def")


def test_shipped_files_are_listed_small_and_load_as_users_load_them():
    listing = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert {e["path"] for e in listing} == {"models/model.pt", "models/model.ts"}
    for entry in listing:
        data = (BUNDLE / entry["path"]).read_bytes()
        assert len(data) < 25 * 1024 * 1024
        assert hashlib.new(entry["hash_type"], data).hexdigest() == entry["hash_val"], entry["path"]

    network = _inference_network().eval()
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))  # strict: exactly inference.json's network_def
    scripted, meta, _ = load(name="bundle", bundle_dir=str(REPO), model_file="models/model.ts", load_ts_module=True)
    assert meta["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    image = torch.randn(1, 1, 64, 64, 3)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(image), network(image), rtol=1e-4, atol=1e-5)


def test_first_inference_after_cloning_gives_the_model_cards_figures(tmp_path):
    """Plain ``run inference --config_file configs/inference.json`` with the shipped weights on the platelet slice,
    then the evaluation: MIoU within 0.01 of docs/results.json, and the model card prints those figures."""
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    common = {"dataset_dir": str(SAMPLE_DATA), "output_dir": str(tmp_path)}
    bundle_run("inference", ["configs/inference.json"], common)
    bundle_run("evaluating", ["configs/evaluate.json"], common)
    mean = json.loads((tmp_path / "metrics.json").read_text())["mean"]
    card = (BUNDLE / "docs" / "README.md").read_text()
    for key in ("miou_all", "miou_org"):
        assert mean[key] == pytest.approx(RESULTS["mean"][key], abs=0.01), key
        assert f"{RESULTS['mean'][key]:.3f}" in card, f"model card lacks {key} {RESULTS['mean'][key]:.3f}"


def test_a_window_smaller_than_the_training_window_warns_and_does_segment_worse(tmp_path):
    """The shipped model normalises per window (instance norm): on the real platelet rows, 128 x 128 windows give a
    clearly lower MIoU than its 256 x 256 training window (docs/results.json), and inference says so beforehand."""
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    common = {"dataset_dir": str(SAMPLE_DATA), "output_dir": str(tmp_path)}
    result = bundle_run("inference", ["configs/inference.json"], {**common, "infer_window": [128, 128, 1]})
    assert "--infer_window [128, 128, 1] is smaller in x or y than the training window [256, 256, 1]" in (
        result.stdout + result.stderr
    )
    bundle_run("evaluating", ["configs/evaluate.json"], common)
    small = json.loads((tmp_path / "metrics.json").read_text())["mean"]
    print(f"shipped model, 128 x 128 windows: {small['miou_all']:.3f} / {small['miou_org']:.3f}")
    assert small["miou_all"] < RESULTS["mean"]["miou_all"] - 0.05


def _finetune_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("train.json", "variants/finetune.json")])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


def test_finetune_variant_starts_from_the_shipped_weights():
    """MONAI's CheckpointLoader, enabled by the variant, loads the shipped weights when training starts."""
    parser = _finetune_parser()
    network = parser.get_parsed_content("network")
    shipped = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    shipped = shipped.get("model", shipped)
    assert not torch.equal(network.state_dict()["predictor_2d.weight"], shipped["predictor_2d.weight"])
    parser.get_parsed_content("train#handlers#0")(Engine(lambda engine, batch: None))
    assert all(torch.equal(value.cpu(), shipped[key]) for key, value in network.state_dict().items())
    assert parser.get_parsed_content("ckpt_dir").endswith("runs/finetuned")  # the shipped file is not overwritten


def test_finetune_from_weights_of_another_network_is_refused_in_the_preflight(tmp_path):
    torch.save(HybridUNet2D3D(out_channels=7, features=8, **CONFIG_NETWORK).state_dict(), tmp_path / "w.pt")
    parser = _finetune_parser(pretrained_checkpoint=str(tmp_path / "w.pt"), ckpt_dir=str(tmp_path / "models"))
    with pytest.raises(RuntimeError) as failure:  # MONAI wraps what the component raises
        parser.get_parsed_content("preflight")
    assert isinstance(failure.value.__cause__, InputError)
    assert f"checkpoint {tmp_path / 'w.pt'} does not fit this network" in str(failure.value.__cause__)
    assert "(set --network_features 8)" in str(failure.value.__cause__)

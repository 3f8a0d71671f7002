"""Training checkpoints: atomic, never NaN, never replacing an earlier run's unasked, and resumable after a kill."""

import signal
import subprocess
import time

import pytest
import torch
from ignite.engine import Engine

from bundle_cli import TINY, bundle_command, bundle_run
from conftest import BUNDLE, CONFIG_NETWORK, SAMPLE_DATA, require_data
from scripts.checkpoints import BestCheckpoint, TrainingCheckpoint
from scripts.io import InputError, load_weights
from scripts.networks import HybridUNet2D3D

# 2 steps an epoch on the platelet volume, long enough (about 0.3 s a step) to be killed mid-run; with a weight
# average, the most state to restore
RESUMABLE = {
    **TINY, "train_window": [192, 192, 1], "max_epochs": 14, "save_minutes": 0, "val_interval": 10,
    "weight_average_decay": 0.99,
}  # fmt: skip


def _platelet(tmp_path, name):
    return {
        "dataset_dir": str(SAMPLE_DATA),
        "ckpt_dir": str(tmp_path / name),
        "output_dir": str(tmp_path / f"{name}_eval"),
    }


def _saved_epoch(path):
    try:
        return torch.load(path, weights_only=True)["trainer"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.slow
def test_training_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    require_data("platelet/50-slice0-image.tif")
    bundle_run("training", ["configs/train.json"], {**RESUMABLE, **_platelet(tmp_path, "whole")})

    killed = _platelet(tmp_path, "killed")
    process = subprocess.Popen(
        bundle_command("training", ["configs/train.json"], {**RESUMABLE, **killed}),
        cwd=BUNDLE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while _saved_epoch(tmp_path / "killed" / "model_last.pt") < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint of epoch 3 within 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= _saved_epoch(tmp_path / "killed" / "model_last.pt") < RESUMABLE["max_epochs"], "not killed mid-run"

    resumed = bundle_run("training", ["configs/train.json"], {**RESUMABLE, **killed, "resume": True})
    assert "resuming" in resumed.stdout
    whole, again = (torch.load(tmp_path / name / "model_last.pt", weights_only=True) for name in ("whole", "killed"))
    assert again["trainer"]["iteration"] == whole["trainer"]["iteration"] == 2 * RESUMABLE["max_epochs"]
    for part in ("model", "averaged"):
        for key, value in whole[part].items():
            assert torch.equal(value, again[part][key]), f"{part} {key} differs after the resume"
    assert whole["best"] == again["best"]
    assert not list((tmp_path / "killed").glob(".*partial*"))


def test_a_second_run_does_not_replace_the_first_runs_checkpoints(tmp_path):
    require_data("platelet/50-slice0-image.tif")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"earlier run")
    result = bundle_run("training", ["configs/train.json"], {**TINY, **_platelet(tmp_path, "models")}, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "--ckpt_dir" in last and "model.pt" in last and "--overwrite True" in last and "--resume True" in last
    assert (tmp_path / "models" / "model.pt").read_bytes() == b"earlier run"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]

    nothing = bundle_run(
        "training", ["configs/train.json"], {**TINY, **_platelet(tmp_path, "new"), "resume": True}, check=False
    )
    assert nothing.returncode != 0 and "nothing to resume" in nothing.stderr.strip().splitlines()[-1]


def test_default_checkpoint_folder_is_not_the_shipped_models_folder():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE)})
    assert parser.get_parsed_content("ckpt_dir") == f"{BUNDLE}/runs/models"


def _engine_with_loss(loss):
    return Engine(lambda engine, batch: [{"loss": torch.tensor(loss)}])


def test_diverged_loss_stops_training_and_nothing_is_saved(tmp_path):
    network = HybridUNet2D3D(out_channels=2, features=4, **CONFIG_NETWORK)
    checkpoint = TrainingCheckpoint(
        str(tmp_path), network, torch.optim.SGD(network.parameters(), lr=0.1), save_minutes=0
    )
    engine = _engine_with_loss(float("nan"))
    checkpoint.attach(engine)
    with pytest.raises(InputError, match="training diverged at step 1: the loss is nan"):
        engine.run([0, 1], max_epochs=1)
    assert not list(tmp_path.iterdir())

    with torch.no_grad():
        next(network.parameters())[0] = float("nan")
    with pytest.raises(InputError, match="hold NaN or inf"):
        checkpoint.save(_engine_with_loss(1.0))
    validator = _engine_with_loss(1.0)
    validator.state.metrics, validator.state.key_metric_name = {"miou": 0.5}, "miou"
    validator.state.best_metric, validator.state.best_metric_epoch, validator.state.epoch = 0.5, 1, 1
    with pytest.raises(InputError, match="hold NaN or inf"):
        BestCheckpoint(str(tmp_path), network)(validator)
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_width_names_the_setting(tmp_path):
    torch.save({"model": HybridUNet2D3D(out_channels=7, features=8, **CONFIG_NETWORK).state_dict()}, tmp_path / "m.pt")
    with pytest.raises(
        InputError,
        match=r"m\.pt does not fit this network .*network_features: its first layer has 8 filters, this network 16 "
        r"\(set --network_features 8\)",
    ):
        load_weights(HybridUNet2D3D(out_channels=7, features=16, **CONFIG_NETWORK), tmp_path / "m.pt")
    with pytest.raises(InputError, match="the class list: this network predicts 2 classes"):
        load_weights(HybridUNet2D3D(out_channels=2, features=8, **CONFIG_NETWORK), tmp_path / "m.pt")
    with pytest.raises(InputError, match="the architecture: .* layers only in the checkpoint"):
        load_weights(
            HybridUNet2D3D(out_channels=7, features=8, norm="instance", upsample="transposed"), tmp_path / "m.pt"
        )

"""Helpers to run the bundle's CLI (``python -m monai.bundle run ...``) in a subprocess from ``bundle/``."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BUNDLE

# a tiny network and windows: enough to learn something on one CPU core in a minute
TINY = {
    "network_def#features": 8,
    "train_window": [128, 128, 1],
    "val_window": [192, 192, 1],
    "windows_per_volume": 4,
    "batch_size": 2,
    "val_interval": 20,
}
# small but able to learn: what the trained-beats-untrained tests use
SMALL = {**TINY, "network_def#features": 16, "windows_per_volume": 20, "val_interval": 50, "learning_rate": 3e-3}


# keys of train.json that inference.json lacks: tests that share one dict of settings drop them for inference (an
# unknown key is an error)
TRAINING_ONLY = {"val_window", "windows_per_volume", "batch_size", "max_epochs", "val_interval", "learning_rate"}

# two processes on one machine, as `torchrun --standalone --nproc_per_node=2` starts them (gloo on a CPU)
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def bundle_command(
    run_id: str, config_files: list[str], overrides: dict, launcher: list[str] | None = None
) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file [...] --key value ...`` as an argument list."""
    command = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", run_id]
    command += ["--config_file", json.dumps(config_files)]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return command


def bundle_run(
    run_id: str,
    config_files: list[str],
    overrides: dict,
    check: bool = True,
    timeout: int = 600,
    launcher: list[str] | None = None,
):
    """Run ``python -m monai.bundle run <run_id> --config_file [...] --key value ...`` and return the result.

    ``launcher`` replaces ``python`` (e.g. ``TORCHRUN_2``)."""
    command = bundle_command(run_id, config_files, overrides, launcher)
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result

"""The shape of the paper's Table 1 and Figure 4 on the real platelet slice, at CPU scale.

Trains ``instances`` seeds of the 2D-3D+3x3x3 network, its three ablations and the 2D U-Net baseline on the
training region (y < 560) and evaluates them, and their top-k ensembles, on the validation region (y >= 560),
through ``tools.experiments``. CPU scale: every network at a quarter of the paper's width (16 base features for
the 2D-3D family, 16-256 for the U-Net), single-section 256x256 windows, ``max_epochs`` x 50 windows. Prints
Table 1 and writes it, with the per-instance figures, to JSON. Resumes like the runner: a second call only
re-prints.

Usage (from the repository root): python benchmarks/table1.py [--instances 3] [--max_epochs 4]
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE), str(REPO)]  # the bundle package `scripts` and the tools package
from scripts.io import SAMPLE_DATA  # noqa: E402
from tools.experiments import ExperimentRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

VARIANTS = ["hybrid", "ablation_no_3x3x3", "ablation_no_multiloss", "ablation_no_pyramid", "baseline_unet2d"]
QUARTER_WIDTH_UNET2D = {"network_def#network#features": [16, 32, 64, 128, 256, 16]}


def main(
    instances: int = 3,
    max_epochs: int = 4,
    workdir: str = "runs/table1_cpu",
    data_dir: str | None = None,
    output: str = "benchmarks/results/table1_cpu.json",
) -> None:
    data_dir = Path(data_dir) if data_dir else SAMPLE_DATA
    if not (data_dir / "platelet" / "50-slice0-image.tif").exists():
        print(f"SKIPPED: the real platelet slice is not in {data_dir}/platelet (it ships in sample_data/)")
        return
    start = time.time()
    workdir = Path(workdir).resolve()
    os.chdir(BUNDLE)  # config paths are relative to the bundle root, as with `python -m monai.bundle run`
    runner = ExperimentRunner(
        str(workdir),
        recipe=["configs/variants/demo_cpu.json"],
        overrides={"max_epochs": max_epochs},
        variant_overrides={"baseline_unet2d": QUARTER_WIDTH_UNET2D},
        dataset_dir=str(data_dir),
        ensemble_sizes=[2, 3],
    )
    runner.run(VARIANTS, instances)
    with open(workdir / "table1.csv", newline="") as f:
        table = list(csv.DictReader(f))
    with open(workdir / "instances.csv", newline="") as f:
        per_instance = list(csv.DictReader(f))
    report = {
        "settings": {
            "instances": instances,
            "max_epochs": max_epochs,
            "windows_per_epoch": 50,
            "window": [256, 256, 1],
        },
        "table1": table,
        "instances": per_instance,
        "seconds_this_call": round(time.time() - start, 1),
    }
    print(f"\nTable 1 (markdown): {workdir / 'table1.md'}\nper class: {workdir / 'per_class.md'}")
    write_report(report, output)


if __name__ == "__main__":
    fire.Fire(main)

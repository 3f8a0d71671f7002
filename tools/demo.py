"""The main job end to end on real sample data: train, segment, evaluate, draw.

Runs the bundle's own CLI (``python -m monai.bundle run ...``) exactly as a user would, from the bundle root.
Uses the real platelet SBF-SEM slice that ships in the repository's ``sample_data/``.

Usage (from the repository root; relative paths start at ``bundle/``):
``python -m tools.demo --workdir ../runs/demo [--seed N] [--max_minutes M]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fire
import numpy as np

from scripts.io import data_root, load_class_schema, load_datalist, output_path
from scripts.pictures import save_comparison_png
from scripts.transforms import source_volume_loading
from tools import BUNDLE_ROOT

DEMO_VARIANT = "configs/variants/demo_cpu.json"


def _bundle_run(run_id: str, config_files: list[str], overrides: dict) -> None:
    """``python -m monai.bundle run <run_id>`` in the bundle root with ``--key value`` overrides."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(config_files)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    print("\n$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=BUNDLE_ROOT, check=True)


def main(workdir: str = "../runs/demo", seed: int = 0, max_minutes: float | None = None) -> None:
    """Train on the platelet slice, segment it, print metrics and write a picture.

    Args:
        workdir: where checkpoints, predictions, metrics and the picture go (relative to ``bundle/``).
        seed: the training run's random seed (windows, augmentation, initial weights).
        max_minutes: the training budget; None keeps the demo variant's 5 minutes.
    """
    start = time.time()
    workdir = (BUNDLE_ROOT / workdir).resolve()
    datalist, dataset_dir = BUNDLE_ROOT / "configs" / "datalists" / "platelet.json", data_root("platelet")
    print(f"real EM: platelet SBF-SEM slice from {dataset_dir / 'platelet'}")
    common = {"dataset_dir": dataset_dir, "datalist": datalist, "output_dir": workdir / "eval"}
    budget = {} if max_minutes is None else {"max_minutes": max_minutes}
    training = {**common, **budget, "seed": seed, "ckpt_dir": workdir / "models", "overwrite": True}
    _bundle_run("training", ["configs/train.json", DEMO_VARIANT], training)
    _bundle_run(
        "inference", ["configs/inference.json", DEMO_VARIANT], {**common, "ckpt_path": workdir / "models" / "model.pt"}
    )
    _bundle_run("evaluating", ["configs/evaluate.json"], common)

    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    mean = metrics["mean"]
    names = load_class_schema(BUNDLE_ROOT / "configs" / "metadata.json")["names"]
    item = load_datalist(datalist, dataset_dir, key="validation")[0]
    item["pred"] = str(output_path(item["image"], workdir / "eval", "seg"))
    volumes = source_volume_loading(["image", "label", "pred"])(item)
    picture = save_comparison_png(
        *(np.asarray(volumes[k][0]) for k in ("image", "label", "pred")),
        path=workdir / "eval" / "comparison.png",
        class_names=names,
        title=f"validation region MIoU(all) {mean['miou_all']:.3f}, MIoU(org) {mean['miou_org']:.3f}",
    )
    found = ", ".join(f"{r['class']} {r['found']} of {r['gt_objects']}" for r in metrics["objects"] if r["gt_objects"])
    print(
        f"\nvalidation region: MIoU(all) = {mean['miou_all']:.4f}, MIoU(org) = {mean['miou_org']:.4f}"
        f"\nobjects found: {found}"
        f"\npicture: {picture}\nmetrics: {workdir / 'eval' / 'metrics.csv'}\ntotal time: {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    os.chdir(BUNDLE_ROOT)  # relative paths in the arguments start at bundle/, as the configs' do
    fire.Fire(main)

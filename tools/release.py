"""Train, export and document the model that ships in ``models/``: one command, from the repository root.

1. trains the default recipe, ``configs/train.json``, for ``--max_minutes`` on the real platelet slice's training
   region (rows y < 560), validating on rows y >= 560 every ``--val_interval`` steps, checkpoints in
   ``<workdir>/models``;
2. copies the best checkpoint (validation MIoU(all)) to ``models/model.pt`` and exports it to TorchScript
   (``models/model.ts``, MONAI's ``ckpt_export``), and lists both with their hashes in ``large_files.yml``;
3. segments the slice with plain ``configs/inference.json`` and the shipped weights, as a user's first run does,
   evaluates the validation region (rows y >= 560) with ``configs/evaluate.json``, and writes the figures to
   ``docs/results.json`` and the overlay picture to ``docs/images/``; prints the tables the model card shows.

Usage (from the repository root; relative paths start at ``bundle/``):
``python -m tools.release [--max_minutes 30] [--workdir ../runs/release] [--train True]``.
``--train False`` repeats steps 2-3 from the checkpoint of an earlier call (capitalised: Fire reads a lowercase
``false`` as a string, which trains).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
import yaml

from scripts.io import atomic_path, data_root, write_json_atomically
from tools import BUNDLE_ROOT
from tools.tables import markdown_table

RECIPE = ["configs/train.json"]
SHIPPED = ["models/model.pt", "models/model.ts"]
RESULTS = BUNDLE_ROOT / "docs" / "results.json"
PICTURE = BUNDLE_ROOT / "docs" / "images" / "platelet_validation.png"


def _bundle(*args: str) -> None:
    """``python -m monai.bundle <args>`` in the bundle root, echoed, stopping on failure."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    print("\n$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=BUNDLE_ROOT, check=True)


def _replace(source: Path, destination: Path) -> None:
    """Copy through a temporary name and an atomic rename."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)


def write_large_files(paths: list[str]) -> Path:
    """``large_files.yml`` as the model zoo lists weights: path, hash and hash type (no download URL: they ship)."""
    entries = []
    for relative in paths:
        digest = hashlib.sha256((BUNDLE_ROOT / relative).read_bytes()).hexdigest()
        entries.append({"path": relative, "hash_val": digest, "hash_type": "sha256"})
    listing = BUNDLE_ROOT / "large_files.yml"
    with atomic_path(listing) as tmp:
        tmp.write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
    return listing


def _chosen_precision() -> str:
    from scripts.precision import resolve_precision

    return resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")


def main(
    workdir: str = "../runs/release",
    train: bool = True,
    data_dir: str | None = None,
    max_minutes: float = 30.0,
    val_interval: int = 250,
) -> None:
    """Train (unless ``train`` is False), ship, evaluate and document the pretrained model.

    Args:
        max_minutes: the training budget (``--max_minutes`` of ``run training``).
        val_interval: validation (and best-checkpoint) interval in steps.
        workdir: training checkpoints, predictions and evaluation (relative to ``bundle/``).
        train: False reuses ``<workdir>/models/model.pt`` from an earlier call.
        data_dir: the folder holding ``platelet/``; default the repository's ``sample_data``.
    """
    start = time.time()
    workdir = (BUNDLE_ROOT / workdir).resolve()
    data_dir = Path(data_dir).resolve() if data_dir else data_root("platelet")
    if not (data_dir / "platelet" / "50-slice0-image.tif").exists():
        sys.exit(f"the real platelet slice is not in {data_dir}/platelet: the shipped model is trained on it only")
    checkpoint = workdir / "models" / "model.pt"
    common = ["--dataset_dir", str(data_dir)]
    if train:
        _bundle(
            "run", "training", "--config_file", json.dumps(RECIPE), *common,
            "--ckpt_dir", str(workdir / "models"), "--output_dir", str(workdir / "train"), "--overwrite", "True",
            "--max_minutes", str(max_minutes), "--val_interval", str(val_interval),
        )  # fmt: skip
    elif not checkpoint.is_file():
        sys.exit(f"{checkpoint} not found: run with --train true first")

    (BUNDLE_ROOT / "models").mkdir(exist_ok=True)
    _replace(checkpoint, BUNDLE_ROOT / SHIPPED[0])
    state = torch.load(BUNDLE_ROOT / SHIPPED[0], map_location="cpu", weights_only=True)
    export = ["ckpt_export", "network_def", "--filepath", SHIPPED[1], "--ckpt_file", SHIPPED[0]]
    export += ["--key_in_ckpt", "model"] if "model" in state else []
    _bundle(*export, "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")
    write_large_files(SHIPPED)

    # what a user's first run does: plain inference.json with the shipped weights, then the evaluation
    prediction = workdir / "eval"
    _bundle("run", "inference", "--config_file", "configs/inference.json", *common, "--output_dir", str(prediction))
    _bundle("run", "evaluating", "--config_file", "configs/evaluate.json", *common, "--output_dir", str(prediction))
    metrics = json.loads((prediction / "metrics.json").read_text())
    overlay = next(prediction.glob("*_overlay.png"))
    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    _replace(overlay, PICTURE)

    summary = json.loads((workdir / "train" / "training_summary.json").read_text())
    train_seconds = summary["seconds"]
    results = {
        "command": f"python -m tools.release --max_minutes {max_minutes:g}",
        "recipe": RECIPE,
        "steps": summary["steps"],
        "train_seconds": round(train_seconds),
        "threads": summary.get("threads"),  # summaries written before it was recorded lack it
        "precision": _chosen_precision(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "validation": "platelet/50-slice0, rows y >= 560 (trained on rows y < 560)",
        "mean": metrics["mean"],
        "objects": metrics["objects"],
        "picture": str(PICTURE.relative_to(BUNDLE_ROOT)),
    }
    write_json_atomically(results, RESULTS)
    mean = metrics["mean"]
    print(f"\nshipped: {', '.join(SHIPPED)}; figures: {RESULTS}; picture: {PICTURE}")
    print(f"validation MIoU(all) {mean['miou_all']:.4f}, MIoU(org) {mean['miou_org']:.4f}")
    per_class = [{"class": name, "IoU": iou, "Dice": mean["dice"][name]} for name, iou in mean["iou"].items()]
    print("\n" + markdown_table(per_class))
    columns = ["class", "gt_objects", "found", "missed", "under_detected", "pred_objects"]
    header = ["class", "GT objects", "found", "missed", "under-detected", "predicted objects"]
    print("\n" + markdown_table(metrics["objects"], columns, header))
    print(f"\ntotal {time.time() - start:.0f} s (training {train_seconds:.0f} s)")


if __name__ == "__main__":
    os.chdir(BUNDLE_ROOT)  # relative paths in the arguments start at bundle/, as the configs' do
    fire.Fire(main)

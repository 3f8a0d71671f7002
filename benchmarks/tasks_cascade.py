"""Task-based class selection and the coarse-to-fine cascade (seed 002) on the real platelet slice, at CPU scale.

Four trainings on the training region (y < 560) with one budget, each evaluated on the validation region
(y >= 560) through the bundle's CLI, as a user runs it:

- ``full``: the 7-class network (``demo_cpu.json`` shortened to ``max_epochs`` x 50 windows of 256 x 256 x 1);
- ``mito_only``: the same with ``configs/tasks/mito_only.json`` (background, mitochondrion);
- ``cascade``: stage 1, a DynUNet (16-128 filters) on the slice down-sampled 4 x 4 x 1, with the same number of
  steps on 64 x 64 x 1 windows of the coarse grid; then stage 2, the ``full`` network with the image and stage 1's
  probabilities as input and the same steps as ``full``; one inference call runs both.

Prints MIoU(all), MIoU(org), per-class IoU, seconds and the peak resident memory of each CLI process (the
``ru_maxrss`` of that process alone, from ``os.wait4``), and writes them as JSON.

Usage (from the repository root): python benchmarks/tasks_cascade.py [--max_epochs 4] [--windows_per_epoch 50]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RECIPE = ["configs/variants/demo_cpu.json"]
TASK = ["configs/variants/task.json"]
STAGE1 = ["configs/variants/cascade_stage1.json"]
STAGE2 = ["configs/variants/cascade_stage2.json"]
COARSE = {"coarse_network_def#filters": [16, 32, 64, 128], "coarse_window": [200, 200, 1]}
STAGE1_WINDOWS = {"train_window": [64, 64, 1], "val_window": [200, 64, 1]}


def run_cli(run_id: str, configs: list[str], overrides: dict, log: Path) -> dict:
    """One ``python -m monai.bundle run`` from ``bundle/``; its seconds and its own peak RSS in MiB."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=BUNDLE, stdout=out, stderr=subprocess.STDOUT)
        # wait4 reports this child's own resources (getrusage(RUSAGE_CHILDREN) would give the largest child so far)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def experiment(
    name: str, workdir: Path, common: dict, train: list[tuple[list[str], dict]], infer: tuple, evaluate: list[str]
) -> dict:
    """Train the stages in order, infer once, evaluate; return the scores and the cost of every process.

    Args:
        name: the run's folder under ``workdir``.
        common: overrides of every inference and training process.
        train: per stage, the variant files after ``train.json`` and the overrides.
        infer: the variant files after ``inference.json`` and the overrides.
        evaluate: the variant files after ``evaluate.json``.
    """
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    processes = {}
    for stage, (configs, overrides) in enumerate(train, 1):
        out = {"output_dir": str(root / f"stage{stage}"), "ckpt_dir": str(root / f"stage{stage}")}
        overrides = {**common, **overrides, **out}
        processes[f"train_stage{stage}"] = run_cli(
            "training", ["configs/train.json", *configs], overrides, root / f"stage{stage}.log"
        )
    configs, overrides = infer
    out = {**common, **overrides, "output_dir": str(root / "prediction")}
    ckpt = str(root / f"stage{len(train)}" / "model.pt")
    processes["inference"] = run_cli(
        "inference", ["configs/inference.json", *configs], {**out, "ckpt_path": ckpt}, root / "inference.log"
    )
    processes["evaluation"] = run_cli(
        "evaluating",
        ["configs/evaluate.json", *evaluate],
        {"dataset_dir": common["dataset_dir"], "output_dir": out["output_dir"]},
        root / "eval.log",
    )
    mean = json.loads((root / "prediction" / "metrics.json").read_text())["mean"]
    training = [p for k, p in processes.items() if k.startswith("train")]
    return {
        "miou_all": mean["miou_all"],
        "miou_org": mean["miou_org"],
        "iou": mean["iou"],
        "train_seconds": round(sum(p["seconds"] for p in training), 1),
        "train_peak_rss_mib": max(p["peak_rss_mib"] for p in training),
        "inference_peak_rss_mib": processes["inference"]["peak_rss_mib"],
        "processes": processes,
    }


def main(
    max_epochs: int = 4,
    windows_per_epoch: int = 50,
    workdir: str = "runs/tasks_cascade",
    data_dir: str | None = None,
    output: str = "benchmarks/results/tasks_cascade.json",
) -> None:
    data_dir = Path(data_dir) if data_dir else REPO / "sample_data"
    if not (data_dir / "platelet" / "50-slice0-image.tif").exists():
        print(f"SKIPPED: the real platelet slice is not in {data_dir}/platelet (it ships in sample_data/)")
        return
    workdir = (REPO / workdir).resolve()
    common = {"dataset_dir": str(data_dir)}
    budget = {"max_epochs": max_epochs, "windows_per_volume": windows_per_epoch, "seed": 0}  # one per network
    start = time.time()
    results = {
        "full": experiment("full", workdir, common, [(RECIPE, budget)], (RECIPE, {}), []),
        "mito_only": experiment("mito_only", workdir, common, [(RECIPE + TASK, budget)], (RECIPE + TASK, {}), TASK),
    }
    stage2 = {**COARSE, "coarse_checkpoint": str(workdir / "cascade" / "stage1" / "model.pt")}
    results["cascade"] = experiment(
        "cascade",
        workdir,
        common,
        [(RECIPE + STAGE1, {**budget, **COARSE, **STAGE1_WINDOWS}), (RECIPE + STAGE2, {**budget, **stage2})],
        (RECIPE + STAGE2, stage2),
        [],
    )
    report = {
        "data": "platelet/50-slice0 (800 x 800 x 1): train y < 560, evaluate y >= 560",
        "settings": {
            "recipe": "configs/variants/demo_cpu.json (16 features, 256 x 256 x 1 windows, batch 1)",
            "max_epochs": max_epochs,
            "steps_per_network": max_epochs * windows_per_epoch,
            "cascade_stage1": "DynUNet 16-128 filters on the 4 x 4 x 1 down-sampled slice, 64 x 64 x 1 windows",
            "cpus": os.cpu_count(),
        },
        "results": results,
        "seconds_total": round(time.time() - start, 1),
    }
    header = ["run", "MIoU(all)", "MIoU(org)", "IoU mito", "train s", "train MiB", "infer MiB"]
    print("\n" + "  ".join(f"{h:>10}" for h in header))
    for name, r in results.items():
        row = [r["miou_all"], r["miou_org"], r["iou"]["mitochondrion"]]
        row += [r["train_seconds"], r["train_peak_rss_mib"], r["inference_peak_rss_mib"]]
        print(f"{name:>10}  " + "  ".join(f"{v:>10.3f}" if i < 3 else f"{v:>10.1f}" for i, v in enumerate(row)))
    for name, r in results.items():
        print(f"{name} IoU: " + ", ".join(f"{c} {v:.3f}" for c, v in r["iou"].items()))
        costs = [f"{k} {p['seconds']} s {p['peak_rss_mib']} MiB" for k, p in r["processes"].items()]
        print(f"{name} processes: " + ", ".join(costs))
    print(f"total {report['seconds_total']} s")
    write_report(report, output)


if __name__ == "__main__":
    fire.Fire(main)

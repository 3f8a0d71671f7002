"""Experiment runner of the paper's Table 1 and Figure 4: many seeds per architecture, ranking, top-k ensembles.

For every variant (``hybrid`` = ``configs/train.json`` alone, any other name = ``configs/variants/<name>.json`` on
top of it) it trains N instances that differ only in their random seed, runs inference and evaluation on the
datalist's validation section, ranks the instances by MIoU(all), and evaluates the top-k ensembles of each
variant. All runs go through ``monai.bundle.run``, the code path of ``python -m monai.bundle run``.

The tables and the histogram written to ``workdir`` come from ``tools.experiment_tables``.

It resumes: an instance or ensemble whose ``result.json`` exists is not run again; one without it (killed part
way) is started afresh.

Usage (from the repository root; relative paths start at ``bundle/``)::

    python -m tools.experiments run --variants "['hybrid','ablation_no_pyramid']" --instances 3 \
        --workdir ../runs/table1 --recipe configs/variants/demo_cpu.json
    python -m tools.experiments tables --workdir ../runs/table1
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import monai.bundle

from scripts.io import write_json_atomically
from tools import BUNDLE_ROOT
from tools.experiment_tables import BASE_VARIANT, collect_results, write_tables


def variant_files(variant: str, recipe: Sequence[str] = ()) -> list[str]:
    """Config override files of a variant after the recipe files (e.g. a CPU-scale recipe), relative to the bundle.

    ``"a+b"`` combines variants: ``a``'s file, then ``b``'s (e.g. ``"study/norm_batch+study/sampling_uniform"``)."""
    files = list(recipe)
    if variant == BASE_VARIANT:
        return files
    for part in variant.split("+"):
        path = f"configs/variants/{part}.json"
        if not (BUNDLE_ROOT / path).is_file():
            known = sorted(p.stem for p in (BUNDLE_ROOT / "configs" / "variants").glob("*.json"))
            raise ValueError(
                f"variant '{part}' (of '{variant}'): {BUNDLE_ROOT / path} does not exist; known: {BASE_VARIANT}, "
                f"{known}"
            )
        files.append(path)
    return files


def count_parameters(config_files: Sequence[str], overrides: dict) -> int:
    """Trainable parameters of the config's ``network_def``."""
    parser = monai.bundle.ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / f) for f in config_files])
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    network = parser.get_parsed_content("network_def")
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def read_evaluation(eval_dir: Path) -> dict:
    """MIoU(all), MIoU(org), per-class scores and object counts from an evaluation's metrics.json and metrics.csv."""
    summary = json.loads((eval_dir / "metrics.json").read_text())
    with open(eval_dir / "metrics.csv", newline="") as f:
        per_class = {
            row["class"]: {k: float(row[k]) for k in ("iou", "dice", "precision", "recall")}
            for row in csv.DictReader(f)
            if row["volume"] == "ALL"
        }
    objects: dict[str, dict] = {}
    for row in summary["objects"]:  # summed over volumes
        counts = objects.setdefault(row["class"], {"gt_objects": 0, "found": 0, "missed": 0, "under_detected": 0})
        for key in counts:
            counts[key] += int(row[key])
    return {
        "miou_all": summary["mean"]["miou_all"],
        "miou_org": summary["mean"]["miou_org"],
        "pixel_error": summary["mean"].get("pixel_error"),
        "per_class": per_class,
        "objects": objects,
    }


class ExperimentRunner:
    """Trains, evaluates and ranks instances of bundle variants; see the module docstring.

    Args:
        workdir: where instances, ensembles and tables go.
        recipe: config files put between ``train.json``/``inference.json`` and each variant's file (e.g. a
            CPU-scale recipe such as ``configs/variants/demo_cpu.json``).
        overrides: ``key: value`` overrides of every run (top-level keys, or ids present in both ``train.json`` and
            ``inference.json``), e.g. ``{"max_epochs": 2}``.
        variant_overrides: further overrides per variant name, e.g. a narrower baseline.
        datalist: datalist JSON with ``training``, ``validation`` and ``testing`` sections.
        dataset_dir: base directory of the datalist's relative paths.
        ensemble_sizes: the k of the top-k ensembles evaluated per variant (those with k above the number of
            instances are skipped).
        ensemble_mode: ``mean`` of the softmax (the paper) or majority ``vote``.
        dataset_files: config files of a data set (its datalist, classes and spacing, e.g.
            ``configs/variants/drosophila_vnc.json``), applied before each variant's file (which may override the
            spacing) in training and inference, and in evaluation.
    """

    def __init__(
        self,
        workdir: str,
        recipe: Sequence[str] = (),
        overrides: dict | None = None,
        variant_overrides: dict[str, dict] | None = None,
        datalist: str = "configs/datalists/platelet.json",
        dataset_dir: str = "../sample_data",
        ensemble_sizes: Sequence[int] = (2, 3, 4),
        ensemble_mode: str = "mean",
        dataset_files: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.dataset_files = [dataset_files] if isinstance(dataset_files, str) else list(dataset_files)
        self.recipe = [recipe] if isinstance(recipe, str) else list(recipe)
        self.overrides = dict(overrides or {})
        self.variant_overrides = dict(variant_overrides or {})
        self.common = {
            "datalist": str((BUNDLE_ROOT / datalist).resolve()),
            "dataset_dir": str((BUNDLE_ROOT / dataset_dir).resolve()),
        }
        for key, path in self.common.items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"{key} {path} does not exist (relative paths start at {BUNDLE_ROOT})")
        self.ensemble_sizes = [int(k) for k in ensemble_sizes if int(k) >= 2]
        if ensemble_mode not in ("mean", "vote"):
            raise ValueError(f"ensemble_mode must be 'mean' or 'vote', got '{ensemble_mode}'")
        self.ensemble_mode = ensemble_mode
        self.trained = 0

    def _files(self, variant: str) -> list[str]:
        return variant_files(variant, [*self.recipe, *self.dataset_files])

    def _overrides(self, variant: str) -> dict:
        return {**self.overrides, **self.variant_overrides.get(variant, {})}

    def infer_and_evaluate(self, variant: str, out_dir: Path, extra_files: Sequence[str], overrides: dict) -> dict:
        """Segment the validation split with ``variant`` (and ``extra_files``), evaluate it in ``out_dir/eval``."""
        eval_dir = out_dir / "eval"
        monai.bundle.run(
            "inference",
            config_file=["configs/inference.json", *self._files(variant), *extra_files],
            output_dir=str(eval_dir),
            **self.common,
            **self._overrides(variant),
            **overrides,
        )
        monai.bundle.run(
            "evaluating",
            config_file=["configs/evaluate.json", *self.dataset_files],
            prediction_dir=str(eval_dir),
            output_dir=str(eval_dir),
            **self.common,
        )
        return read_evaluation(eval_dir)

    def train_instance(self, variant: str, seed: int) -> dict:
        """Train, infer and evaluate one instance, unless its ``result.json`` exists; return that result."""
        out_dir = self.workdir / variant / f"seed{seed:03d}"
        result_file = out_dir / "result.json"
        train_files = ["configs/train.json", *self._files(variant)]
        settings = {"config_files": train_files, "overrides": self._overrides(variant), **self.common}
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if result["settings"] != settings:
                raise ValueError(
                    f"{result_file} was trained with other settings:\n  {result['settings']}\nnot\n  {settings}\n"
                    "use another workdir for new settings, or the same settings to resume"
                )
            return result
        if out_dir.exists():  # left by a killed run: start afresh rather than trust half-written files
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        print(f"\n=== {variant}, seed {seed}: training ===", flush=True)
        start = time.time()
        monai.bundle.run(
            "training",
            config_file=train_files,
            seed=seed,
            ckpt_dir=str(out_dir / "models"),
            output_dir=str(out_dir / "train"),
            **self.common,
            **self._overrides(variant),
        )
        train_seconds = time.time() - start
        summary_file = out_dir / "train" / "training_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        checkpoint = out_dir / "models" / "model.pt"
        scores = self.infer_and_evaluate(variant, out_dir, [], {"ckpt_path": str(checkpoint)})
        result = {
            "variant": variant,
            "seed": seed,
            "parameters": count_parameters(train_files, self._overrides(variant)),
            "checkpoint": str(checkpoint),
            "train_seconds": round(train_seconds, 1),
            "steps": summary.get("steps"),
            "settings": settings,
            **scores,
        }
        write_json_atomically(result, result_file)
        self.trained += 1
        return result

    def evaluate_ensemble(self, variant: str, ranked: list[dict], k: int) -> dict:
        """Evaluate the top-k ensemble of a variant's ranked instances, unless done for the same members."""
        members = ranked[:k]
        out_dir = self.workdir / variant / f"top{k}"
        result_file = out_dir / "result.json"
        seeds = [m["seed"] for m in members]
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if result["members"] == seeds and result["mode"] == self.ensemble_mode:
                return result
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        print(f"\n=== {variant}: top-{k} ensemble of seeds {seeds} ({self.ensemble_mode}) ===", flush=True)
        scores = self.infer_and_evaluate(
            variant,
            out_dir,
            ["configs/ensemble.json"],
            {"ensemble_checkpoints": [m["checkpoint"] for m in members], "ensemble_mode": self.ensemble_mode},
        )
        result = {"variant": variant, "k": k, "members": seeds, "mode": self.ensemble_mode, **scores}
        write_json_atomically(result, result_file)
        return result

    def run(self, variants: Sequence[str], instances: int, first_seed: int = 0) -> dict:
        """Train ``instances`` seeds of each variant, evaluate its top-k ensembles, write the tables."""
        variants = [variants] if isinstance(variants, str) else list(variants)
        for variant in variants:  # a misspelt variant fails now, not after hours of training
            variant_files(variant, self.recipe)
        results = {}
        for variant in variants:
            ranked = sorted(
                (self.train_instance(variant, seed) for seed in range(first_seed, first_seed + instances)),
                key=lambda r: r["miou_all"],
                reverse=True,
            )
            ensembles = [self.evaluate_ensemble(variant, ranked, k) for k in self.ensemble_sizes if k <= len(ranked)]
            results[variant] = {"instances": ranked, "ensembles": ensembles}
        write_tables(self.workdir, results)
        print(f"\n{self.trained} instance(s) trained in this call; tables in {self.workdir}")
        return results


def run(
    variants: Sequence[str] | str = (BASE_VARIANT,),
    instances: int = 3,
    workdir: str = "../runs/experiments",
    recipe: Sequence[str] | str = (),
    overrides: dict | None = None,
    datalist: str = "configs/datalists/platelet.json",
    dataset_dir: str = "../sample_data",
    ensemble_sizes: Sequence[int] = (2, 3, 4),
    ensemble_mode: str = "mean",
    first_seed: int = 0,
) -> None:
    """Train ``instances`` seeds of every variant, rank them, evaluate top-k ensembles and write the tables.

    Args:
        variants: ``hybrid`` (the paper's 2D-3D+3x3x3 network) and/or names of files in ``configs/variants/``.
        instances: seeds per variant.
        workdir: output directory (relative to ``bundle/``); a second call with the same settings trains nothing.
        recipe: config file(s) applied before each variant's file, e.g. ``configs/variants/demo_cpu.json``.
        overrides: ``key: value`` overrides of every run, e.g. ``"{'max_epochs': 2}"``.
        datalist: datalist JSON (training, validation and testing sections).
        dataset_dir: base directory of the datalist's relative paths.
        ensemble_sizes: k of the top-k ensembles.
        ensemble_mode: ``mean`` or ``vote``.
        first_seed: seed of the first instance; instance i uses ``first_seed + i``.
    """
    runner = ExperimentRunner(
        workdir,
        recipe,
        overrides,
        datalist=datalist,
        dataset_dir=dataset_dir,
        ensemble_sizes=ensemble_sizes,
        ensemble_mode=ensemble_mode,
    )
    runner.run(variants, instances, first_seed)


def tables(workdir: str = "../runs/experiments") -> None:
    """Rewrite the tables and the histogram from the finished results in ``workdir``."""
    workdir = Path(workdir).resolve()
    results = collect_results(workdir)
    if not results:
        raise FileNotFoundError(f"no finished instance (*/seed*/result.json) in {workdir}")
    write_tables(workdir, results)


if __name__ == "__main__":
    os.chdir(BUNDLE_ROOT)  # relative paths in the arguments start at bundle/, as the configs' do
    fire.Fire({"run": run, "tables": tables})

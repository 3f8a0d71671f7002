"""Recipe study: which training recipe learns organelles fastest on a CPU, on four real EM data sets.

Every arm is a variant file trained for the same wall-clock budget (``--max_minutes``) and evaluated on each data
set's validation split, through the experiment runner (``tools.experiments.ExperimentRunner``), so an arm is a
plain ``python -m monai.bundle run training --config_file "['configs/train.json', <arm>, <data set>]"``:

- ``hybrid``: ``configs/train.json`` alone, the bundle's default recipe;
- ``monai_unet_baseline``: plain MONAI (2D ``UNet``, ``DiceCELoss``, random windows, Adam 1e-3);
- ``paper_recipe``: the paper's exact recipe (``configs/variants/paper_recipe.json``);
- ``study/<name>``: one factor changed from the default (``configs/variants/study/<name>.json``).

Arms run ``--workers`` at a time, one thread each, so that every arm meets the same machine. It resumes: a finished
(data set, arm, seed) is not trained again. Writes, under ``--output`` (default ``benchmarks/results``):
``recipe_study.json`` (every instance, with the CPU model and flags, the commit and library versions),
``recipe_study_<data set>.md/.csv`` (one table per data set) and ``recipe_study_summary.md/.csv/.png``.

Usage (from the repository root)::

    python benchmarks/recipe_study.py run --datasets "['platelet','drosophila_vnc']" \\
        --arms "['hybrid','monai_unet_baseline','study/norm_batch']" --seeds 2 --max_minutes 5
    python benchmarks/recipe_study.py tables
    python benchmarks/recipe_study.py reevaluate tta "{'tta_axes': [0, 1]}"   # the same checkpoints, test-time flips
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE), str(REPO)]  # the bundle package `scripts` and the tools package
from scripts.io import atomic_path, data_root, write_csv_atomically, write_json_atomically  # noqa: E402
from tools.experiments import BASE_VARIANT, ExperimentRunner, variant_files  # noqa: E402
from tools.tables import markdown_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

#: data set -> (datalist, data set variant file, a file that must exist under the data directory)
DATASETS = {
    "platelet": ("configs/datalists/platelet.json", None, "platelet/50-slice0-image.tif"),
    "isbi2012": ("configs/datalists/isbi2012.json", "configs/variants/isbi2012.json", "isbi2012/images.tif"),
    "drosophila_vnc": (
        "configs/datalists/drosophila_vnc.json",
        "configs/variants/drosophila_vnc.json",
        "drosophila_vnc/images.tif",
    ),
    "cdeep3m_mito": (
        "configs/datalists/cdeep3m_mito.json",
        "configs/variants/cdeep3m_mito.json",
        "cdeep3m_mito/images.tif",
    ),
}
BASELINE = "monai_unet_baseline"
#: every finished instance under a workdir: ``<budget>min/<data set>/<arm>/seed<k>/result.json``
INSTANCE_RESULTS = "*min/*/**/seed*/result.json"
DEFAULT_ARMS = [BASE_VARIANT, BASELINE, "paper_recipe"]


def arm_name(arm: str) -> str:
    variant, _, label = arm.partition(":")
    name = "default" if variant == BASE_VARIANT else variant.replace("study/", "")
    return f"{name}:{label}" if label else name


def study_runner(dataset: str, workdir: Path, data_dir: Path | None, max_minutes: float) -> ExperimentRunner:
    """The experiment runner of one data set's arms: its datalist and variant file, the time budget, no ensembles."""
    datalist, variant, _ = DATASETS[dataset]
    return ExperimentRunner(
        str(workdir / dataset),
        # the time budget alone ends training (max_epochs out of reach), and validation comes once, at the end
        overrides={"max_minutes": max_minutes, "max_epochs": 10**6, "val_interval": 10**9},
        datalist=datalist,
        dataset_dir=str(data_dir or data_root(dataset)),
        dataset_files=[variant] if variant else [],
        ensemble_sizes=[],
    )


def _jobs(datasets: Sequence[str], arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    return [(d, a, s) for s in seeds for d in datasets for a in arms]


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """Seeds ``0 .. seeds - 1`` for a count, or the seeds listed."""
    return list(range(seeds)) if isinstance(seeds, int) else [int(seed) for seed in seeds]


def _available(datasets: Sequence[str], data_dir: Path | None) -> list[str]:
    found = []
    for dataset in datasets:
        if dataset not in DATASETS:
            raise ValueError(f"unknown data set '{dataset}'; known: {sorted(DATASETS)}")
        marker = (data_dir or data_root(dataset)) / DATASETS[dataset][2]
        if marker.is_file():
            found.append(dataset)
        else:
            print(f"SKIPPED {dataset}: {marker} not found (non-commercial data sets live in ../shared/data)")
    return found


def worker(
    index: int,
    workers: int,
    datasets: Sequence[str],
    arms: Sequence[str],
    seeds: Sequence[int],
    max_minutes: float,
    workdir: str,
    data_dir: str,
) -> None:
    """Train and evaluate this worker's share of the jobs (every ``workers``-th one from ``index``)."""
    os.chdir(BUNDLE)  # config paths are relative to the bundle root, as with `python -m monai.bundle run`
    for n, (dataset, arm, seed) in enumerate(_jobs(datasets, arms, seeds)):
        if n % workers == index:
            study_runner(dataset, Path(workdir), Path(data_dir) if data_dir else None, max_minutes).train_instance(
                arm, seed
            )


def run(
    datasets: Sequence[str] = tuple(DATASETS),
    arms: Sequence[str] = tuple(DEFAULT_ARMS),
    seeds: int | Sequence[int] = 2,
    max_minutes: float = 5.0,
    workers: int = 2,
    workdir: str = "runs/recipe_study",
    data_dir: str | None = None,
    output: str = "benchmarks/results",
) -> None:
    """Train every (data set, arm, seed) for ``max_minutes``, ``workers`` at a time, then write the tables.

    Args:
        datasets: names of ``DATASETS``; those absent from ``data_dir`` are skipped with a message.
        arms: ``hybrid`` (the default recipe) or variant names (``monai_unet_baseline``, ``study/norm_batch``).
        seeds: seeds per arm and data set (``2``: seeds 0 and 1), or the seeds to train (``"[1]"``).
        max_minutes: training budget of every arm (validation at the end comes on top).
        workers: arms trained at once, one thread each (this machine's cores).
        workdir: the study's runs, per budget (``<workdir>/<max_minutes>min/<data set>/<arm>/seed<k>``).
        data_dir: one folder holding every data set; default each data set's own (``sample_data/`` for the
            platelet and ISBI samples, ``../shared/data`` for the others).
        output: where the tables and JSON go.
    """
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    arms = [arms] if isinstance(arms, str) else list(arms)
    os.chdir(BUNDLE)
    for arm in arms:  # a misspelt arm fails now, not after hours of training
        variant_files(arm)
    os.chdir(REPO)
    data_path = Path(data_dir).resolve() if data_dir else None
    datasets = _available(datasets, data_path)
    budget_dir = (REPO / workdir / f"{max_minutes:g}min").resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(k), str(workers), json.dumps(datasets), json.dumps(arms)]
            + [json.dumps(seed_list(seeds)), str(max_minutes), str(budget_dir), str(data_path or "")],
            env=env,
        )
        for k in range(workers)
    ]
    failed = [p.args for p in processes if p.wait() != 0]
    print(f"study part done in {(time.time() - start) / 60:.1f} min")
    tables(workdir, output)
    if failed:
        raise RuntimeError(f"{len(failed)} worker(s) failed; finished instances are kept, rerun to resume")


def reevaluate(
    label: str,
    overrides: dict,
    workdir: str = "runs/recipe_study",
    data_dir: str | None = None,
    output: str = "benchmarks/results",
) -> None:
    """Evaluate every trained instance under ``workdir`` again with inference ``overrides``, as arm ``<arm>:<label>``.

    The same checkpoints, another way of inferring (``label`` ``no_tta`` with ``"{'tta_axes': []}"``, say): each
    result goes to ``<budget>/<data set>/<arm>:<label>/seed<k>/`` and the tables show it beside its arm. Resumes
    like ``run``.

    Args:
        label: name of the evaluation, appended to the arm's name.
        overrides: ``inference.json`` keys and values.
        workdir, data_dir, output: as for ``run``.
    """
    if not label or ":" in label or "/" in label:
        raise ValueError(f"label must be a plain name (no ':' or '/'), got {label!r}")
    root = (REPO / workdir).resolve()
    os.chdir(BUNDLE)
    for result_file in sorted(root.glob(INSTANCE_RESULTS)):
        trained = json.loads(result_file.read_text())
        if ":" in trained["variant"]:
            continue
        budget, dataset = result_file.relative_to(root).parts[:2]
        out_dir = root / budget / dataset / f"{trained['variant']}:{label}" / result_file.parent.name
        if (out_dir / "result.json").is_file():
            if json.loads((out_dir / "result.json").read_text())["evaluated_with"] != overrides:
                raise ValueError(f"{out_dir} was evaluated with other overrides; use another label")
            continue
        print(f"\n=== {dataset}, {trained['variant']}, {result_file.parent.name}: evaluating with {overrides} ===")
        out_dir.mkdir(parents=True, exist_ok=True)
        runner = study_runner(dataset, root / budget, Path(data_dir) if data_dir else None, 0.0)
        scores = runner.infer_and_evaluate(
            trained["variant"], out_dir, [], {"ckpt_path": trained["checkpoint"], **overrides}
        )
        result = {**trained, "variant": f"{trained['variant']}:{label}", "evaluated_with": overrides, **scores}
        write_json_atomically(result, out_dir / "result.json")
    os.chdir(REPO)
    tables(workdir, output)


def _collect(workdir: Path) -> list[dict]:
    results = []
    for result_file in sorted(workdir.glob(INSTANCE_RESULTS)):
        result = json.loads(result_file.read_text())
        relative = result_file.relative_to(workdir).parts
        result["budget_minutes"] = float(relative[0].removesuffix("min"))
        result["dataset"] = relative[1]
        results.append(result)
    return results


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN: a class absent from labels and predictions
    return statistics.fmean(values) if values else float("nan")


def _rows(results: list[dict]) -> list[dict]:
    """One row per (budget, data set, arm): means over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["budget_minutes"], r["dataset"], r["variant"]), []).append(r)
    rows = []
    for (budget, dataset, arm), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        all_scores = [r["miou_all"] for r in runs]
        row = {
            "budget_min": f"{budget:g}",
            "dataset": dataset,
            "arm": arm_name(arm),
            "seeds": len(runs),
            "miou_all": _mean(all_scores),
            "miou_all_sd": statistics.stdev(all_scores) if len(runs) > 1 else 0.0,
            "miou_org": _mean([r["miou_org"] for r in runs]),
            "pixel_error": _mean([r["pixel_error"] for r in runs if r.get("pixel_error") is not None]),
        }
        for name in runs[0]["per_class"]:
            row[f"iou {name}"] = _mean([r["per_class"][name]["iou"] for r in runs])

        def per_seed(key: str) -> str:  # an object count averaged over the seeds, to a tenth
            return f"{round(sum(c[key] for r in runs for c in r['objects'].values()) / len(runs), 1):g}"

        row["objects found"] = f"{per_seed('found')} of {per_seed('gt_objects')}"
        row["objects missed"] = per_seed("missed")
        steps = [r.get("steps") for r in runs if r.get("steps") is not None]
        row["steps"] = round(statistics.fmean(steps)) if steps else "n/a"
        row["minutes"] = round(statistics.fmean(r["train_seconds"] for r in runs) / 60, 1)
        rows.append(row)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["budget_min"], r["dataset"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (budget, dataset) in zip(axes[0], panels):
        subset = [r for r in rows if (r["budget_min"], r["dataset"]) == (budget, dataset)]
        subset.sort(key=lambda r: r["miou_org"])
        names = [r["arm"] for r in subset]
        ax.barh(names, [r["miou_org"] for r in subset], color="tab:orange", label="MIoU(org)")
        ax.plot([r["miou_all"] for r in subset], names, "k|", markersize=14, label="MIoU(all)")
        ax.set_title(f"{dataset}, {budget} min")
        ax.set_xlim(0, 1)
        ax.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=90)
    plt.close(figure)


def tables(workdir: str = "runs/recipe_study", output: str = "benchmarks/results") -> None:
    """Write and print the per-data-set tables, the summary and the plot from the finished instances."""
    results = _collect((REPO / workdir).resolve())
    if not results:
        raise FileNotFoundError(f"no finished instance under {REPO / workdir}")
    rows = _rows(results)
    out = (REPO / output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    printed = []
    for dataset in sorted({r["dataset"] for r in rows}):
        subset = [r for r in rows if r["dataset"] == dataset]
        write_csv_atomically(subset, out / f"recipe_study_{dataset}.csv")
        text = f"## {dataset}\n\n{markdown_table(subset)}\n"
        with atomic_path(out / f"recipe_study_{dataset}.md") as tmp:
            tmp.write_text(text)
        printed.append(text)
    summary = []
    for row in rows:
        label = row["arm"].partition(":")[2]
        baseline = f"{BASELINE}:{label}" if label else BASELINE  # like with like: re-evaluated arms against theirs
        base = [
            r
            for r in rows
            if (r["budget_min"], r["dataset"], r["arm"]) == (row["budget_min"], row["dataset"], baseline)
        ]
        beats = "n/a"
        if base and row["arm"] != baseline:
            won = row["miou_all"] > base[0]["miou_all"] and row["miou_org"] > base[0]["miou_org"]
            beats = "yes" if won else "no"
        summary.append(
            {k: row[k] for k in ("budget_min", "dataset", "arm", "seeds", "miou_all", "miou_org", "steps")}
            | {"beats plain MONAI on both": beats}
        )
    write_csv_atomically(summary, out / "recipe_study_summary.csv")
    summary_text = f"## Summary (means over seeds)\n\n{markdown_table(summary)}\n"
    with atomic_path(out / "recipe_study_summary.md") as tmp:
        tmp.write_text(summary_text)
    _plot(rows, out / "recipe_study_summary.png")
    write_report({"rows": rows, "instances": results}, out / "recipe_study.json")
    print("\n".join(printed) + "\n" + summary_text)


if __name__ == "__main__":
    fire.Fire({"run": run, "worker": worker, "tables": tables, "reevaluate": reevaluate})

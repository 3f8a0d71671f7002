"""Tables and the histogram of the experiment runner (``tools.experiments``): the paper's Table 1 and Figure 4.

Written to the run's ``workdir``: ``table1.md/.csv`` ((a) best ensemble per architecture, (b) best single network
with its parameter count, (c) baselines), ``per_class.md/.csv`` (per-class F1, precision, recall and objects found,
for each row of Table 1), ``instances.csv`` (every instance with its rank) and ``miou_histogram.png`` (Figure 4).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from scripts.io import atomic_path, write_csv_atomically  # noqa: E402
from tools.tables import markdown_table  # noqa: E402

BASE_VARIANT = "hybrid"
# the paper's names of its architectures (Table 1); other variants are listed under their file name
PAPER_NAMES = {
    BASE_VARIANT: "2D-3D+3x3x3",
    "ablation_no_3x3x3": "2D-3D",
    "ablation_no_multiloss": "2D-3D+3x3x3, no multi-loss",
    "ablation_no_pyramid": "2D-3D+3x3x3, no 3D pyramid",
    "baseline_unet2d": "2D U-Net",
    "baseline_unet3d_thin": "3D U-Net thin",
    "baseline_unet3d_thick": "3D U-Net thick",
}


def display_name(variant: str) -> str:
    """The paper's name of a variant, or the variant's own name."""
    return PAPER_NAMES.get(variant, variant)


def is_baseline(variant: str) -> bool:
    """Baselines go to section (c) of Table 1."""
    return variant.startswith("baseline")


def collect_results(workdir: Path) -> dict:
    """Finished instances (ranked by MIoU(all)) and ensembles of every variant found in ``workdir``."""
    results = {}
    for variant_dir in sorted(p for p in workdir.iterdir() if p.is_dir()):
        instances = [json.loads(f.read_text()) for f in sorted(variant_dir.glob("seed*/result.json"))]
        if not instances:
            continue
        ensembles = [json.loads(f.read_text()) for f in sorted(variant_dir.glob("top*/result.json"))]
        results[variant_dir.name] = {
            "instances": sorted(instances, key=lambda r: r["miou_all"], reverse=True),
            "ensembles": sorted(ensembles, key=lambda r: r["k"]),
        }
    return results


def _objects_found(result: dict) -> str:
    found = sum(c["found"] for c in result["objects"].values())
    total = sum(c["gt_objects"] for c in result["objects"].values())
    return f"{found} of {total}"


def table1_rows(results: dict) -> list[dict]:
    """Rows of Table 1: (a) best ensemble per architecture, (b) best single network, (c) baselines."""
    rows = []
    for variant, entry in results.items():
        if entry["ensembles"]:
            best = max(entry["ensembles"], key=lambda r: r["miou_all"])
            rows.append({"section": "(a) ensembles", "name": f"Top-{best['k']} {display_name(variant)}", **_row(best)})
    for variant, entry in results.items():
        best, n = entry["instances"][0], len(entry["instances"])
        section = "(c) baselines" if is_baseline(variant) else "(b) single networks"
        name = f"{display_name(variant)} ({best['parameters'] / 1e6:.2f} M), best of {n}"
        rows.append({"section": section, "name": name, **_row(best)})
    order = ["(a) ensembles", "(b) single networks", "(c) baselines"]
    return sorted(rows, key=lambda r: order.index(r["section"]))  # stable: keeps the variants' order


def _row(result: dict) -> dict:
    return {
        "eval_miou_all": result["miou_all"],
        "eval_miou_org": result["miou_org"],
        "organelles_found": _objects_found(result),
        "_result": result,
    }


def write_tables(workdir: str | Path, results: dict) -> str:
    """Write Table 1, the per-class table, the instance list and the histogram; return Table 1 as Markdown."""
    workdir = Path(workdir)
    rows = table1_rows(results)
    columns = ["section", "name", "eval_miou_all", "eval_miou_org", "organelles_found"]
    write_csv_atomically([{c: r[c] for c in columns} for r in rows], workdir / "table1.csv")
    table1 = markdown_table(rows, columns, ["", "network", "Eval MIoU(all)", "Eval MIoU(org)", "organelles found"])
    distribution = [
        {
            "name": display_name(v),
            "n": len(e["instances"]),
            "mean": statistics.fmean(r["miou_all"] for r in e["instances"]),
            "sd": statistics.stdev([r["miou_all"] for r in e["instances"]]) if len(e["instances"]) > 1 else 0.0,
            "min": e["instances"][-1]["miou_all"],
            "max": e["instances"][0]["miou_all"],
        }
        for v, e in results.items()
    ]
    spread = markdown_table(
        distribution, ["name", "n", "mean", "sd", "min", "max"], ["network", "instances", "mean", "sd", "min", "max"]
    )
    markdown = f"## Table 1\n\n{table1}\n\n## Eval MIoU(all) over instances (Figure 4)\n\n{spread}\n"
    with atomic_path(workdir / "table1.md") as tmp:
        tmp.write_text(markdown)

    per_class = []
    for row in rows:
        result = row["_result"]
        for name, scores in result["per_class"].items():
            objects = result["objects"].get(name, {})
            per_class.append(
                {
                    "network": row["name"],
                    "class": name,
                    "f1": scores["dice"],
                    "precision": scores["precision"],
                    "recall": scores["recall"],
                    "iou": scores["iou"],
                    **{k: objects.get(k, "") for k in ("gt_objects", "found", "missed", "under_detected")},
                }
            )
    write_csv_atomically(per_class, workdir / "per_class.csv")
    per_class_columns = ["network", "class", "f1", "precision", "recall", "gt_objects", "found", "missed"]
    header = ["network", "class", "F1", "precision", "recall", "objects", "found", "missed"]
    with atomic_path(workdir / "per_class.md") as tmp:
        tmp.write_text(markdown_table(per_class, per_class_columns, header) + "\n")

    instances = [
        {
            "variant": v,
            "rank": rank,
            "seed": r["seed"],
            "parameters": r["parameters"],
            "miou_all": r["miou_all"],
            "miou_org": r["miou_org"],
            "train_seconds": r["train_seconds"],
            "checkpoint": r["checkpoint"],
        }
        for v, e in results.items()
        for rank, r in enumerate(e["instances"], start=1)
    ]
    write_csv_atomically(instances, workdir / "instances.csv")
    save_histogram(results, workdir / "miou_histogram.png")
    print(markdown)
    return table1


def save_histogram(results: dict, path: Path, bins: int = 10) -> Path:
    """Normalised histograms of per-instance eval MIoU(all), one per variant, on shared bins (Figure 4)."""
    values = {display_name(v): [r["miou_all"] for r in e["instances"]] for v, e in results.items()}
    everything = [x for xs in values.values() for x in xs]
    low, high = min(everything), max(everything)
    if high - low < 1e-3:
        low, high = low - 0.01, high + 0.01
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, xs in values.items():
        _, _, patches = axes.hist(
            xs, bins=bins, range=(low, high), density=True, histtype="step", linewidth=2, label=f"{name} (n={len(xs)})"
        )
        # a tick per instance: with a handful of seeds the ticks say more than the bars
        axes.plot(xs, [0] * len(xs), "|", markersize=14, color=patches[0].get_edgecolor())
    axes.set_xlabel("eval MIoU(all) of an instance")
    axes.set_ylabel("density")
    axes.set_title("Per-instance eval MIoU(all) by architecture")
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path

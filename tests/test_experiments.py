"""The experiment runner: N seeds of a variant on the real platelet slice, ranking, top-k ensemble, tables, resume."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_DATA, require_data
from tools.experiment_tables import table1_rows
from tools.experiments import ExperimentRunner, variant_files

TINY_RUN = {
    "network_def#features": 8,
    "train_window": [128, 128, 1],
    "val_window": [192, 192, 1],
    "infer_window": [192, 192, 1],
    "windows_per_volume": 4,
    "batch_size": 2,
    "val_interval": 4,
    "max_epochs": 2,
}


def _runner_command(workdir, overrides=TINY_RUN):
    return [
        sys.executable,
        "-m",
        "tools.experiments",
        "run",
        "--variants",
        "['hybrid']",
        "--instances",
        "3",
        "--ensemble_sizes",
        "[2]",
        "--workdir",
        str(workdir),
        "--dataset_dir",
        str(SAMPLE_DATA),
        "--overrides",
        json.dumps(overrides),
    ]


def test_runner_trains_ranks_tabulates_and_resumes_on_platelet(tmp_path):
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    workdir = tmp_path / "table1"
    first = subprocess.run(_runner_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-5000:]
    assert "3 instance(s) trained in this call" in first.stdout

    for name in ("table1.md", "table1.csv", "per_class.md", "per_class.csv", "instances.csv", "miou_histogram.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "miou_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the ranking follows the MIoU(all) each instance's own evaluation measured
    with open(workdir / "instances.csv", newline="") as f:
        instances = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in instances] == [1, 2, 3]
    assert sorted(int(r["seed"]) for r in instances) == [0, 1, 2]
    measured = [
        json.loads((workdir / "hybrid" / f"seed{int(r['seed']):03d}" / "eval" / "metrics.json").read_text())["mean"][
            "miou_all"
        ]
        for r in instances
    ]
    assert [float(r["miou_all"]) for r in instances] == pytest.approx(measured)
    assert measured == sorted(measured, reverse=True)

    # the top-2 ensemble combines the two best instances; Table 1 has its three sections' rows
    ensemble = json.loads((workdir / "hybrid" / "top2" / "result.json").read_text())
    assert ensemble["members"] == [int(r["seed"]) for r in instances[:2]]
    with open(workdir / "table1.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["section"] for r in table] == ["(a) ensembles", "(b) single networks"]
    assert table[0]["name"] == "Top-2 2D-3D+3x3x3"
    assert float(table[1]["eval_miou_all"]) == pytest.approx(measured[0])
    assert "best of 3" in table[1]["name"]
    with open(workdir / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert len(per_class) == 2 * 7 and {"f1", "precision", "recall", "found", "missed"} <= set(per_class[0])

    # a second call trains nothing and leaves the results untouched
    results = sorted(workdir.glob("hybrid/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    second = subprocess.run(_runner_command(workdir), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-5000:]
    assert "0 instance(s) trained in this call" in second.stdout
    assert [p.stat().st_mtime_ns for p in results] == stamps

    # other settings in the same workdir are refused rather than mixed with the finished instances
    third = subprocess.run(
        _runner_command(workdir, {**TINY_RUN, "max_epochs": 3}), cwd=REPO, capture_output=True, text=True
    )
    assert third.returncode != 0 and "other settings" in third.stderr


def _result(variant, seed, miou_all, k=None):
    result = {
        "variant": variant,
        "seed": seed,
        "parameters": 1_000_000,
        "miou_all": miou_all,
        "miou_org": miou_all / 2,
        "per_class": {},
        "objects": {"mitochondrion": {"gt_objects": 4, "found": 3, "missed": 1, "under_detected": 0}},
    }
    return {**result, "k": k, "members": []} if k else result


def test_table1_sections_follow_the_paper():
    results = {
        "hybrid": {"instances": [_result("hybrid", 1, 0.6), _result("hybrid", 0, 0.5)], "ensembles": []},
        "baseline_unet2d": {"instances": [_result("baseline_unet2d", 0, 0.4)], "ensembles": []},
        "ablation_no_pyramid": {
            "instances": [_result("ablation_no_pyramid", 0, 0.55)],
            "ensembles": [
                _result("ablation_no_pyramid", None, 0.58, k=2),
                _result("ablation_no_pyramid", None, 0.57, k=3),
            ],
        },
    }
    rows = table1_rows(results)
    assert [(r["section"], r["name"].split(" (")[0]) for r in rows] == [
        ("(a) ensembles", "Top-2 2D-3D+3x3x3, no 3D pyramid"),
        ("(b) single networks", "2D-3D+3x3x3"),
        ("(b) single networks", "2D-3D+3x3x3, no 3D pyramid"),
        ("(c) baselines", "2D U-Net"),
    ]
    assert rows[1]["eval_miou_all"] == 0.6 and rows[1]["organelles_found"] == "3 of 4"


def test_combined_variants_are_applied_in_order():
    assert variant_files("study/norm_batch+study/sampling_uniform", ["configs/variants/cdeep3m_mito.json"]) == [
        "configs/variants/cdeep3m_mito.json",
        "configs/variants/study/norm_batch.json",
        "configs/variants/study/sampling_uniform.json",
    ]


def test_unknown_variant_and_missing_data_are_named(tmp_path):
    with pytest.raises(ValueError, match="no_such_variant"):
        variant_files("no_such_variant")
    with pytest.raises(ValueError, match="'no_such_variant' \\(of 'study/norm_batch\\+no_such_variant'\\)"):
        variant_files("study/norm_batch+no_such_variant")
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        ExperimentRunner(str(tmp_path), dataset_dir=str(tmp_path / "absent"))

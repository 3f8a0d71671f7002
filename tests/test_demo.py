"""The main job of the README's first command: ``demo.sh`` runs ``python -m tools.demo``, which trains the default
recipe on the real platelet slice, segments it, scores the validation rows and draws the comparison."""

import json
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import REPO, require_data

#: a short training budget: this test is about the job running end to end, not about its quality
BUDGET_MINUTES = 0.5


@pytest.mark.slow
def test_demo_trains_segments_scores_and_draws_the_real_platelet_slice(tmp_path):
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    command = [sys.executable, "-m", "tools.demo", "--workdir", str(tmp_path), "--max_minutes", str(BUDGET_MINUTES)]
    result = subprocess.run(command + ["--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((tmp_path / "eval" / "training_summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes" and summary["seconds"] < BUDGET_MINUTES * 60 + 60, summary
    assert "--seed 1" in result.stdout  # the seed reaches the training run
    mean = json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]
    assert f"MIoU(all) = {mean['miou_all']:.4f}, MIoU(org) = {mean['miou_org']:.4f}" in result.stdout
    assert "objects found: mitochondrion" in result.stdout and "canalicular vessel" in result.stdout

    picture = matplotlib.image.imread(tmp_path / "eval" / "comparison.png")
    assert picture.ndim == 3 and picture.shape[1] > 2 * picture.shape[0]  # image, ground truth, prediction in a row
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    assert (tmp_path / "eval" / "50-slice0-image_seg.tif").is_file()

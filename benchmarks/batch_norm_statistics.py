"""Does a batch-norm network lose a class to the statistics it carries from training windows to inference?

Class-balanced windows over-represent rare classes, so the running means and variances that batch normalisation
accumulates in training describe other windows than the uniform tiles of inference. This evaluates a trained
batch-norm checkpoint of the recipe study on its data set's validation split three times: with its stored
statistics (exponential moving averages over training), and with statistics re-estimated without gradients
(``torch.optim.swa_utils.update_bn``: a plain average over ``--batches`` batches) on training windows drawn as in
training, then drawn uniformly (``configs/variants/study/sampling_uniform.json``).

Usage (from the repository root)::

    python benchmarks/batch_norm_statistics.py --instance runs/b1/30min/platelet/study/norm_batch/seed000 \\
        --dataset platelet --arm study/norm_batch --batches 100 --seed 0 \\
        --output benchmarks/results/batch_norm_statistics_platelet.json

The instance comes from ``python benchmarks/recipe_study.py run --datasets "['platelet']" --arms
"['study/norm_batch']" --seeds 1 --max_minutes 30 --workdir runs/b1``; ``--seed`` draws other windows.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism
from torch.optim.swa_utils import update_bn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path[:0] = [str(BUNDLE), str(REPO), str(Path(__file__).resolve().parent)]
from provenance import write_report  # noqa: E402
from recipe_study import DATASETS, study_runner  # noqa: E402

from scripts.checkpoints import save_atomically  # noqa: E402
from scripts.io import load_weights  # noqa: E402
from tools.experiments import variant_files  # noqa: E402
from tools.tables import markdown_table  # noqa: E402

UNIFORM_WINDOWS = "study/sampling_uniform"


def reestimate(
    checkpoint: Path, config_files: list[str], common: dict, batches: int, destination: Path, seed: int = 0
) -> Path:
    """Load ``checkpoint`` into the training config's network, average its batch-norm statistics over ``batches``
    batches of that config's training windows (drawn with random ``seed``), and save it as ``destination``."""
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({**common, "num_workers": 0})
    set_determinism(seed)
    network = load_weights(parser.get_parsed_content("network_def"), checkpoint)
    loader = parser.get_parsed_content("train#dataloader")

    def windows():  # new windows on every pass (an epoch may hold only a few batches: 16 windows per volume)
        while True:
            for batch in loader:
                yield batch["image"]

    with torch.no_grad():
        update_bn(itertools.islice(windows(), batches), network)
    save_atomically({"model": network.state_dict()}, destination)
    return destination


def main(
    instance: str,
    dataset: str = "platelet",
    arm: str = "study/norm_batch",
    batches: int = 100,
    seed: int = 0,
    output: str = "benchmarks/results/batch_norm_statistics.json",
) -> dict:
    """Evaluate ``instance``'s checkpoint with stored and re-estimated batch-norm statistics; print and write them.

    Args:
        instance: a recipe-study instance directory (``<workdir>/<budget>min/<data set>/<arm>/seed<k>``) with
            ``models/model.pt``; the re-estimated checkpoints and evaluations go to its ``batch_norm/``.
        dataset: the data set it was trained on (a key of ``recipe_study.DATASETS``).
        arm: the arm it was trained with (its variant files are applied, as in training).
        batches: training batches averaged per re-estimation.
        seed: random seed of the windows drawn (the same for both re-estimations).
        output: JSON report (relative paths start at the repository root).
    """
    instance_dir = Path(instance).resolve()
    checkpoint = instance_dir / "models" / "model.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: --instance must be a finished recipe-study instance")
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set '{dataset}'; known: {sorted(DATASETS)}")
    os.chdir(BUNDLE)  # config paths are relative to the bundle root, as with `python -m monai.bundle run`
    work = instance_dir / "batch_norm"
    runner = study_runner(dataset, work, None, max_minutes=0)
    training_files = ["configs/train.json", *variant_files(arm, runner.dataset_files)]
    uniform = [*training_files, f"configs/variants/{UNIFORM_WINDOWS}.json"]
    rows = []
    for name, folder, files in (
        ("stored (moving averages)", "stored", None),
        ("re-estimated, training windows", "training_windows", training_files),
        ("re-estimated, uniform windows", "uniform_windows", uniform),
    ):
        path = (
            checkpoint
            if files is None
            else reestimate(checkpoint, files, runner.common, batches, work / folder / "model.pt", seed)
        )
        scores = runner.infer_and_evaluate(arm, work / folder, [], {"ckpt_path": str(path)})
        # every class in every row: "n/a" where it is neither in the ground truth nor predicted (IoU NaN)
        iou = {
            f"iou {c}": "n/a" if math.isnan(v["iou"]) else round(v["iou"], 4) for c, v in scores["per_class"].items()
        }
        rows.append(
            {
                "statistics": name,
                "miou_all": round(scores["miou_all"], 4),
                "miou_org": round(scores["miou_org"], 4),
                **iou,
            }
        )
    print(f"\n{dataset}, {arm}, {instance_dir.name}, {batches} batches per re-estimation, window seed {seed}:\n")
    print(markdown_table(rows))
    write_report(
        {"instance": str(instance_dir), "dataset": dataset, "arm": arm, "batches": batches, "seed": seed, "rows": rows},
        REPO / output,
    )
    return {"rows": rows}


if __name__ == "__main__":
    fire.Fire(main)

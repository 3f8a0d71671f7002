"""A copy of the bundle with config variants merged into its configs, for tools that read one config file.

MONAI Label serves ``configs/inference.json`` and trains with ``configs/train.json`` as they are: it cannot stack
``configs/variants/*.json`` on top. This writes a bundle whose ``train.json``, ``inference.json`` and
``evaluate.json`` already hold the variants (MONAI's own ``ConfigParser`` merge, the one ``--config_file "[...]"``
uses), with a checkpoint of that network as ``models/model.pt``. Where a variant changes the classes (a task file,
``configs/variants/task.json``), ``metadata.json`` gets the task's classes, so that MONAI Label shows their names,
and the data's label schema moves to ``configs/label_schema.json``, which the copied task files then read.

Usage (from the repository root; relative paths start at ``bundle/``)::

    python -m tools.variant_bundle --variants "['configs/variants/crf_stage2.json']" \
        --output ../em_crf_segmentation --checkpoint runs/crf/model.pt
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import fire
from monai.bundle import ConfigParser

from tools import BUNDLE_ROOT

MERGED_CONFIGS = ("train.json", "inference.json", "evaluate.json")
LABEL_SCHEMA = "label_schema.json"


def _merged(config: str, variants: Sequence[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / config), *(str(BUNDLE_ROOT / v) for v in variants)])
    return parser


def _write_json(content: dict, path: Path) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n")


def write_variant_bundle(
    variants: Sequence[str], output: str | os.PathLike, checkpoint: str | os.PathLike | None = None
) -> Path:
    """Write a bundle copy with ``variants`` merged into its configs; returns its directory.

    Args:
        variants: variant files relative to the bundle root, in the order ``--config_file`` would stack them.
        output: the new bundle's directory (must not exist); MONAI Label wants a name containing ``segmentation``.
        checkpoint: weights of the merged network, copied to ``models/model.pt``; None leaves ``models/`` empty.

    Raises:
        FileExistsError: if ``output`` exists.
        FileNotFoundError: naming a missing variant file or checkpoint.
    """
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists: give a new directory for the variant bundle")
    for variant in variants:
        if not (BUNDLE_ROOT / variant).is_file():
            raise FileNotFoundError(f"variant {BUNDLE_ROOT / variant} not found (variants are relative to bundle/)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    # built under a temporary name: a crash never leaves a half-made bundle that MONAI Label would load
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        BUNDLE_ROOT, tmp, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "logs", "outputs", "runs")
    )
    (tmp / "models").mkdir()
    if checkpoint is not None:
        shutil.copyfile(checkpoint, tmp / "models" / "model.pt")
    configs = tmp / "configs"
    for config in MERGED_CONFIGS:
        merged = {k: v for k, v in _merged(config, variants).get().items() if k != "_meta_"}
        _write_json(merged, configs / config)

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    schema = parser.get_parsed_content("class_schema")
    metadata = json.loads((configs / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    if list(pred["channel_def"].values()) != schema["names"]:
        _write_json(metadata, configs / LABEL_SCHEMA)
        for task in (configs / "tasks").glob("*.json"):
            spec = json.loads(task.read_text())
            if spec.get("source_schema") == "../metadata.json":
                spec["source_schema"] = f"../{LABEL_SCHEMA}"
                _write_json(spec, task)
        pred["num_channels"] = len(schema["names"])
        pred["channel_def"] = {str(i): name for i, name in enumerate(schema["names"])}
        metadata["organelle_channels"] = list(schema["organelles"])
        metadata["label_classes"] = ", ".join(f"{i} {name}" for i, name in enumerate(schema["names"]))
        metadata["pred_classes"] = "same as label_classes"
        _write_json(metadata, configs / "metadata.json")
    os.replace(tmp, output)
    print(f"variant bundle {output}: {', '.join(variants)} merged; classes {schema['names']}")
    return output


if __name__ == "__main__":
    os.chdir(BUNDLE_ROOT)  # relative paths in the arguments start at bundle/, as the configs' do
    fire.Fire(write_variant_bundle)

"""Task-based class selection (seed 002): keep, merge and drop the classes of a data set's label schema.

A task file ``configs/tasks/<name>.json`` names the classes a research question needs, in output-channel order,
each as the list of source classes it takes::

    {
        "source_schema": "../metadata.json",
        "classes": {"background": ["background"], "cell": ["cell"], "mitochondrion": ["mitochondrion"],
                    "dense granule": ["dense granule body", "dense granule core"]},
        "rest": "ignore",
        "organelles": ["mitochondrion", "dense granule"]
    }

- ``source_schema``: the metadata file whose ``channel_def`` is the label files' schema (relative to the task file).
- ``classes``: task class name -> source class names; a list of several merges them.
- ``rest``: where the source classes not listed go: the name of a task class (e.g. ``"background"``) or
  ``"ignore"`` (the config's ``ignore_label``, which the loss and the metrics skip). Needed only if some are unlisted.
- ``organelles`` (optional): task classes averaged by MIoU(org); default: those made only of source organelles.
- ``description`` (optional): free text.

The one definition gives the label mapping (:class:`MapLabelsd`), the class names and organelle subset the configs
read (``configs/variants/task.json``) and the metadata MONAI Label shows (``python -m scripts.tasks write_metadata``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import fire
import torch
from monai.config import KeysCollection
from monai.transforms import MapLabelValued

from scripts.io import load_class_schema, write_json_atomically
from scripts.transforms import _source

__all__ = ["LabelTask", "load_task", "MapLabelsd", "write_metadata"]

IGNORE = "ignore"
_TASK_KEYS = {"description", "source_schema", "classes", "rest", "organelles"}


@dataclass(frozen=True)
class LabelTask:
    """A parsed task: which task class each source class becomes.

    Attributes:
        file: the task file, named in every error message.
        source_schema: the metadata file of the source label schema.
        source_names: source class names by label value.
        names: task class names by output channel.
        organelles: task class indices of MIoU(org).
        targets: task class index of each source class, None where it is ignored.
    """

    file: str
    source_schema: str
    source_names: tuple[str, ...]
    names: tuple[str, ...]
    organelles: tuple[int, ...]
    targets: tuple[int | None, ...]

    @property
    def name(self) -> str:
        return Path(self.file).stem

    @property
    def uses_ignore(self) -> bool:
        return any(t is None for t in self.targets)

    def class_schema(self) -> dict:
        """``{"names": [...], "organelles": [...]}``, the shape of :func:`scripts.io.load_class_schema`."""
        return {"names": list(self.names), "organelles": list(self.organelles)}

    def describe(self) -> str:
        """One line per task class with the source classes it takes, e.g. ``3 dense granule <- 5, 6``."""
        lines = []
        for index, name in enumerate(self.names):
            sources = [f"{s} {self.source_names[s]}" for s, t in enumerate(self.targets) if t == index]
            lines.append(f"{index} {name} <- {', '.join(sources)}")
        ignored = [f"{s} {self.source_names[s]}" for s, t in enumerate(self.targets) if t is None]
        if ignored:
            lines.append(f"ignored: {', '.join(ignored)}")
        return "; ".join(lines)


def load_task(task_file: str | os.PathLike) -> LabelTask:
    """Read and check a task file against its source schema.

    Raises:
        ValueError: naming the task file, the key and the offending value, for an unknown source class, a source
            class used twice, an unknown ``rest`` or ``organelles`` entry, unlisted classes without ``rest``.
        FileNotFoundError: if the task file or its source schema is missing.
    """
    task_file = Path(task_file)
    if not task_file.is_file():
        raise FileNotFoundError(f"task file {task_file} not found")
    with open(task_file) as f:
        spec = json.load(f)
    unknown_keys = sorted(set(spec) - _TASK_KEYS)
    if unknown_keys:
        raise ValueError(f"{task_file}: unknown keys {unknown_keys}; allowed: {sorted(_TASK_KEYS)}")
    if "source_schema" not in spec:
        raise ValueError(f"{task_file}: 'source_schema' (the metadata file of the label schema) is missing")
    schema_file = (task_file.parent / spec["source_schema"]).resolve()
    if not schema_file.is_file():
        raise FileNotFoundError(f"{task_file}: source_schema {schema_file} not found")
    source = load_class_schema(schema_file)
    source_names = source["names"]

    classes = spec.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f"{task_file}: 'classes' must map each task class name to a list of source class names")
    names = list(classes)
    targets: list[int | None] = [None] * len(source_names)
    listed = [False] * len(source_names)
    for index, (name, members) in enumerate(classes.items()):
        if isinstance(members, str) or not members:
            raise ValueError(f"{task_file}: classes['{name}'] must be a non-empty list of source class names")
        for member in members:
            if member not in source_names:
                raise ValueError(
                    f"{task_file}: classes['{name}'] names '{member}', which is not a class of the source schema "
                    f"{schema_file} (its classes: {source_names})"
                )
            s = source_names.index(member)
            if listed[s]:
                raise ValueError(
                    f"{task_file}: classes['{name}'] takes '{member}', already taken by classes['{names[targets[s]]}']"
                )
            targets[s], listed[s] = index, True

    rest = spec.get("rest")
    if rest is not None and rest != IGNORE and rest not in names:
        raise ValueError(f"{task_file}: 'rest' is '{rest}', which is neither a task class {names} nor '{IGNORE}'")
    unlisted = [source_names[s] for s in range(len(source_names)) if not listed[s]]
    if unlisted and rest is None:
        raise ValueError(
            f"{task_file}: source classes {unlisted} are in no task class: set 'rest' to a task class or '{IGNORE}'"
        )
    if unlisted:
        rest_target = None if rest == IGNORE else names.index(rest)
        targets = [t if listed[s] else rest_target for s, t in enumerate(targets)]

    if "organelles" in spec:
        if not isinstance(spec["organelles"], list):
            raise ValueError(f"{task_file}: 'organelles' must be a list of task class names")
        for name in spec["organelles"]:
            if name not in names:
                raise ValueError(f"{task_file}: organelles names '{name}', which is not a task class {names}")
        organelles = [names.index(name) for name in spec["organelles"]]
    else:
        # a task class counts as an organelle if every source class listed for it is one
        source_organelles = set(source["organelles"])
        organelles = [
            index
            for index in range(len(names))
            if all(source_names.index(m) in source_organelles for m in classes[names[index]])
        ]
    return LabelTask(
        file=str(task_file),
        source_schema=str(schema_file),
        source_names=tuple(source_names),
        names=tuple(names),
        organelles=tuple(organelles),
        targets=tuple(targets),
    )


class MapLabelsd(MapLabelValued):
    """Map label volumes of a task's source schema to the task's classes (MONAI ``MapLabelValued``).

    Source classes become their task class; classes sent to ``"ignore"`` and voxels already marked
    ``ignore_label`` (unlabelled voxels of sparse annotations) become ``ignore_label``. Any other value stops with a
    message naming the file, as the label would otherwise train silently on a wrong schema.

    Args:
        keys: label keys.
        task: the task (:func:`load_task`).
        ignore_label: value of ignored voxels; required if the task ignores classes. It must not be a class index.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        task: LabelTask,
        ignore_label: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        if ignore_label is None and task.uses_ignore:
            raise ValueError(f"{task.file}: 'rest' is '{IGNORE}', so the config must set ignore_label (e.g. 255)")
        if ignore_label is not None and 0 <= ignore_label < max(len(task.names), len(task.source_names)):
            raise ValueError(
                f"{task.file}: ignore_label {ignore_label} is a class index; use a value outside "
                f"0..{max(len(task.names), len(task.source_names)) - 1}, e.g. 255"
            )
        self.task = task
        self.ignore_label = ignore_label
        target_labels = [ignore_label if t is None else t for t in task.targets]
        source_labels = list(range(len(task.source_names)))
        super().__init__(keys, source_labels, target_labels, dtype=torch.float32, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        allowed = set(range(len(self.task.source_names))) | ({self.ignore_label} - {None})
        for key in self.key_iterator(d):
            bad = sorted(v for v in torch.unique(torch.as_tensor(d[key])).tolist() if v not in allowed)
            if bad:
                raise ValueError(
                    f"{_source(d[key])}: label '{key}' has values {bad[:10]} outside the classes "
                    f"0..{len(self.task.source_names) - 1} of {self.task.source_schema} (task {self.task.file})"
                    + (f" and ignore_label {self.ignore_label}" if self.ignore_label is not None else "")
                )
        return super().__call__(d)


def task_metadata(task: LabelTask, metadata: dict) -> dict:
    """A copy of the bundle metadata describing the task's classes (channel_def, organelles, class strings)."""
    meta = copy.deepcopy(metadata)
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(task.names)
    pred["channel_def"] = {str(i): name for i, name in enumerate(task.names)}
    meta["organelle_channels"] = list(task.organelles)
    meta["label_classes"] = (
        ", ".join(f"{i} {name}" for i, name in enumerate(task.names)) + f" (task {task.name}: {task.describe()})"
    )
    meta["pred_classes"] = "same as label_classes"
    organelle_names = ", ".join(task.names[i] for i in task.organelles) or "none"
    meta["eval_metrics"] = {
        "val_miou_all": f"mean IoU over the {len(task.names)} classes of task {task.name}",
        "val_miou_org": f"mean IoU over the organelle classes ({organelle_names})",
    }
    return meta


def write_metadata(task: str, metadata_file: str | None = None, output: str | None = None) -> str:
    """Write the bundle metadata of a task, so that MONAI Label and ``load_class_schema`` see the task's classes.

    Args:
        task: the task file, e.g. ``configs/tasks/mito_only.json``.
        metadata_file: the metadata to start from; default the task's source schema.
        output: where to write; default ``metadata_<task name>.json`` beside the source schema.

    Returns:
        The written path.
    """
    label_task = load_task(task)
    metadata_file = metadata_file or label_task.source_schema
    with open(metadata_file) as f:
        meta = task_metadata(label_task, json.load(f))
    path = Path(output) if output else Path(label_task.source_schema).with_name(f"metadata_{label_task.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(meta, path)
    print(f"task {label_task.name}: {label_task.describe()}")
    return str(path)


if __name__ == "__main__":
    fire.Fire({"write_metadata": write_metadata})

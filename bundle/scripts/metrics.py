"""Voxel-overlap metrics of the paper: per-class IoU and Dice/F1, MIoU(all) and MIoU(org), from confusion matrices.

A class absent from both the ground truth and the prediction of everything evaluated has no IoU (NaN) and is
left out of the means, rather than counted as 0 or 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.metrics import ConfusionMatrix
from ignite.metrics.metric import reinit__is_reduced

from scripts.io import load_datalist, output_path, write_csv_atomically, write_json_atomically
from scripts.objects import describe, missed_object_mask, object_report
from scripts.transforms import source_volume_loading

logger = logging.getLogger(__name__)


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction.

    Args:
        pred: predicted class indices, any shape (a leading channel of 1 is fine).
        label: ground-truth class indices, same number of voxels.
        num_classes: number of classes.
        ignore_index: label value whose voxels are not counted.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    label = torch.as_tensor(label).reshape(-1).long()
    if pred.numel() != label.numel():
        raise ValueError(f"prediction has {pred.numel()} voxels, label {label.numel()}")
    keep = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        keep &= label != ignore_index
    index = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def scores_from_confusion(cm: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-class ``iou``, ``dice`` (= F1), ``precision`` and ``recall``; NaN where a score is undefined."""
    cm = cm.double()
    tp = torch.diagonal(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan"))).numpy()

    return {
        "iou": ratio(tp, tp + fp + fn),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def mean_iou(cm: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """Mean IoU over ``classes`` (all if None), ignoring classes whose IoU is undefined."""
    iou = scores_from_confusion(cm)["iou"]
    if classes is not None:
        iou = iou[list(classes)]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def _as_pairs(output) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, label) pairs from an engine output: batched tensors or the lists MONAI's ``from_engine`` gives."""
    preds, labels = output
    if isinstance(preds, torch.Tensor) and preds.ndim > 0:
        preds, labels = list(preds), list(labels)
    return list(zip(preds, labels))


def _class_indices(pred: torch.Tensor) -> torch.Tensor:
    """Class indices from a channel-first prediction: argmax of several channels, else the single channel."""
    return pred.argmax(0) if pred.shape[0] > 1 else pred[0]


class _ConfusionMetric(ConfusionMatrix):
    """ignite's ``ConfusionMatrix`` (accumulation over an epoch, summed over DDP ranks) fed with class indices.

    Its own ``update`` needs ``num_classes`` prediction channels (a one-hot copy of every validation volume) and has
    no ignore label; only ``update`` is replaced.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, output_transform: Callable = lambda x: x
    ) -> None:
        self.ignore_index = ignore_index
        super().__init__(num_classes, output_transform=output_transform)

    @reinit__is_reduced
    def update(self, output) -> None:
        for pred, label in _as_pairs(output):
            counts = confusion_matrix(_class_indices(pred), label, self.num_classes, self.ignore_index)
            self.confusion_matrix += counts.to(self.confusion_matrix)
            self._num_examples += 1

    def confusion(self) -> torch.Tensor:
        """The summed counts (rows = ground truth, columns = prediction) of every rank."""
        return ConfusionMatrix.compute(self)


class MeanIoU(_ConfusionMetric):
    """MIoU over a class subset (MIoU(all) with ``classes=None``, MIoU(org) with the organelle channels).

    Args:
        num_classes: number of classes.
        classes: the class subset averaged; None = all.
        ignore_index: label value not counted.
        output_transform: maps the engine output to ``(pred, label)``.
    """

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[int] | None = None,
        ignore_index: int | None = None,
        output_transform: Callable = lambda x: x,
    ) -> None:
        self.classes = classes
        super().__init__(num_classes, ignore_index, output_transform)

    def compute(self) -> float:
        return mean_iou(self.confusion(), self.classes)


class PerClassIoU(_ConfusionMetric):
    """IoU of every class, reported as separate engine metrics ``iou_<class name>``.

    Args:
        class_names: names by class index.
        ignore_index: label value not counted.
        output_transform: maps the engine output to ``(pred, label)``.
    """

    def __init__(
        self, class_names: Sequence[str], ignore_index: int | None = None, output_transform: Callable = lambda x: x
    ) -> None:
        self.class_names = list(class_names)
        super().__init__(len(class_names), ignore_index, output_transform)

    def compute(self) -> dict[str, float]:
        iou = scores_from_confusion(self.confusion())["iou"]
        return {f"iou_{name.replace(' ', '_')}": float(v) for name, v in zip(self.class_names, iou)}


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table with right-aligned numbers, for the terminal."""
    cells = [[str(c) for c in columns]] + [
        [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class SegmentationReport:
    """Compare predicted label volumes with ground truth and write per-volume and mean scores.

    For each datalist item the prediction is ``<prediction_dir>/<image stem>_<postfix><suffix>``, as written by
    ``inference.json``; an item's ``region`` restricts the comparison (e.g. to the validation region). Writes
    ``<output_dir>/metrics.csv`` (one row per volume and class: IoU, Dice/F1, precision, recall), ``objects.csv``
    (per volume and class: ground-truth objects found, missed, under-detected; predicted object counts and mean
    volumes in physical units of the voxel spacing), ``metrics.json`` (with the means over all voxels of all
    volumes) and, per volume, ``<image stem>_overlay.png`` (image, ground truth, prediction, missed objects
    outlined); prints the tables and one sentence per class ("7 of 9 mitochondria found ...").

    Args:
        datalist_file: datalist JSON; the ``key`` section lists ``image`` and ``label`` files.
        dataset_dir: base directory of its relative paths.
        prediction_dir: where the predicted label volumes are.
        output_dir: where the CSV and JSON go.
        class_names: class names by index.
        organelle_classes: class indices of MIoU(org).
        key: datalist section evaluated.
        prediction_postfix: the postfix inference added to the file names.
        ignore_index: label value not counted.
        object_classes: classes of the object-level table; default the organelle classes.
        connectivity: 6 or 26, the connectivity of objects.
        spacing: voxel size (x, y, z) for physical volumes when neither the item nor the file gives one.
        label_transforms: dictionary transforms applied to the loaded ``{"image", "pred", "label"}`` before
            scoring, e.g. a task's label mapping (``scripts.tasks.MapLabelsd``) so ground truth and prediction
            share the task's classes.
    """

    def __init__(
        self,
        datalist_file: str,
        dataset_dir: str,
        prediction_dir: str,
        output_dir: str,
        class_names: Sequence[str],
        organelle_classes: Sequence[int],
        key: str = "validation",
        prediction_postfix: str = "seg",
        ignore_index: int | None = None,
        object_classes: Sequence[int] | None = None,
        connectivity: int = 6,
        spacing: Sequence[float] | None = None,
        label_transforms: Sequence[Callable] = (),
    ) -> None:
        self.items = load_datalist(datalist_file, dataset_dir, key=key)
        self.prediction_dir = prediction_dir
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.organelle_classes = list(organelle_classes)
        self.prediction_postfix = prediction_postfix
        self.ignore_index = ignore_index
        self.object_classes = list(object_classes) if object_classes is not None else self.organelle_classes
        self.connectivity = connectivity
        self.spacing = spacing
        self.label_transforms = list(label_transforms)
        for item in self.items:
            item["pred"] = str(output_path(item["image"], prediction_dir, prediction_postfix))
            if not os.path.isfile(item["pred"]):
                raise FileNotFoundError(
                    f"prediction {item['pred']} for {item['image']} not found: run inference first "
                    f"(its output_dir must be {prediction_dir})"
                )

    def _load(self, item: dict) -> dict:
        """Image, prediction and label of an item, cropped to its region, with the label's voxel spacing."""
        keys = ["image", "pred", "label"]
        d = source_volume_loading(keys, self.spacing)({k: item[k] for k in (*keys, "region", "spacing") if k in item})
        for transform in self.label_transforms:
            d = transform(d)
        if d["pred"].shape != d["label"].shape:
            raise ValueError(
                f"prediction {item['pred']} has shape {tuple(d['pred'].shape[1:])}, "
                f"label {item['label']} {tuple(d['label'].shape[1:])}"
            )
        return {
            "image": np.asarray(d["image"][0]),
            "pred": d["pred"].round().long(),
            "label": d["label"].round().long(),
            "spacing": [float(s) for s in d["label"].pixdim],
        }

    def run(self) -> dict:
        """Evaluate every item; return the JSON summary."""
        num_classes = len(self.class_names)
        total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        rows, volumes, objects = [], [], []
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item in self.items:
            name = Path(item["image"]).name
            volume = self._load(item)
            pred, label = volume["pred"], volume["label"]
            cm = confusion_matrix(pred, label, num_classes, self.ignore_index)
            total += cm
            volumes.append(self._summary(cm, name=name))
            rows.extend(self._class_rows(cm, name))
            objects.extend(self._object_rows(volume, name))
            self._draw(volume, name)
        rows.extend(self._class_rows(total, "ALL"))
        summary = {"volumes": volumes, "mean": self._summary(total, name="ALL"), "objects": objects}
        write_csv_atomically(rows, self.output_dir / "metrics.csv")
        write_csv_atomically(objects, self.output_dir / "objects.csv")
        write_json_atomically(summary, self.output_dir / "metrics.json")
        print(format_table(rows, ["volume", "class", "iou", "dice", "precision", "recall"]))
        print(format_table(volumes + [summary["mean"]], ["volume", "miou_all", "miou_org"]))
        columns = ["volume", "class", "gt_objects", "found", "missed", "under_detected", "pred_objects"]
        print(format_table(objects, columns + ["mean_gt_volume", "mean_pred_volume"]))
        for row in objects:
            print(f"{row['volume']}: {describe(row)}")
        return summary

    def _object_rows(self, volume: dict, name: str) -> list[dict]:
        rows = object_report(
            volume["pred"][0].numpy(),
            volume["label"][0].numpy(),
            self.class_names,
            classes=self.object_classes,
            connectivity=self.connectivity,
            spacing=volume["spacing"],
            ignore_index=self.ignore_index,
        )
        return [{"volume": name, **row} for row in rows]

    def _draw(self, volume: dict, name: str) -> None:
        """Overlay picture of the section with the most missed-object voxels (the middle one if none)."""
        from scripts.pictures import save_comparison_png  # drawing (matplotlib) only where a picture is made

        label, pred = volume["label"][0].numpy(), volume["pred"][0].numpy()
        missed = missed_object_mask(
            pred, label, classes=self.object_classes, connectivity=self.connectivity, ignore_index=self.ignore_index
        )
        per_section = missed.reshape(-1, missed.shape[-1]).sum(0)
        z = int(per_section.argmax()) if per_section.any() else None
        save_comparison_png(
            volume["image"],
            label,
            pred,
            output_path(name, self.output_dir, "overlay", ".png"),
            self.class_names,
            z=z,
            title=f"{name}: missed objects outlined in white",
            outline=missed,
        )

    def _summary(self, cm: torch.Tensor, name: str) -> dict:
        scores = scores_from_confusion(cm)
        return {
            "volume": name,
            "miou_all": mean_iou(cm),
            "miou_org": mean_iou(cm, self.organelle_classes),
            # the ISBI 2012 challenge's pixel error: share of labelled voxels given the wrong class
            "pixel_error": float(1.0 - cm.diagonal().sum() / cm.sum().clamp(min=1)),
            "iou": dict(zip(self.class_names, map(float, scores["iou"]))),
            "dice": dict(zip(self.class_names, map(float, scores["dice"]))),
        }

    def _class_rows(self, cm: torch.Tensor, volume: str) -> list[dict]:
        scores = scores_from_confusion(cm)
        return [
            {"volume": volume, "class": name, **{k: float(v[i]) for k, v in scores.items()}}
            for i, name in enumerate(self.class_names)
        ]

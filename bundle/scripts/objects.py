"""Object-level metrics biologists ask for: how many organelles were found, missed or only partly segmented.

A ground-truth object of a class is a connected component of ``label == class``. Its recall is the fraction of
its voxels predicted as that class, and, as in Meyer et al. (FIB-SEM multi-class segmentation, Table 2), it is

- found (true positive) if ``recall > found`` (default 0.8),
- missed (false negative) if ``recall < missed`` (default 0.1),
- under-detected otherwise, i.e. ``missed <= recall <= found``: both boundaries are under-detected.

Recall is computed as ``hits / size`` in float64; IEEE division is correctly rounded, so an object with exactly
4 of 5 voxels hit has recall ``== 0.8`` and is under-detected, not found.

Arrays are ``(X, Y, Z)`` (z = section axis last) or channel-first ``(1, X, Y, Z)``; 2D ``(X, Y)`` arrays work too.
Voxels whose label is ``ignore_index`` belong to no object, ground truth or predicted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# plural names for describe(); anything else gets an "s" (or "y" -> "ies")
_IRREGULAR_PLURALS = {"mitochondrion": "mitochondria", "background": "background regions"}


def _as_classes(array) -> np.ndarray:
    """Integer class indices as ``(X, Y[, Z])``: drops a channel of 1, rounds float volumes read from TIFF."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise ValueError(f"expected an (X, Y), (X, Y, Z) or (1, X, Y, Z) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array).astype(np.int64)
    return array


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    """``scipy.ndimage`` structuring element: faces only (6 in 3D, 4 in 2D) or all neighbours (26 / 8)."""
    face, full = (6, 26) if ndim == 3 else (4, 8)
    # 6/26 are accepted for 2D arrays too, meaning faces / all neighbours, so one setting serves both
    if connectivity in (face, 6):
        return ndimage.generate_binary_structure(ndim, 1)
    if connectivity in (full, 26):
        return ndimage.generate_binary_structure(ndim, ndim)
    raise ValueError(f"connectivity must be {face} or {full} for {ndim}D arrays, got {connectivity}")


def _check_thresholds(found: float, missed: float) -> None:
    if not 0.0 <= missed <= found <= 1.0:
        raise ValueError(f"need 0 <= missed <= found <= 1, got missed={missed}, found={found}")


def _pct(count: int, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def detect_objects(
    pred,
    label,
    class_index: int,
    connectivity: int = 6,
    found: float = 0.8,
    missed: float = 0.1,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ignore_index: int | None = None,
) -> dict:
    """Found / missed / under-detected ground-truth objects of one class, and object counts and mean volumes.

    Args:
        pred: predicted class indices, ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(X, Y)``.
        label: ground-truth class indices, same shape.
        class_index: the class evaluated.
        connectivity: 6 (faces) or 26 (faces, edges and corners) in 3D; 4 or 8 in 2D.
        found: an object is found if its recall is strictly above this.
        missed: an object is missed if its recall is strictly below this.
        spacing: voxel size ``(x, y, z)``; volumes are in its units cubed (voxel volume = product).
        ignore_index: label value whose voxels belong to no object.

    Returns:
        ``gt_objects``, ``found``, ``missed``, ``under_detected`` (counts), ``found_pct``, ``missed_pct``,
        ``under_detected_pct`` (NaN without objects), ``recall`` (float64 per GT object, object ``i + 1`` at
        index ``i``), ``missed_ids`` (ids of the missed objects in ``components``), ``components`` (int32 label
        image of the GT objects, 0 = none), ``pred_objects``, ``mean_pred_volume``, ``mean_gt_volume`` (NaN
        without objects).
    """
    _check_thresholds(found, missed)
    pred, label = _as_classes(pred), _as_classes(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has shape {pred.shape}, label {label.shape}")
    structure = _structure(label.ndim, connectivity)
    voxel_volume = float(np.prod(spacing))

    gt_mask = label == class_index
    components, n_gt = ndimage.label(gt_mask, structure=structure)
    hit = pred == class_index
    # per-object sizes and hits in two passes of bincount instead of a loop over objects
    sizes = np.bincount(components.ravel(), minlength=n_gt + 1)[1:]
    hits = np.bincount(components[hit], minlength=n_gt + 1)[1:]
    recall = hits / np.maximum(sizes, 1)
    is_found, is_missed = recall > found, recall < missed
    n_found, n_missed = int(is_found.sum()), int(is_missed.sum())
    n_under = n_gt - n_found - n_missed

    # predicted objects: ignored voxels are not scored, so they neither join nor create predicted objects
    if ignore_index is not None:
        hit &= label != ignore_index
    n_pred = ndimage.label(hit, structure=structure)[1]
    # mean object volume = total volume / number of objects: no per-object sizes needed
    n_gt_voxels, n_pred_voxels = int(sizes.sum()), int(hit.sum())
    return {
        "gt_objects": int(n_gt),
        "found": n_found,
        "missed": n_missed,
        "under_detected": n_under,
        "found_pct": _pct(n_found, n_gt),
        "missed_pct": _pct(n_missed, n_gt),
        "under_detected_pct": _pct(n_under, n_gt),
        "recall": recall,
        "missed_ids": np.flatnonzero(is_missed) + 1,
        "components": components,
        "pred_objects": int(n_pred),
        "mean_pred_volume": n_pred_voxels * voxel_volume / n_pred if n_pred else float("nan"),
        "mean_gt_volume": n_gt_voxels * voxel_volume / n_gt if n_gt else float("nan"),
    }


# scalar entries of detect_objects() that go into a report row (the arrays stay out: rows go to CSV / JSON)
ROW_KEYS = (
    "gt_objects",
    "found",
    "missed",
    "under_detected",
    "found_pct",
    "missed_pct",
    "under_detected_pct",
    "pred_objects",
    "mean_pred_volume",
    "mean_gt_volume",
)


def _default_classes(label: np.ndarray, ignore_index: int | None) -> list[int]:
    present = np.unique(label)
    return [int(c) for c in present if c != ignore_index]


def object_report(
    pred,
    label,
    class_names: Sequence[str],
    classes: Sequence[int] | None = None,
    connectivity: int = 6,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ignore_index: int | None = None,
    found: float = 0.8,
    missed: float = 0.1,
) -> list[dict]:
    """One row per class: ``class``, ``class_index`` and the scalar results of :func:`detect_objects`.

    Args:
        pred: predicted class indices, ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(X, Y)``.
        label: ground-truth class indices, same shape.
        class_names: names by class index.
        classes: class indices reported; None = all of ``class_names``.
        connectivity: 6 or 26 (4 or 8 for 2D arrays).
        spacing: voxel size ``(x, y, z)``, e.g. ``(10, 10, 50)`` nm; volumes are in its units cubed.
        ignore_index: label value whose voxels belong to no object.
        found: recall above which an object is found.
        missed: recall below which an object is missed.
    """
    pred, label = _as_classes(pred), _as_classes(label)
    classes = range(len(class_names)) if classes is None else classes
    rows = []
    for c in classes:
        result = detect_objects(pred, label, int(c), connectivity, found, missed, spacing, ignore_index)
        rows.append({"class": class_names[c], "class_index": int(c), **{k: result[k] for k in ROW_KEYS}})
    return rows


def _plural(name: str) -> str:
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    if name.endswith("y") and not name.endswith(("ay", "ey", "oy", "uy")):
        return name[:-1] + "ies"
    return name if name.endswith("s") else name + "s"


def describe(row: dict) -> str:
    """One sentence from a report row, e.g. ``179 of 193 mitochondria found (92.7 %), 6 missed, 8 under-detected``."""
    name = _plural(row["class"])
    if row["gt_objects"] == 0:
        return f"no {name} in the ground truth ({row['pred_objects']} predicted)"
    return (
        f"{row['found']} of {row['gt_objects']} {name} found ({row['found_pct']:.1f} %), "
        f"{row['missed']} missed, {row['under_detected']} under-detected"
    )


def missed_object_mask(
    pred,
    label,
    classes: Sequence[int] | None = None,
    connectivity: int = 6,
    found: float = 0.8,
    missed: float = 0.1,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Boolean ``(X, Y, Z)`` (or ``(X, Y)``) mask of the missed ground-truth objects of all ``classes``, to outline.

    Args:
        pred: predicted class indices, ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(X, Y)``.
        label: ground-truth class indices, same shape.
        classes: classes whose missed objects are marked; None = every class in ``label`` but ``ignore_index``.
        connectivity: 6 or 26 (4 or 8 for 2D arrays).
        found: recall above which an object is found (kept for symmetry with :func:`detect_objects`).
        missed: recall below which an object is missed.
        ignore_index: label value whose voxels belong to no object.
    """
    pred, label = _as_classes(pred), _as_classes(label)
    classes = _default_classes(label, ignore_index) if classes is None else classes
    mask = np.zeros(label.shape, dtype=bool)
    for c in classes:
        result = detect_objects(pred, label, int(c), connectivity, found, missed, ignore_index=ignore_index)
        if len(result["missed_ids"]):
            # lookup table indexed by object id: one pass over the volume whatever the number of objects
            lut = np.zeros(result["gt_objects"] + 1, dtype=bool)
            lut[result["missed_ids"]] = True
            mask |= lut[result["components"]]
    return mask


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a boolean mask within each z-section (in-plane 4-neighbourhood), for drawing outlines."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(2, 1)
    if mask.ndim == 3:
        # erode in-plane only, so a one-section object gets a ring rather than vanishing into the z borders
        structure = structure[..., None]
    return mask & ~ndimage.binary_erosion(mask, structure=structure)

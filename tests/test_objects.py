import math

import numpy as np
import pytest
import torch

from conftest import require_data
from scripts.objects import describe, detect_objects, mask_outline, missed_object_mask, object_report

PLATELET_CLASSES = [
    "background",
    "cell",
    "mitochondrion",
    "alpha granule",
    "canalicular vessel",
    "dense granule body",
    "dense granule core",
]
MITO = 2


def bars(hits: list[int], size: int = 10, cls: int = MITO) -> tuple[np.ndarray, np.ndarray]:
    """(pred, label) of shape (2 n, size, 1): object i is the bar x = 2 i, predicted on its first hits[i] voxels."""
    label = np.zeros((2 * len(hits), size, 1), dtype=np.int64)
    pred = np.zeros_like(label)
    for i, h in enumerate(hits):
        label[2 * i, :, 0] = cls
        pred[2 * i, :h, 0] = cls
    return pred, label


def test_found_missed_under_detected_counts_and_sentence():
    pred, label = bars([10, 0, 5])  # recall 1.0, 0.0, 0.5
    result = detect_objects(pred, label, MITO)
    assert (result["gt_objects"], result["found"], result["missed"], result["under_detected"]) == (3, 1, 1, 1)
    np.testing.assert_allclose(result["recall"], [1.0, 0.0, 0.5])
    assert result["found_pct"] == pytest.approx(100 / 3)
    assert result["missed_pct"] == pytest.approx(100 / 3)
    assert result["pred_objects"] == 2
    # the missed object's id points at the second bar in the component image
    assert result["missed_ids"].tolist() == [2]
    assert np.array_equal(result["components"] == 2, np.isin(np.arange(6), [2])[:, None, None] & (label == MITO))
    row = object_report(pred, label, PLATELET_CLASSES, classes=[MITO])[0]
    assert describe(row) == "1 of 3 mitochondria found (33.3 %), 1 missed, 1 under-detected"
    assert row["class"] == "mitochondrion" and row["class_index"] == MITO


@pytest.mark.parametrize(
    "hits, expected",
    [(0, "missed"), (1, "under_detected"), (8, "under_detected"), (9, "found"), (10, "found")],
)
def test_boundaries_found_strictly_above_missed_strictly_below(hits, expected):
    # recall exactly 0.8 or exactly 0.1 is under-detected: found needs > 0.8, missed needs < 0.1 (paper's Table 2)
    result = detect_objects(*bars([hits]), MITO)
    assert result[expected] == 1 and result["gt_objects"] == 1


def test_thresholds_are_configurable_and_checked():
    pred, label = bars([8])
    assert detect_objects(pred, label, MITO, found=0.79)["found"] == 1
    assert detect_objects(pred, label, MITO, missed=0.81, found=0.9)["missed"] == 1
    with pytest.raises(ValueError, match="missed <= found"):
        detect_objects(pred, label, MITO, found=0.1, missed=0.5)


def test_corner_touching_voxels_are_two_objects_with_6_one_with_26():
    label = np.zeros((2, 2, 2), dtype=np.int64)
    label[0, 0, 0] = label[1, 1, 1] = 1
    assert detect_objects(label, label, 1, connectivity=6)["gt_objects"] == 2
    assert detect_objects(label, label, 1, connectivity=26)["gt_objects"] == 1
    with pytest.raises(ValueError, match="connectivity"):
        detect_objects(label, label, 1, connectivity=8)


def test_2d_connectivity_4_and_8():
    label = np.eye(2, dtype=np.int64)  # two pixels touching by a corner
    assert detect_objects(label, label, 1, connectivity=4)["gt_objects"] == 2
    assert detect_objects(label, label, 1, connectivity=8)["gt_objects"] == 1
    # the 3D names mean the same (faces / all neighbours) on 2D arrays
    assert detect_objects(label, label, 1, connectivity=6)["gt_objects"] == 2
    assert detect_objects(label, label, 1, connectivity=26)["gt_objects"] == 1


def test_physical_volumes_from_spacing():
    label = np.zeros((6, 4, 2), dtype=np.int64)
    label[0:2, 0:2, 0] = 1  # 2 x 2 x 1 voxels
    result = detect_objects(label, label, 1, spacing=(10, 10, 50))
    assert result["mean_gt_volume"] == pytest.approx(2 * 2 * 1 * 10 * 10 * 50) == 20000
    assert result["mean_pred_volume"] == pytest.approx(20000)
    pred = label.copy()
    pred[4:6, 0, 0] = 1  # a second predicted object of 2 voxels: mean (4 + 2) / 2 voxels
    result = detect_objects(pred, label, 1, spacing=(10, 10, 50))
    assert result["pred_objects"] == 2
    assert result["mean_pred_volume"] == pytest.approx(3 * 5000)
    assert result["mean_gt_volume"] == pytest.approx(20000)


def test_ignored_voxels_count_neither_for_objects_nor_recall():
    label = np.zeros((8, 4, 1), dtype=np.int64)
    label[0:2, 0:2, 0] = 1
    label[2:8, :, 0] = 9  # ignored strip next to the object
    pred_a = np.where(label == 1, 1, 0)
    pred_b = pred_a.copy()
    pred_b[2:4, 0:2, 0] = 1  # extends the predicted object into the ignored strip
    pred_b[6:8, 2:4, 0] = 1  # a predicted object wholly inside it
    row_a = object_report(pred_a, label, ["bg", "cell"], classes=[1], ignore_index=9)[0]
    row_b = object_report(pred_b, label, ["bg", "cell"], classes=[1], ignore_index=9)[0]
    assert row_a == row_b
    assert (row_a["gt_objects"], row_a["found"], row_a["pred_objects"], row_a["mean_pred_volume"]) == (1, 1, 1, 4)
    # without ignore_index the strip's predictions are extra volume and an extra object
    row = object_report(pred_b, label, ["bg", "cell"], classes=[1])[0]
    assert (row["pred_objects"], row["mean_pred_volume"]) == (2, (4 + 4 + 4) / 2)
    # the ignore value is no class of its own in the missed mask
    assert not missed_object_mask(np.zeros_like(label), label, ignore_index=9)[2:].any()


def test_channel_first_float_and_torch_inputs_agree():
    pred, label = bars([10, 0, 5])
    expected = detect_objects(pred, label, MITO)["recall"]
    for p, lab in [
        (pred[None].astype(np.float32), label[None].astype(np.float32)),
        (torch.as_tensor(pred)[None], torch.as_tensor(label)[None]),
    ]:
        np.testing.assert_array_equal(detect_objects(p, lab, MITO)["recall"], expected)
    with pytest.raises(ValueError, match="shape"):
        detect_objects(pred[:2], label, MITO)


def test_class_without_objects_is_nan_and_described():
    pred, label = bars([10])
    row = object_report(pred, label, PLATELET_CLASSES, classes=[3])[0]
    assert row["gt_objects"] == 0 and math.isnan(row["found_pct"]) and math.isnan(row["mean_gt_volume"])
    assert describe(row) == "no alpha granules in the ground truth (0 predicted)"


def test_missed_object_mask_and_outline():
    pred, label = bars([10, 0, 5])
    label[4:6, 0:3, 0] = 3  # an alpha granule missed too (predicted as background)
    mask = missed_object_mask(pred, label, classes=[MITO, 3])
    expected = np.zeros_like(mask)
    expected[2, :, 0] = True
    expected[4:6, 0:3, 0] = True
    np.testing.assert_array_equal(mask, expected)
    # default classes: everything in the label, background included (fully predicted here, so not missed)
    np.testing.assert_array_equal(missed_object_mask(pred, label), expected)
    square = np.zeros((5, 5, 1), dtype=bool)
    square[1:4, 1:4, 0] = True
    outline = mask_outline(square)
    assert outline.sum() == 8 and not outline[2, 2, 0]


@pytest.fixture(scope="module")
def platelet_label() -> np.ndarray:
    from monai.transforms import LoadImage

    (path,) = require_data("platelet/50-slice0-labels.tif")
    label = np.asarray(LoadImage(reader="ITKReader", image_only=True)(str(path)))
    assert label.shape == (800, 800)
    return np.rint(label).astype(np.int64)[..., None]  # one section: (X, Y, 1)


def test_real_em_label_predicting_itself_finds_every_object(platelet_label):
    rows = object_report(platelet_label, platelet_label, PLATELET_CLASSES, spacing=(10, 10, 50))
    assert [r["class"] for r in rows] == PLATELET_CLASSES
    for row in rows:
        assert row["gt_objects"] > 0, row
        assert row["found"] == row["gt_objects"] == row["pred_objects"] and row["found_pct"] == 100.0, row
        assert row["mean_pred_volume"] == pytest.approx(row["mean_gt_volume"])


def test_real_em_without_mitochondria_misses_them_all(platelet_label):
    pred = platelet_label.copy()
    pred[pred == MITO] = 1  # mitochondria painted over as cell
    rows = {r["class"]: r for r in object_report(pred, platelet_label, PLATELET_CLASSES)}
    mito = rows.pop("mitochondrion")
    assert mito["gt_objects"] > 0 and mito["missed"] == mito["gt_objects"] and mito["found"] == 0
    assert mito["pred_objects"] == 0
    n = mito["gt_objects"]
    assert describe(mito) == f"0 of {n} mitochondria found (0.0 %), {n} missed, 0 under-detected"
    for row in rows.values():
        assert row["found_pct"] == 100.0, row
    np.testing.assert_array_equal(missed_object_mask(pred, platelet_label), platelet_label == MITO)

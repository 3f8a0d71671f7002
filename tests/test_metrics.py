import json

import numpy as np
import pytest
import torch
from synthetic import write_synthetic_dataset

from scripts.metrics import MeanIoU, PerClassIoU, SegmentationReport, confusion_matrix, mean_iou, scores_from_confusion

# five voxels: ground truth 0 1 1 1 2, prediction 0 0 1 1 2
LABEL = torch.tensor([0, 1, 1, 1, 2])
PRED = torch.tensor([0, 0, 1, 1, 2])


def test_confusion_matrix_counts_rows_truth_columns_prediction():
    cm = confusion_matrix(PRED, LABEL, num_classes=3)
    assert cm.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]


def test_scores_against_hand_computation():
    scores = scores_from_confusion(confusion_matrix(PRED, LABEL, 3))
    # class 0: tp 1, fp 1, fn 0 -> IoU 1/2, Dice 2/3; class 1: tp 2, fp 0, fn 1 -> IoU 2/3, Dice 4/5; class 2 perfect
    np.testing.assert_allclose(scores["iou"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(scores["dice"], [2 / 3, 4 / 5, 1.0])
    np.testing.assert_allclose(scores["precision"], [1 / 2, 1.0, 1.0])
    np.testing.assert_allclose(scores["recall"], [1.0, 2 / 3, 1.0])
    assert mean_iou(confusion_matrix(PRED, LABEL, 3)) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert mean_iou(confusion_matrix(PRED, LABEL, 3), classes=[1, 2]) == pytest.approx((2 / 3 + 1) / 2)


def test_absent_class_is_left_out_of_the_mean():
    cm = confusion_matrix(PRED, LABEL, num_classes=4)  # class 3 appears nowhere
    assert np.isnan(scores_from_confusion(cm)["iou"][3])
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_ignore_index_voxels_do_not_count():
    label = torch.tensor([0, 1, 1, 1, 2, 9, 9])
    pred_a = torch.tensor([0, 0, 1, 1, 2, 0, 0])
    pred_b = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    cm_a = confusion_matrix(pred_a, label, 3, ignore_index=9)
    assert torch.equal(cm_a, confusion_matrix(pred_b, label, 3, ignore_index=9))
    assert torch.equal(cm_a, confusion_matrix(PRED, LABEL, 3))


def test_ignite_metrics_accumulate_over_batches_and_lists():
    metric = MeanIoU(num_classes=3, classes=[1, 2])
    metric.reset()
    one_hot = torch.nn.functional.one_hot(PRED, 3).T.float()  # (C, N) channel-first scores
    metric.update(([one_hot[:, :3]], [LABEL[None, :3]]))  # list form, as monai's from_engine gives
    metric.update((one_hot[None, :, 3:], LABEL[None, None, 3:]))  # batched tensor form
    assert metric.compute() == pytest.approx((2 / 3 + 1) / 2)
    per_class = PerClassIoU(["background", "cell", "mito"])
    per_class.reset()
    per_class.update(([PRED[None]], [LABEL[None]]))
    assert per_class.compute() == pytest.approx({"iou_background": 0.5, "iou_cell": 2 / 3, "iou_mito": 1.0})


def test_segmentation_report_writes_csv_json_and_table(tmp_path, capsys):
    datalist = write_synthetic_dataset(tmp_path / "data", shape=(64, 64, 3))
    # a "prediction" equal to the label except one class swapped in the validation region
    from monai.transforms import LoadImage

    from scripts.io import write_volume_atomically

    label = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "data/labels.tif"))
    pred = label.clone()
    pred[pred == 1] = 0
    write_volume_atomically(pred, label.meta, tmp_path / "pred" / "image_seg.tif", np.uint8)
    names = ["bg", "cell", "m", "a", "v", "b", "c"]
    summary = SegmentationReport(
        str(datalist), str(tmp_path / "data"), str(tmp_path / "pred"), str(tmp_path / "out"), names, [2, 3, 4, 5, 6]
    ).run()
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == 7 * 2 + 1
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["mean"]["iou"]["cell"] == 0.0
    assert summary["mean"]["miou_org"] == pytest.approx(1.0)  # organelles untouched
    out = capsys.readouterr().out
    assert "miou_all" in out
    # organelles untouched: every ground-truth organelle object is found, and the sentence says so
    assert summary["objects"] and all(row["found"] == row["gt_objects"] for row in summary["objects"])
    assert (tmp_path / "out" / "objects.csv").is_file() and (tmp_path / "out" / "image_overlay.png").is_file()
    assert " found (100.0 %)" in out


def test_segmentation_report_names_missing_prediction(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "data", shape=(32, 32, 2))
    with pytest.raises(FileNotFoundError, match="image_seg.tif.*run inference first"):
        SegmentationReport(str(datalist), str(tmp_path / "data"), str(tmp_path / "none"), str(tmp_path), ["a"], [])

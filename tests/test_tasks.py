"""Task-based class selection: one task file drives the label mapping, the network, the metrics and the metadata;
sparse labels (an ignore value) are skipped by the loss, the weight map and the metrics."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import MetaTensor
from monai.transforms import LoadImage
from synthetic import write_synthetic_dataset

from conftest import BUNDLE, METADATA_SCHEMA
from scripts.io import load_class_schema, write_volume_atomically
from scripts.tasks import MapLabelsd, load_task

METADATA = BUNDLE / "configs" / "metadata.json"
# source classes: 0 background, 1 cell, 2 mitochondrion, 3 alpha granule, 4 canalicular vessel,
# 5 dense granule body, 6 dense granule core
MIXED = {
    "background": ["background", "alpha granule"],  # alpha granule -> background
    "cell": ["cell"],
    "mitochondrion": ["mitochondrion"],
    "dense granule": ["dense granule body", "dense granule core"],  # merged
}
# three classes in an order unlike the source's, so that an unmapped label would not score
THREE = {"cell": ["cell"], "background": ["background"], "organelle": ["mitochondrion", "alpha granule"]}
TASK_CONFIG = ["train.json", "variants/task.json"]


def _task_file(tmp_path, classes, rest="ignore", name="task", **extra):
    path = tmp_path / f"{name}.json"
    spec = {"source_schema": str(METADATA), "classes": classes, "rest": rest, **extra}
    path.write_text(json.dumps(spec))
    return path


def _parser(files, task_file, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLE)
    parser["task_file"] = str(task_file)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_mapping_merges_keeps_sends_to_background_and_ignores(tmp_path):
    task = load_task(_task_file(tmp_path, MIXED, rest="ignore"))
    assert task.names == ("background", "cell", "mitochondrion", "dense granule")
    assert task.organelles == (2, 3)  # made of source organelles only
    raw = torch.tensor([0, 1, 2, 3, 4, 5, 6, 255, 6, 2], dtype=torch.float32).reshape(1, 5, 2, 1)
    affine = torch.diag(torch.tensor([10.0, 10.0, 50.0, 1.0]))
    label = MetaTensor(raw, affine=affine, meta={"filename_or_obj": "l.tif"})
    out = MapLabelsd("label", task, ignore_label=255)({"label": label})["label"]
    #                     bg cell mito alpha->bg vessel->ignore body->dg core->dg unlabelled stays ignored
    assert out.reshape(-1).tolist() == [0, 1, 2, 0, 255, 3, 3, 255, 3, 2]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, label.affine)
    to_background = load_task(_task_file(tmp_path, MIXED, rest="background", name="bg"))
    out = MapLabelsd("label", to_background, ignore_label=255)({"label": label})["label"]
    assert out.reshape(-1).tolist() == [0, 1, 2, 0, 0, 3, 3, 255, 3, 2]
    with pytest.raises(ValueError, match=r"l.tif: label 'label' has values \[9.0\] outside the classes 0..6"):
        MapLabelsd("label", task, ignore_label=255)({"label": torch.where(label == 4, 9.0, label)})
    with pytest.raises(ValueError, match="must set ignore_label"):
        MapLabelsd("label", task)
    with pytest.raises(ValueError, match="ignore_label 3 is a class index"):
        MapLabelsd("label", task, ignore_label=3)


@pytest.mark.parametrize(
    "spec, message",
    [
        (  # an unknown class: the file, the key and the class are named
            {"classes": {**MIXED, "dense granule": ["dense granule body", "dense granule crust"]}, "rest": "ignore"},
            r"bad_task.json: classes\['dense granule'\] names 'dense granule crust', which is not a class",
        ),
        (
            {"classes": {"cell": ["cell"], "more cell": ["cell"]}, "rest": "ignore"},
            r"bad_task.json: classes\['more cell'\] takes 'cell', already taken",
        ),
        (
            {"classes": {"cell": ["cell"]}, "rest": "cytoplasm"},
            "bad_task.json: 'rest' is 'cytoplasm', which is neither",
        ),
        ({"classes": {"cell": ["cell"]}}, r"bad_task.json: source classes \['background', .*\] are in no task class"),
        (
            {"classes": {"cell": ["cell"]}, "rest": "ignore", "organelles": ["mitochondrion"]},
            "bad_task.json: organelles names 'mitochondrion'",
        ),
        ({"classes": {"cell": ["cell"]}, "organelle": ["cell"]}, r"bad_task.json: unknown keys \['organelle'\]"),
    ],
)
def test_bad_task_is_a_clear_error_at_config_parse(tmp_path, spec, message):
    path = tmp_path / "bad_task.json"
    path.write_text(json.dumps({"source_schema": str(METADATA), **spec}))
    with pytest.raises(ValueError, match=message):
        load_task(path)
    # the same error stops the bundle while its config is parsed, before any data is read
    with pytest.raises(RuntimeError) as raised:
        _parser(["train.json", "variants/task.json"], path).get_parsed_content("network_def")
    chain, cause = [], raised.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    assert any("bad_task.json" in text for text in chain), chain


@pytest.mark.parametrize("files, overrides", [(["train.json"], {"ignore_label": 255}), (TASK_CONFIG, {})])
def test_loss_weight_map_and_metrics_skip_ignored_voxels(tmp_path, files, overrides):
    """Sparse labels, with or without a task: unlabelled voxels (255 in the label file) count nowhere."""
    parser = _parser(files, _task_file(tmp_path, MIXED), **{"train#weight_map#edge": False, **overrides})
    assert parser.get_parsed_content("ignore_label") == 255
    # label validation accepts the ignore value in the label file, and nothing else outside the source classes
    validate = parser.get_parsed_content("volume_loading")[2]
    image = MetaTensor(torch.rand(1, 4, 4, 1))
    label = torch.zeros(1, 4, 4, 1)
    label[0, 0] = 6  # a source class, beyond the task's 4 classes: the mapping comes later
    label[0, 1] = 255
    validate({"image": image, "label": label})
    with pytest.raises(ValueError, match="outside the class list"):
        validate({"image": image, "label": torch.full((1, 4, 4, 1), 254.0)})

    # a mapped label: classes 0-3 and a block of ignored voxels
    torch.manual_seed(0)
    label = torch.randint(0, 4, (1, 1, 8, 8, 2)).float()
    ignored = torch.zeros_like(label, dtype=torch.bool)
    ignored[..., :3, :, :] = True
    label[ignored] = 255
    # the weight map: zero on ignored voxels, class balance counted without them
    weight = parser.get_parsed_content("train#weight_map")({"label": label[0]})["weight"][None]
    assert bool((weight[ignored] == 0).all())
    counts = torch.bincount(label[~ignored].long(), minlength=4).double()
    expected = 0.01 + counts.min() / counts[label[~ignored].long()]
    torch.testing.assert_close(weight[~ignored].double(), expected, rtol=1e-5, atol=1e-6)

    loss = parser.get_parsed_content("loss")
    target = torch.cat([label, weight], dim=1)
    logits = torch.randn(1, 2, 4, 8, 8, 2)  # (B, heads, C, X, Y, Z) as the network trains
    changed = logits.clone()
    changed[:, :, :, ignored[0, 0]] = torch.randn_like(changed[:, :, :, ignored[0, 0]]) * 10
    assert loss(changed, target) == pytest.approx(loss(logits, target).item(), rel=1e-6)
    changed[:, :, :, ~ignored[0, 0]] += torch.randn_like(changed[:, :, :, ~ignored[0, 0]])
    assert loss(changed, target).item() != pytest.approx(loss(logits, target).item(), rel=1e-6)

    metrics = [
        parser.get_parsed_content("validate#key_metric#val_miou_all"),
        parser.get_parsed_content("validate#additional_metrics#val_miou_org"),
        parser.get_parsed_content("validate#additional_metrics#val_iou"),
    ]
    pred = torch.nn.functional.one_hot(torch.where(ignored, 0, label).long()[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    other = pred.clone()
    other[:, :, ignored[0, 0]] = torch.tensor([0.0, 0.0, 1.0, 0.0])[:, None]  # ignored voxels predicted otherwise
    assert [metric.ignore_index for metric in metrics] == [255] * 3  # 255 would be out of range anyway: check wiring
    scores = []
    for p in (pred, other):
        for metric in metrics:
            metric.reset()
            metric.update((p, label))
        scores.append([metric.compute() for metric in metrics])
    np.testing.assert_equal(scores[0], scores[1])  # NaN (classes absent from both) equal to NaN
    assert scores[0][0] == pytest.approx(1.0)


def test_three_class_task_drives_network_metadata_and_evaluation(tmp_path):
    task_file = _task_file(tmp_path, THREE, rest="ignore", name="three")
    train = _parser(["train.json", "variants/task.json"], task_file, **{"network_def#features": 8})
    assert train.get_parsed_content("class_names") == ["cell", "background", "organelle"]
    assert train.get_parsed_content("organelle_classes") == [2]
    network = train.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert network(torch.randn(1, 1, 32, 32, 1)).shape == (1, 3, 32, 32, 1)
    infer = _parser(["inference.json", "variants/task.json"], task_file)
    assert infer.get_parsed_content("network_def#out_channels") == 3

    # the metadata command: channel_def has the task's names, and the bundle reads them back as its classes
    written = tmp_path / "metadata.json"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tasks", "write_metadata", "--task", str(task_file), "--output", str(written)],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads(written.read_text())
    pred_format = meta["network_data_format"]["outputs"]["pred"]
    assert pred_format["channel_def"] == {"0": "cell", "1": "background", "2": "organelle"}
    assert pred_format["num_channels"] == 3
    assert load_class_schema(written) == {"names": ["cell", "background", "organelle"], "organelles": [2]}
    verify_metadata(meta_file=str(written), filepath=str(METADATA_SCHEMA))  # raises on a schema violation

    # evaluation: ground truth mapped to the task, a 3-class table; ignored voxels do not count
    datalist = write_synthetic_dataset(tmp_path / "data", shape=(32, 32, 2))
    raw = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "data/labels.tif"))
    label = MapLabelsd("label", load_task(task_file), ignore_label=255)({"label": raw})["label"]
    pred = torch.where(label == 255, 1.0, label)  # perfect, and "background" on the ignored voxels
    write_volume_atomically(pred, label.meta, tmp_path / "pred" / "image_seg.tif", np.uint8)
    overrides = {
        "datalist": str(datalist),
        "dataset_dir": str(tmp_path / "data"),
        "prediction_dir": str(tmp_path / "pred"),
        "output_dir": str(tmp_path / "eval"),
    }
    evaluate = _parser(["evaluate.json", "variants/task.json"], task_file, **overrides)
    report = evaluate.get_parsed_content("report")
    assert report.ignore_index == 255
    summary = report.run()
    assert list(summary["mean"]["iou"]) == ["cell", "background", "organelle"]
    assert summary["mean"]["miou_all"] == pytest.approx(1.0)
    rows = (tmp_path / "eval" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 2  # header, 3 classes for the volume and for ALL


@pytest.mark.parametrize("name", ["mito_only", "dense_granules"])
def test_shipped_tasks_parse_with_the_bundle(name):
    task = load_task(BUNDLE / "configs" / "tasks" / f"{name}.json")
    assert task.source_names == tuple(load_class_schema(METADATA)["names"])
    parser = _parser(["train.json", "variants/task.json"], BUNDLE / "configs" / "tasks" / f"{name}.json")
    assert parser.get_parsed_content("num_classes") == len(task.names)
    assert parser.get_parsed_content("label_classes") == 7

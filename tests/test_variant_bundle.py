"""Bundle copies with variants merged into their configs (what MONAI Label can load)."""

import json

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

from conftest import BUNDLE, METADATA_SCHEMA
from scripts.crf_stack import NetworkWithCRF
from scripts.io import InputError
from tools.variant_bundle import write_variant_bundle


def _parsed(bundle, config, key):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content(key)


def test_crf_stack_bundle_builds_the_stack_from_its_own_configs(tmp_path):
    stack = _parsed(BUNDLE, "inference.json", "network_def")  # the plain network, to seed a stage-1 checkpoint
    torch.save(stack.state_dict(), tmp_path / "stage1.pt")
    out = write_variant_bundle(["configs/variants/crf_stage2.json"], tmp_path / "em_crf_segmentation")
    for config in ("train.json", "inference.json", "evaluate.json"):
        assert not any("#" in key for key in json.loads((out / "configs" / config).read_text()))
    network = _parsed(out, "inference.json", "network_def")
    assert isinstance(network, NetworkWithCRF)
    assert (out / "configs" / "metadata.json").read_text() == (BUNDLE / "configs" / "metadata.json").read_text()
    assert not (out / "configs" / "label_schema.json").exists()
    assert list((out / "models").iterdir()) == []

    # a stack's own checkpoint fine-tunes the stack (MONAI Label trains from models/model.pt)
    network.load_network(tmp_path / "stage1.pt")
    torch.save(network.state_dict(), tmp_path / "stack.pt")
    again = _parsed(out, "inference.json", "network_def").load_network(tmp_path / "stack.pt")
    for key, value in network.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    torch.save({"x": torch.ones(1)}, tmp_path / "mismatch.pt")
    with pytest.raises(InputError, match="mismatch.pt does not fit this network"):
        again.load_network(tmp_path / "mismatch.pt")

    with pytest.raises(FileExistsError, match="em_crf_segmentation exists"):
        write_variant_bundle(["configs/variants/crf_stage2.json"], out)
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        write_variant_bundle(["configs/variants/nope.json"], tmp_path / "other_segmentation")


def test_task_bundle_metadata_names_the_task_classes(tmp_path):
    out = write_variant_bundle(["configs/variants/task.json"], tmp_path / "em_mito_segmentation")
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "mitochondrion"} and pred["num_channels"] == 2
    verify_metadata(meta_file=str(out / "configs" / "metadata.json"), filepath=str(METADATA_SCHEMA))
    # the data's label schema stays the one the task maps from
    source = json.loads((out / "configs" / "label_schema.json").read_text())
    assert source == json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    task = _parsed(out, "train.json", "task")
    assert task.names == ("background", "mitochondrion") and len(task.source_names) == 7
    assert _parsed(out, "inference.json", "network_def").out_channels == 2

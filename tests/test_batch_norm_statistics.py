"""benchmarks/batch_norm_statistics.py: batch-norm statistics re-estimated on real training windows."""

import importlib.util

import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, REPO, SAMPLE_DATA, require_data

spec = importlib.util.spec_from_file_location("batch_norm_statistics", REPO / "benchmarks" / "batch_norm_statistics.py")
batch_norm_statistics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(batch_norm_statistics)


def test_reestimate_averages_the_statistics_over_training_windows_and_keeps_the_weights(tmp_path, monkeypatch):
    require_data("platelet/50-slice0-image.tif", "platelet/50-slice0-labels.tif")
    monkeypatch.chdir(BUNDLE)
    files = ["configs/train.json", "configs/variants/study/norm_batch.json"]
    common = {"dataset_dir": str(SAMPLE_DATA), "datalist": str(BUNDLE / "configs" / "datalists" / "platelet.json")}
    parser = ConfigParser()
    parser.read_config(files)
    untrained = parser.get_parsed_content("network_def").state_dict()  # running statistics at 0 and 1
    torch.save({"model": untrained}, tmp_path / "model.pt")

    path = batch_norm_statistics.reestimate(tmp_path / "model.pt", files, common, 3, tmp_path / "re" / "model.pt")

    state = torch.load(path, weights_only=True)["model"]
    tracked = [value for key, value in state.items() if key.endswith("num_batches_tracked")]
    assert tracked and all(int(count) == 3 for count in tracked)  # a plain average over the 3 batches
    assert all(state[key].abs().sum() > 0 for key in state if key.endswith("running_mean"))
    assert all(
        not torch.allclose(state[key], torch.ones_like(state[key])) for key in state if key.endswith("running_var")
    )
    for key, value in untrained.items():
        if "running_" not in key and not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key

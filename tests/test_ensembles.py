import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_cli import bundle_run
from conftest import BUNDLE, SAMPLE_DATA, require_data
from scripts.ensembles import EnsembleNetwork
from scripts.networks import HybridUNet2D3D


def _nets(k=2):
    torch.manual_seed(0)
    return [HybridUNet2D3D(out_channels=3, features=4).eval() for _ in range(k)]


def test_mean_ensemble_is_the_mean_of_the_softmax():
    nets, x = _nets(), torch.randn(1, 1, 16, 16, 2)
    with torch.inference_mode():
        expected = (torch.softmax(nets[0](x), 1) + torch.softmax(nets[1](x), 1)) / 2
        got = torch.softmax(EnsembleNetwork(nets)(x), 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vote_ensemble_counts_members_argmax():
    nets, x = _nets(3), torch.randn(1, 1, 16, 16, 2)
    with torch.inference_mode():
        votes = torch.stack([n(x).argmax(1) for n in nets])
        shares = torch.softmax(EnsembleNetwork(nets, mode="vote")(x), 1)
    for c in range(3):
        torch.testing.assert_close(shares[:, c], (votes == c).float().mean(0), atol=1e-5, rtol=0)


def test_bad_ensemble_settings_are_named():
    with pytest.raises(ValueError, match="ensemble_checkpoints"):
        EnsembleNetwork([])
    with pytest.raises(ValueError, match="'mean' or 'vote'"):
        EnsembleNetwork(_nets(1), mode="median")


def test_two_model_ensemble_through_the_cli_writes_the_mean_probabilities(tmp_path):
    """Through ``run inference`` on the real platelet slice: the ensemble's probability map is the mean of the two
    members' probability maps, and the label volume is its argmax."""
    require_data("platelet/50-slice0-image.tif")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["network_def#features"] = 8
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(
            parser.get_parsed_content("network_def", instantiate=True, lazy=False).state_dict(),
            tmp_path / f"m{seed}.pt",
        )
    common = {
        "dataset_dir": str(SAMPLE_DATA),
        "network_def#features": 8,
        # one window over the whole slice: with instance normalisation a voxel's logits depend on its window, so
        # blending the ensemble's mean over overlapping windows differs from averaging blended members
        "infer_window": [800, 800, 1],
        "save_probabilities": True,
        "precision": "float32",  # the averaging is checked, not bf16 rounding of random weights
    }
    probabilities = []
    for seed in (1, 2):
        out = tmp_path / f"single{seed}"
        bundle_run(
            "inference",
            ["configs/inference.json"],
            {**common, "output_dir": str(out), "ckpt_path": str(tmp_path / f"m{seed}.pt")},
        )
        probabilities.append(np.asarray(nib.load(out / "50-slice0-image_prob.nii.gz").dataobj))
    out = tmp_path / "ensemble"
    checkpoints = [str(tmp_path / "m1.pt"), str(tmp_path / "m2.pt")]
    bundle_run(
        "inference",
        ["configs/inference.json", "configs/ensemble.json"],
        {**common, "output_dir": str(out), "ensemble_checkpoints": checkpoints},
    )
    ensemble = np.asarray(nib.load(out / "50-slice0-image_prob.nii.gz").dataobj)
    np.testing.assert_allclose(ensemble, (probabilities[0] + probabilities[1]) / 2, atol=1e-4)

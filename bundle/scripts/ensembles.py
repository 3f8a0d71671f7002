"""Top-k ensembles of trained instances (Guay et al.): voxelwise mean of their softmax, or a majority vote."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from scripts.inference import class_indices
from scripts.io import load_weights


class EnsembleNetwork(nn.Module):
    """Combine several networks' class probabilities voxel by voxel.

    Returns log-probabilities, so that the bundle's inference post-processing (a softmax) yields exactly the
    ensemble's probabilities and the argmax its segmentation: sliding windows, inversion and writing work as for a
    single model.

    Args:
        networks: the members, each mapping a window to class logits.
        mode: ``"mean"`` (mean of the softmax) or ``"vote"`` (share of members voting for each class).
    """

    def __init__(self, networks: Sequence[nn.Module], mode: str = "mean") -> None:
        super().__init__()
        if not networks:
            raise ValueError("an ensemble needs at least one network: set ensemble_checkpoints")
        if mode not in ("mean", "vote"):
            raise ValueError(f"ensemble mode must be 'mean' or 'vote', got {mode!r}")
        self.networks = nn.ModuleList(networks)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.softmax(net(x).float(), dim=1) for net in self.networks])
        if self.mode == "vote":
            votes = class_indices(probabilities, 2)
            classes = probabilities.shape[2]
            probabilities = nn.functional.one_hot(votes, classes).movedim(-1, 2).float()
        return torch.log(probabilities.mean(0).clamp_min(1e-12))


def load_members(network_def: nn.Module, checkpoints: Sequence[str | os.PathLike], device) -> list[nn.Module]:
    """One copy of ``network_def`` per checkpoint, with its weights loaded (``weights_only``), in eval mode.

    Args:
        network_def: the architecture shared by the members.
        checkpoints: checkpoint files, e.g. the top-k instances' ``model.pt``.
        device: where the members run.
    """
    members = []
    for path in checkpoints:
        member = load_weights(copy.deepcopy(network_def), path, "listed in ensemble_checkpoints", map_location=device)
        members.append(member.to(device).eval())
    return members

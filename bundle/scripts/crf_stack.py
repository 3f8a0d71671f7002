"""The full processing stack of seed 000: the segmentation network followed by the anisotropic 3D CRF-RNN
(``scripts.crf.CRFRNN``) on its logits, loadable from stage-1 weights or from a whole stack's checkpoint."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn

from scripts.crf import CRFRNN
from scripts.io import InputError, load_weights

__all__ = ["NetworkWithCRF"]


class NetworkWithCRF(nn.Module):
    """The full processing stack: a segmentation network followed by a :class:`CRFRNN` on its logits.

    In training mode a network returning stacked heads ``(B, H, C, X, Y, Z)`` (the hybrid network's 3D and 2D
    heads) keeps that contract: head 0 (the output head) is refined, the others pass through, so the weighted
    multi-head loss still applies. Otherwise the refined logits ``(B, C, X, Y, Z)`` are returned.

    Args:
        network: maps ``(B, C_in, X, Y, Z)`` to logits; its first ``crf.image_channels`` input channels are the
            CRF's image features.
        crf: the CRF-RNN.
    """

    def __init__(self, network: nn.Module, crf: CRFRNN) -> None:
        super().__init__()
        self.network = network
        self.crf = crf
        # the window sizes the stack accepts are those of its network (inference fits windows to it)
        if hasattr(network, "spatial_divisor"):
            self.spatial_divisor: int = network.spatial_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        image = x[:, : self.crf.image_channels]
        if out.ndim == x.ndim + 1:
            refined = self.crf(out[:, 0], image)
            return torch.cat([refined.unsqueeze(1), out[:, 1:].as_subclass(torch.Tensor).to(refined.dtype)], dim=1)
        return self.crf(out, image)

    def load_network(self, checkpoint: Union[str, os.PathLike]) -> NetworkWithCRF:
        """Load stage-1 weights (``model.pt`` of ``train.json``: ``{"model": state dict}`` or a state dict) into
        the wrapped network, or a whole stack's checkpoint into the stack (fine-tuning a trained stack, as MONAI
        Label does with a bundle's ``models/model.pt``); returns ``self``.

        Raises:
            InputError: naming the checkpoint and how to produce it, or what differs if the weights fit neither the
                network nor the stack.
        """
        hint = "train the network alone first (configs/train.json) or set --stage1_checkpoint"
        try:
            load_weights(self.network, checkpoint, hint)
        except InputError:  # not the network's keys: a stack checkpoint ("network.*", "crf.*"), or a mismatch
            load_weights(self, checkpoint, hint)
        return self

    def parameter_groups(
        self, crf_learning_rate: Optional[float] = None, train_network: bool = True, **l2_lambdas: float
    ) -> list[dict]:
        """Optimiser groups: the network's (its ``l2_parameter_groups(**l2_lambdas)`` where it has them, the
        paper's L2 terms) and the CRF's (no weight decay: its parameters are logs and a compatibility).

        Args:
            crf_learning_rate: the CRF group's learning rate; default the optimiser's.
            train_network: False freezes the network (``requires_grad`` off) and trains the CRF alone.
            l2_lambdas: passed to the network's ``l2_parameter_groups``.
        """
        groups: list[dict] = []
        if train_network:
            if hasattr(self.network, "l2_parameter_groups"):
                groups += self.network.l2_parameter_groups(**l2_lambdas)
            else:
                groups.append({"params": list(self.network.parameters()), "name": "network"})
        else:
            self.network.requires_grad_(False)
        crf_group: dict = {"params": list(self.crf.parameters()), "weight_decay": 0.0, "name": "crf"}
        if crf_learning_rate is not None:
            crf_group["lr"] = crf_learning_rate
        return groups + [crf_group]

"""2D networks of the baselines and of the FIB-SEM recipe, run section by section in the bundle's 3D pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["SectionWise2D", "unet_with_deep_dropout"]


class SectionWise2D(nn.Module):
    """Run a 2D network on every z-section of a ``(B, C, X, Y, Z)`` window, so that MONAI's 2D networks (the
    FIB-SEM recipe's U-Nets, the original 2D U-Net baseline) plug into the bundle's 3D pipeline unchanged.

    Args:
        network: a 2D network mapping ``(N, C, X, Y)`` to ``(N, C_out, X, Y)``.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, sx, sy, sz = x.shape
        sections = x.permute(0, 4, 1, 2, 3).reshape(b * sz, c, sx, sy)
        out = self.network(sections)
        return out.reshape(b, sz, out.shape[1], sx, sy).permute(0, 2, 3, 4, 1)


def unet_with_deep_dropout(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 7,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    dropout: float = 0.5,
) -> nn.Module:
    """MONAI's ``BasicUNet`` with batch normalisation and dropout only after its deepest block (seed 003).

    Args:
        spatial_dims: 2 for the FIB-SEM recipe's section-wise U-Net.
        in_channels: image channels (1, plus one per grain-filter area).
        out_channels: classes.
        features: ``BasicUNet`` widths.
        dropout: dropout probability after the deepest block.
    """
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims, in_channels, out_channels, features=features, norm="batch", dropout=0.0)
    net.down_4 = nn.Sequential(net.down_4, nn.Dropout(dropout))
    return net

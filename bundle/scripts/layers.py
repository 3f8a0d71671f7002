"""Building blocks of the hybrid network: a 3D convolution that runs as 2D where that gives the same result, the
convolution, normalisation and up-sampling choices of ``scripts.networks.HybridUNet2D3D``, and its 3D spatial
pyramid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["SectionConv3d", "SpatialPyramid3D", "conv_block", "norm_spec", "upsampling"]

_KERNEL_3D = (3, 3, 3)


class SectionConv3d(nn.Conv3d):
    """A zero-padded 3D convolution that runs as a 2D convolution on a single section (``Z == 1``).

    With "same" zero padding along z, the outer z-taps of a 3x3x3 kernel multiply zeros when the input has one
    section, and a (3, 3, 1) kernel never reaches across sections: either way the result is a 2D convolution with
    the kernel's central z-slice. CPU libraries run that 2-3x faster than the equivalent 3D call (measured with
    oneDNN on (4, 16, 256, 256, 1) windows), and single-section windows are the CPU default. A 1x1x1 kernel runs as
    a 1x1 2D convolution for any ``Z``: oneDNN's 3D backward of the predictors took 0.34 s a call on such a
    window, a fifth of a training step.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kz, pz = self.kernel_size[2], self.padding[2]
        if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1:
            # a 1x1x1 convolution is a per-voxel matrix product: one 1x1 2D call over (X, Y * Z)
            b, _, sx, sy, sz = input.shape
            out = F.conv2d(input.reshape(b, -1, sx, sy * sz), self.weight.squeeze(-1), self.bias)
            return out.reshape(b, -1, sx, sy, sz)
        if input.shape[-1] == 1 and kz == 2 * pz + 1 and self.stride[2] == 1 and self.padding_mode == "zeros":
            out = F.conv2d(
                input.squeeze(-1),
                self.weight.squeeze(-1) if kz == 1 else self.weight[..., pz],
                self.bias,
                (self.stride[0], self.stride[1]),
                (self.padding[0], self.padding[1]),
                (self.dilation[0], self.dilation[1]),
                self.groups,
            )
            return out.unsqueeze(-1)
        return self._conv_forward(input, self.weight, self.bias)


def conv_block(
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    norm: Optional[str] = None,
    stride: Sequence[int] | int = 1,
) -> Convolution:
    """Zero-padded ("same") convolution with bias, optional normalisation, then ReLU (the paper: no norm)."""
    block = Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=kernel_size,
        act=("relu", {"inplace": True}),
        norm=norm_spec(norm),
        bias=True,
    )
    conv = block.conv  # replaced under the same name, so checkpoints are unchanged
    section_conv = SectionConv3d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    section_conv.load_state_dict(conv.state_dict())
    block.conv = section_conv
    return block


def norm_spec(norm: Optional[str]):
    """MONAI's norm argument; instance norm gets affine parameters (nnU-Net's choice)."""
    if norm is None or norm == "none":
        return None
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "batch":
        return "batch"
    raise ValueError(f"norm must be None, 'none', 'instance' or 'batch', got {norm!r}")


def upsampling(in_channels: int, out_channels: int, factor: Sequence[int], mode: str) -> nn.Module:
    """xy up-sampling by ``factor``: the paper's transposed convolution (kernel = stride), or nearest-neighbour
    interpolation followed by a (3, 3, 1) convolution, which cannot print the kernel's period into the output
    (the transposed convolution gives each of the ``factor`` sub-positions its own weights: a regular grid)."""
    if mode == "transposed":
        return nn.ConvTranspose3d(in_channels, out_channels, kernel_size=factor, stride=factor, bias=True)
    if mode == "interpolate":
        return nn.Sequential(
            nn.Upsample(scale_factor=tuple(float(f) for f in factor), mode="nearest"),
            SectionConv3d(in_channels, out_channels, kernel_size=(3, 3, 1), padding=(1, 1, 0), bias=True),
        )
    raise ValueError(f"upsample must be 'transposed' or 'interpolate', got {mode!r}")


class _PyramidLevel(nn.Module):
    """One spatial-pyramid level: xy max-pool by ``2**level``, 3x3x3 conv block, width matching, up-sampling."""

    def __init__(
        self,
        level: int,
        in_channels: int,
        features: int,
        num_convs: int,
        out_channels: int,
        norm: Optional[str] = None,
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        factor = (2**level, 2**level, 1)
        self.pool: nn.Module = nn.MaxPool3d(kernel_size=factor, stride=factor) if level > 0 else nn.Identity()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_convs):
            layers.append(conv_block(channels, features, _KERNEL_3D, norm))
            channels = features
        self.block = nn.Sequential(*layers)
        if level > 0:
            # authors' "path end" 1x1x1 conv (with the block activation) then the up-sampling edge
            self.proj: nn.Module = conv_block(features, out_channels, (1, 1, 1), norm)
            self.up: nn.Module = upsampling(out_channels, out_channels, factor, upsample)
        else:
            if features != out_channels:
                raise ValueError(f"pyramid level 0 width {features} must equal the pyramid output {out_channels}")
            self.proj = nn.Identity()
            self.up = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.proj(self.block(self.pool(x))))


class SpatialPyramid3D(nn.Module):
    """3D convolutional spatial pyramid; the levels' outputs are summed at full resolution (residual)."""

    def __init__(
        self,
        in_channels: int,
        features: Sequence[int],
        convs: Sequence[int],
        norm: Optional[str] = None,
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            [
                _PyramidLevel(i, in_channels, f, n, features[0], norm, upsample)
                for i, (f, n) in enumerate(zip(features, convs))
            ]
        )
        self.out_channels = features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Optional[torch.Tensor] = None
        for level in self.levels:
            y = level(x)
            out = y if out is None else out + y
        assert out is not None
        return out

"""Building blocks of the hybrid network: a 3D convolution that runs as 2D where that gives the same result, an
instance norm on group-norm kernels, max-pooling, nearest up-sampling and ReLU with faster inference paths, the
convolution, normalisation and up-sampling choices of ``scripts.networks.HybridUNet2D3D``, and its 3D spatial
pyramid."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = [
    "InplaceReLU",
    "InstanceGroupNorm3d",
    "NearestUpsample3d",
    "SectionConv3d",
    "SpatialPyramid3D",
    "StridedMaxPool3d",
    "conv_block",
    "norm_spec",
    "to_channels_last_3d",
    "upsampling",
]

_KERNEL_3D = (3, 3, 3)
GROUP_NORM_CHANNELS = 4


def unsqueeze_section(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, X, Y)`` -> ``(B, C, X, Y, 1)``; a channels-last input gets the canonical channels-last-3d strides,
    which ``torch.cat`` keeps (after a plain ``unsqueeze`` it returns a channel-first tensor)."""
    if x.is_contiguous():
        return x.unsqueeze(-1)
    return x.permute(0, 2, 3, 1).unsqueeze(3).permute(0, 4, 1, 2, 3)


class SectionConv3d(nn.Conv3d):
    """A zero-padded 3D convolution that runs as a 2D convolution on a single section (``Z == 1``).

    With "same" zero padding along z, the outer z-taps of a 3x3x3 kernel multiply zeros when the input has one
    section, and a (3, 3, 1) kernel never reaches across sections: either way the result is a 2D convolution with
    the kernel's central z-slice. CPU libraries run that 2-3x faster than the equivalent 3D call (measured with
    oneDNN on (4, 16, 256, 256, 1) windows), and single-section windows are the CPU default. A 1x1x1 kernel runs as
    a 1x1 2D convolution for any ``Z`` (oneDNN's 3D backward of the predictors took 0.34 s a call on such a
    window, a fifth of a training step), or on a channels-last input as a linear layer over the channels.

    ``channels_last`` (set by ``to_channels_last_3d``) keeps single-section outputs channels-last: oneDNN takes its
    output layout from the input's or the weight's, which a 1-channel image or the central slice of a 3x3x3 kernel
    leaves undecided, and a bf16 convolution copies a channel-first input to channels-last and its output back.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels_last = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kz, pz = self.kernel_size[2], self.padding[2]
        if self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1:
            # a 1x1x1 convolution is a per-voxel matrix product
            if self.channels_last and input.is_contiguous(memory_format=torch.channels_last_3d):
                # a linear layer on the (B, X, Y, Z, C) view, whose memory is contiguous: channels-last out (the
                # 1x1 2D call returns a channel-first tensor here, which every consumer then copied back)
                weight = self.weight.reshape(self.out_channels, -1)
                return F.linear(input.permute(0, 2, 3, 4, 1), weight, self.bias).permute(0, 4, 1, 2, 3)
            b, _, sx, sy, sz = input.shape  # one 1x1 2D call over (X, Y * Z)
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
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            return unsqueeze_section(out)
        return self._conv_forward(input, self.weight, self.bias)


def to_channels_last_3d(network: nn.Module) -> nn.Module:
    """Stores the 5D weights of ``network`` (3D convolutions) channels-last, in place, and has its single-section
    convolutions return channels-last activations; other tensors are kept.

    ``nn.Module.to(memory_format=torch.channels_last_3d)`` would fail on a 2D convolution's 4D weights.
    """
    for tensor in itertools.chain(network.parameters(), network.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
    for module in network.modules():
        if isinstance(module, SectionConv3d):
            module.channels_last = True
    return network


class InstanceGroupNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` without running statistics, computed as a group norm with one group per channel.

    The same normalisation (per sample and channel over the spatial axes) and parameters, so checkpoints are
    unchanged. PyTorch's CPU group norm is faster than its instance norm, a batch norm of a reshaped copy (4.9x in
    float32 on a (4, 16, 128, 128, 1) window, 10.4x on a channels-last 3D one: ``benchmarks/inference_speed.py --part
    operators``), and keeps a channels-last input channels-last. Its channels-last kernel normalises one group at a
    time, element by element, on maps under 1024 voxels, and under-fills its channel vectors below 16 bf16 channels
    (slower than a channel-first copy on the shipped model's (4, 8, 128, 128, 1) and (4, 128, 16, 16, 1) bf16
    activations, ``--part operators``): those are normalised channel-first and returned channels-last.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 5 or self.track_running_stats:
            return self._apply_instance_norm(input)
        voxels = input.shape[2] * input.shape[3] * input.shape[4]
        narrow = self.num_features < 16 and input.dtype != torch.float32
        if input.is_contiguous() or (voxels >= 1024 and not narrow):
            return F.group_norm(input, self.num_features, self.weight, self.bias, self.eps)
        out = F.group_norm(input.contiguous(), self.num_features, self.weight, self.bias, self.eps)
        return out.contiguous(memory_format=torch.channels_last_3d)


class InplaceReLU(nn.ReLU):
    """``nn.ReLU(inplace=True)`` whose bfloat16 inference clamps the values' int16 view at 0.

    A bfloat16 value is negative exactly when its sign bit, the int16 view's, is set, so clamping that view at 0
    maps every negative value (and -0) to +0 and keeps the rest: the ReLU, bit for bit, except that a NaN with the
    sign bit set becomes 0. PyTorch's CPU bf16 ReLU runs no faster than float32's on twice the bytes; with the
    integer clamp the ReLU of the shipped model's bf16 inference of the platelet slice takes 2.8 ms where it took
    8.7 ms (2-core Intel Xeon, ``python benchmarks/inference_speed.py --part profile``, against the JSON of commit
    55242b2). With gradients (training) and in TorchScript the library ReLU runs.
    """

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript has no view as another dtype
            return F.relu(input, inplace=True)
        if input.dtype == torch.bfloat16 and not (input.requires_grad and torch.is_grad_enabled()):
            input.view(torch.int16).clamp_min_(0)
            return input
        return F.relu(input, inplace=True)


class StridedMaxPool3d(nn.Module):
    """``nn.MaxPool3d(factor, factor)`` that runs in eval mode as the maximum of the input's ``factor`` strided views.

    The same values either way. PyTorch's CPU ``max_pool3d`` on channel-first tensors took 4.0 ms where the strided
    maxima take 0.6 ms, on a (4, 23, 128, 128, 1) float32 window (2 threads, ``benchmarks/inference_speed.py --part
    operators``); it was 15 % of the shipped model's bf16 block-wise inference. In training mode the library kernel
    stays: its backward is the faster one (the strided form made a training step 15 % slower).

    Args:
        factor: pooling factor per spatial axis, e.g. ``(2, 2, 1)``.
    """

    def __init__(self, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = [int(f) for f in factor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.max_pool3d(x, self.factor, self.factor)
        fx, fy, fz = self.factor
        sx, sy, sz = x.shape[2] // fx * fx, x.shape[3] // fy * fy, x.shape[4] // fz * fz
        out = x[:, :, 0:sx:fx, 0:sy:fy, 0:sz:fz]
        for i in range(fx):
            for j in range(fy):
                for k in range(fz):
                    if i + j + k > 0:
                        out = torch.maximum(out, x[:, :, i:sx:fx, j:sy:fy, k:sz:fz])
        return out


class NearestUpsample3d(nn.Module):
    """``nn.Upsample(scale_factor=factor, mode="nearest")`` for integer factors, whose inference runs as a broadcast
    copy in eval mode: the same values 1.5x faster than ``upsample_nearest3d`` on channel-first tensors (float32
    and bf16, ``benchmarks/inference_speed.py --part operators``), in the input's layout (channel-first or
    channels-last). In training mode the library kernel stays, for its faster backward.

    Args:
        factor: up-sampling factor per spatial axis, e.g. ``(2, 2, 1)``.
    """

    def __init__(self, factor: Sequence[int]) -> None:
        super().__init__()
        self.factor = [int(f) for f in factor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.interpolate(x, scale_factor=[float(f) for f in self.factor], mode="nearest")
        b, c, sx, sy, sz = x.shape
        fx, fy, fz = self.factor
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            grid = x[:, :, :, None, :, None, :, None].expand(b, c, sx, fx, sy, fy, sz, fz)
            return grid.reshape(b, c, sx * fx, sy * fy, sz * fz)
        # channels-last: broadcast the (B, X, Y, Z, C) view, whose memory is contiguous, and permute back
        grid = x.permute(0, 2, 3, 4, 1)[:, :, None, :, None, :, None, :].expand(b, sx, fx, sy, fy, sz, fz, c)
        return grid.reshape(b, sx * fx, sy * fy, sz * fz, c).permute(0, 4, 1, 2, 3)


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
        norm=norm_spec(norm, out_channels),
        bias=True,
    )
    conv = block.conv  # replaced under the same name, so checkpoints are unchanged
    section_conv = SectionConv3d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    section_conv.load_state_dict(conv.state_dict())
    block.conv = section_conv
    block.adn.A = InplaceReLU()
    instance_norm = getattr(block.adn, "N", None)
    if isinstance(instance_norm, nn.InstanceNorm3d):
        group_norm = InstanceGroupNorm3d(out_channels, eps=instance_norm.eps, affine=instance_norm.affine)
        group_norm.load_state_dict(instance_norm.state_dict())
        block.adn.N = group_norm
    return block


def norm_spec(norm: Optional[str], channels: int):
    """MONAI's norm argument for a layer of ``channels`` channels: instance norm gets affine parameters (nnU-Net's
    choice); ``"group"`` is a group norm with ``GROUP_NORM_CHANNELS`` channels a group (Wu and He 2018): statistics
    per window like instance norm, but over several channels, and none carried from training to inference like
    batch norm's."""
    if norm is None or norm == "none":
        return None
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": max(1, channels // GROUP_NORM_CHANNELS)})
    raise ValueError(f"norm must be None, 'none', 'instance', 'batch' or 'group', got {norm!r}")


def upsampling(in_channels: int, out_channels: int, factor: Sequence[int], mode: str) -> nn.Module:
    """xy up-sampling by ``factor``: the paper's transposed convolution (kernel = stride), or nearest-neighbour
    interpolation followed by a (3, 3, 1) convolution, which cannot print the kernel's period into the output
    (the transposed convolution gives each of the ``factor`` sub-positions its own weights: a regular grid)."""
    if mode == "transposed":
        return nn.ConvTranspose3d(in_channels, out_channels, kernel_size=factor, stride=factor, bias=True)
    if mode == "interpolate":
        return nn.Sequential(
            NearestUpsample3d(factor),
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
        self.pool: nn.Module = StridedMaxPool3d(factor) if level > 0 else nn.Identity()
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

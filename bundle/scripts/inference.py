"""Sliding-window inference variants for large volumes, and the class of each voxel from their logits."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer


def class_indices(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The index of the largest value along ``dim`` (the class of each voxel), as ``torch.argmax`` (first maximum).

    ``max(dim).indices`` is the same result; on CPU, PyTorch's ``argmax`` over a dimension that is not the innermost
    ran 23x slower (109 ms against 4.7 ms for 5 x 800 x 800 float32 logits, 2 threads, ``benchmarks/inference_speed.py
    --part operators``): it was the largest single operator of the shipped model's block-wise bf16 inference.
    """
    return logits.max(dim).indices


class FlipTTA(nn.Module):
    """Test-time augmentation by flips: the mean softmax over every combination of flips along ``axes``.

    Each flipped window's prediction is flipped back before averaging. Returns log-probabilities, like
    ``scripts.ensembles.EnsembleNetwork``, so the two compose either way round and the bundle's softmax yields the
    averaged probabilities.

    Args:
        network: maps windows ``(B, C, X, Y, Z)`` to class logits (or log-probabilities).
        axes: spatial axes to flip (0 = x, 1 = y, 2 = z); ``2 ** len(axes)`` passes per window.
    """

    def __init__(self, network: nn.Module, axes: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.axes = self.checked_axes(axes)

    @staticmethod
    def checked_axes(axes: Sequence[int]) -> tuple[int, ...]:
        axes = tuple(int(a) for a in axes)
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"tta_axes {list(axes)} must be distinct spatial axes among 0 (x), 1 (y), 2 (z)")
        return axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flips = [combo for n in range(len(self.axes) + 1) for combo in itertools.combinations(self.axes, n)]
        probabilities = 0
        for flip in flips:
            dims = [2 + axis for axis in flip]
            logits = self.network(torch.flip(x, dims)).float()
            probabilities = probabilities + torch.flip(torch.softmax(logits, dim=1), dims)
        return torch.log((probabilities / len(flips)).clamp_min(1e-12))

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


def fit_multiple(fit_divisor: int, fit_min: int) -> int:
    """The multiple a fitted window keeps along x or y: the network's divisor, else the training window (the network
    accepts it and its multiples), else 0: that axis is not fitted."""
    return fit_divisor if fit_divisor > 0 else fit_min if fit_min > 1 else 0


def fitted_window(
    shape: Sequence[int],
    roi_size: Sequence[int],
    fit_axes: Sequence[int] = (2,),
    fit_divisor: int = 0,
    fit_min: Sequence[int] = (1, 1),
) -> list[int]:
    """The window actually laid over a volume of ``shape``: ``roi_size`` shrunk where the volume is smaller.

    Along ``fit_axes`` (axes the network never pools: z for the 2D-3D network) the window shrinks to the volume.
    Along x and y it shrinks to the volume rounded up to a multiple of ``fit_divisor`` (the network's
    ``spatial_divisor``; MONAI pads the rest), but not below ``fit_min``: a section no larger than the window is
    one window, computed once, where a smaller window would compute the overlaps of several.

    Args:
        shape: volume shape (x, y, z).
        roi_size: the configured window (x, y, z).
        fit_axes: spatial axes (0 = x, 1 = y, 2 = z) cut to the volume exactly.
        fit_divisor: multiple the x and y sizes of the window must keep; 0 for networks whose divisor is not
            known: multiples of ``fit_min`` then, or x and y left as they are without it.
        fit_min: smallest x and y of a fitted window (the training window, itself a multiple of the divisor:
            a network that normalises per window needs the context it was trained with; smaller volumes are
            padded to it as MONAI pads).
    """
    roi = [int(r) for r in roi_size]
    for axis in (0, 1):
        multiple = fit_multiple(fit_divisor, int(fit_min[axis]))
        if multiple:
            fitted = max(-(-int(shape[axis]) // multiple) * multiple, int(fit_min[axis]))
            roi[axis] = min(roi[axis], fitted)
    for axis in fit_axes:
        roi[axis] = min(roi[axis], int(shape[axis]))
    return roi


def fitted_batch_size(sw_batch_size: int, roi: Sequence[int], max_voxels: int = 0) -> int:
    """Windows per forward pass: ``sw_batch_size``, fewer where their voxels would pass ``max_voxels`` (never below
    one window); 0: no cap. Four 256 x 256 windows are a faster batch than one on a 2-core CPU, but four 1024 x 1024
    ones ran the shipped model slower per voxel than one at a time (their activations outgrow the caches)."""
    if max_voxels <= 0:
        return int(sw_batch_size)
    return max(1, min(int(sw_batch_size), int(max_voxels) // math.prod(int(r) for r in roi)))


class FittedSlidingWindowInferer(SlidingWindowInferer):
    """Sliding window whose window shrinks to the volume (:func:`fitted_window`) instead of padding the volume.

    MONAI pads a volume smaller than the window. Along an axis the network never pools (z for the 2D-3D network),
    a window as deep as the volume is just as valid, and it spares the network sections of padding it never saw in
    training: a single section stays a single section instead of one real section among four blank ones. Along x
    and y the window keeps the network's divisor, so a large configured window costs a small volume nothing.

    Args:
        roi_size: window size (x, y, z).
        fit_axes: spatial axes (0 = x, 1 = y, 2 = z) along which the window shrinks to the volume; ``[]`` for
            networks that pool every axis (their windows must keep their divisible size).
        fit_divisor: x and y shrink to the volume rounded up to this multiple (the network's ``spatial_divisor``);
            0: multiples of ``fit_min`` (:func:`fitted_window`).
        fit_min: smallest x and y of a fitted window (the training window).
        tta_axes: spatial axes flipped for test-time augmentation (:class:`FlipTTA`, ``2 ** len(tta_axes)`` passes
            per window, log-probabilities out); ``[]`` for none (the network's logits out).
        sw_batch_voxels: at most this many voxels of windows per forward pass (:func:`fitted_batch_size`); 0: the
            ``sw_batch_size`` windows whatever their size.
        kwargs: other ``SlidingWindowInferer`` arguments (``sw_batch_size``, ``overlap``, ``mode``, ``progress``...).
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        fit_axes: Sequence[int] = (2,),
        fit_divisor: int = 0,
        fit_min: Sequence[int] = (1, 1),
        tta_axes: Sequence[int] = (),
        sw_batch_voxels: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(roi_size, **kwargs)
        self.fit_axes = tuple(fit_axes)
        self.fit_divisor = int(fit_divisor)
        self.fit_min = tuple(int(m) for m in fit_min[:2])
        self.sw_batch_voxels = int(sw_batch_voxels)
        self.tta_axes = FlipTTA.checked_axes(tta_axes)
        if self.tta_axes:
            passes = 2 ** len(self.tta_axes)
            print(f"test-time augmentation: every window averaged over its {passes} flips along {list(self.tta_axes)}")

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if self.tta_axes:
            network = FlipTTA(network, self.tta_axes)
        roi = fitted_window(inputs.shape[2:], self.roi_size, self.fit_axes, self.fit_divisor, self.fit_min)
        batch = fitted_batch_size(self.sw_batch_size, roi, self.sw_batch_voxels)
        if roi == list(self.roi_size) and batch == self.sw_batch_size:
            return super().__call__(inputs, network, *args, **kwargs)
        fitted = copy.copy(self)
        fitted.sw_batch_size = batch
        if roi != list(self.roi_size):
            fitted.roi_size, fitted.roi_weight_map = roi, None  # the cached weight map is the full window's
        return SlidingWindowInferer.__call__(fitted, inputs, network, *args, **kwargs)


class CentreWindowInferer(SlidingWindowInferer):
    """Sliding window with a stride of a third of the window that keeps only each window's central third.

    The FIB-SEM recipe (seed 003) trusts a prediction only far from the window's borders, where the network saw
    context on every side. The central thirds tile the volume exactly; the rest of each window gets a weight of
    ``margin_weight``, so that the volume's own borders, which no central third covers, are still predicted.
    Axes with a window of 1 (single sections) are not overlapped.

    Args:
        roi_size: window size (x, y, z).
        sw_batch_size: windows per forward pass.
        margin_weight: blending weight outside the central third.
        kwargs: other ``SlidingWindowInferer`` arguments (``progress``, ``device`` ...).
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 1, margin_weight: float = 1e-3, **kwargs) -> None:
        overlap = [2 / 3 if size >= 3 else 0.0 for size in roi_size]
        super().__init__(roi_size, sw_batch_size, overlap=overlap, mode="constant", **kwargs)
        weight = torch.full(tuple(roi_size), margin_weight)
        centre = tuple(slice(s // 3, s - s // 3) if s >= 3 else slice(None) for s in roi_size)
        weight[centre] = 1.0
        self.roi_weight_map = weight

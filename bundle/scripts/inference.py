"""Sliding-window inference variants for large volumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import SlidingWindowInferer


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

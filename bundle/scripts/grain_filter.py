"""Grain filter (Caselles & Monasse) on the tree of shapes, and a MONAI transform adding its outputs as channels.

The grain filter G_λ removes every *shape* of area < λ. A shape is the saturation (the set with its holes filled)
of a connected component of an upper level set [u ≥ t] or of a lower level set [u < t], for any t; shapes are
nested or disjoint and form the tree of shapes. A removed shape takes the grey level of the smallest kept shape
around it, so the kept level lines stay exactly where they were: no contour is created or moved. G_λ is
self-dual (bright and dark details are treated alike), contrast invariant and idempotent.

It is not the composition of an area opening and an area closing (e.g. scikit-image's max-tree based
``area_opening``/``area_closing``): those use the area of the components themselves, ignore holes, depend on their
order and are not self-dual. A thin bright ring of 100 pixels around a 1000-pixel hole, for λ = 650, is removed by
an area opening but kept by the grain filter, whose shape (the ring with its hole) has 1100 pixels.

Discrete conventions (those of the tree of shapes on digital images):

* ``connectivity`` is that of the upper level sets; the lower level sets use the dual one, so that Jordan's
  theorem holds: ``1`` = 4 (2D) / 6 (3D) neighbours for upper sets and 8 / 26 for lower sets; ``ndim`` = the reverse.
* The image lies in an exterior (the point at infinity) whose grey level is a median of the border values: the
  lower median for ``connectivity=ndim``, the upper median for ``connectivity=1``. Hence exact self-duality:
  ``grain_filter(-u, a, 1) == -grain_filter(u, a, ndim)``. Components connected to the exterior are not shapes.

The tree of shapes is built by ``scripts.tree_of_shapes``. The tests check the result against a brute-force stack
of thresholded, labelled level sets.

Reference: V. Caselles, P. Monasse, "Grain filters", J. Math. Imaging Vis. 17(3), 2002.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from scripts.tree_of_shapes import ShapeTree

__all__ = ["grain_filter", "grain_filters", "GrainFilterd"]


def grain_filters(image: np.ndarray, areas: Sequence[int], connectivity: int = 1) -> list[np.ndarray]:
    """Grain filters of one image for several areas; the tree of shapes is built once and shared.

    Args:
        image: 2D or 3D real array (NaN not allowed).
        areas: minimum areas λ (pixels in 2D, voxels in 3D) of the shapes that are kept.
        connectivity: 1 (4/6 neighbours) or ``image.ndim`` (8/26) for upper level sets; lower sets use the other.

    Returns:
        One array per area, of the image's shape and dtype.
    """
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"grain_filter needs a 2D or 3D array, got shape {array.shape}")
    if connectivity not in (1, array.ndim):
        raise ValueError(f"connectivity must be 1 or {array.ndim} (dual pairs only), got {connectivity}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"grain_filter needs a real-valued array, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError("grain_filter: the image contains NaN or infinite values")
    if all(int(a) <= 1 for a in areas):
        return [array.copy() for _ in areas]
    # ranks: the filter commutes with increasing contrast changes, so it runs exactly on integer levels
    values, ranks = np.unique(array, return_inverse=True)
    ranks = ranks.reshape(array.shape).astype(np.int32)
    top = len(values) - 1
    if connectivity == 1:  # the max interpolation makes upper sets fully connected: filter the dual image
        ranks = top - ranks
    tree = ShapeTree(ranks, len(values))
    outputs = []
    for area in areas:
        if int(area) <= 1:
            outputs.append(array.copy())
            continue
        filtered = tree.filter(int(area))
        if connectivity == 1:
            filtered = top - filtered
        outputs.append(values[filtered].astype(array.dtype, copy=False))
    return outputs


def grain_filter(image: np.ndarray, area: int, connectivity: int = 1) -> np.ndarray:
    """Grain filter G_λ: remove every shape (component of an upper or lower level set, holes filled) of area < λ.

    Args:
        image: 2D or 3D real array.
        area: λ, the minimum area (pixels in 2D, voxels in 3D) of a kept shape; λ <= 1 returns a copy.
        connectivity: 1 (4/6 neighbours) or ``image.ndim`` (8/26) for upper level sets; lower sets use the other.

    Returns:
        The filtered array, same shape and dtype; its values are grey levels of ``image``.
    """
    return grain_filters(image, [area], connectivity)[0]


class GrainFilterd(MapTransform):
    """Append grain-filtered versions of an image as extra channels (seed 003: λ = 650 and 3200 pixels).

    ``(C, X, Y, Z)`` becomes ``(C + C * len(areas), X, Y, Z)``: the input channels first, then for each area the
    filtered input channels, in the order of ``areas``. float32, meta and affine are kept. Deterministic, so it may
    sit before a CacheDataset's cache boundary (the filter is by far the costliest transform).

    Args:
        keys: keys of channel-first images ``(C, X, Y, Z)`` (or ``(C, X, Y)``).
        areas: minimum shape areas λ, one new channel per area and input channel.
        mode: "2d" filters each (X, Y) section z separately (λ in pixels); "3d" filters the volume (λ in voxels).
        connectivity: 1 (4/6 neighbours) or the filtered ndim (8/26) for upper level sets.
    """

    def __init__(
        self,
        keys: KeysCollection,
        areas: Sequence[int] = (650, 3200),
        mode: str = "2d",
        connectivity: int = 1,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
        self.areas = [int(a) for a in areas]
        self.mode = mode
        self.connectivity = connectivity

    def _filter_channel(self, channel: np.ndarray) -> list[np.ndarray]:
        if self.mode == "3d" or channel.ndim == 2:
            return grain_filters(channel, self.areas, self.connectivity)
        # 2d: sections are independent images (z is the last axis)
        per_slice = [grain_filters(channel[..., z], self.areas, self.connectivity) for z in range(channel.shape[-1])]
        return [np.stack([s[i] for s in per_slice], axis=-1) for i in range(len(self.areas))]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = np.asarray(torch.as_tensor(image).detach().cpu().numpy(), dtype=np.float32)
            if array.ndim not in (3, 4):
                raise ValueError(f"'{key}' has shape {tuple(array.shape)}; expected (C, X, Y[, Z])")
            filtered = [self._filter_channel(c) for c in array]
            extra = [filtered[c][i] for i in range(len(self.areas)) for c in range(array.shape[0])]
            stacked = np.ascontiguousarray(np.stack([*array, *extra]), dtype=np.float32)
            # the image's type and device, with its meta (affine, filename...) and transform history
            d[key] = convert_to_dst_type(stacked, image, dtype=torch.float32)[0]
        return d

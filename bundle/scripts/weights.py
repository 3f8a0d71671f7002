"""Voxel weight map ``W = floor + W_cb + W_ep`` of Guay et al. 2020 ("Dense cellular segmentation for EM using
2D-3D neural network ensembles", section "Network training").

Arrays are MONAI channel-first: a label volume is ``(1, X, Y, Z)`` with ``z`` the section axis last (a single
section may be given as ``(1, X, Y)``); the 2D planes used by the edge term are the ``(X, Y)`` planes, one per ``z``.

The recipe follows the authors' released code (``create_weight_volume.py`` of leapmanlab):

- ``W_cb``: per class ``1 / N_class`` scaled so that the largest class weight is 1 (the rarest class present gets 1).
- ``W_ep``: for every class pair (s, t), in both directions, class ``s`` is a heat source (value 1) in every
  (X, Y) slice; ``steps`` explicit steps of a 2D heat equation with the 3x3 stencil (centre -1, edge neighbours 1/6,
  corners 0.5/6) and diffusion constant ``diffusion`` are run, each followed by ``* decay``, clipping at 0 and
  resetting the source voxels to 1; then ``max(d - threshold, 0)`` is kept on the voxels of class ``t`` only and
  scaled so that its maximum over the whole volume is ``max_weight``. ``W_ep`` is the sum over all these terms.
  The authors' diffusion uses FFTs, i.e. periodic boundaries in X and Y: ``padding_mode="circular"`` reproduces it.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple_rep

__all__ = ["class_balance_weights", "edge_weights", "weight_map", "WeightMapd"]

PADDING_MODES = ("circular", "replicate", "zeros")

# voxels per chunk of z-slices on the CPU: a chunk and its temporaries then stay in the CPU cache for all the
# diffusion steps, which measured ~2x faster than streaming the whole volume through memory at every step
_CPU_CHUNK_VOXELS = 1_500_000
# on accelerators all slices go in one batch unless that exceeds this many voxels (bounds the temporaries' memory)
_GPU_CHUNK_VOXELS = 1 << 26


def _prepare_label(
    label: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the label and return it as an ``(X, Y, Z)`` int64 tensor of bins, and the mask of ignored voxels.

    Ignored voxels are put in bin ``num_classes``, so that per-class look-up tables of length ``num_classes + 1``
    with a final 0 give them no weight.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    lab = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    # channel-first only: a channel-less (X, Y, Z) would be indistinguishable from a 2D (1, X, Y)
    if lab.ndim not in (3, 4) or lab.shape[0] != 1:
        raise ValueError(f"label must have shape (1, X, Y, Z) or (1, X, Y), got {tuple(label.shape)}.")
    lab = lab[0] if lab.ndim == 4 else lab[0, :, :, None]
    if lab.is_floating_point():
        # labels read from images or resampled with nearest neighbour arrive as floats holding integers
        lab = torch.round(lab)
    lab = lab.long()
    ignored = lab == ignore_index if ignore_index is not None else torch.zeros_like(lab, dtype=torch.bool)
    bad = ((lab < 0) | (lab >= num_classes)) & ~ignored
    if bool(bad.any()):
        raise ValueError(
            f"label values must be in [0, {num_classes - 1}] (or ignore_index={ignore_index}), "
            f"found {torch.unique(lab[bad])[:10].tolist()}."
        )
    return torch.where(ignored, torch.full_like(lab, num_classes), lab), ignored


def _restore_shape(w: torch.Tensor, label: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Give the ``(X, Y, Z)`` map ``w`` the shape of the input label, ``(1, X, Y, Z)`` or ``(1, X, Y)``."""
    return w.reshape(tuple(label.shape))


def class_balance_weights(
    label: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int | None = None, max_weight: float = 1.0
) -> torch.Tensor:
    """Class-balancing term ``W_cb``: each voxel gets ``max_weight * N_min / N_class``, i.e. ``∝ 1 / N_class`` with
    maximum ``max_weight``, where ``N_c`` counts the voxels of class ``c`` in this volume.

    Classes absent from the volume get no weight (no voxel has them); ignored voxels get 0 and are not counted.

    Args:
        label: ``(1, X, Y, Z)`` (or ``(1, X, Y)``) class indices (integer, or float holding integers).
        num_classes: number of classes; values must lie in ``[0, num_classes)`` apart from ``ignore_index``.
        ignore_index: label value that gets weight 0 and is left out of the counts.
        max_weight: weight of the rarest class present.

    Returns:
        float32 tensor of the label's shape, on the label's device.
    """
    lab, _ = _prepare_label(label, num_classes, ignore_index)
    return _restore_shape(_class_balance(lab, num_classes, max_weight), label)


def _class_balance(lab: torch.Tensor, num_classes: int, max_weight: float = 1.0) -> torch.Tensor:
    """:func:`class_balance_weights` on prepared ``(X, Y, Z)`` bins (ignored voxels in bin ``num_classes``)."""
    counts = torch.bincount(lab.flatten(), minlength=num_classes + 1)[:num_classes].double()
    class_w = torch.zeros(num_classes + 1, dtype=torch.float64, device=lab.device)
    present = counts > 0
    if bool(present.any()):
        # max_weight * (1 / N_c) / max_c'(1 / N_c') = max_weight * N_min / N_c
        class_w[:num_classes][present] = max_weight * counts[present].min() / counts[present]
    return class_w.float()[lab]


def _fill_halo(padded: torch.Tensor, padding_mode: str) -> None:
    """Refresh the one-voxel border of ``padded`` (n, X + 2, Y + 2) from its interior, in place."""
    if padding_mode == "zeros":
        return  # the border was zero-initialised and is never written
    if padding_mode == "circular":
        padded[:, 0, 1:-1] = padded[:, -2, 1:-1]
        padded[:, -1, 1:-1] = padded[:, 1, 1:-1]
        padded[:, :, 0] = padded[:, :, -2]  # whole columns, so the corners wrap too
        padded[:, :, -1] = padded[:, :, 1]
    else:  # replicate: zero-flux (Neumann) boundary
        padded[:, 0, 1:-1] = padded[:, 1, 1:-1]
        padded[:, -1, 1:-1] = padded[:, -2, 1:-1]
        padded[:, :, 0] = padded[:, :, 1]
        padded[:, :, -1] = padded[:, :, -2]


def _diffuse(source: torch.Tensor, steps: int, diffusion: float, decay: float, padding_mode: str) -> torch.Tensor:
    """Run the heat-equation steps on a batch of 2D slices.

    Each step is ``d <- decay * (d + diffusion * (k * d))``, clipped at 0, then ``d[source] = 1``, with the stencil
    ``k`` = centre -1, edge neighbours 1/6, corners 0.5/6. The update kernel ``decay * (delta + diffusion * k)`` is
    ``alpha * delta + beta * [1, 2, 1]^T [1, 2, 1]`` with ``alpha = decay * (1 - 4 * diffusion / 3)`` and
    ``beta = decay * diffusion / 12``, so it is applied as two 3-tap passes on a padded buffer (much faster on the CPU
    than a single-channel ``conv2d``).

    Args:
        source: bool ``(n, X, Y)``, the source voxels of each slice.
        steps, diffusion, decay, padding_mode: see :func:`edge_weights`.

    Returns:
        float32 ``(n, X, Y)`` diffusion values after ``steps`` steps.
    """
    n, nx, ny = source.shape
    alpha = decay * (1.0 - 4.0 * diffusion / 3.0)
    beta = decay * diffusion / 12.0
    # with non-negative kernel entries a non-negative field stays non-negative: the clip is then a no-op and skipped
    needs_clip = alpha < 0 or beta < 0
    padded = torch.zeros(n, nx + 2, ny + 2, dtype=torch.float32, device=source.device)
    interior = padded[:, 1:-1, 1:-1]
    src = source.to(torch.float32)
    interior.copy_(src)
    not_src = 1.0 - src
    # the source mask is folded into the coefficients: at source voxels the update is 0 * ... + 1
    coef_beta = not_src * beta
    coef_alpha = not_src * alpha
    h = torch.empty(n, nx + 2, ny, dtype=torch.float32, device=source.device)
    v = torch.empty(n, nx, ny, dtype=torch.float32, device=source.device)
    for _ in range(steps):
        _fill_halo(padded, padding_mode)
        torch.add(padded[:, :, :-2], padded[:, :, 2:], out=h)  # [1, 2, 1] along Y
        h.add_(padded[:, :, 1:-1], alpha=2.0)
        torch.add(h[:, :-2], h[:, 2:], out=v)  # [1, 2, 1] along X
        v.add_(h[:, 1:-1], alpha=2.0)
        v.mul_(coef_beta).addcmul_(interior, coef_alpha)
        if needs_clip:
            v.clamp_(min=0.0)
        torch.add(v, src, out=interior)
    return interior.clone()


def _pair_matrix(
    num_classes: int, ignore_index: int | None, class_pairs: Sequence[Sequence[int]] | None, device: torch.device
) -> torch.Tensor:
    """Bool ``(C, C)`` matrix: entry ``[s, t]`` says whether source ``s`` puts weight on target ``t``."""
    pairs = itertools.combinations(range(num_classes), 2) if class_pairs is None else class_pairs
    mat = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    for pair in pairs:
        s, t = (int(p) for p in pair)
        if not (0 <= s < num_classes and 0 <= t < num_classes) or s == t:
            raise ValueError(f"class pair {tuple(pair)} must hold two different classes in [0, {num_classes}).")
        mat[s, t] = mat[t, s] = True  # symmetric, as the authors' symmetric=True: weight on both sides
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        mat[ignore_index, :] = False
        mat[:, ignore_index] = False
    return mat.to(device)


def edge_weights(
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    steps: int = 50,
    diffusion: float = 0.2,
    decay: float = 0.98,
    threshold: float = 0.2,
    max_weight: float = 25.0,
    ignore_index: int | None = None,
    class_pairs: Sequence[Sequence[int]] | None = None,
    padding_mode: str = "circular",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Diffusive edge-preserving term ``W_ep``, computed per z-slice in the (X, Y) plane.

    For each ordered pair (source ``s``, target ``t``) the diffused and thresholded field of ``s`` is kept on the
    voxels of ``t`` and scaled so that its maximum over the whole volume is ``max_weight`` (a pair whose classes never
    come within reach contributes nothing); the pair terms are summed. The field of a source does not depend on the
    target, so it is diffused once per source class, only on the slices holding the source and one of its targets.

    Args:
        label: ``(1, X, Y, Z)`` (or ``(1, X, Y)``) class indices (integer, or float holding integers).
        num_classes: number of classes.
        steps: number of diffusion steps.
        diffusion: diffusion constant of the heat equation.
        decay: factor applied to the field after each step.
        threshold: subtracted from the final field, which is then clipped at 0 (must be >= 0).
        max_weight: maximum of each (source, target) term.
        ignore_index: label value that is neither source nor target and gets weight 0 (heat still crosses it).
        class_pairs: unordered class pairs to use, each in both directions; default all pairs of different classes.
        padding_mode: X/Y boundary of the heat equation: ``"circular"`` (periodic, as the authors' FFT code),
            ``"replicate"`` (zero flux) or ``"zeros"`` (held at 0).
        chunk_size: z-slices diffused together; default: about 1.5 M voxels on the CPU (cache-sized), all on GPUs.

    Returns:
        float32 tensor of the label's shape, on the label's device.
    """
    lab, _ = _prepare_label(label, num_classes, ignore_index)
    pair_mat = _pair_matrix(num_classes, ignore_index, class_pairs, lab.device)
    w = _edge(lab, num_classes, pair_mat, steps, diffusion, decay, threshold, max_weight, padding_mode, chunk_size)
    return _restore_shape(w, label)


def _edge(
    lab: torch.Tensor,
    num_classes: int,
    pair_mat: torch.Tensor,
    steps: int,
    diffusion: float,
    decay: float,
    threshold: float,
    max_weight: float,
    padding_mode: str,
    chunk_size: int | None,
) -> torch.Tensor:
    """:func:`edge_weights` on prepared ``(X, Y, Z)`` bins (ignored voxels in bin ``num_classes``)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
    if steps < 0 or threshold < 0:
        raise ValueError(f"steps and threshold must be >= 0, got steps={steps}, threshold={threshold}.")
    lab = lab.permute(2, 0, 1).contiguous()  # (Z, X, Y): slices first, so each chunk is a contiguous batch
    nz, nx, ny = lab.shape
    device = lab.device
    nbins = num_classes + 1
    # per-slice class counts in one pass, to skip slices where a source has no target
    z_offset = torch.arange(nz, device=device).view(nz, 1, 1) * nbins
    present = torch.bincount((lab + z_offset).flatten(), minlength=nz * nbins).view(nz, nbins)[:, :num_classes] > 0
    if chunk_size is None:
        budget = _CPU_CHUNK_VOXELS if device.type == "cpu" else _GPU_CHUNK_VOXELS
        chunk_size = max(1, budget // max(1, nx * ny))
    out = torch.zeros(nz, nx, ny, dtype=torch.float32, device=device)
    for s in range(num_classes):
        targets = pair_mat[s]
        if not bool(targets.any()):
            continue
        active = torch.nonzero(present[:, s] & present[:, targets].any(dim=1)).flatten()
        if active.numel() == 0:
            continue
        lab_act = lab if active.numel() == nz else lab.index_select(0, active)
        field = torch.empty(active.numel(), nx, ny, dtype=torch.float32, device=device)
        for start in range(0, active.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            field[sl] = _diffuse(lab_act[sl] == s, steps, diffusion, decay, padding_mode)
        field.sub_(threshold).clamp_(min=0.0)
        # maximum of the field over the voxels of each class (whole volume), for the per-pair scaling
        class_max = torch.zeros(nbins, dtype=torch.float32, device=device)
        class_max.scatter_reduce_(0, lab_act.flatten(), field.flatten(), reduce="amax")
        scale = torch.zeros(nbins, dtype=torch.float32, device=device)
        use = targets & (class_max[:num_classes] > 0)
        scale[:num_classes][use] = max_weight / class_max[:num_classes][use]
        field.mul_(scale[lab_act])  # the source itself, non-targets and ignored voxels get scale 0
        out.index_add_(0, active, field)
    return out.permute(1, 2, 0)


def weight_map(
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    floor: float = 0.01,
    class_balance: bool = True,
    edge: bool = True,
    ignore_index: int | None = None,
    **edge_kwargs: Any,
) -> torch.Tensor:
    """Voxel weight map ``W = floor + W_cb + W_ep`` (Guay et al. 2020, eq. after (1)).

    Args:
        label: ``(1, X, Y, Z)`` (or ``(1, X, Y)``) class indices (integer, or float holding integers).
        num_classes: number of classes.
        floor: constant minimum weight ``w``.
        class_balance: add the class-balancing term (:func:`class_balance_weights`).
        edge: add the diffusive edge term (:func:`edge_weights`).
        ignore_index: label value whose voxels get weight 0 (floor included) and play no part in either term.
        edge_kwargs: passed to :func:`edge_weights` (``steps``, ``diffusion``, ``decay``, ``threshold``, ...).

    Returns:
        float32 tensor of the label's shape, on the label's device (a plain tensor, no metadata).
    """
    lab, ignored = _prepare_label(label, num_classes, ignore_index)
    w = torch.full(lab.shape, float(floor), dtype=torch.float32, device=lab.device)
    if class_balance:
        w += _class_balance(lab, num_classes)
    if edge:
        w += edge_weights(lab[None], num_classes, ignore_index=num_classes, **edge_kwargs)[0]
    w[ignored] = 0.0
    return _restore_shape(w, label)


class WeightMapd(MapTransform):
    """Dictionary transform writing the voxel weight map of a label under ``weight_key``.

    The output is float32 with the label's shape and type; a MetaTensor label gives a MetaTensor with a copy of its
    meta (affine included) and applied operations. The map is deterministic: put this transform before the cache
    boundary of a ``CacheDataset`` so it runs once per volume, not once per training step. Class counts and the
    edge-term scaling are taken over the whole volume given.

    Args:
        keys: label key(s).
        num_classes: number of classes.
        weight_key: output key(s), one per label key.
        floor, class_balance, edge, ignore_index: see :func:`weight_map`.
        steps, diffusion, decay, threshold, max_weight, class_pairs, padding_mode: see :func:`edge_weights`.
        device: device to compute on (e.g. ``"cuda"``); the result goes back to the label's device. Default: the
            label's device.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        weight_key: str | Sequence[str] = "weight",
        floor: float = 0.01,
        class_balance: bool = True,
        edge: bool = True,
        ignore_index: int | None = None,
        steps: int = 50,
        diffusion: float = 0.2,
        decay: float = 0.98,
        threshold: float = 0.2,
        max_weight: float = 25.0,
        class_pairs: Sequence[Sequence[int]] | None = None,
        padding_mode: str = "circular",
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.weight_keys = ensure_tuple_rep(weight_key, len(self.keys))
        self.num_classes = num_classes
        self.device = device
        self.map_kwargs: dict[str, Any] = {
            "floor": floor,
            "class_balance": class_balance,
            "edge": edge,
            "ignore_index": ignore_index,
            "steps": steps,
            "diffusion": diffusion,
            "decay": decay,
            "threshold": threshold,
            "max_weight": max_weight,
            "class_pairs": class_pairs,
            "padding_mode": padding_mode,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, weight_key in self.key_iterator(d, self.weight_keys):
            label = d[key]
            lab = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
            if self.device is not None:
                lab = lab.to(self.device)
            w = weight_map(lab, self.num_classes, **self.map_kwargs)
            d[weight_key] = convert_to_dst_type(w, label, dtype=w.dtype)[0]  # the label's type, device and meta
        return d

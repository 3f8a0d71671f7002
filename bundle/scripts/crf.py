"""Trainable anisotropic 3D CRF-RNN (seed 000: "2D U-Nets -> hybrid 3D module -> 3D CRF-RNN").

A fully-connected CRF's mean-field inference (Krähenbühl and Koltun 2011) unrolled as a recurrent network
(Zheng et al. 2015), truncated to local windows so that it runs on CPU and GPU with plain PyTorch:

* spatial term: a separable Gaussian with its own ``sigma_xy`` and ``sigma_z``;
* image-dependent (bilateral) term over a truncated window (``7 x 7 x 3`` by default) with its own ``theta_xy``,
  ``theta_z`` and intensity ``theta_intensity``, computed by :class:`BilateralMessage`, a custom autograd function
  that accumulates in place over the window offsets and recomputes them in backward, so that no shifted product is
  kept alive;
* a learnable ``C x C`` compatibility initialised to Potts, a learnable weight per term; every positive parameter is
  stored as its logarithm.

Axis convention: MONAI's ``(B, C, X, Y, Z)`` with ``Z`` the section (anisotropic) axis last. Lengths are physical
(nm with the bundle's spacings) and converted to voxels with ``spacing``, so the voxel spacing sets the initial
xy/z ratio. ``scripts.crf_stack.NetworkWithCRF`` puts the CRF after any of the bundle's networks (the full
processing stack); ``configs/variants/crf_stage2.json`` is the two-stage recipe (stage 1: the network alone with
``train.json``; stage 2: the stack end to end from the stage-1 checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["BilateralMessage", "CRFRNN"]


def _pair_offsets(radius: Sequence[int]) -> list[tuple[int, int, int]]:
    """One offset ``o`` per symmetric pair ``+-o`` of a ``(2 r0 + 1, 2 r1 + 1, 2 r2 + 1)`` window: the
    lexicographically positive ones (their flat delta on a padded grid is positive)."""
    return [
        (d0, d1, d2)
        for d0 in range(-radius[0], radius[0] + 1)
        for d1 in range(-radius[1], radius[1] + 1)
        for d2 in range(-radius[2], radius[2] + 1)
        if (d0, d1, d2) > (0, 0, 0)
    ]


class _FlatGrid:
    """A ``(B, C, D0, D1, D2)`` volume zero-padded by ``radius`` and flattened, so that every window offset is one
    flat delta and every shifted copy a contiguous slice (strided shifted views are several times slower on CPU).

    The output grid is the ``D0`` interior planes of the padded volume (``length`` voxels); its padded rows and
    columns hold values that are never read back, and a ``margin`` at both ends keeps every shift in range.
    """

    def __init__(self, shape: Sequence[int], radius: Sequence[int]) -> None:
        self.shape = tuple(shape[2:])
        self.radius = tuple(radius)
        self.padded = tuple(s + 2 * r for s, r in zip(self.shape, self.radius))
        self.plane = self.padded[1] * self.padded[2]
        self.row = self.padded[2]
        self.margin = self.radius[1] * self.row + self.radius[2]
        self.start = self.margin + self.radius[0] * self.plane  # first output voxel
        self.length = self.shape[0] * self.plane
        self.total = 2 * self.margin + self.padded[0] * self.plane

    def _interior(self, flat: torch.Tensor) -> torch.Tensor:
        body = flat[..., self.margin : self.margin + self.padded[0] * self.plane].view(*flat.shape[:2], *self.padded)
        r = self.radius
        return body[..., r[0] : r[0] + self.shape[0], r[1] : r[1] + self.shape[1], r[2] : r[2] + self.shape[2]]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D0, D1, D2)`` -> zero-padded flat ``(B, C, total)``."""
        flat = x.new_zeros(*x.shape[:2], self.total)
        self._interior(flat).copy_(x)
        return flat

    def embed_output(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D0, D1, D2)`` -> flat output grid ``(B, C, length)``, zero on the padded rows and columns."""
        flat = x.new_zeros(*x.shape[:2], self.length)
        r = self.radius
        grid = flat.view(*x.shape[:2], self.shape[0], *self.padded[1:])
        grid[..., r[1] : r[1] + self.shape[1], r[2] : r[2] + self.shape[2]].copy_(x)
        return flat

    def crop(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat padded ``(B, C, total)`` -> ``(B, C, D0, D1, D2)``."""
        return self._interior(flat).contiguous()

    def crop_output(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat output grid ``(B, C, length)`` -> ``(B, C, D0, D1, D2)``."""
        r = self.radius
        grid = flat.view(*flat.shape[:2], self.shape[0], *self.padded[1:])
        return grid[..., r[1] : r[1] + self.shape[1], r[2] : r[2] + self.shape[2]].contiguous()


def _kernel(
    features: torch.Tensor, delta: int, lo: int, n: int, log_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_j = f_j - f_{j+delta}`` and ``k_j = exp(log_weight - |d_j|^2 / 2)`` for flat ``j`` in ``[lo, lo + n)``."""
    diff = features[..., lo : lo + n] - features[..., lo + delta : lo + delta + n]
    if diff.shape[1] == 1:  # one fused kernel instead of square + add: op count is what costs on a busy CPU
        exponent = torch.addcmul(log_weight, diff, diff, value=-0.5)
    else:
        exponent = torch.add(log_weight, diff.square().sum(1, keepdim=True), alpha=-0.5)
    return diff, exponent.exp_()


class BilateralMessage(torch.autograd.Function):
    """Truncated bilateral message passing ``out_i = sum_{o != 0} w_o exp(-|f_i - f_{i+o}|^2 / 2) q_{i+o}``.

    ``q`` is ``(B, C, D0, D1, D2)`` (the probabilities being filtered), ``features`` ``(B, F, D0, D1, D2)`` (the
    image already divided by the intensity length), ``log_weights`` the log of ``w_o`` for each symmetric pair of
    offsets ``+-o`` (the order of :func:`_pair_offsets`; the spatial factor of a bilateral kernel is symmetric), zero
    padding outside the volume. Forward accumulates in place offset by offset; backward recomputes each offset's
    kernel and accumulates the shifted gradients, so memory stays at a few volumes whatever the window. Gradients
    flow to ``q``, ``features`` (hence to the intensity length) and ``log_weights`` (hence to the spatial lengths
    and the term's weight). Put the largest axis last: each shift is a contiguous slice of the flattened volume.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, features: torch.Tensor, log_weights: torch.Tensor, radius: Sequence[int]):
        grid = _FlatGrid(q.shape, radius)
        offsets = _pair_offsets(radius)
        if len(offsets) != log_weights.numel():
            raise ValueError(f"{log_weights.numel()} pair weights for a window with {len(offsets)} offset pairs")
        # offsets reaching past the volume on some axis (e.g. z offsets on a single section) only meet padding
        active = [p for p, o in enumerate(offsets) if all(abs(d) < size for d, size in zip(o, grid.shape))]
        deltas = [offsets[p][0] * grid.plane + offsets[p][1] * grid.row + offsets[p][2] for p in active]
        qf, ff = grid.embed(q), grid.embed(features)
        out = q.new_zeros(*q.shape[:2], grid.length)
        s0, length = grid.start, grid.length
        for delta, log_w in zip(deltas, log_weights[active]):
            # one kernel for the pair: k(f_i, f_{i+o}) at j = i serves +o, at j = i - delta serves -o
            _, k = _kernel(ff, delta, s0 - delta, length + delta, log_w)
            out.addcmul_(k[..., delta:], qf[..., s0 + delta : s0 + delta + length])
            out.addcmul_(k[..., :length], qf[..., s0 - delta : s0 - delta + length])
        ctx.save_for_backward(qf, ff, log_weights)
        ctx.grid, ctx.active, ctx.deltas = grid, active, deltas
        return grid.crop_output(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qf, ff, log_weights = ctx.saved_tensors
        grid, active, deltas = ctx.grid, ctx.active, ctx.deltas
        s0, length = grid.start, grid.length
        g = grid.embed_output(grad_out)  # zero on padded rows: their garbage never reaches a gradient
        grad_q = torch.zeros_like(qf)
        grad_f = torch.zeros_like(ff)
        grad_w = torch.zeros_like(log_weights)
        for p, delta in zip(active, deltas):
            log_w = log_weights[p]
            lo, n = s0 - delta, length + delta
            diff, k = _kernel(ff, delta, lo, n, log_w)
            plus, minus = qf[..., s0 + delta : s0 + delta + length], qf[..., s0 - delta : s0 - delta + length]
            grad_q[..., s0 + delta : s0 + delta + length].addcmul_(k[..., delta:], g)
            grad_q[..., s0 - delta : s0 - delta + length].addcmul_(k[..., :length], g)
            # k_j * dL/dk_j, both uses of the pair's kernel (dk/dlog_w = k)
            dk = torch.zeros_like(k)
            dk[..., delta:].addcmul_(k[..., delta:], (g * plus).sum(1, keepdim=True))
            dk[..., :length].addcmul_(k[..., :length], (g * minus).sum(1, keepdim=True))
            grad_w[p] = dk.sum()
            # dk_j/df_j = -k_j d_j, dk_j/df_{j+delta} = +k_j d_j
            t = diff.mul_(dk)
            grad_f[..., lo : lo + n].sub_(t)
            grad_f[..., lo + delta : lo + delta + n].add_(t)
        return grid.crop(grad_q), grid.crop(grad_f), grad_w, None


def _as_pair(value: Union[float, Sequence[float]], name: str) -> tuple[float, float]:
    """A length as ``(xy, z)``: one number is isotropic in physical units."""
    pair = (float(value), float(value)) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive length or a positive (xy, z) pair, got {value}")
    return pair  # type: ignore[return-value]


class CRFRNN(nn.Module):
    """Anisotropic 3D CRF-RNN: ``iterations`` mean-field updates of a CRF on the network's logits.

    Each update: ``Q = softmax(logits)``, messages ``m = w_s (G_sigma * Q - self) + w_b bilateral(Q)``, then
    ``logits = unary - mu m`` with ``mu`` the compatibility (Potts ``1 - I`` at start). Both kernels are
    normalised over their window (messages are weighted averages of neighbours' probabilities, so the term weights
    have a scale independent of the lengths) and exclude the voxel itself. Every parameter is learnable; lengths and
    weights are stored as logs. dtype and device follow the input (half precision inputs run in float32).

    Args:
        num_classes: classes ``C``.
        image_channels: image channels used as bilateral features (the first ones of the network input).
        spacing: voxel size ``(x, y, z)`` (nm in the bundle), converting the physical lengths below to voxels.
        spatial_sigma: spatial Gaussian length, one number (isotropic in physical units: the spacing sets the xy/z
            ratio in voxels) or ``(xy, z)``.
        bilateral_theta: spatial length of the bilateral term, one number or ``(xy, z)``.
        intensity_theta: intensity length of the bilateral term (images are normalised to std 1).
        spatial_weight: initial weight of the spatial term.
        bilateral_weight: initial weight of the bilateral term.
        window: bilateral window ``(k_x, k_y, k_z)`` in (down-sampled) voxels, odd.
        truncate: the spatial Gaussian's radius in initial sigmas.
        iterations: mean-field updates at test time.
        train_iterations: mean-field updates in training mode (fewer is cheaper); default ``iterations``.
        bilateral_downsample: xy down-sampling factor of the bilateral term (area averaging in, trilinear out):
            the window then covers ``downsample`` times more voxels at a ``downsample**2`` lower cost.
    """

    def __init__(
        self,
        num_classes: int,
        image_channels: int = 1,
        spacing: Sequence[float] = (10.0, 10.0, 50.0),
        spatial_sigma: Union[float, Sequence[float]] = 30.0,
        bilateral_theta: Union[float, Sequence[float]] = 30.0,
        intensity_theta: float = 0.5,
        spatial_weight: float = 1.0,
        bilateral_weight: float = 2.0,
        window: Sequence[int] = (7, 7, 3),
        truncate: float = 3.0,
        iterations: int = 5,
        train_iterations: Optional[int] = None,
        bilateral_downsample: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be a positive (x, y, z) voxel size, got {spacing}")
        if len(window) != 3 or any(k < 1 or k % 2 == 0 for k in window):
            raise ValueError(f"window must be three odd sizes (k_x, k_y, k_z), got {window}")
        train_iterations = iterations if train_iterations is None else train_iterations
        if min(iterations, train_iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations} and train_iterations {train_iterations}")
        if bilateral_downsample < 1 or intensity_theta <= 0 or min(spatial_weight, bilateral_weight) <= 0:
            raise ValueError("bilateral_downsample >= 1 and positive intensity_theta and term weights are required")
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.spacing = tuple(float(s) for s in spacing)
        self.iterations = int(iterations)
        self.train_iterations = int(train_iterations)
        self.bilateral_downsample = int(bilateral_downsample)
        sigma, theta = _as_pair(spatial_sigma, "spatial_sigma"), _as_pair(bilateral_theta, "bilateral_theta")
        # the spatial kernel's support is fixed at construction (a shape cannot be learnt), wide enough to grow
        self.spatial_radius = tuple(
            max(1, math.ceil(truncate * s / sp)) for s, sp in zip((sigma[0], sigma[0], sigma[1]), self.spacing)
        )
        self.bilateral_radius = tuple(k // 2 for k in window)
        self.log_sigma_xy = nn.Parameter(torch.tensor(math.log(sigma[0])))
        self.log_sigma_z = nn.Parameter(torch.tensor(math.log(sigma[1])))
        self.log_theta_xy = nn.Parameter(torch.tensor(math.log(theta[0])))
        self.log_theta_z = nn.Parameter(torch.tensor(math.log(theta[1])))
        self.log_theta_intensity = nn.Parameter(torch.tensor(math.log(intensity_theta)))
        self.log_spatial_weight = nn.Parameter(torch.tensor(math.log(spatial_weight)))
        self.log_bilateral_weight = nn.Parameter(torch.tensor(math.log(bilateral_weight)))
        self.compatibility = nn.Parameter(1.0 - torch.eye(num_classes))  # Potts

    def _voxel_lengths(self, log_xy: torch.Tensor, log_z: torch.Tensor, xy_factor: float = 1.0) -> list[torch.Tensor]:
        """Physical ``(xy, z)`` lengths in voxels of the ``(z, x, y)`` working layout."""
        sz, sx, sy = self.spacing[2], self.spacing[0] * xy_factor, self.spacing[1] * xy_factor
        return [log_z.exp() / sz, log_xy.exp() / sx, log_xy.exp() / sy]

    def spatial_kernels(self) -> list[torch.Tensor]:
        """Normalised 1D Gaussians along z, x, y (the working layout), truncated to ``spatial_radius``."""
        sigmas = self._voxel_lengths(self.log_sigma_xy, self.log_sigma_z)
        radii = (self.spatial_radius[2], self.spatial_radius[0], self.spatial_radius[1])
        kernels = []
        for sigma, r in zip(sigmas, radii):
            t = torch.arange(-r, r + 1, dtype=sigma.dtype, device=sigma.device)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            kernels.append(g / g.sum())
        return kernels

    def bilateral_log_weights(self) -> torch.Tensor:
        """Log weight of each symmetric offset pair: term weight times the window-normalised spatial Gaussian."""
        radius = (self.bilateral_radius[2], self.bilateral_radius[0], self.bilateral_radius[1])
        thetas = self._voxel_lengths(self.log_theta_xy, self.log_theta_z, self.bilateral_downsample)
        log_norm = self.log_bilateral_weight
        for theta, r in zip(thetas, radius):
            t = torch.arange(-r, r + 1, dtype=theta.dtype, device=theta.device)
            log_norm = log_norm - torch.logsumexp(-0.5 * (t / theta) ** 2, 0)
        offsets = torch.tensor(_pair_offsets(radius), dtype=log_norm.dtype, device=log_norm.device).reshape(-1, 3)
        return log_norm - 0.5 * ((offsets / torch.stack(thetas)) ** 2).sum(1)

    def _spatial_message(self, q: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian filtering of ``q`` (working layout) without each voxel's own contribution."""
        kernels = self.spatial_kernels()
        out = q
        channels = q.shape[1]
        for axis, g in enumerate(kernels):
            shape = [1, 1, 1]
            shape[axis] = g.numel()
            padding = [0, 0, 0]
            padding[axis] = g.numel() // 2
            weight = g.to(q.dtype).reshape(1, 1, *shape).expand(channels, 1, *shape)
            out = F.conv3d(out, weight, padding=padding, groups=channels)
        centre = kernels[0][kernels[0].numel() // 2] * kernels[1][kernels[1].numel() // 2]
        centre = centre * kernels[2][kernels[2].numel() // 2]
        return out - centre.to(q.dtype) * q

    def _bilateral_message(self, q: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Bilateral filtering of ``q`` (working layout), optionally on an xy down-sampled grid."""
        d = self.bilateral_downsample
        full = q.shape[2:]
        if d > 1:
            low = (full[0], -(-full[1] // d), -(-full[2] // d))
            q = F.interpolate(q, size=low, mode="area")
            features = F.interpolate(features, size=low, mode="area")
        radius = (self.bilateral_radius[2], self.bilateral_radius[0], self.bilateral_radius[1])
        log_weights = self.bilateral_log_weights().to(q.dtype)
        out = BilateralMessage.apply(q, features, log_weights, radius)
        if d > 1:
            out = F.interpolate(out, size=full, mode="trilinear", align_corners=False)
        return out

    def forward(self, unary: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """
        Args:
            unary: logits ``(B, C, X, Y, Z)``.
            image: ``(B, image_channels, X, Y, Z)``, the bilateral features.

        Returns:
            refined logits ``(B, C, X, Y, Z)``.
        """
        if unary.ndim != 5 or unary.shape[1] != self.num_classes:
            raise ValueError(f"unary must be (B, {self.num_classes}, X, Y, Z), got {tuple(unary.shape)}")
        if image.ndim != 5 or image.shape[1] != self.image_channels or image.shape[2:] != unary.shape[2:]:
            raise ValueError(
                f"image must be (B, {self.image_channels}, X, Y, Z) on the grid of the unary {tuple(unary.shape)}, "
                f"got {tuple(image.shape)}"
            )
        dtype = torch.promote_types(unary.dtype, self.compatibility.dtype)
        # the mean field runs in full precision even under AMP (exp of small kernel weights, softmax)
        with torch.autocast(device_type=unary.device.type, enabled=False):
            # working layout (B, C, Z, X, Y): the short section axis outermost keeps shifted slices long
            unary = unary.as_subclass(torch.Tensor).to(dtype).permute(0, 1, 4, 2, 3)
            features = image.as_subclass(torch.Tensor).to(dtype).permute(0, 1, 4, 2, 3)
            features = features / self.log_theta_intensity.exp().to(dtype)
            compatibility = self.compatibility.to(dtype)
            spatial_weight = self.log_spatial_weight.exp().to(dtype)
            logits = unary
            for _ in range(self.train_iterations if self.training else self.iterations):
                q = torch.softmax(logits, dim=1)
                message = spatial_weight * self._spatial_message(q) + self._bilateral_message(q, features)
                logits = unary - torch.einsum("lk,bk...->bl...", compatibility, message)
            return logits.permute(0, 1, 3, 4, 2).contiguous()

"""Random training augmentations for EM windows: the skeleton they share (:class:`RandWindowTransformd`) and
Guay et al. 2020's brightness, contrast and per-section elastic deformation (reflections are MONAI's ``RandFlipd``;
the EM section defects are in ``scripts.section_defects``).

Every transform takes a dict of channel-first arrays ``(C, X, Y, Z)`` with the section axis z LAST (MetaTensor,
tensor or ndarray; the output has the input's type, dtype, device and meta). Labels are only ever moved with nearest
interpolation or integer shifts, so they stay integer-valued and aligned with the image. Windows with a single
section (``Z == 1``) are accepted everywhere; the defects that need several sections (lost section, misalignment)
then leave the data unchanged, the in-plane ones (elastic, blur, CutBlur) still apply.

Facts from the authors' released code (``leapmanlab`` GeneNet ``DataHandler``): the elastic field is
``gaussian_filter(U(-1, 1) on a coarse grid of shape / 40, sigma=0.6) * 20`` voxels, up-sampled and applied to the
whole 800 x 800 training volume once per epoch (the paper's "mean 20, standard deviation 0.6" are this magnitude
and this smoothing); brightness adds ``±0.12 * data range``, then contrast multiplies by ``1 ± 0.2`` (on z-scored data).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple, ensure_tuple_rep
from scipy.ndimage import gaussian_filter

__all__ = [
    "RandWindowTransformd",
    "RandBrightnessContrastd",
    "RandSectionElasticd",
]

_GRID_MODES = ("bilinear", "nearest", "bicubic")


def _tensor(array: Any) -> torch.Tensor:
    """Plain tensor view of ``array`` (no meta), on its own device."""
    return convert_to_tensor(array, track_meta=False)


def _like(result: torch.Tensor, reference: Any) -> Any:
    """``result`` with the type, dtype, device and meta of ``reference``."""
    return convert_to_dst_type(result, reference)[0]


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if floating point, else as float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _first_shape(transform: MapTransform, d: Mapping[Hashable, Any]) -> tuple[int, ...] | None:
    """Spatial shape of the first present key, checking that every key has it."""
    shapes = {key: tuple(d[key].shape[1:]) for key in transform.key_iterator(d)}
    if not shapes:
        return None
    first = next(iter(shapes.values()))
    if len(first) not in (2, 3) or any(s != first for s in shapes.values()):
        raise ValueError(
            f"{type(transform).__name__}: expected (C, X, Y[, Z]) arrays of one spatial shape, got {shapes}"
        )
    return first


def window_depth(shape: Sequence[int]) -> int:
    """Number of sections of a spatial shape (1 for a 2D one)."""
    return int(shape[2]) if len(shape) == 3 else 1


class RandWindowTransformd(RandomizableTransform, MapTransform):
    """The skeleton every window augmentation here shares: check that the present keys have one spatial shape,
    draw the window's random parameters once from that shape (:meth:`randomize_window`), then :meth:`apply` them to
    each key as a plain tensor; each result gets back its input's type, dtype, device and meta.

    Args:
        keys: keys of ``(C, X, Y[, Z])`` arrays.
        prob: probability of applying.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, prob: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        """Draw this window's parameters from its spatial shape (by default ``randomize(shape)``)."""
        self.randomize(shape)

    def applies(self) -> bool:
        """Whether the last draw changes anything."""
        return self._do_transform

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        """The augmented ``x`` (a plain tensor) of ``key``."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize_window(shape)
        if not self.applies():
            return d
        for key in self.key_iterator(d):
            d[key] = _like(self.apply(_tensor(d[key]), key), d[key])
        return d


class RandBrightnessContrastd(RandWindowTransformd):
    """Guay et al. brightness and contrast shift: ``(x + b * range) * c``, b ~ U(-brightness, brightness),
    c ~ U(1 - contrast, 1 + contrast), one draw per sample shared by all keys and channels.

    Own transform because MONAI has no brightness shift relative to the data range (``RandShiftIntensityd`` adds an
    absolute offset, ``RandAdjustContrastd`` is a gamma curve); the contrast factor alone equals
    ``RandScaleIntensityd(factors=contrast)``. As in the authors' code the multiplication is about zero, so the input
    should be z-scored (the bundle's ``NormalizeIntensityd``).

    Args:
        keys: image keys.
        prob: probability of applying (the paper: every window).
        brightness: maximum shift as a fraction of the data range (paper: 0.12).
        contrast: maximum relative scale change (paper: 0.2).
        data_range: intensity range the brightness refers to; None uses each window's max - min (the authors used
            the range of the whole normalised training volume).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 1.0,
        brightness: float = 0.12,
        contrast: float = 0.2,
        data_range: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.data_range = data_range
        self.shift = 0.0
        self.scale = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.shift = self.R.uniform(-self.brightness, self.brightness)
            self.scale = self.R.uniform(1.0 - self.contrast, 1.0 + self.contrast)

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        self.randomize()

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        x = as_float(x)
        span = self.data_range if self.data_range is not None else float(x.max() - x.min())
        return (x + self.shift * span) * self.scale


class RandSectionElasticd(RandWindowTransformd):
    """Guay et al. per-section 2D elastic deformation: one in-plane displacement field, the same for every z-section
    and every key.

    A coarse ``grid`` of iid standard-normal displacements (x and y) is smoothed by a Gaussian of ``sigma`` grid
    nodes, scaled by ``magnitude`` voxels, bilinearly up-sampled (corner nodes on corner voxels) to the window's
    (X, Y) plane and applied with ``torch.nn.functional.grid_sample`` (CPU or CUDA): ``out(x) = in(x + u(x))``.
    The paper's code drew U(-1, 1) * 20 (std 11.5, the default ``magnitude``) with sigma 0.6 on a 40-voxel grid over
    the whole volume; here the field is drawn per window, so a 20 x 20 grid on a 300-voxel window has 15-voxel
    spacing (about 1 % of voxels folded), on a 128-voxel window 6.7 (about 20 % folded): use ``grid_spacing=40`` (the
    paper's node distance, no folds) or a smaller ``magnitude`` for small windows. Labels use ``"nearest"``.

    Args:
        keys: keys of ``(C, X, Y, Z)`` arrays, all with the same spatial shape.
        grid: coarse grid nodes along X and Y (paper: 20 x 20).
        sigma: Gaussian smoothing of the coarse displacements, in grid nodes (paper code: 0.6; 0 = iid).
        magnitude: standard deviation of the coarse displacements before smoothing, in voxels.
        prob: probability of applying (the paper: every epoch).
        mode: grid_sample interpolation per key (``bilinear``, ``nearest``, ``bicubic``), or one for all keys; the
            default fits keys ``(image, label, weight)``, other key counts must give their own.
        padding_mode: grid_sample padding; ``"border"`` matches the authors' clipped coordinates.
        grid_spacing: if given, voxels between grid nodes along X and Y; overrides ``grid`` per window.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        grid: Sequence[int] = (20, 20),
        sigma: float = 0.6,
        magnitude: float = 11.5,
        prob: float = 1.0,
        mode: str | Sequence[str] = ("bilinear", "nearest", "bilinear"),
        padding_mode: str = "border",
        grid_spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, prob, allow_missing_keys)
        modes = ensure_tuple(mode)
        if len(modes) not in (1, len(self.keys)):
            raise ValueError(f"mode {modes} must be one value or one per key {self.keys}")
        self.mode = ensure_tuple_rep(modes[0], len(self.keys)) if len(modes) == 1 else modes
        if any(m not in _GRID_MODES for m in self.mode):
            raise ValueError(f"mode must be in {_GRID_MODES}, got {self.mode}")
        self.grid = tuple(int(g) for g in ensure_tuple_rep(grid, 2))
        if min(self.grid) < 1:
            raise ValueError(f"grid must be at least 1 node per axis, got {grid}")
        self.grid_spacing = None if grid_spacing is None else tuple(float(s) for s in ensure_tuple_rep(grid_spacing, 2))
        self.sigma = float(sigma)
        self.magnitude = float(magnitude)
        self.padding_mode = padding_mode
        self.coarse_field: np.ndarray | None = None

    def _grid_shape(self, plane: Sequence[int]) -> tuple[int, int]:
        if self.grid_spacing is None:
            return self.grid  # type: ignore[return-value]
        return tuple(max(2, int(round(n / s)) + 1) for n, s in zip(plane, self.grid_spacing))  # type: ignore

    def randomize(self, data: Sequence[int]) -> None:
        """Draw the coarse field (2, gx, gy) in voxels for an (X, Y) plane ``data``."""
        super().randomize(None)
        if not self._do_transform:
            return
        field = self.R.standard_normal((2, *self._grid_shape(data)))
        if self.sigma > 0:
            field = gaussian_filter(field, sigma=(0, self.sigma, self.sigma), mode="reflect")
        self.coarse_field = field * self.magnitude

    def dense_field(self, plane: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """The last drawn field bilinearly up-sampled to ``plane`` = (X, Y): a (2, X, Y) float32 tensor in voxels."""
        if self.coarse_field is None:
            raise RuntimeError("no field drawn yet")
        coarse = torch.as_tensor(self.coarse_field, dtype=torch.float32, device=device)[None]
        return F.interpolate(coarse, size=tuple(plane), mode="bilinear", align_corners=True)[0]

    def _sampling_grid(self, plane: Sequence[int], device: torch.device) -> torch.Tensor:
        field = self.dense_field(plane, device)
        axes = []
        for i, n in enumerate(plane):
            base = torch.arange(n, dtype=torch.float32, device=device).reshape([-1, 1] if i == 0 else [1, -1])
            axes.append((base + field[i]) * (2.0 / max(n - 1, 1)) - 1.0)
        # grid_sample's last axis is (W, H) = (Y, X)
        return torch.stack([axes[1], axes[0]], dim=-1)[None]

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        self.randomize(shape[:2])
        self._grids: dict[tuple, torch.Tensor] = {}  # one sampling grid per device and dtype, for every key

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        c, nx, ny = x.shape[:3]
        work = as_float(x)
        # (C, X, Y, Z) -> (1, C * Z, X, Y): one 2D grid for every channel and section
        stack = work.reshape(c, nx, ny, -1).permute(0, 3, 1, 2).reshape(1, -1, nx, ny)
        cache = (work.device, work.dtype)
        if cache not in self._grids:
            self._grids[cache] = self._sampling_grid((nx, ny), work.device).to(work.dtype)
        mode = dict(zip(self.keys, self.mode))[key]
        out = F.grid_sample(stack, self._grids[cache], mode=mode, padding_mode=self.padding_mode, align_corners=True)
        out = out.reshape(c, -1, nx, ny).permute(0, 2, 3, 1).reshape(x.shape)
        return out.round() if not x.is_floating_point() else out

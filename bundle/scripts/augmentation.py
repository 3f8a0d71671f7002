"""Random training augmentations for EM windows: Guay et al. 2020 (reflections, brightness, contrast, per-section
elastic deformation) and the EM section defects MONAI lacks (lost section, misalignment, section blur, CutBlur).

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
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import Compose, MapTransform, RandFlipd, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple, ensure_tuple_rep
from scipy.ndimage import gaussian_filter

__all__ = [
    "RandBrightnessContrastd",
    "RandSectionElasticd",
    "RandMissingSectiond",
    "RandSectionShiftd",
    "RandSectionBlurd",
    "RandCutBlurd",
    "guay2020_augmentation",
]

_GRID_MODES = ("bilinear", "nearest", "bicubic")


def _tensor(array: Any) -> torch.Tensor:
    """Plain tensor view of ``array`` (no meta), on its own device."""
    return convert_to_tensor(array, track_meta=False)


def _like(result: torch.Tensor, reference: Any) -> Any:
    """``result`` with the type, dtype, device and meta of ``reference``."""
    return convert_to_dst_type(result, reference)[0]


def _float(t: torch.Tensor) -> torch.Tensor:
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


def _depth(shape: Sequence[int]) -> int:
    return int(shape[2]) if len(shape) == 3 else 1


class RandBrightnessContrastd(RandomizableTransform, MapTransform):
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
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
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

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            x = _float(_tensor(d[key]))
            span = self.data_range if self.data_range is not None else float(x.max() - x.min())
            d[key] = _like((x + self.shift * span) * self.scale, d[key])
        return d


class RandSectionElasticd(RandomizableTransform, MapTransform):
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
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
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

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize(shape[:2])
        if not self._do_transform:
            return d
        grids: dict[tuple, torch.Tensor] = {}
        for key, mode in self.key_iterator(d, self.mode):
            x = _tensor(d[key])
            c, nx, ny = x.shape[:3]
            work = _float(x)
            # (C, X, Y, Z) -> (1, C * Z, X, Y): one 2D grid for every channel and section
            stack = work.reshape(c, nx, ny, -1).permute(0, 3, 1, 2).reshape(1, -1, nx, ny)
            cache = (work.device, work.dtype)
            if cache not in grids:
                grids[cache] = self._sampling_grid((nx, ny), work.device).to(work.dtype)
            out = F.grid_sample(stack, grids[cache], mode=mode, padding_mode=self.padding_mode, align_corners=True)
            out = out.reshape(c, -1, nx, ny).permute(0, 2, 3, 1).reshape(x.shape)
            if not x.is_floating_point():
                out = out.round()
            d[key] = _like(out.to(x.dtype), d[key])
        return d


class RandMissingSectiond(RandomizableTransform, MapTransform):
    """Lost sections: 1 to ``max_sections`` random z-sections of the image replaced (labels are not listed in
    ``keys`` and stay: the tissue is still there, the network must infer it from the neighbours).

    Fill ``"mean"`` is a uniform section at the window's per-channel mean, ``"zero"`` a black section,
    ``"neighbour"`` a copy of the nearest intact section (as when a registration pipeline duplicates a neighbour;
    ties broken at random). At least one section always stays intact; a single-section window is left unchanged.
    The chosen sections are in ``self.sections`` after each call.

    Args:
        keys: image keys.
        prob: probability of applying.
        max_sections: most sections lost at once.
        fill: ``"mean"``, ``"zero"`` or ``"neighbour"``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.1,
        max_sections: int = 1,
        fill: str = "mean",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if fill not in ("mean", "zero", "neighbour"):
            raise ValueError(f"fill must be 'mean', 'zero' or 'neighbour', got {fill!r}")
        if max_sections < 1:
            raise ValueError(f"max_sections must be >= 1, got {max_sections}")
        self.max_sections = int(max_sections)
        self.fill = fill
        self.sections: list[int] = []
        self.sources: list[int] = []

    def randomize(self, data: int) -> None:
        """Choose the lost sections of a window with ``data`` sections (and their neighbour sources)."""
        super().randomize(None)
        self.sections, self.sources = [], []
        if data < 2:
            self._do_transform = False
        if not self._do_transform:
            return
        count = self.R.randint(1, min(self.max_sections, data - 1) + 1)
        self.sections = sorted(int(z) for z in self.R.choice(data, size=count, replace=False))
        intact = np.setdiff1d(np.arange(data), self.sections)
        for z in self.sections:
            distance = np.abs(intact - z)
            nearest = intact[distance == distance.min()]
            self.sources.append(int(nearest[self.R.randint(len(nearest))]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize(_depth(shape))
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            x = _tensor(d[key])
            out = x.clone()
            if self.fill == "neighbour":
                out[..., self.sections] = x[..., self.sources]
            elif self.fill == "zero":
                out[..., self.sections] = 0
            else:
                mean = _float(x).mean(dim=tuple(range(1, x.ndim)), keepdim=True)[..., 0]
                out[..., self.sections] = mean.to(x.dtype).unsqueeze(-1)
            d[key] = _like(out, d[key])
        return d


class RandSectionShiftd(RandomizableTransform, MapTransform):
    """Section misalignment: an integer in-plane shift of one section (``"single"``) or of every section from a
    random z onward (``"step"``, a registration jump), applied identically to every key.

    The label (and weight) shift WITH the image: an alignment error moves the recorded data, and annotations drawn on
    the misaligned stack follow it; this keeps image and label aligned voxel by voxel and teaches the network not to
    trust z-context blindly across a jump (as pytorch_connectomics' MisAlignment). ``out[x] = in[x - shift]``; the
    vacated strip is filled by edge replication (``"edge"``) or zeros (``"constant"``), and in ``weight_key`` it is
    set to 0 so the loss ignores these made-up voxels. A single-section window is left unchanged (nothing to be
    misaligned with). The draw is in ``self.sections`` and ``self.shift`` after each call.

    Args:
        keys: keys of image, label and weight arrays.
        prob: probability of applying.
        max_shift: largest shift in voxels along X and Y.
        kind: ``"step"``, ``"single"`` or ``"either"`` (one of the two at random).
        padding_mode: ``"edge"`` or ``"constant"`` for the vacated strip.
        weight_key: key (among ``keys``) of the loss weight map, zeroed in the vacated strip; None for none.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        max_shift: Sequence[int] = (10, 10),
        kind: str = "either",
        padding_mode: str = "edge",
        weight_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if kind not in ("step", "single", "either"):
            raise ValueError(f"kind must be 'step', 'single' or 'either', got {kind!r}")
        if padding_mode not in ("edge", "constant"):
            raise ValueError(f"padding_mode must be 'edge' or 'constant', got {padding_mode!r}")
        self.max_shift = tuple(abs(int(s)) for s in ensure_tuple_rep(max_shift, 2))
        self.kind = kind
        self.padding_mode = padding_mode
        self.weight_key = weight_key
        self.sections: list[int] = []
        self.shift: tuple[int, int] = (0, 0)

    def randomize(self, data: int) -> None:
        """Choose the shifted sections of a window with ``data`` sections and a non-zero shift."""
        super().randomize(None)
        self.sections, self.shift = [], (0, 0)
        if data < 2 or max(self.max_shift) == 0:
            self._do_transform = False
        if not self._do_transform:
            return
        kind = self.kind if self.kind != "either" else ("step" if self.R.rand() < 0.5 else "single")
        if kind == "step":
            self.sections = list(range(self.R.randint(1, data), data))
        else:
            self.sections = [int(self.R.randint(data))]
        shift = [int(self.R.randint(-m, m + 1)) for m in self.max_shift]
        if shift == [0, 0]:
            axis = int(np.argmax(self.max_shift)) if min(self.max_shift) == 0 else int(self.R.randint(2))
            shift[axis] = int(self.R.randint(1, self.max_shift[axis] + 1)) * (1 if self.R.rand() < 0.5 else -1)
        self.shift = (shift[0], shift[1])

    def _indices(self, n: int, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        source = torch.arange(n, device=device) - shift
        return source.clamp(0, n - 1), (source < 0) | (source >= n)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize(_depth(shape))
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            x = _tensor(d[key])
            ix, vacant_x = self._indices(x.shape[1], self.shift[0], x.device)
            iy, vacant_y = self._indices(x.shape[2], self.shift[1], x.device)
            moved = x[..., self.sections][:, ix][:, :, iy]
            vacant = vacant_x[:, None] | vacant_y[None, :]
            if self.padding_mode == "constant" or key == self.weight_key:
                moved[:, vacant] = 0
            out = x.clone()
            out[..., self.sections] = moved
            d[key] = _like(out, d[key])
        return d


class RandSectionBlurd(RandomizableTransform, MapTransform):
    """Out-of-focus section: in-plane Gaussian blur (sigma ~ U(sigma_range) voxels, edge-replicated borders) of one
    random z-section of the image. Labels stay sharp. A single-section window has its one section blurred (an
    in-plane blur stays meaningful there). The section and sigma are in ``self.section`` and ``self.sigma``.

    Args:
        keys: image keys.
        prob: probability of applying.
        sigma_range: range of the Gaussian standard deviation in voxels.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.1,
        sigma_range: Sequence[float] = (1.0, 3.0),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = tuple(float(s) for s in ensure_tuple_rep(sigma_range, 2))
        self.section = 0
        self.sigma = 0.0

    def randomize(self, data: int) -> None:
        """Choose the blurred section of a window with ``data`` sections and the sigma."""
        super().randomize(None)
        if self._do_transform:
            self.section = int(self.R.randint(data))
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize(_depth(shape))
        if not self._do_transform or self.sigma <= 0:
            return d
        for key in self.key_iterator(d):
            x = _tensor(d[key])
            work = _float(x)
            kernel = gaussian_1d(torch.tensor(self.sigma), truncated=4.0, normalize=True).to(work)
            section = work[..., self.section] if x.ndim == 4 else work
            blurred = separable_filtering(section[None], [kernel, kernel], mode="replicate")[0]
            out = work.clone()
            if x.ndim == 4:
                out[..., self.section] = blurred
            else:
                out = blurred
            d[key] = _like(out.to(x.dtype), d[key])
        return d


class RandCutBlurd(RandomizableTransform, MapTransform):
    """CutBlur (Yoo et al. 2020, as in pytorch_connectomics): a random cuboid of the image down-sampled by a random
    factor (area averaging) and up-sampled back (linear), i.e. a low-resolution patch. Labels stay full-resolution.

    Each cuboid side is ``U(size_range)`` times the window side (at least one voxel); z is down-sampled too only with
    ``downsample_z`` (EM sections are already thick). Works on single-section windows (an in-plane patch). The cuboid
    slices and factor are in ``self.region`` and ``self.factor``.

    Args:
        keys: image keys.
        prob: probability of applying.
        size_range: cuboid side as a fraction of the window side.
        factor_range: down-sampling factor range (> 1).
        downsample_z: also down-sample along z.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.1,
        size_range: Sequence[float] = (0.25, 0.75),
        factor_range: Sequence[float] = (2.0, 8.0),
        downsample_z: bool = False,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.size_range = tuple(float(s) for s in ensure_tuple_rep(size_range, 2))
        self.factor_range = tuple(float(f) for f in ensure_tuple_rep(factor_range, 2))
        if not 0 < self.size_range[0] <= self.size_range[1] <= 1:
            raise ValueError(f"size_range must lie in (0, 1], got {size_range}")
        if self.factor_range[0] < 1:
            raise ValueError(f"factor_range must be >= 1, got {factor_range}")
        self.downsample_z = downsample_z
        self.region: tuple[slice, ...] = ()
        self.factor = 1.0

    def randomize(self, data: Sequence[int]) -> None:
        """Choose the cuboid in a window of spatial shape ``data`` and the factor."""
        super().randomize(None)
        if not self._do_transform:
            return
        region = []
        for n in data:
            size = min(n, max(1, int(round(self.R.uniform(*self.size_range) * n))))
            start = int(self.R.randint(0, n - size + 1))
            region.append(slice(start, start + size))
        self.region = tuple(region)
        self.factor = float(self.R.uniform(*self.factor_range))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        shape = _first_shape(self, d)
        if shape is None:
            return d
        self.randomize(shape)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            x = _tensor(d[key])
            work = _float(x)
            patch = work[(slice(None), *self.region)]
            size = list(patch.shape[1:])
            low = [max(1, int(round(s / self.factor))) for s in size]
            if len(size) == 3 and not self.downsample_z:
                low[2] = size[2]
            linear = "trilinear" if len(size) == 3 else "bilinear"
            small = F.interpolate(patch[None], size=low, mode="area")
            out = work.clone()
            out[(slice(None), *self.region)] = F.interpolate(small, size=size, mode=linear, align_corners=False)[0]
            d[key] = _like(out.to(x.dtype), d[key])
        return d


def guay2020_augmentation(
    image_key: str = "image",
    label_key: str | None = "label",
    weight_key: str | None = "weight",
    flip_prob: float = 0.5,
    prob: float = 1.0,
    brightness: float = 0.12,
    contrast: float = 0.2,
    elastic: Mapping[str, Any] | None = None,
) -> Compose:
    """The paper's augmentation of a training window: reflections on each axis (MONAI ``RandFlipd``, x, y and z),
    brightness/contrast of the image (:class:`RandBrightnessContrastd`), per-section elastic deformation
    (:class:`RandSectionElasticd`, nearest for the label). ``Compose.set_random_state`` seeds them all.

    Args:
        image_key: image key.
        label_key: label key, or None.
        weight_key: weight-map key, or None.
        flip_prob: probability of a reflection along each axis.
        prob: probability of the brightness/contrast shift and of the deformation (the paper: 1).
        brightness: maximum brightness shift (fraction of the data range).
        contrast: maximum contrast change.
        elastic: extra keyword arguments of :class:`RandSectionElasticd` (``grid``, ``sigma``, ``magnitude``...).
    """
    keys = [k for k in (image_key, label_key, weight_key) if k is not None]
    modes = [{image_key: "bilinear", label_key: "nearest"}.get(k, "bilinear") for k in keys]
    flips = [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    return Compose(
        [
            *flips,
            RandBrightnessContrastd(image_key, prob=prob, brightness=brightness, contrast=contrast),
            RandSectionElasticd(keys, **{"prob": prob, "mode": modes, **dict(elastic or {})}),
        ]
    )

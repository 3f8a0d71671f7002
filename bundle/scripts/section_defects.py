"""EM section defects as random training augmentations, which MONAI lacks: a lost section, a misaligned section
or stack, a blurred section, and CutBlur (a low-resolution patch). Windows are ``(C, X, Y, Z)``, z last; a
single-section window is left unchanged by the defects that need several sections."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from monai.utils import ensure_tuple_rep

from scripts.augmentation import RandWindowTransformd, as_float, window_depth

__all__ = ["RandMissingSectiond", "RandSectionShiftd", "RandSectionBlurd", "RandCutBlurd"]


class RandMissingSectiond(RandWindowTransformd):
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
        super().__init__(keys, prob, allow_missing_keys)
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

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        self.randomize(window_depth(shape))

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        out = x.clone()
        if self.fill == "neighbour":
            out[..., self.sections] = x[..., self.sources]
        elif self.fill == "zero":
            out[..., self.sections] = 0
        else:
            mean = as_float(x).mean(dim=tuple(range(1, x.ndim)), keepdim=True)[..., 0]
            out[..., self.sections] = mean.to(x.dtype).unsqueeze(-1)
        return out


class RandSectionShiftd(RandWindowTransformd):
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
        super().__init__(keys, prob, allow_missing_keys)
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

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        self.randomize(window_depth(shape))

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        ix, vacant_x = self._indices(x.shape[1], self.shift[0], x.device)
        iy, vacant_y = self._indices(x.shape[2], self.shift[1], x.device)
        moved = x[..., self.sections][:, ix][:, :, iy]
        vacant = vacant_x[:, None] | vacant_y[None, :]
        if self.padding_mode == "constant" or key == self.weight_key:
            moved[:, vacant] = 0
        out = x.clone()
        out[..., self.sections] = moved
        return out


class RandSectionBlurd(RandWindowTransformd):
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
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma_range = tuple(float(s) for s in ensure_tuple_rep(sigma_range, 2))
        self.section = 0
        self.sigma = 0.0

    def randomize(self, data: int) -> None:
        """Choose the blurred section of a window with ``data`` sections and the sigma."""
        super().randomize(None)
        if self._do_transform:
            self.section = int(self.R.randint(data))
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def randomize_window(self, shape: tuple[int, ...]) -> None:
        self.randomize(window_depth(shape))

    def applies(self) -> bool:
        return self._do_transform and self.sigma > 0

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        work = as_float(x)
        kernel = gaussian_1d(torch.tensor(self.sigma), truncated=4.0, normalize=True).to(work)
        section = work[..., self.section] if x.ndim == 4 else work
        blurred = separable_filtering(section[None], [kernel, kernel], mode="replicate")[0]
        if x.ndim != 4:
            return blurred
        out = work.clone()
        out[..., self.section] = blurred
        return out


class RandCutBlurd(RandWindowTransformd):
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
        super().__init__(keys, prob, allow_missing_keys)
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

    def apply(self, x: torch.Tensor, key: Hashable) -> torch.Tensor:
        work = as_float(x)
        patch = work[(slice(None), *self.region)]
        size = list(patch.shape[1:])
        low = [max(1, int(round(s / self.factor))) for s in size]
        if len(size) == 3 and not self.downsample_z:
            low[2] = size[2]
        linear = "trilinear" if len(size) == 3 else "bilinear"
        small = F.interpolate(patch[None], size=low, mode="area")
        out = work.clone()
        out[(slice(None), *self.region)] = F.interpolate(small, size=size, mode=linear, align_corners=False)[0]
        return out

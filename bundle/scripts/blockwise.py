"""Block-wise (out-of-core), resumable sliding-window inference for volumes of any size.

MONAI's ``SlidingWindowInferer`` holds the whole input and a float32 map per class in memory. Here the volume is
cut into block cores; for each core every window of the *global* window grid that intersects it is run, and the
Gaussian-weighted logits falling inside the core are blended and normalised exactly as
``SlidingWindowInferer(roi_size, overlap=overlap, mode="gaussian")`` blends them over the whole volume. Only the
core's labels (and optionally its uncertainty) are written, to a Zarr group. Peak memory follows the block size,
not the volume size. Windows straddling block borders run once for every core they touch: make blocks several
windows wide (the log line at the start gives the resulting factor).

Intensities are normalised as the in-memory pipeline's ``NormalizeIntensityd`` does (the whole volume to mean 0,
std 1), with the statistics from a first streaming pass over the blocks.

A block is finished once its chunks are written and its completion marker (a file renamed into
``<output>.blocks/``) exists: a restart with the same settings skips finished blocks and recomputes any other from
scratch; a restart with other settings (input, network weights, window, overlap, block size...) is refused.

Unlike ``configs/inference.json``, which resamples every volume to ``target_spacing``, this path runs on the input's
own grid: a spacing more than 1 % off ``target_spacing`` is refused (resample first, or set ``target_spacing`` to it).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.apps.utils import get_logger
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval  # the public SlidingWindowSplitter lays another grid (tested)
from monai.utils import ensure_tuple_rep
from tqdm import tqdm

from scripts.block_markers import BlockMarkers, NetworkFingerprint
from scripts.distributed import barrier, rank_and_world
from scripts.inference import class_indices, fit_multiple, fitted_batch_size, fitted_window
from scripts.label_volumes import ZarrLabelWriter
from scripts.layers import to_channels_last_3d
from scripts.volumes import Box, Volume

logger = get_logger(__name__)  # INFO to stdout, as MONAI's bundle scripts log: the resume report must be seen


class WindowGrid:
    """The window grid MONAI's ``sliding_window_inference`` lays over a whole volume, with its Gaussian weights.

    Windows start where ``_get_scan_interval`` and ``dense_patch_slices`` put them on the volume padded evenly to at
    least the window; MONAI's grid is the product of one list of starts per axis, kept here per axis (in the
    unpadded volume's coordinates: negative along a padded axis) so that a teravoxel grid costs nothing.

    Args:
        shape: volume shape (x, y, z).
        roi_size: window (x, y, z).
        overlap: MONAI's overlap, one value or one per axis, in [0, 1).
        fit_axes: axes along which the window is cut to the volume instead of padding the volume, as
            ``scripts.inference.FittedSlidingWindowInferer`` does.
        fit_divisor: x and y of the window shrink to the volume rounded up to this multiple (the network's
            ``spatial_divisor``), as ``scripts.inference.fitted_window`` describes.
        fit_min: smallest x and y of a fitted window (the training window).
        sigma_scale: Gaussian sigma as a fraction of the window (MONAI's default 0.125).
    """

    def __init__(
        self,
        shape: Sequence[int],
        roi_size: Sequence[int],
        overlap: float | Sequence[float] = 0.25,
        fit_axes: Sequence[int] = (),
        fit_divisor: int = 0,
        fit_min: Sequence[int] = (1, 1),
        sigma_scale: float = 0.125,
    ) -> None:
        overlap = ensure_tuple_rep(overlap, 3)
        if len(roi_size) != 3 or min(roi_size) < 1 or any(not 0 <= o < 1 for o in overlap):
            raise ValueError(f"window {list(roi_size)} needs 3 positive sizes and overlap {overlap} values in [0, 1)")
        roi = fitted_window(shape, roi_size, fit_axes, fit_divisor, fit_min)
        padded = [max(s, r) for s, r in zip(shape, roi)]
        scan_interval = _get_scan_interval(padded, roi, 3, overlap)
        self.shape = tuple(int(s) for s in shape)
        self.roi_size = tuple(roi)
        self.axis_starts = [
            np.asarray([w[0][0] for w in dense_patch_slices([p], [r], [i], return_slice=False)]) - (p - s) // 2
            for p, r, i, s in zip(padded, roi, scan_interval, shape)
        ]
        self.importance = compute_importance_map(self.roi_size, mode="gaussian", sigma_scale=sigma_scale)

    @property
    def num_windows(self) -> int:
        return math.prod(len(starts) for starts in self.axis_starts)

    def axis_windows(self, axis: int, lo: int, hi: int) -> np.ndarray:
        """Starts along ``axis`` of the windows that intersect ``[lo, hi)``."""
        starts = self.axis_starts[axis]
        return starts[(starts < hi) & (starts + self.roi_size[axis] > lo)]

    def windows(self, box: Box) -> list[tuple[int, int, int]]:
        """Starts (x, y, z) of the windows that intersect ``box``, in MONAI's order."""
        per_axis = [self.axis_windows(axis, lo, hi) for axis, (lo, hi) in enumerate(box)]
        return [tuple(int(s) for s in start) for start in itertools.product(*per_axis)]


def _zeros_in_layout_of(logits: torch.Tensor, core_shape: Sequence[int]) -> torch.Tensor:
    """A float32 zero map ``(C, *core_shape)`` laid out in memory like ``logits`` ``(B, C, X, Y, Z)``: channels-last
    logits added into a channel-first map are transposed voxel by voxel, several times slower."""
    channels = logits.shape[1]
    if logits.is_contiguous() or not logits.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.zeros((channels, *core_shape), device=logits.device)
    return torch.zeros((*core_shape, channels), device=logits.device).permute(3, 0, 1, 2)


def block_boxes(shape: Sequence[int], block_size: Sequence[int]) -> list[list[list[int]]]:
    """Boxes ``[[x0, x1], [y0, y1], [z0, z1]]`` tiling ``shape`` by ``block_size``, x fastest (z-slab by z-slab)."""
    ranges = [[[lo, min(lo + b, s)] for lo in range(0, s, b)] for s, b in zip(shape, block_size)]
    return [[x, y, z] for z, y, x in itertools.product(ranges[2], ranges[1], ranges[0])]


def intensity_statistics(volume: Volume, block_size: Sequence[int], progress: bool = True) -> tuple[float, float]:
    """Mean and (population) standard deviation of every voxel, streamed block by block in float64.

    8- and 16-bit integer volumes (most EM) are counted into a histogram of their values, from which the
    statistics follow exactly, several times faster than float64 sums of the voxels. Other types merge
    blocks with Chan et al.'s pairwise update, which keeps its precision where the mean is large against the
    spread. A volume with NaN, infinite or constant intensities is refused, as ``scripts.transforms.ValidateVolumed``
    refuses it.

    Args:
        volume: the volume.
        block_size: block shape (x, y, z) read at a time.
        progress: show a progress bar.
    """
    boxes = tqdm(block_boxes(volume.shape, block_size), desc="intensity statistics", disable=not progress)
    dtype = np.dtype(volume.dtype)
    if dtype.kind in "iu" and dtype.itemsize <= 2:
        as_unsigned = dtype.str.replace("i", "u")  # the same bits, counted as non-negative bins
        counts = np.zeros(2 ** (8 * dtype.itemsize), np.int64)
        for box in boxes:
            counts += np.bincount(volume.read(box).view(as_unsigned).ravel(), minlength=counts.size)
        bins = np.arange(counts.size, dtype=f"u{dtype.itemsize}")
        values = bins.view(f"{dtype.kind}{dtype.itemsize}").astype(np.float64)  # the value each bin counts
        # element-wise sums, not `@`: numpy's matrix product wakes BLAS threads that then spin beside torch's
        count = int(counts.sum())
        mean = float((counts * values).sum()) / count
        std = math.sqrt(float((counts * np.square(values - mean)).sum()) / count)
    else:
        count, mean, squares = 0, 0.0, 0.0
        for box in boxes:
            block = volume.read(box).astype(np.float64)
            block_mean = float(block.mean())
            block_squares = float(np.square(block - block_mean).sum())
            total = count + block.size
            delta = block_mean - mean
            mean += delta * block.size / total
            squares += block_squares + delta * delta * count * block.size / total
            count = total
        std = math.sqrt(squares / count)
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise ValueError(f"{volume.path}: the image contains NaN or infinite values")
    if std == 0:
        raise ValueError(f"{volume.path}: the image is constant ({mean}); it cannot be normalised to mean 0, std 1")
    return mean, std


@dataclass
class BlockwiseResult:
    """What one block-wise run did: its Zarr group, blocks computed now and blocks found finished."""

    zarr_path: Path
    computed: int
    skipped: int


class BlockwiseInference:
    """Sliding-window inference block by block, equal to MONAI's Gaussian-blended sliding window on the whole volume.

    Args:
        network: maps windows ``(B, C, X, Y, Z)`` to class logits; put in eval mode and on ``device``.
        roi_size: window (x, y, z).
        overlap: MONAI's window overlap.
        block_size: block core (x, y, z): the unit of writing, resuming and memory use.
        sw_batch_size: windows per forward pass.
        sw_batch_voxels: at most this many voxels of windows per forward pass (fewer windows where they are large:
            ``scripts.inference.fitted_batch_size``); 0: ``sw_batch_size`` windows whatever their size.
        device: where the network runs (windows go there, results come back to the CPU); default: the device of
            the network's parameters.
        fit_axes: axes along which the window is cut to the volume instead of padding it (inference.json's
            ``window_fit_axes``); ``()`` pads like ``SlidingWindowInferer``.
        fit_divisor: x and y of the window shrink to the volume rounded up to this multiple (inference.json's
            ``window_fit_divisor``, the network's ``spatial_divisor``); 0: multiples of ``fit_min``. Along an axis
            where the volume spans several blocks, the window is also capped at a quarter of the block (rounded
            down to that multiple, not below it): each window is run once per block it overlaps, and wider
            windows would multiply that.
        fit_min: smallest x and y of a fitted or capped window (inference.json's ``train_window``).
        bf16: run the network under ``torch.autocast(dtype=torch.bfloat16)`` (CPU or CUDA).
        channels_last: store the network's 3D convolution weights and the windows channels-last (NDHWC), the
            layout oneDNN's and cuDNN's fastest 3D convolutions use (1.3-1.5x on this CPU); results change by
            float rounding only.
        save_uncertainty: also store the per-voxel entropy (nats) of the blended class probabilities, float16.
        sigma_scale: Gaussian sigma as a fraction of the window.
        progress: show progress bars.
    """

    def __init__(
        self,
        network: nn.Module,
        roi_size: Sequence[int],
        overlap: float | Sequence[float] = 0.25,
        block_size: Sequence[int] = (1024, 1024, 32),
        sw_batch_size: int = 1,
        sw_batch_voxels: int = 0,
        device: str | torch.device | None = None,
        fit_axes: Sequence[int] = (),
        fit_divisor: int = 0,
        fit_min: Sequence[int] = (1, 1),
        bf16: bool = False,
        channels_last: bool = True,
        save_uncertainty: bool = False,
        sigma_scale: float = 0.125,
        progress: bool = True,
    ) -> None:
        if len(block_size) != 3 or min(block_size) < 1:
            raise ValueError(f"block_size {list(block_size)} needs 3 positive sizes (x, y, z)")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if device is None:
            device = next(network.parameters(), torch.empty(0)).device
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.fingerprint = NetworkFingerprint(self.network)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last_3d(self.network)
        self.roi_size = [int(r) for r in roi_size]
        self.overlap = list(ensure_tuple_rep(overlap, 3))
        self.block_size = [int(b) for b in block_size]
        self.sw_batch_size = int(sw_batch_size)
        self.sw_batch_voxels = int(sw_batch_voxels)
        self.fit_axes = [int(a) for a in fit_axes]
        self.fit_divisor = int(fit_divisor)
        self.fit_min = [int(m) for m in fit_min[:2]]
        self.bf16 = bool(bf16)
        self.save_uncertainty = bool(save_uncertainty)
        self.sigma_scale = float(sigma_scale)
        self.progress = progress

    def window(self, volume: Volume) -> list[int]:
        """The configured window, capped along x and y where ``volume`` spans several blocks (see Args)."""
        roi = list(self.roi_size)
        for axis in (0, 1):
            multiple = fit_multiple(self.fit_divisor, self.fit_min[axis])
            if multiple and volume.shape[axis] > self.block_size[axis]:
                roi[axis] = min(roi[axis], max(self.block_size[axis] // 4 // multiple * multiple, multiple))
        return roi

    def grid(self, volume: Volume) -> WindowGrid:
        """The global window grid of ``volume``."""
        return WindowGrid(
            volume.shape,
            self.window(volume),
            self.overlap,
            self.fit_axes,
            self.fit_divisor,
            self.fit_min,
            self.sigma_scale,
        )

    def settings(self, volume: Volume) -> dict:
        """What a run's result depends on; a restart must match it."""
        return {
            "input": os.path.abspath(volume.path),
            "shape": list(volume.shape),
            "dtype": str(volume.dtype),
            "spacing": list(volume.spacing) if volume.spacing is not None else None,
            "network": {"class": type(self.network).__name__, "sha256": self.fingerprint()},
            "roi_size": self.roi_size,
            "overlap": self.overlap,
            "block_size": self.block_size,
            "fit_axes": self.fit_axes,
            "fit_divisor": self.fit_divisor,
            "fit_min": self.fit_min,
            "sigma_scale": self.sigma_scale,
            "bf16": self.bf16,
            "channels_last": self.channels_last,
            "uncertainty": self.save_uncertainty,
        }

    @torch.inference_mode()
    def predict_block(self, volume: Volume, grid: WindowGrid, core: Box, mean: float, std: float) -> torch.Tensor:
        """Blended logits ``(C, *core shape)`` of one block core, on ``device``.

        Args:
            volume: the volume.
            grid: its global window grid.
            core: the block core ``[[x0, x1], [y0, y1], [z0, z1]]``.
            mean: intensity mean of the whole volume.
            std: intensity standard deviation of the whole volume.
        """
        windows = grid.windows(core)
        roi = grid.roi_size
        lo = [min(s[a] for s in windows) for a in range(3)]
        hi = [max(s[a] for s in windows) + roi[a] for a in range(3)]
        # the windows' union, padded with 0 (the normalised mean) where it leaves the volume, as MONAI pads
        read_box = [[max(low, 0), min(h, s)] for low, h, s in zip(lo, hi, volume.shape)]
        read = torch.from_numpy(volume.read(read_box).astype(np.float32)).sub_(mean).div_(std)
        if read_box == [[low, h] for low, h in zip(lo, hi)]:
            image = read[None, None]
        else:
            image = torch.zeros((1, 1, *(h - low for low, h in zip(lo, hi))))
            image[(0, 0, *(slice(r0 - low, r1 - low) for (r0, r1), low in zip(read_box, lo)))] = read
        core_shape = [c1 - c0 for c0, c1 in core]
        importance = grid.importance.to(self.device)
        blended = weight = None
        batch_size = fitted_batch_size(self.sw_batch_size, roi, self.sw_batch_voxels)
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            inputs = torch.cat(
                [
                    image[(slice(None), slice(None), *(slice(s - low, s - low + r) for s, low, r in zip(w, lo, roi)))]
                    for w in batch
                ]
            ).to(self.device)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.network(inputs)
            if tuple(logits.shape[2:]) != tuple(roi):
                raise ValueError(
                    f"the network maps windows {tuple(roi)} to {tuple(logits.shape[2:])}; expected the same"
                )
            if len(windows) == 1:  # the core lies in one window: the Gaussian weights cancel out of the blend
                crop = [slice(c0 - s, c1 - s) for s, (c0, c1) in zip(batch[0], core)]
                return logits[(0, slice(None), *crop)].float()
            if blended is None:
                blended = _zeros_in_layout_of(logits, core_shape)
                weight = torch.zeros(core_shape, device=self.device)
            # only the part of each window inside the core is kept: the core's voxels see every window covering them
            for start, window_logits in zip(batch, logits):
                in_window, in_core = [], []
                for s, r, (c0, c1) in zip(start, roi, core):
                    o0, o1 = max(s, c0), min(s + r, c1)
                    in_window.append(slice(o0 - s, o1 - s))
                    in_core.append(slice(o0 - c0, o1 - c0))
                # float32 sums of (bf16) logits times the Gaussian weights, in one pass
                blended[(slice(None), *in_core)].addcmul_(
                    window_logits[(slice(None), *in_window)], importance[tuple(in_window)]
                )
                weight[tuple(in_core)] += importance[tuple(in_window)]
        return blended.div_(weight)

    def __call__(self, volume: Volume, output: str | os.PathLike) -> BlockwiseResult:
        """Segment ``volume`` into the Zarr group ``output``, resuming a run of the same settings found there.

        Under ``torch.distributed`` (``torchrun``), rank 0 creates the group and the pending blocks are shared out
        over the ranks; each block is computed exactly as in one process, so the result is the same.

        Args:
            volume: the input.
            output: the Zarr group's directory, e.g. ``eval/vol_seg.zarr``.
        """
        output = Path(output)
        markers = BlockMarkers(output.with_name(output.name + ".blocks"))
        settings = self.settings(volume)
        blocks = block_boxes(volume.shape, self.block_size)
        grid = self.grid(volume)
        rank, world = rank_and_world()
        if rank == 0 and not output.exists():
            markers.clear()  # markers of an earlier result deleted since
            mean, std = intensity_statistics(volume, self.block_size, self.progress)
            ZarrLabelWriter.create(
                output,
                volume.shape,
                self.block_size,
                volume.spacing,
                {"blockwise": settings, "intensity": {"mean": mean, "std": std}},
                uncertainty=self.save_uncertainty,
            )
        barrier()
        writer = self._resume(output, settings)
        mean, std = writer.attributes["intensity"]["mean"], writer.attributes["intensity"]["std"]
        runs = math.prod(
            sum(len(grid.axis_windows(a, lo, hi)) for lo, hi in {tuple(box[a]) for box in blocks}) for a in range(3)
        )
        logger.info(
            "%s: %d blocks, windows %s, %d window passes for the %d windows of the grid (x%.2f)",
            volume.path,
            len(blocks),
            " x ".join(map(str, grid.roi_size)),
            runs,
            grid.num_windows,
            runs / grid.num_windows,
        )
        pending = [box for box in blocks if not markers.is_done(box)]
        if len(pending) < len(blocks) and rank == 0:
            logger.info(
                "%s: resuming, %d of %d blocks already finished", output, len(blocks) - len(pending), len(blocks)
            )
        mine = pending[rank::world]
        for box in tqdm(mine, desc=f"blocks of {Path(volume.path).name}", disable=not self.progress or rank > 0):
            logits = self.predict_block(volume, grid, box, mean, std)
            if logits.shape[0] > 256:
                raise ValueError(f"{logits.shape[0]} classes do not fit the uint8 label volume")
            uncertainty = None
            if self.save_uncertainty:
                uncertainty = torch.special.entr(torch.softmax(logits, dim=0)).sum(0).cpu().numpy()
            writer.write(box, class_indices(logits).to(torch.uint8).cpu().numpy(), uncertainty)
            markers.mark_done(box)
        barrier()  # every rank's blocks are in before anyone reads the result
        return BlockwiseResult(output, computed=len(pending), skipped=len(blocks) - len(pending))

    def _resume(self, output: Path, settings: dict) -> ZarrLabelWriter:
        """The existing group ``output``, if a run of the same ``settings`` wrote it."""
        try:
            writer = ZarrLabelWriter(output)
            stored = writer.attributes["blockwise"]
        except Exception as error:
            raise ValueError(f"{output} exists and is not a block-wise result ({error}): remove it") from None
        current = json.loads(json.dumps(settings))
        differences = {k: (stored.get(k), current[k]) for k in current if stored.get(k) != current[k]}
        if differences:
            lines = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differences.items())
            raise ValueError(
                f"{output} was started with other settings ({lines}): rerun with the same settings to resume, "
                "or remove it (and its .blocks folder) or choose another output_dir to start afresh"
            )
        return writer

"""The label volume of block-wise inference: a Zarr group written box by box (labels, optionally uncertainty), and
its export to the input's own format when it fits in memory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from scripts.io import write_volume_atomically
from scripts.volumes import Box, Volume


class ZarrLabelWriter:
    """A Zarr v3 group holding a uint8 label volume ``labels`` (and optionally a float16 ``uncertainty``).

    Arrays are stored ``(Z, Y, X)`` like the inputs, chunked by block, so that writing one block writes whole
    chunks. The spacing is stored as OME-Zarr 0.5 ``multiscales`` metadata (``open_volume`` reads it back) and the
    caller's attributes beside it. The group is created under a temporary name and renamed, so a group that exists
    always carries its attributes.

    Args:
        path: the group's directory, e.g. ``out/vol_seg.zarr``.
    """

    LABELS = "labels"
    UNCERTAINTY = "uncertainty"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.group = zarr.open_group(self.path, mode="r+")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        shape: Sequence[int],
        chunks: Sequence[int],
        spacing: Sequence[float] | None,
        attributes: dict,
        uncertainty: bool = False,
    ) -> ZarrLabelWriter:
        """Create the group (it must not exist yet).

        Args:
            path: the group's directory.
            shape: volume shape ``(X, Y, Z)``.
            chunks: chunk (block) shape ``(X, Y, Z)``.
            spacing: voxel size ``(x, y, z)``, or None.
            attributes: JSON-serialisable attributes stored on the group.
            uncertainty: also create the float16 ``uncertainty`` array.
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists already")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        try:
            metadata = {
                "ome": {
                    "version": "0.5",
                    "multiscales": [
                        {
                            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")],
                            "datasets": [
                                {
                                    "path": cls.LABELS,
                                    "coordinateTransformations": [
                                        {"type": "scale", "scale": list((spacing or (1.0, 1.0, 1.0))[::-1])}
                                    ],
                                }
                            ],
                        }
                    ],
                },
                **attributes,
            }
            group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=metadata)
            zyx_shape, zyx_chunks = tuple(shape[::-1]), tuple(min(c, s) for c, s in zip(chunks[::-1], shape[::-1]))
            group.create_array(cls.LABELS, shape=zyx_shape, chunks=zyx_chunks, dtype="uint8", fill_value=0)
            if uncertainty:
                group.create_array(cls.UNCERTAINTY, shape=zyx_shape, chunks=zyx_chunks, dtype="float16", fill_value=0)
            os.rename(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return cls(path)

    @property
    def attributes(self) -> dict:
        return self.group.attrs.asdict()

    def write(self, box: Box, labels: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        """Store the ``(X, Y, Z)`` arrays of one box; returns once the chunk files are written and closed.

        Zarr's local store writes each chunk to a temporary file and renames it, so a kill leaves every chunk
        either old or new.

        Args:
            box: ``[[x0, x1], [y0, y1], [z0, z1]]``.
            labels: class indices ``(X, Y, Z)``.
            uncertainty: per-voxel uncertainty ``(X, Y, Z)``, for a group created with one.
        """
        zyx = tuple(slice(int(lo), int(hi)) for lo, hi in reversed(list(box)))
        self.group[self.LABELS][zyx] = np.ascontiguousarray(np.transpose(labels).astype(np.uint8))
        if uncertainty is not None:
            self.group[self.UNCERTAINTY][zyx] = np.ascontiguousarray(np.transpose(uncertainty).astype(np.float16))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def zarr_labels_to_file(
    zarr_path: str | os.PathLike, like: Volume, output: str | os.PathLike, memory_factor: float = 4.0
) -> Path | None:
    """Write a finished Zarr label volume in a file format (TIFF, NIfTI, NRRD, MHA) on ``like``'s grid.

    Goes through ``scripts.io.write_volume_atomically`` (temporary name and rename); the affine is ``like``'s, and
    a volume read from a single 2D page is written as a single page, as ``scripts.io.SaveVolumed`` does. The whole
    volume passes through memory: nothing is written (None is returned) when ``memory_factor`` times its size
    exceeds the memory available.

    Args:
        zarr_path: a group written by ``ZarrLabelWriter``.
        like: the input volume whose grid and affine the file gets.
        output: the file to write; its suffix picks the format.
        memory_factor: copies of the label volume the writers make on the way (numpy, torch, ITK).
    """
    labels = zarr.open_array(Path(zarr_path) / ZarrLabelWriter.LABELS, mode="r")
    if tuple(labels.shape[::-1]) != like.shape:
        raise ValueError(f"{zarr_path}: labels of shape {labels.shape[::-1]} (x, y, z) do not match {like.path}")
    available = available_memory()
    if available is not None and memory_factor * labels.nbytes > available:
        return None
    array = np.transpose(labels[...])[None]
    affine = like.affine
    if like.single_section:
        array, affine = array[..., 0], affine[[0, 1, 3]][:, [0, 1, 3]]
    return write_volume_atomically(array, {"affine": affine}, output, np.uint8)

"""Lazy access to 3D volumes of any size, one box at a time (readers; ``scripts.label_volumes`` writes).

Axis order is the bundle's (see ``scripts.io``): ``(X, Y, Z)``, z the section axis last. Containers that store
arrays ``(Z, Y, X)`` (multipage TIFF, Zarr, HDF5: the usual convention) are exposed as ``(X, Y, Z)``, as MONAI's
``ITKReader`` exposes a TIFF stack; NIfTI keeps its ``(i, j, k)`` order. A 2D array ``(Y, X)`` is a volume of depth 1.

Paths: a file (``.tif``, ``.nii.gz``, ``.nrrd``, ...), a Zarr directory (``vol.zarr``, an array inside it as
``vol.zarr/raw`` or ``vol.zarr:/raw``), or an HDF5 dataset ``vol.h5:/path/to/dataset``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import h5py
import nibabel as nib
import numpy as np
import tifffile
import zarr
from monai.data import ITKReader

from scripts.io import VOLUME_SUFFIXES, volume_suffix
from scripts.preflight import check_tiff_complete

Box = Sequence[Sequence[int]]  # [[x0, x1], [y0, y1], [z0, z1]], ends exclusive

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_CONTAINER = re.compile(r"^(?P<file>.*?\.(?:zarr|h5|hdf5|hdf))(?:[:/](?P<key>.*?))?/?$", re.IGNORECASE)


# the bundle's spacings are nanometres; formats that name their unit are converted (others are taken as they are)
_NANOMETRES_PER_UNIT = {
    "nanometer": 1.0, "nanometre": 1.0, "nm": 1.0,
    "micrometer": 1e3, "micrometre": 1e3, "micron": 1e3, "um": 1e3, "\u00b5m": 1e3, "\u03bcm": 1e3,
    "millimeter": 1e6, "millimetre": 1e6, "mm": 1e6,
    "angstrom": 0.1,
}  # fmt: skip


def to_nanometres(value: float, unit: str | None) -> float:
    """A length in nanometres; ``unit`` None or unknown (ImageJ's "pixel", say) keeps the value as it is."""
    return value * _NANOMETRES_PER_UNIT.get((unit or "").strip().lower(), 1.0)


def default_affine(spacing: Sequence[float] | None) -> np.ndarray:
    """The affine MONAI's ``ITKReader`` gives a file with identity direction and origin: RAS, ``diag(-sx, -sy, sz)``."""
    sx, sy, sz = spacing if spacing is not None else (1.0, 1.0, 1.0)
    return np.diag([-sx, -sy, sz, 1.0])


class Volume:
    """A 3D image of shape ``(X, Y, Z)`` read one box at a time; subclasses say how to read a box.

    Args:
        path: where it comes from, ``file:key`` for an array inside a container; used in every message.
        shape: ``(X, Y, Z)``.
        dtype: stored data type (a real number type).
        spacing: voxel size ``(x, y, z)``, or None when the file does not state it.
        affine: 4x4 voxel-to-world matrix in MONAI's RAS convention; by default that of ``spacing``.

    Attributes:
        single_section: the file holds one 2D image, which is written back as one (as ``scripts.io.SaveVolumed``
            does); set by the readers.
    """

    single_section = False

    def __init__(
        self,
        path: str,
        shape: Sequence[int],
        dtype: np.dtype,
        spacing: Sequence[float] | None,
        affine: np.ndarray | None = None,
    ) -> None:
        self.path = str(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if len(self.shape) != 3:
            raise ValueError(f"{self.path}: shape {self.shape} has {len(self.shape)} dimensions; expected 3 (x, y, z)")
        if self.dtype.kind not in "uif":
            raise ValueError(f"{self.path}: data type {self.dtype} is not a real number type")
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.affine = np.asarray(affine, dtype=np.float64) if affine is not None else default_affine(self.spacing)

    def override_spacing(self, spacing: Sequence[float]) -> None:
        """Replace the file's voxel size, rescaling the affine's axes as ``scripts.transforms.SetSpacingd`` does.

        Args:
            spacing: voxel size ``(x, y, z)``, e.g. a datalist item's ``spacing``.
        """
        spacing = np.asarray([float(s) for s in spacing], dtype=np.float64)
        if spacing.shape != (3,) or (spacing <= 0).any():
            raise ValueError(f"{self.path}: spacing {spacing.tolist()} must hold 3 positive values (x, y, z)")
        direction = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0, keepdims=True)
        self.affine = self.affine.copy()
        self.affine[:3, :3] = direction * spacing
        self.spacing = tuple(spacing.tolist())

    def read(self, box: Box) -> np.ndarray:
        """The voxels of ``box`` as a numpy array ``(X, Y, Z)`` of the stored type.

        Args:
            box: ``[[x0, x1], [y0, y1], [z0, z1]]`` inside the volume.
        """
        box = [(int(lo), int(hi)) for lo, hi in box]
        if len(box) != 3 or any(not 0 <= lo < hi <= size for (lo, hi), size in zip(box, self.shape)):
            raise ValueError(f"{self.path}: box {box} does not fit in its shape {self.shape} (x, y, z)")
        return self._read(box)

    def _read(self, box: list[tuple[int, int]]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handle, if any."""

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayVolume(Volume):
    """A volume already in memory as an ``(X, Y, Z)`` array.

    Args:
        array: the voxels ``(X, Y, Z)``.
        path: name used in messages.
        spacing: voxel size ``(x, y, z)`` or None.
        affine: 4x4 RAS affine; by default that of ``spacing``.
    """

    def __init__(
        self,
        array: np.ndarray,
        path: str = "<array>",
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
    ) -> None:
        super().__init__(path, array.shape, array.dtype, spacing, affine)
        self.array = array

    def _read(self, box: list[tuple[int, int]]) -> np.ndarray:
        return self.array[tuple(slice(lo, hi) for lo, hi in box)]


class StoredAxesVolume(Volume):
    """A volume backed by an array sliced lazily (Zarr, HDF5, TIFF through tifffile), stored in any axis order.

    Storage axes are named: ``x``, ``y``, ``z`` are spatial (``z`` may be absent: a 2D image), any other axis
    (``c``, ``t``) must have size 1 and is dropped. The usual ``("z", "y", "x")`` becomes ``(X, Y, Z)``.

    Args:
        array: anything with ``.shape`` and numpy slicing (``zarr.Array``, ``h5py.Dataset``).
        axes: one name per storage axis.
        path: name used in messages.
        spacing: voxel size ``(x, y, z)`` or None.
        handle: an open file to close with the volume.
    """

    def __init__(
        self,
        array,
        axes: Sequence[str],
        path: str,
        spacing: Sequence[float] | None = None,
        handle=None,
    ) -> None:
        axes = [a.lower() for a in axes]
        if len(axes) != len(array.shape) or not {"x", "y"} <= set(axes) or len(set(axes)) != len(axes):
            raise ValueError(
                f"{path}: array of shape {tuple(array.shape)} with axes {axes}; expected (z, y, x) or (y, x)"
            )
        extra = {a: n for a, n in zip(axes, array.shape) if a not in ("x", "y", "z") and n != 1}
        if extra:
            raise ValueError(f"{path}: non-spatial axes {extra} of shape {tuple(array.shape)} must have size 1")
        sizes = dict(zip(axes, array.shape))
        super().__init__(path, [sizes["x"], sizes["y"], sizes.get("z", 1)], array.dtype, spacing)
        self.array = array
        self.axes = axes
        self.handle = handle
        self.single_section = "z" not in axes

    def _read(self, box: list[tuple[int, int]]) -> np.ndarray:
        ranges = dict(zip(("x", "y", "z"), box))
        block = self.array[tuple(slice(*ranges[a]) if a in ranges else 0 for a in self.axes)]
        kept = [a for a in self.axes if a in ranges]
        if "z" not in kept:
            block, kept = block[..., None], kept + ["z"]
        return np.transpose(block, [kept.index(a) for a in ("x", "y", "z")])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def split_container_path(path: str | os.PathLike) -> tuple[str, str | None]:
    """The container file and the key inside it: ``("vol.h5", "/raw")`` from ``"vol.h5:/raw"``, ``("vol.zarr",
    "raw")`` from ``"vol.zarr/raw"``; ``(path, None)`` for a plain file or a container itself."""
    match = _CONTAINER.match(str(path))
    if match is None:
        return str(path), None
    return match["file"], match["key"] if (match["key"] or "").strip("/") else None


def open_volume(path: str | os.PathLike, spacing: Sequence[float] | None = None) -> Volume:
    """Open a volume lazily, by its suffix; errors name the file, the key and the problem.

    Multipage TIFF is read through tifffile's Zarr view of its strips and tiles (a box reads only the strips it
    needs, compressed or not). NIfTI is sliced through nibabel's ``dataobj`` (a gzipped file is decompressed up to
    the box). NRRD and MHA/MHD are read whole through ITK (MONAI's ``ITKReader``), so they must fit in memory:
    convert bigger ones to Zarr. Zarr v2 and v3 arrays and OME-Zarr images (level 0, spacing from its
    ``coordinateTransformations``), and HDF5 datasets (``vol.h5:/path``, spacing from an ``element_size_um``
    attribute, z, y, x, as Fiji and ilastik write it) are sliced lazily. Spacings are in nm: OME-Zarr axis units,
    ImageJ TIFF units and ``element_size_um`` are converted; NIfTI, NRRD and MHA spacings are taken as stored, as
    the in-memory pipeline takes them.

    Args:
        path: the volume; see the module docstring.
        spacing: voxel size ``(x, y, z)`` overriding the file's.
    """
    file, key = split_container_path(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"volume {file} not found")
    lower = file.lower()
    if lower.endswith(".zarr") or (os.path.isdir(file) and key is None):
        volume = open_zarr(file, key)
    elif lower.endswith(HDF5_SUFFIXES):
        volume = open_hdf5(file, key)
    else:
        suffix = _volume_suffix(file)
        if suffix in TIFF_SUFFIXES:
            volume = open_tiff(file)
        elif suffix in NIFTI_SUFFIXES:
            volume = open_nifti(file)
        else:
            volume = open_itk(file)
    if spacing is not None:
        volume.override_spacing(spacing)
    return volume


def _volume_suffix(file: str) -> str:
    try:
        return volume_suffix(file)
    except ValueError:
        supported = [*VOLUME_SUFFIXES, ".zarr", *(f"{s}:/dataset" for s in HDF5_SUFFIXES)]
        raise ValueError(f"{file}: unsupported volume format; use one of {', '.join(supported)}") from None


def open_tiff(file: str) -> Volume:
    """A multipage TIFF stack ``(Z, Y, X)`` (or one page ``(Y, X)``); spacing from ImageJ metadata when present."""
    tif = tifffile.TiffFile(file)
    try:
        series = tif.series[0]
        if series.ndim not in (2, 3) or series.axes[-2:] != "YX":
            raise ValueError(
                f"{file}: TIFF image of shape {series.shape} (axes {series.axes}); expected a (Z, Y, X) stack of "
                "single-channel pages or one (Y, X) page"
            )
        check_tiff_complete(file)
        array = zarr.open_array(series.aszarr(level=0), mode="r")
        volume = StoredAxesVolume(array, ("z", "y", "x")[-series.ndim :], file, _imagej_spacing(tif), handle=tif)
        volume.single_section = volume.shape[2] == 1  # in TIFF a one-page stack is a single page
        return volume
    except Exception:
        tif.close()
        raise


def _imagej_spacing(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """ImageJ's voxel size in nm: x and y from the resolution tags (pixels per unit), z from its ``spacing``."""
    if not tif.is_imagej or "spacing" not in (tif.imagej_metadata or {}):
        return None
    tags = tif.pages[0].tags
    x_resolution, y_resolution = tags["XResolution"].value, tags["YResolution"].value
    unit = tif.imagej_metadata.get("unit")
    lengths = (x_resolution[1] / x_resolution[0], y_resolution[1] / y_resolution[0], tif.imagej_metadata["spacing"])
    return tuple(to_nanometres(float(v), unit) for v in lengths)


def open_nifti(file: str) -> Volume:
    """A NIfTI volume ``(i, j, k)`` sliced through nibabel's ``dataobj``; trailing axes (time, components) of size 1
    are dropped and a 2D image gets depth 1."""
    image = nib.load(file)
    axes = ("x", "y", "z", "t", "u", "v", "w")[: len(image.shape)]
    spacing = [float(s) for s in image.header.get_zooms()[:3]] + [1.0] * (3 - min(len(image.shape), 3))
    volume = StoredAxesVolume(image.dataobj, axes, file, spacing)
    volume.affine = np.asarray(image.affine, dtype=np.float64)
    return volume


def open_itk(file: str) -> Volume:
    """NRRD or MHA/MHD through MONAI's ``ITKReader``: read whole (these formats hold no chunks to read lazily)."""
    reader = ITKReader()
    array, meta = reader.get_data(reader.read(file))
    if array.ndim not in (2, 3):
        raise ValueError(f"{file}: image of shape {array.shape}; expected a 2D or 3D scalar image")
    affine = np.asarray(meta["affine"], dtype=np.float64)
    if array.ndim == 2:
        # the section axis gets unit spacing, as scripts.transforms.AddSectionAxisd gives it
        affine = np.insert(np.insert(affine, 2, 0.0, axis=0), 2, 0.0, axis=1)
        affine[2, 2] = 1.0
    volume = ArrayVolume(array.reshape(array.shape[:2] + (-1,)), file, np.linalg.norm(affine[:3, :3], axis=0), affine)
    volume.single_section = array.ndim == 2
    return volume


def open_zarr(file: str, key: str | None) -> Volume:
    """A Zarr (v2 or v3) array stored ``(Z, Y, X)``, or an OME-Zarr image group (its level 0).

    Args:
        file: the Zarr directory (or an array or group inside it).
        key: path of the array or group inside ``file``, or None for ``file`` itself.
    """
    name = f"{file}:{key}" if key else file
    try:
        node = zarr.open(file, mode="r", path=(key or "").strip("/") or None)
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise FileNotFoundError(f"{name}: no Zarr array or group there ({error})") from None
    if isinstance(node, zarr.Array):
        if node.ndim not in (2, 3):
            raise ValueError(f"{name}: Zarr array of shape {node.shape}; expected (Z, Y, X) or (Y, X)")
        return StoredAxesVolume(node, ("z", "y", "x")[-node.ndim :], name)
    multiscales = _ome_multiscales(node.attrs.asdict())
    if multiscales is None:
        arrays = sorted(k for k, _ in node.arrays())
        raise ValueError(
            f"{name}: a Zarr group without OME-Zarr multiscales metadata; name its array as {file}:/<array> "
            f"(arrays: {arrays})"
        )
    level = multiscales["datasets"][0]
    axes_metadata = [a if isinstance(a, dict) else {"name": a} for a in multiscales.get("axes", ("z", "y", "x"))]
    axes = [a["name"] for a in axes_metadata]
    try:
        array = node[level["path"]]
    except KeyError:
        raise KeyError(f"{name}: OME-Zarr level 0 path '{level['path']}' is missing") from None
    scale = np.ones(len(axes))
    for transform in [*level.get("coordinateTransformations", []), *multiscales.get("coordinateTransformations", [])]:
        if transform.get("type") == "scale":
            scale *= np.asarray(transform["scale"], dtype=np.float64)
    scales = {a["name"]: to_nanometres(v, a.get("unit")) for a, v in zip(axes_metadata, scale.tolist())}
    spacing = (scales["x"], scales["y"], scales.get("z", 1.0)) if {"x", "y"} <= set(scales) else None
    return StoredAxesVolume(array, axes, f"{name}/{level['path']}", spacing)


def _ome_multiscales(attributes: dict) -> dict | None:
    """The first multiscales entry of OME-Zarr 0.4 (top-level attributes) or 0.5 (under ``ome``)."""
    multiscales = attributes.get("ome", attributes).get("multiscales")
    return multiscales[0] if multiscales else None


def open_hdf5(file: str, key: str | None) -> Volume:
    """An HDF5 dataset stored ``(Z, Y, X)`` or ``(Y, X)``, named ``file.h5:/path/to/dataset``.

    Args:
        file: the HDF5 file.
        key: path of the dataset inside the file.
    """
    handle = h5py.File(file, "r")
    try:
        datasets: list[str] = []
        handle.visititems(lambda name, node: datasets.append("/" + name) if isinstance(node, h5py.Dataset) else None)
        if not key:
            raise ValueError(f"{file}: name the dataset as {file}:/<dataset> (datasets: {datasets})")
        if key not in handle or not isinstance(handle[key], h5py.Dataset):
            raise KeyError(f"{file}: no dataset '{key}' in this HDF5 file (datasets: {datasets})")
        dataset = handle[key]
        name = f"{file}:{key}"
        if dataset.ndim not in (2, 3):
            raise ValueError(f"{name}: dataset of shape {dataset.shape}; expected (Z, Y, X) or (Y, X)")
        element_size = dataset.attrs.get("element_size_um")
        spacing = None
        if element_size is not None and len(element_size) == dataset.ndim:
            spacing = [to_nanometres(float(s), "um") for s in element_size[::-1]] + [1.0] * (3 - dataset.ndim)
        return StoredAxesVolume(dataset, ("z", "y", "x")[-dataset.ndim :], name, spacing, handle=handle)
    except Exception:
        handle.close()
        raise

"""Reading datalists and class schemas, and writing volumes without ever leaving a half-written file.

Axis order inside the bundle: MONAI channel-first ``(C, X, Y, Z)``, with z the section (slice) axis last.
Every format is read through MONAI's ``ITKReader``, which reverses the file's index order: a multipage TIFF
stored as ``(Z, Y, X)`` pages comes back as ``(X, Y, Z)``, a NIfTI volume keeps its ``(i, j, k)`` order, and a
single TIFF page becomes a volume of depth 1 (see ``scripts.transforms.AddSectionAxisd``). Writing reverses the
order again, so a TIFF written by the bundle has the same page layout as the TIFF it came from.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKWriter, MetaTensor, NibabelWriter, load_decathlon_datalist
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)

#: the public platelet and ISBI 2012 samples, shipped in the repository beside ``bundle/``
SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
#: data sets under non-commercial licences (Drosophila VNC, CDeep3M), kept in ``../shared/data`` beside the checkout
SHARED_DATA = Path(os.environ.get("EM_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))

VOLUME_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class InputError(ValueError):
    """Bad input or settings: the message names the file or key, the problem and what to do.

    On the command line it is printed as the last line of stderr, without a traceback (``scripts.preflight``).
    """


def data_root(dataset: str) -> Path:
    """The folder that holds ``dataset`` (``platelet``, ``isbi2012``, ``drosophila_vnc``, ...): the repository's
    ``sample_data/`` where it ships there, else the shared data beside the checkout (for the tools and tests that
    run from a checkout; the configs name their own ``dataset_dir``)."""
    return SAMPLE_DATA if (SAMPLE_DATA / dataset).is_dir() else SHARED_DATA


def volume_suffix(path: str | os.PathLike) -> str:
    """The file's volume suffix (``.nii.gz`` counts as one), or a ValueError naming the supported ones."""
    name = str(path).lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unsupported volume format; use one of {', '.join(VOLUME_SUFFIXES)}")


def load_datalist(
    datalist_file: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    key: str = "training",
    file_keys: Sequence[str] = ("image", "label"),
) -> list[dict]:
    """Load and check one section of a MONAI (Decathlon-style) datalist JSON.

    Paths in the datalist are relative to ``dataset_dir`` unless absolute. Every problem found is raised at once,
    before any training or inference starts, with the datalist file, the key and the offending path.

    Args:
        datalist_file: JSON file with lists of items such as ``{"image": "a.tif", "label": "a_labels.tif"}``.
            Optional item keys: ``spacing`` (voxel size x, y, z overriding the file's) and ``region``
            (``[[x0, x1], [y0, y1], [z0, z1]]`` voxel box of the stored volume to use).
        dataset_dir: base directory of the relative paths.
        key: the datalist section, e.g. ``training``, ``validation`` or ``testing``.
        file_keys: item keys that must name existing volume files.
    """
    datalist_file = Path(datalist_file)
    if not datalist_file.is_file():
        raise InputError(f"datalist {datalist_file} not found: set --datalist to your datalist JSON")
    if not Path(dataset_dir).is_dir():
        raise InputError(
            f"dataset_dir {dataset_dir} (used by datalist {datalist_file}) is not a directory: set --dataset_dir"
        )
    with open(datalist_file) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"datalist {datalist_file}: not valid JSON ({e}): fix the file") from None
    if key not in content:
        raise InputError(f"datalist {datalist_file} has no key '{key}' (keys: {sorted(content)})")
    if not content[key]:
        raise InputError(f"datalist {datalist_file}: the list under '{key}' is empty")
    items = load_decathlon_datalist(str(datalist_file), is_segmentation=False, data_list_key=key, base_dir=dataset_dir)
    for index, item in enumerate(items):
        for file_key in file_keys:
            if file_key not in item:
                raise InputError(f"datalist {datalist_file}: item {index} of '{key}' has no '{file_key}' entry")
            path = item[file_key]
            if not os.path.isfile(path):
                raise InputError(f"datalist {datalist_file}: '{key}'[{index}]['{file_key}'] = {path} not found")
            volume_suffix(path)
    return items


def load_class_schema(metadata_file: str | os.PathLike) -> dict:
    """Class names and organelle subset from the bundle's ``metadata.json``, their one home.

    Returns:
        ``{"names": [...], "organelles": [...]}``: names indexed by output channel (from
        ``network_data_format.outputs.pred.channel_def``) and the channel indices of MIoU(org).
    """
    with open(metadata_file) as f:
        meta = json.load(f)
    try:
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except KeyError as e:
        raise KeyError(f"{metadata_file}: network_data_format.outputs.pred.channel_def is missing") from e
    names = [channel_def[str(i)] for i in range(len(channel_def))]
    organelles = [int(c) for c in meta.get("organelle_channels", range(len(names)))]
    if any(c < 0 or c >= len(names) for c in organelles):
        raise ValueError(f"{metadata_file}: organelle_channels {organelles} outside 0..{len(names) - 1}")
    return {"names": names, "organelles": organelles}


def check_weights_fit(network: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: str) -> None:
    """Raise an :class:`InputError` naming the checkpoint, the first layer that differs and the setting that most
    likely does, when ``state`` cannot be loaded strictly into ``network``."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return
    hints = []
    convs = [k for k, v in expected.items() if v.ndim >= 4 and k in state]
    if convs and state[convs[0]].shape[0] != expected[convs[0]].shape[0]:
        features = getattr(network, "features", None)
        setting = features * state[convs[0]].shape[0] // expected[convs[0]].shape[0] if features else None
        hints.append(
            f"network_features: its first layer has {state[convs[0]].shape[0]} filters, this network "
            f"{expected[convs[0]].shape[0]}" + (f" (set --network_features {setting})" if setting else "")
        )
    classes = getattr(network, "out_channels", None)
    if any(expected[k].shape[0] == classes and state[k].shape[0] != classes for k in wrong):
        hints.append(f"the class list: this network predicts {classes} classes (metadata.json, --class_names)")
    if missing or unexpected:
        hints.append(
            f"the architecture: {len(unexpected)} layers only in the checkpoint (e.g. {unexpected[:1]}), "
            f"{len(missing)} only in this network (e.g. {missing[:1]}): use the variant file it was trained with "
            "(paper_size.json, a baseline, --network_norm, --upsample, --stem_stride)"
        )
    first = (
        f"{wrong[0]} is {tuple(state[wrong[0]].shape)} there, {tuple(expected[wrong[0]].shape)} here"
        if wrong
        else f"{(missing or unexpected)[0]}"
    )
    raise InputError(
        f"checkpoint {checkpoint} does not fit this network ({first}); check "
        + ("; ".join(hints) or "the variant file it was trained with")
    )


def read_checkpoint(checkpoint: str | os.PathLike, missing_hint: str = "", map_location="cpu") -> dict:
    """The weights of a bundle checkpoint (a state dict, or ``{"model": state dict, ...}``), read with
    ``torch.load(..., weights_only=True)``; an :class:`InputError` naming it (and ``missing_hint``) if it is missing."""
    if not os.path.isfile(checkpoint):
        raise InputError(f"checkpoint {checkpoint} not found" + (f": {missing_hint}" if missing_hint else ""))
    state = torch.load(checkpoint, map_location=map_location, weights_only=True)
    return state.get("model", state)


def load_weights(
    network: torch.nn.Module, checkpoint: str | os.PathLike, missing_hint: str = "", map_location="cpu"
) -> torch.nn.Module:
    """Load a bundle checkpoint into ``network`` with ``torch.load(..., weights_only=True)``; returns ``network``.

    Args:
        network: the architecture the weights belong to (strict loading).
        checkpoint: what the bundle's training writes (a state dict, or ``{"model": state dict, ...}``).
        missing_hint: how to produce the checkpoint, appended to the error when it is missing.
        map_location: where the tensors are loaded.

    Raises:
        InputError: naming the checkpoint (and the hint) when it is missing, or the setting that differs when its
            layers do not fit ``network``.
    """
    state = read_checkpoint(checkpoint, missing_hint, map_location)
    check_weights_fit(network, state, str(checkpoint))
    network.load_state_dict(state)
    return network


def output_path(
    source: str | os.PathLike, output_dir: str | os.PathLike, postfix: str, suffix: str | None = None
) -> Path:
    """``output_dir/<source name>_<postfix><suffix>``, keeping the source's format unless ``suffix`` is given."""
    source_suffix = volume_suffix(source)
    stem = Path(source).name[: -len(source_suffix)]
    return Path(output_dir) / f"{stem}_{postfix}{suffix or source_suffix}"


def _partial_name(path: Path, pid: int | str) -> str:
    name = path.name.lower()
    suffix = next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix)
    return f".{path.name}.{pid}.partial{suffix}"


def _remove_stale_partials(path: Path) -> None:
    """Remove temporary files that killed processes left beside ``path``."""
    for leftover in path.parent.glob(_partial_name(path, "*")):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            leftover.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` (same suffix, so writers that pick a format by it still do) to write to.

    It is renamed onto ``path`` when the ``with`` block ends, and removed if the block raises: a crash or kill leaves
    the previous complete file or none, never a half-written one. Temporary files of killed earlier runs are removed
    first. The writer creates the file itself, so it gets the umask's permissions.
    """
    path = Path(path)
    if path.parent.is_dir():
        _remove_stale_partials(path)
    tmp = path.with_name(_partial_name(path, os.getpid()))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv_atomically(rows: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Write ``rows`` (dicts with the same keys, the first one's order) as CSV through ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_json_atomically(data, path: str | os.PathLike, indent: int | None = 4) -> None:
    """Write ``data`` as JSON (with a final newline) through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


def write_volume_atomically(array: torch.Tensor | np.ndarray, meta: Mapping, path: str | os.PathLike, dtype) -> Path:
    """Write a channel-first ``(C, X, Y, Z)`` array to ``path`` through a temporary file and an atomic rename.

    A crash or kill leaves either no file or the previous complete file, never a truncated one. The writer is
    chosen by suffix: NIfTI through nibabel (channel last, affine kept), other formats through ITK.

    Args:
        array: channel-first data; a single channel is written as a scalar volume.
        meta: MONAI metadata holding at least ``affine``.
        path: destination; its suffix selects the format.
        dtype: the stored data type.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        logger.warning(f"replacing the existing {path}")
    writer = NibabelWriter(output_dtype=dtype) if suffix in (".nii", ".nii.gz") else ITKWriter(output_dtype=dtype)
    data = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.as_tensor(array)
    if isinstance(data, MetaTensor):
        data = data.as_tensor()
    if data.shape[0] == 1:
        writer.set_data_array(data[0], channel_dim=None)
    else:
        writer.set_data_array(data, channel_dim=0)
    # the array is already on its output grid: set the affine directly (MONAI's set_metadata would resample)
    writer.affine = torch.as_tensor(meta["affine"], dtype=torch.float64).numpy()
    with atomic_path(path) as tmp:
        writer.write(str(tmp))
    return path


class SaveVolumed(MapTransform):
    """Save ``data[key]`` beside its source volume's name, in the source's format unless told otherwise.

    The source is ``data[key].meta["filename_or_obj"]``. A volume that came from a single 2D page
    (``meta["section_axis_added"]``) is written back as a single page. Writes are atomic.

    Args:
        keys: keys of the arrays to save.
        output_dir: destination directory.
        output_postfix: appended to the source file's stem, e.g. ``seg``.
        output_suffix: force a format (e.g. ``.nii.gz`` for multi-channel probability maps); None = the source's.
        output_dtype: stored data type.
        path_key: if given, the written path is stored in ``data[path_key]``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str = "seg",
        output_suffix: str | None = None,
        output_dtype=np.uint8,
        path_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.output_suffix = output_suffix
        self.output_dtype = output_dtype
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = d[key]
            meta = dict(array.meta)
            if meta.get("section_axis_added") and array.shape[-1] == 1:
                array = array[..., 0]
                meta["affine"] = meta["affine"][[0, 1, 3]][:, [0, 1, 3]]
            path = output_path(meta["filename_or_obj"], self.output_dir, self.output_postfix, self.output_suffix)
            write_volume_atomically(array, meta, path, self.output_dtype)
            if self.path_key:
                d[self.path_key] = str(path)
        return d

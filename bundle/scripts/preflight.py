"""Pre-flight checks: inputs, outputs and command-line overrides are checked before any long work starts.

Each workflow's ``initialize`` calls :func:`install_error_summary`, then one ``check_*`` function. A problem raises
:class:`InputError`, whose message names the file or key, the problem and what to do; on the command line it is
printed as the last line of stderr, without the traceback (``--debug True`` shows it).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import struct
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import itk
import numpy as np
import torch
from monai.handlers import CheckpointLoader

from scripts.io import VOLUME_SUFFIXES, InputError, check_weights_fit, read_checkpoint

# arguments of `python -m monai.bundle run` itself, not config keys
RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
# config keys whose default (None, an expression, or a whole number of a fractional quantity) does not show the
# type an override must have
KEY_TYPES = {
    "max_minutes": "number",
    "save_minutes": "number",
    "input_spacing": "list",
    "ignore_label": "int",
    "overwrite": "bool",
    "resume": "bool",
    "debug": "bool",
}
# what a training run writes in its ckpt_dir
CHECKPOINT_NAMES = ("model.pt", "model_last.pt")
# files up to this size are read in full by the check (a truncated file then fails here, not mid-run)
FULL_READ_BYTES = 2**31

logger = logging.getLogger(__name__)


def _type_of(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, str) and not value.startswith(("$", "@", "%")):
        return "str"
    return None  # None or an expression: the type cannot be told from the default


def _type_error(key: str, expected: str, value) -> str | None:
    """Why ``value`` does not fit a key of type ``expected``, or None when it fits."""
    if value is None:
        return (
            f"--{key} None: MONAI's command line drops None values, so {key} would keep its default: set it to "
            "null in an override file instead"
        )
    if isinstance(value, str) and value.startswith(("$", "@", "%")):
        return None
    if expected == "bool":
        if isinstance(value, bool):
            return None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return (
                f"--{key} {value}: write True or False (capitalised); the command line reads '{value}' as text, "
                "which would count as true"
            )
        return f"--{key}: expected True or False, got {value!r}"
    fits = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "list": isinstance(value, (list, tuple)),
        "dict": isinstance(value, dict),
        "str": isinstance(value, str),
    }[expected]
    if not fits:
        names = {"int": "an integer", "number": "a number", "list": "a list such as [1, 2, 3]", "dict": "a dict"}
        return f"--{key}: expected {names.get(expected, 'text')}, got {value!r}"
    return None


def _flat_ids(config, prefix: str = "") -> dict[str, object]:
    """Every id of a config (``a``, ``a#b``, ``a#0``) with its raw value."""
    ids: dict[str, object] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        path = f"{prefix}#{key}" if prefix else str(key)
        ids[path] = value
        ids.update(_flat_ids(value, path))
    return ids


def _is_argument_of_component(key: str, known: Mapping[str, object]) -> bool:
    """Whether ``key`` (``a#b#name``) sets an argument the config does not spell out of the component ``a#b``:
    a parameter of its ``_target_``'s signature, or one of MONAI's reserved keys."""
    parent, _, name = key.rpartition("#")
    component = known.get(parent)
    if not isinstance(component, dict) or "_target_" not in component:
        return False
    if name in ("_disabled_", "_requires_", "_desc_", "_mode_"):
        return True
    from monai.bundle.config_item import ComponentLocator
    from monai.utils import optional_import

    target = component["_target_"]
    module = ComponentLocator().get_component_module_name(target) if "." not in target else None
    if isinstance(module, list):
        module = module[0]
    module_name, _, attribute = (f"{module}.{target}" if module else target).rpartition(".")
    factory, found = optional_import(module_name, name=attribute)
    if not found:
        return False
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def cli_overrides(argv: Sequence[str]) -> dict[str, object]:
    """The ``--key value`` pairs of a ``python -m monai.bundle run ...`` command line, parsed as fire parses them."""
    from fire.parser import DefaultParseValue

    pairs: dict[str, object] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            continue
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if index < len(argv) and not argv[index].startswith("--"):
                value = argv[index]
                index += 1
            else:
                pairs[key.replace("-", "_")] = True
                continue
        pairs[key.replace("-", "_")] = DefaultParseValue(value)
    return pairs


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Every ``--key`` of the command line must name a config key and fit its type.

    Only checks ``python -m monai.bundle run`` command lines (MONAI Label and Python callers pass checked values).

    Raises:
        InputError: naming the key and the closest known key, or the type expected.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py") or argv[1] != "run":
        return
    from monai.bundle import ConfigParser

    overrides = cli_overrides(argv[2:])
    config_files = overrides.get("config_file")
    if not config_files:
        return
    known = _flat_ids(ConfigParser.load_config_files(config_files))
    for key, value in overrides.items():
        if key in RUN_ARGUMENTS:
            continue
        if key not in known and not _is_argument_of_component(key, known):
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else "; see the keys in configs/train.json"
            raise InputError(f"--{key} is not a key of {config_files}{hint}")
        expected = KEY_TYPES.get(key) or _type_of(known.get(key))
        problem = _type_error(key, expected, value) if expected else None
        if problem:
            raise InputError(problem)
        default = known.get(key)
        if isinstance(default, list) and default and all(isinstance(v, (int, float)) for v in default):
            if isinstance(value, (list, tuple)) and len(value) != len(default):  # a window, a spacing
                raise InputError(f"--{key}: expected {len(default)} values like {default}, got {value!r}")


def _check_tiff_directories(path: Path, name: str) -> None:
    """Walk a TIFF's chain of page directories; a directory beyond the end of the file means a truncated file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(16)
        if len(header) < 8 or header[:2] not in (b"II", b"MM"):
            raise InputError(f"{name}: not a TIFF file (no TIFF header): check the file, or give it its real suffix")
        order = "<" if header[:2] == b"II" else ">"
        big = struct.unpack(order + "H", header[2:4])[0] == 43
        offset = struct.unpack(order + ("Q" if big else "I"), header[8:16] if big else header[4:8])[0]
        count_format, entry_size, offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
        pages = 0
        while offset:
            count_size = struct.calcsize(count_format)
            f.seek(offset)
            raw = f.read(count_size)
            if offset >= size or len(raw) < count_size:
                raise InputError(
                    f"{name}: truncated: page {pages + 1}'s directory is at byte {offset} but the file ends at byte "
                    f"{size} (an interrupted copy or save?): copy or export the file again"
                )
            entries = struct.unpack(order + count_format, raw)[0]
            f.seek(offset + count_size + entries * entry_size)
            raw = f.read(struct.calcsize(offset_format))
            if len(raw) < struct.calcsize(offset_format):
                raise InputError(f"{name}: truncated inside page {pages + 1}'s directory: copy the file again")
            offset = struct.unpack(order + offset_format, raw)[0]
            pages += 1


def _check_tiff_pages(path: Path, name: str, formats: bool) -> None:
    """Every page's pixel data lies inside the file; with ``formats``, pages are single-channel and not 64-bit."""
    import tifffile

    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for number, page in enumerate(tif.pages, start=1):
            if formats and page.samplesperpixel > 1:
                raise InputError(
                    f"{name}: {page.samplesperpixel} channels per pixel (RGB?), but the bundle segments single-channel "
                    "greyscale EM: convert it to greyscale (Fiji: Image > Type > 8-bit)"
                )
            if formats and page.dtype is not None and np.dtype(page.dtype).itemsize == 8:
                raise InputError(
                    f"{name}: {page.dtype} pixels, which ITK (the bundle's reader) cannot read: save it as 32-bit "
                    "float or 16-bit integer (numpy: image.astype('float32'); Fiji: Image > Type > 32-bit)"
                )
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > size:
                raise InputError(
                    f"{name}: truncated: page {number}'s pixels end at byte {end} but the file has {size} bytes "
                    "(an interrupted copy or save?): copy or export the file again"
                )


def check_tiff_complete(path: str | os.PathLike) -> None:
    """A TIFF file's page directories and pixel data all lie inside the file (checked without reading pixels): a
    truncated stack would otherwise read as its first pages."""
    path = Path(path)
    _check_tiff_directories(path, str(path))
    _check_tiff_pages(path, str(path), formats=False)


def check_volume_file(path: str | os.PathLike, what: str = "") -> None:
    """One input volume: not empty, a supported format ITK reads, one channel, complete.

    TIFF files are checked page by page (directory chain, channels, sample type, data extent) without reading their
    pixels; other formats are read in full by ITK when under 2 GiB.

    Args:
        path: the file.
        what: where it comes from (e.g. ``datalist.json 'training'[0]['image']``), for the message.
    """
    path = Path(path)
    where = f" ({what})" if what else ""
    if not path.exists():
        raise InputError(f"{path}{where}: not found")
    suffix = next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if path.name.lower().endswith(s)), None)
    if suffix is None:  # a format only block-wise inference reads (Zarr, HDF5): its reader checks it on opening
        return
    if path.stat().st_size == 0:
        raise InputError(f"{path}{where}: the file is empty (0 bytes): copy or export it again")
    if suffix in (".tif", ".tiff"):
        _check_tiff_directories(path, f"{path}{where}")
        _check_tiff_pages(path, f"{path}{where}", formats=True)
    image_io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise InputError(f"{path}{where}: ITK finds no reader that understands this file: is it really a volume?")
    image_io.SetFileName(str(path))
    try:
        image_io.ReadImageInformation()
        if image_io.GetNumberOfComponents() > 1:
            raise InputError(
                f"{path}{where}: {image_io.GetNumberOfComponents()} channels per voxel, but the bundle segments "
                "single-channel greyscale EM: convert it to greyscale"
            )
        if suffix not in (".tif", ".tiff") and path.stat().st_size <= FULL_READ_BYTES:
            itk.imread(str(path))
    except InputError:
        raise
    except Exception as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}{where}: ITK cannot read it ({message}): check or convert the file") from e


def check_datalist_volumes(items: Iterable[Mapping], keys: Sequence[str] = ("image", "label"), what: str = "") -> None:
    """:func:`check_volume_file` for every file named under ``keys`` in datalist ``items``."""
    for index, item in enumerate(items):
        for key in keys:
            if isinstance(item.get(key), (str, os.PathLike)):
                check_volume_file(item[key], f"{what}[{index}]['{key}']".strip())


def check_writable(directory: str | os.PathLike, key: str) -> None:
    """``directory`` (or its nearest existing parent, if it does not exist yet) must be a writable directory."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--{key} {directory}: {existing} is not a writable directory: choose another --{key}")


def check_checkpoint_dir(ckpt_dir: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
    """Training replaces no checkpoint it did not write unless asked, and resumes only what exists.

    Raises:
        InputError: ``ckpt_dir`` holds checkpoints and neither ``overwrite`` nor ``resume`` is set, or ``resume`` is
            set and there is no ``model_last.pt`` to resume from.
    """
    ckpt_dir = Path(ckpt_dir)
    if overwrite and resume:
        raise InputError("--overwrite True and --resume True contradict each other: choose one")
    if resume:
        if not (ckpt_dir / "model_last.pt").is_file():
            raise InputError(
                f"--resume True: {ckpt_dir / 'model_last.pt'} not found, nothing to resume: check --ckpt_dir"
            )
        return
    existing = [name for name in CHECKPOINT_NAMES if (ckpt_dir / name).exists()]
    if existing and not overwrite:
        raise InputError(
            f"--ckpt_dir {ckpt_dir} already holds {' and '.join(existing)} from an earlier run: --resume True "
            "continues that run, --overwrite True replaces it, or choose another --ckpt_dir"
        )


def install_error_summary(debug: bool = False) -> None:
    """Make an uncaught :class:`InputError` end the process with its message as the last line of stderr.

    MONAI wraps errors raised inside config expressions ("Failed to evaluate ..."), so the cause is found along the
    exception chain. Other errors keep their full traceback, followed by their cause's message. With ``debug`` every
    traceback is printed in full.
    """

    def summarise(exc_type, exc, tb) -> None:
        cause = exc
        while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
            cause = cause.__cause__ or cause.__context__
        if debug or not isinstance(cause, InputError):
            traceback.print_exception(exc_type, exc, tb)
        else:
            print("(the traceback: rerun with --debug True)", file=sys.stderr)
        print(f"error: {cause}", file=sys.stderr)

    sys.excepthook = summarise


def normalises_per_window(network: torch.nn.Module) -> bool:
    """Whether ``network`` normalises with statistics of the window it is given (instance or group norm), so that
    its output depends on the window size; batch norm's statistics are carried over from training."""
    return any(
        isinstance(module, torch.nn.GroupNorm)
        or (isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats)
        for module in network.modules()
    )


def check_window_size(
    window: Sequence[int] | None,
    train_window: Sequence[int] | None,
    network: torch.nn.Module | None,
    key: str,
) -> None:
    """Warn when ``window`` is smaller in x or y than ``train_window`` for a network that normalises per window.

    Such a network segments smaller windows worse than the ones it was trained on (the shipped model on the
    platelet validation rows: MIoU(org) 0.246 with 128 x 128 windows, 0.462 with its training window of 256 x 256).
    A warning, not an error: a network with batch or no normalisation does not depend on the window this way.
    """
    if window is None or train_window is None or network is None or not normalises_per_window(network):
        return
    if any(int(w) < int(t) for w, t in zip(window[:2], train_window[:2])):
        other_checkpoint = (
            ", or --train_window to the window your checkpoint was trained on" if key == "infer_window" else ""
        )
        logger.warning(
            f"warning: --{key} {list(window)} is smaller in x or y than the training window {list(train_window)} "
            "(train_window): the network normalises each window by its own statistics and segments smaller windows "
            f"worse; set --{key} to at least {list(train_window[:2])} in x and y{other_checkpoint}"
        )


def check_training(
    train_items: Sequence[Mapping],
    validation_items: Sequence[Mapping],
    ckpt_dir: str,
    output_dir: str,
    overwrite: bool = False,
    resume: bool = False,
    network: torch.nn.Module | None = None,
    handlers: Sequence[object] = (),
    train_window: Sequence[int] | None = None,
    val_window: Sequence[int] | None = None,
) -> None:
    """Pre-flight of ``run training``: overrides, every volume, writable folders, no checkpoint replaced unasked,
    the starting weights of a fine-tuning run (a ``CheckpointLoader`` among ``handlers``) fit ``network``, and a
    warning for a validation window smaller than the training window."""
    check_overrides()
    check_datalist_volumes(train_items, what="training")
    check_datalist_volumes(validation_items, what="validation")
    check_writable(ckpt_dir, "ckpt_dir")
    check_writable(output_dir, "output_dir")
    check_checkpoint_dir(ckpt_dir, overwrite=overwrite, resume=resume)
    check_loaded_weights(network, handlers, "set --pretrained_checkpoint")
    check_window_size(val_window, train_window, network, "val_window")


def check_inference(
    items: Sequence[Mapping] = (),
    output_dir: str = ".",
    network: torch.nn.Module | None = None,
    handlers: Sequence[object] = (),
    infer_window: Sequence[int] | None = None,
    train_window: Sequence[int] | None = None,
) -> None:
    """Pre-flight of inference, block-wise inference and evaluation: overrides, the input volumes, a writable output
    folder, every checkpoint that a ``CheckpointLoader`` among ``handlers`` will load fits ``network``, and a
    warning for an inference window smaller than the training window."""
    check_overrides()
    check_datalist_volumes(items, keys=("image",), what="testing")
    check_writable(output_dir, "output_dir")
    check_loaded_weights(network, handlers, "set --ckpt_path")
    check_window_size(infer_window, train_window, network, "infer_window")


def check_loaded_weights(network: torch.nn.Module | None, handlers: Sequence[object], missing_hint: str) -> None:
    """Every checkpoint that a ``CheckpointLoader`` among ``handlers`` (disabled ones are None) will load exists
    and fits ``network``: an :class:`InputError` naming it and the differing setting otherwise."""
    for handler in handlers:
        if network is not None and isinstance(handler, CheckpointLoader):
            check_weights_fit(network, read_checkpoint(handler.load_path, missing_hint), str(handler.load_path))

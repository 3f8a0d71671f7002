"""The workflow of ``configs/large_volume.json`` around :class:`scripts.blockwise.BlockwiseInference`: load the
network's weights, open the datalist's volumes and check their spacing before any long work, segment each volume
and name its outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn
from monai.apps.utils import get_logger
from monai.handlers import CheckpointLoader

from scripts.blockwise import BlockwiseInference, BlockwiseResult
from scripts.distributed import barrier, rank_and_world
from scripts.inference import FlipTTA
from scripts.io import VOLUME_SUFFIXES, load_datalist, load_weights, output_path
from scripts.label_volumes import zarr_labels_to_file
from scripts.volumes import HDF5_SUFFIXES, Volume, open_volume, split_container_path

logger = get_logger(__name__)  # INFO to stdout, as MONAI's bundle scripts log


def prepare_network(network: nn.Module, handlers: Sequence, tta_axes: Sequence[int] = ()) -> nn.Module:
    """The network of the in-memory evaluator, weights loaded, in eval mode, wrapped in ``FlipTTA`` if asked.

    Weights are those inference.json's evaluator would load: every ``CheckpointLoader`` among its ``handlers``
    (``ckpt_path`` into ``network``), read with ``torch.load(weights_only=True)``, a ``{"model": state_dict}`` or a
    bare state dict. ``configs/ensemble.json`` drops that handler, its members having loaded their own weights.

    Args:
        network: the config's ``network``.
        handlers: the config's ``handlers``.
        tta_axes: flip axes of test-time augmentation; ``[]`` for none.
    """
    for handler in handlers:
        if isinstance(handler, CheckpointLoader):
            if not os.path.isfile(handler.load_path):
                raise FileNotFoundError(f"checkpoint {handler.load_path} (ckpt_path) not found")
            for module in handler.load_dict.values():
                load_weights(module, handler.load_path, map_location=handler.map_location)
    network.eval()
    return FlipTTA(network, tta_axes) if tta_axes else network


def open_datalist_volumes(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    key: str = "testing",
    input_spacing: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None,
) -> list[Volume]:
    """Open every datalist item's ``image`` lazily and check its voxel size, before any long work.

    Images may be any ``scripts.volumes.open_volume`` path (a Zarr directory, ``file.h5:/dataset``). The spacing
    is the item's ``spacing``, else ``input_spacing``, else the file's; it must be known and within 1 % of
    ``target_spacing`` along every axis longer than one voxel, since nothing is resampled here.

    Args:
        datalist: the datalist JSON.
        dataset_dir: base directory of its relative paths.
        key: the datalist section.
        input_spacing: voxel size (x, y, z) of files that lack one.
        target_spacing: the network's voxel size (x, y, z).
    """
    items = load_datalist(datalist, dataset_dir, key=key, file_keys=())
    volumes = []
    for index, item in enumerate(items):
        if "image" not in item:
            raise KeyError(f"datalist {datalist}: item {index} of '{key}' has no 'image' entry")
        volume = open_volume(item["image"], item.get("spacing", input_spacing))
        if volume.spacing is None:
            raise ValueError(
                f"{volume.path}: its voxel size is unknown; give the datalist item a 'spacing' or set input_spacing"
            )
        if target_spacing is not None and any(
            size > 1 and abs(s - t) > 0.01 * t for s, t, size in zip(volume.spacing, target_spacing, volume.shape)
        ):
            raise ValueError(
                f"{volume.path}: spacing {list(volume.spacing)} differs from target_spacing {list(target_spacing)} "
                "by more than 1 %; block-wise inference runs on the input's grid: resample the volume to "
                f"target_spacing first, or set target_spacing to {list(volume.spacing)} if the network suits it"
            )
        volumes.append(volume)
    return volumes


def output_stem(volume_path: str) -> str:
    """Name of a volume's outputs: the file name without its suffix, plus the array's path inside a container."""
    file, key = split_container_path(volume_path)
    name = Path(file).name
    for suffix in (".zarr", *HDF5_SUFFIXES, *sorted(VOLUME_SUFFIXES, key=len, reverse=True)):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    parts = [name, *(key or "").strip("/").split("/")]
    return "_".join(p for p in parts if p)


def segment_volumes(
    inference: BlockwiseInference,
    volumes: Sequence[Volume],
    output_dir: str | os.PathLike,
    output_format: str = "zarr",
    image_features: Sequence = (),
) -> list[BlockwiseResult]:
    """Segment each volume into ``output_dir/<name>_seg.zarr``, then into the input's own format if asked.

    With ``output_format="input"``, a finished TIFF, NIfTI, NRRD or MHA input also gets ``<name>_seg<suffix>`` (as
    the in-memory pipeline names it), written through a temporary name once every block is finished, when the
    label volume fits in memory (else a warning says the Zarr group is the result). Zarr and HDF5 inputs keep
    the Zarr result.

    Args:
        inference: the block-wise inference.
        volumes: the inputs, e.g. from ``open_datalist_volumes``.
        output_dir: destination directory.
        output_format: ``"zarr"`` or ``"input"``.
        image_features: the config's ``image_features``; block-wise inference feeds the image alone.
    """
    if output_format not in ("zarr", "input"):
        raise ValueError(f"output_format must be 'zarr' or 'input', got {output_format!r}")
    if image_features:
        raise ValueError("block-wise inference feeds the network the image alone: image_features must be []")
    results = []
    for volume in volumes:
        stem = output_stem(volume.path)
        result = inference(volume, Path(output_dir) / f"{stem}_seg.zarr")
        results.append(result)
        file, key = split_container_path(volume.path)
        if output_format != "input" or key is not None or os.path.isdir(file) or rank_and_world()[0] > 0:
            continue
        target = output_path(file, output_dir, "seg")
        logger.info("%s: writing %s", result.zarr_path, target)
        if zarr_labels_to_file(result.zarr_path, volume, target) is None:
            logger.warning("%s does not fit in memory as %s: the Zarr group is the result", result.zarr_path, target)
    barrier()
    return results

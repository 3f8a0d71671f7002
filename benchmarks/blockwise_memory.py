"""Peak memory of block-wise inference on a gigavoxel Zarr volume, next to what MONAI's sliding window would need.

Generates a synthetic uint8 volume chunk by chunk under ``runs/blockwise_memory/`` (never whole in memory; kept
for later runs), segments it with ``scripts.blockwise.BlockwiseInference`` and a tiny convolutional network in a
fresh subprocess, and reads that process's peak resident memory (``os.wait4``'s ``ru_maxrss``). The in-memory
figure is computed, not run: ``SlidingWindowInferer`` on the whole volume holds at least the float32 input, a
float32 output per class and the float32 importance-count map (the uint8 source and the pipeline's copies come on
top). Prints the figures and writes them as JSON.

Usage: python benchmarks/blockwise_memory.py [--voxels 1100000000] [--block_size "[512,512,32]"]
    [--output benchmarks/results/blockwise_memory.json]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
from scripts.blockwise import BlockwiseInference  # noqa: E402
from scripts.volumes import open_volume  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

DEPTH = 64
CHUNKS_ZYX = (32, 256, 256)
CLASSES = 2
TARGET_BYTES = 2 * 1024**3


def volume_shape(voxels: int) -> tuple[int, int, int]:
    """(X, Y, Z): square sections, a multiple of 256 wide, ``DEPTH`` deep, holding at least ``voxels``."""
    side = math.ceil(math.sqrt(voxels / DEPTH) / 256) * 256
    return side, side, DEPTH


def make_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """Write a smooth-plus-noise uint8 volume ``(Z, Y, X)`` chunk by chunk, under a temporary name then renamed."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    zyx = shape[::-1]
    array = zarr.create_array(tmp, shape=zyx, chunks=CHUNKS_ZYX, dtype="uint8", fill_value=0)
    rng = np.random.default_rng(0)
    for z0 in range(0, zyx[0], CHUNKS_ZYX[0]):
        for y0 in range(0, zyx[1], CHUNKS_ZYX[1]):
            for x0 in range(0, zyx[2], CHUNKS_ZYX[2]):
                z, y, x = np.meshgrid(
                    *(np.arange(o, min(o + c, s)) for o, c, s in zip((z0, y0, x0), CHUNKS_ZYX, zyx)), indexing="ij"
                )
                smooth = 100 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0) + 20 * np.sin(z / 5.0)
                chunk = np.clip(smooth + rng.normal(0, 15, smooth.shape), 0, 255).astype(np.uint8)
                array[z0 : z0 + chunk.shape[0], y0 : y0 + chunk.shape[1], x0 : x0 + chunk.shape[2]] = chunk
    os.rename(tmp, path)


def tiny_network() -> torch.nn.Module:
    """A few thousand parameters: the figure is about the blocks' buffers, not the network."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, (3, 3, 1), padding=(1, 1, 0)),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, (3, 3, 3), padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, CLASSES, 1),
    )


def infer(volume: str, output: str, roi_size: list, block_size: list, overlap: float) -> None:
    """The measured run (in its own process): segment ``volume`` into the Zarr group ``output``."""
    inference = BlockwiseInference(tiny_network(), roi_size, overlap, block_size, save_uncertainty=True)
    inference(open_volume(volume), output)


def main(
    voxels: int = 1_100_000_000,
    block_size: list = (512, 512, 32),
    roi_size: list = (128, 128, 8),
    overlap: float = 0.25,
    workdir: str = str(REPO / "runs" / "blockwise_memory"),
    output: str = str(REPO / "benchmarks" / "results" / "blockwise_memory.json"),
    child: bool = False,
) -> None:
    block_size, roi_size = [int(b) for b in block_size], [int(r) for r in roi_size]
    shape = volume_shape(voxels)
    workdir = Path(workdir)
    volume = workdir / f"synthetic_{shape[0]}x{shape[1]}x{shape[2]}.zarr"
    segmentation = workdir / "synthetic_seg.zarr"
    if child:
        infer(str(volume), str(segmentation), roi_size, block_size, overlap)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    if not volume.exists():
        print(f"writing {volume} ({math.prod(shape) / 1e9:.2f} gigavoxels)")
        make_volume(volume, shape)
    for stale in (segmentation, segmentation.with_name(segmentation.name + ".blocks")):
        shutil.rmtree(stale, ignore_errors=True)  # a measurement starts from nothing, not from a resumed run
    command = [sys.executable, __file__, "--child", "--voxels", str(voxels), "--workdir", str(workdir)]
    command += ["--block_size", json.dumps(block_size), "--roi_size", json.dumps(roi_size), "--overlap", str(overlap)]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the block-wise run failed: {' '.join(command)}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    count = math.prod(shape)
    monai = count * 4 * (1 + CLASSES + 1)
    result = {
        "voxels": count,
        "shape_xyz": list(shape),
        "classes": CLASSES,
        "roi_size": roi_size,
        "overlap": overlap,
        "block_size": block_size,
        "uncertainty_saved": True,
        "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "seconds": seconds,
        "blockwise_peak_rss_bytes": peak,
        "monai_sliding_window_bytes_at_least": monai,
        "target_bytes": TARGET_BYTES,
        "under_target": peak < TARGET_BYTES,
    }
    print(f"volume {shape} (x, y, z) = {count / 1e9:.3f} gigavoxels, {CLASSES} classes, blocks {block_size}")
    print(f"block-wise peak RSS      {peak / 2**30:6.2f} GiB  ({seconds:.0f} s)")
    print(f"MONAI sliding window  >= {monai / 2**30:6.2f} GiB  (float32 input + {CLASSES} class maps + count map)")
    write_report(result, output)


if __name__ == "__main__":
    fire.Fire(main)

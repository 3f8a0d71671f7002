"""Inference speed against MONAI's default sliding window, and the bfloat16 path, on real EM (issue 7, b and c).

``--part speed`` (b): the paper-size HybridUNet2D3D (64 features, 10.3 M parameters, random weights) on a real-size
volume: the real platelet slice (800 x 800) repeated to ``depth`` sections. In one run:

- this machine's float32 peak GFLOP/s, at the start and at the end of the run, the higher of the two: the higher of
  MKL's 2048^2 matrix product and oneDNN's 1 x 1 convolution (512 channels), best of 5 each (on AMD CPUs MKL runs
  an AVX2 path, so the matrix product alone understates the peak the networks' oneDNN convolutions can reach);
- the network's forward alone on ``windows`` training windows (296, 296, 5) as MONAI runs them, and on one of the
  bundle's inference windows, channels-last: seconds and GFLOP/s;
- MONAI's default ``SlidingWindowInferer`` (training window, overlap 0.25, Gaussian) on the whole volume;
- the bundle's block-wise inference with a larger inference window (the network is fully convolutional, so fewer
  overlapping voxels are computed), under ``torch.inference_mode``, channels-last. Its default (800, 448, 24) with
  overlap 0.15 lays 2 windows over 800 x 800 x 24 that share 96 rows, more than the 74 that neighbouring
  training windows share at MONAI's overlap 0.25;
- end-to-end voxels per second of both, the speed-up, useful GFLOP/s (the network's FLOPs for each voxel once, over
  the end-to-end time) against that peak, and the share of voxels whose label the two agree on;
- equal accuracy, with trained weights: the shipped model (``models/model.pt``) on the real platelet slice through
  the same two inferers (MONAI's with that model's training window), validation MIoU of each.

``--part bf16`` (c): the shipped model (``models/model.pt``, ``configs/inference.json``'s network) on the platelet
slice through block-wise inference with inference.json's window fitted to the slice (one 800 x 800 window),
float32 and bfloat16 autocast, with contiguous and with channels-last weights, and channels-last with 16
overlapping training windows (256 x 256, inference.json's window before it was fitted in x and y): seconds,
speed-up and validation MIoU of each; and the paper-size network's forward on one channels-last
(296, 296, 24) window in both precisions (random weights: speed only). It ends with the throughput table of this
machine: voxels/s, minutes per gigavoxel and the useful share of the float32 peak of each.

``--part volume``: the shipped model block-wise on the platelet slice tiled to a volume of several blocks and
windows (5 x 5 tiles, 2 sections: 4000 x 4000 x 2), with ``configs/large_volume.json``'s block size and batches
against those it had before (1024 x 1024 x 32 blocks, which capped the window at 256 x 256, and four windows a
forward pass), float32 and bfloat16, channels-last: seconds, voxels/s, minutes per gigavoxel, the useful share of
the float32 peak, and the share of voxels whose labels the two settings agree on.

``--part allocator``: the shipped model's forward on the platelet slice in fresh processes, alternately with glibc's
default allocator and after ``scripts.allocator.reuse_freed_memory`` (as the workflows run): seconds and page faults
per forward, float32 and bfloat16.

``--part profile``: where the shipped model's block-wise inference of the platelet slice spends its time, operator by
operator (``torch.profiler``, self CPU time), float32 and bfloat16, before and after the bundle's single-section
path (``scripts.layers.SectionConv3d``: "before" runs every convolution as the 3D call ``nn.Conv3d`` makes).

``--part compile``: the shipped model's forward on its inference window of the platelet slice (the whole slice, as
inference.json fits it), eager against ``torch.compile`` (inductor), float32 and bfloat16 autocast: compile
seconds, milliseconds per forward and the speed-up.

``--part windows``: the paper-size network's float32 forward (random weights, channels-last) on one window of each
of several sizes: seconds, GFLOP/s and share of the float32 peak.

``--part operators``: the operators the bundle replaces in inference, each against its library form on the shapes
where the profile found them: ``argmax`` over the classes of 5 x 800 x 800 logits against
``scripts.inference.class_indices``, ``max_pool3d`` against ``StridedMaxPool3d``, ``upsample_nearest3d`` against
``NearestUpsample3d`` (eval mode) and ``instance_norm`` against ``InstanceGroupNorm3d`` (also on a channels-last
multi-section window), float32 and bfloat16: milliseconds and ratio.

FLOPs come from ``torch.utils.flop_counter`` on one window (multiply-add = 2 FLOPs). Prints the figures and writes
them as JSON. Usage (from the repository root)::

    python benchmarks/inference_speed.py --part speed [--depth 24] [--window "[800, 448, 24]"] [--overlap 0.15]
    python benchmarks/inference_speed.py --part bf16
    python benchmarks/inference_speed.py --part volume [--tiles 5] [--depth 2]
    python benchmarks/inference_speed.py --part allocator [--rounds 3] [--passes 6]
    python benchmarks/inference_speed.py --part profile [--top 8]
    python benchmarks/inference_speed.py --part compile [--repeats 10]
    python benchmarks/inference_speed.py --part operators [--repeats 30]
    python benchmarks/inference_speed.py --part windows
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import numpy as np
import torch
import zarr
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import write_report  # noqa: E402
from train_step import float32_peak, higher_peak  # noqa: E402

sys.path.insert(0, str(REPO))  # the tools package
from scripts.allocator import reuse_freed_memory  # noqa: E402
from scripts.blockwise import BlockwiseInference  # noqa: E402
from scripts.inference import class_indices, fitted_window  # noqa: E402
from scripts.io import SAMPLE_DATA  # noqa: E402
from scripts.io import load_weights  # noqa: E402
from scripts.layers import (  # noqa: E402
    InstanceGroupNorm3d,
    NearestUpsample3d,
    SectionConv3d,
    StridedMaxPool3d,
    to_channels_last_3d,
)
from scripts.metrics import confusion_matrix, mean_iou  # noqa: E402
from scripts.networks import HybridUNet2D3D  # noqa: E402
from scripts.volumes import ArrayVolume, open_volume  # noqa: E402
from tools.tables import markdown_table  # noqa: E402

DATA = SAMPLE_DATA / "platelet"
TRAIN_WINDOW = (296, 296, 5)
SLICE_SHAPE = (800, 800, 1)  # the platelet slice (x, y, z)
VALIDATION_ROWS = slice(560, 800)  # the datalist's validation region, rows y >= 560


def flops_per_voxel(network: torch.nn.Module, window=TRAIN_WINDOW) -> float:
    """The network's forward FLOPs per output voxel, counted on one window."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.zeros(1, 1, *window))
    return counter.get_total_flops() / math.prod(window)


def _platelet_stack(depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The real slice (X, Y) repeated to (X, Y, depth), and its labels."""
    image, labels = (open_volume(str(DATA / f"50-slice0-{n}.tif")) for n in ("image", "labels"))
    full = [[0, 800], [0, 800], [0, 1]]
    return np.repeat(image.read(full), depth, axis=2), labels.read(full)[..., 0]


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def speed(
    depth: int = 24,
    window: tuple = (800, 448, 24),
    overlap: float = 0.15,
    windows: int = 3,
    block_size: tuple = (800, 800, 24),
    features: int = 64,
) -> dict:
    torch.manual_seed(0)
    network = HybridUNet2D3D(out_channels=7, features=features).eval()
    per_voxel = flops_per_voxel(network)
    peak_start = float32_peak()
    with torch.inference_mode():
        batch = torch.randn(1, 1, *TRAIN_WINDOW)
        network(batch)  # warm-up
        _, forward_s = _timed(lambda: [network(batch) for _ in range(windows)])
    forward_gflops = per_voxel * math.prod(TRAIN_WINDOW) * windows / forward_s / 1e9

    stack, _ = _platelet_stack(depth)
    volume = ArrayVolume(stack, f"platelet slice x {depth}", (10.0, 10.0, 50.0))
    voxels = stack.size
    normalised = torch.from_numpy((stack - stack.mean()) / stack.std()).float()[None, None]
    monai_default = SlidingWindowInferer(TRAIN_WINDOW, sw_batch_size=1, overlap=0.25, mode="gaussian")
    with torch.inference_mode():
        reference, monai_s = _timed(lambda: monai_default(normalised, network).argmax(1)[0])
    bundle = BlockwiseInference(network, window, overlap, block_size=block_size, fit_axes=(2,), progress=False)
    grid = bundle.grid(volume)
    runs = grid.num_windows
    with torch.inference_mode():  # the network is channels-last from here on
        big = torch.randn(1, 1, *grid.roi_size).contiguous(memory_format=torch.channels_last_3d)
        _, window_s = _timed(lambda: network(big))
    window_gflops = per_voxel * math.prod(grid.roi_size) / window_s / 1e9
    out = Path(REPO / "runs" / "inference_speed" / "speed_seg.zarr")
    _remove(out)
    _, bundle_s = _timed(lambda: bundle(volume, out))
    labels = torch.from_numpy(np.ascontiguousarray(zarr.open_array(out / "labels", mode="r")[...].transpose(2, 1, 0)))
    agreement = float((labels == reference).float().mean())
    useful = per_voxel * voxels / 1e9
    peak_end = float32_peak()
    peak = higher_peak(peak_start, peak_end)
    return {
        "volume_xyz": list(stack.shape),
        "network": f"HybridUNet2D3D features {features} (random weights)",
        "parameters": sum(p.numel() for p in network.parameters()),
        "gflop_per_voxel_forward": per_voxel / 1e9,
        "fp32_peak_gflops": peak,
        "fp32_rates_start_end": [peak_start, peak_end],
        "forward_alone": {"windows": windows, "seconds": round(forward_s, 2), "gflops": round(forward_gflops, 1)},
        "forward_alone_inference_window": {
            "roi": list(grid.roi_size),
            "channels_last": True,
            "seconds": round(window_s, 2),
            "gflops": round(window_gflops, 1),
        },
        "monai_default": {
            "roi": list(TRAIN_WINDOW),
            "overlap": 0.25,
            "seconds": round(monai_s, 1),
            "voxels_per_s": round(voxels / monai_s),
            "useful_gflops": round(useful / monai_s, 1),
        },
        "bundle_blockwise": {
            "roi": list(grid.roi_size),
            "overlap": overlap,
            "block_size": list(block_size),
            "channels_last": bundle.channels_last,
            "windows": runs,
            "seconds": round(bundle_s, 1),
            "voxels_per_s": round(voxels / bundle_s),
            "useful_gflops": round(useful / bundle_s, 1),
            "share_of_fp32_peak": round(useful / bundle_s / peak, 3),
        },
        "speed_up_over_monai_default": round(monai_s / bundle_s, 2),
        "label_agreement_with_monai_default": round(agreement, 5),
        "equal_accuracy_shipped_model": equal_accuracy(window, overlap),
    }


def _shipped_model(overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, ConfigParser]:
    """The shipped model in eval mode, and inference.json's parser (with ``overrides``, files in configs/)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("inference.json", *overrides)])
    parser["bundle_root"] = str(BUNDLE)
    network = load_weights(parser.get_parsed_content("network_def"), BUNDLE / "models" / "model.pt").eval()
    return network, parser


def _slice_inference(network: torch.nn.Module, parser: ConfigParser, roi=None, **kwargs) -> BlockwiseInference:
    """Block-wise inference of the platelet slice (one block) with inference.json's window (or ``roi``), fitted
    to the slice as inference.json fits it, and its batches; ``kwargs`` go to ``BlockwiseInference``."""
    settings = {
        "block_size": SLICE_SHAPE,
        "sw_batch_size": parser.get_parsed_content("sw_batch_size"),
        "sw_batch_voxels": parser["sw_batch_voxels"],
        **kwargs,
    }
    inference = BlockwiseInference(
        network,
        roi or parser["infer_window"],
        0.25,
        fit_axes=parser["window_fit_axes"],
        fit_divisor=network.spatial_divisor,
        fit_min=parser["train_window"],
        **settings,
    )
    inference.progress = False
    return inference


def _slice_window(network: torch.nn.Module, parser: ConfigParser) -> list[int]:
    """inference.json's window as it is fitted to the platelet slice (the whole slice)."""
    return fitted_window(
        SLICE_SHAPE, parser["infer_window"], parser["window_fit_axes"], network.spatial_divisor, parser["train_window"]
    )


def _validation_miou(pred: np.ndarray, labels: np.ndarray, parser: ConfigParser) -> dict:
    """MIoU(all) and MIoU(org) of a (X, Y) prediction on the validation rows."""
    cm = confusion_matrix(
        torch.from_numpy(pred[:, VALIDATION_ROWS].astype(np.int64)),
        torch.from_numpy(labels[:, VALIDATION_ROWS].astype(np.int64)),
        len(parser.get_parsed_content("class_names")),
    )
    organelles = parser.get_parsed_content("class_schema")["organelles"]
    return {"miou_all": round(mean_iou(cm), 4), "miou_org": round(mean_iou(cm, organelles), 4)}


def equal_accuracy(window: tuple, overlap: float) -> dict:
    """The shipped model on the real slice: MONAI's sliding window with its training window vs block-wise."""
    network, parser = _shipped_model()
    train_window = parser["train_window"]
    image, labels = _platelet_stack(1)
    normalised = torch.from_numpy((image - image.mean()) / image.std()).float()[None, None]
    monai_default = SlidingWindowInferer(train_window, sw_batch_size=1, overlap=0.25, mode="gaussian")
    with torch.inference_mode():
        reference, monai_s = _timed(lambda: monai_default(normalised, network).argmax(1)[0, ..., 0].numpy())
    bundle = BlockwiseInference(network, window, overlap, (800, 800, 1), fit_axes=(2,), progress=False)
    out = REPO / "runs" / "inference_speed" / "equal_accuracy.zarr"
    _remove(out)
    _, bundle_s = _timed(lambda: bundle(ArrayVolume(image, "platelet slice", (10.0, 10.0, 50.0)), out))
    pred = zarr.open_array(out / "labels", mode="r")[...].transpose(2, 1, 0)[..., 0]
    return {
        "model": "models/model.pt",
        "monai_default": {
            "roi": train_window,
            "seconds": round(monai_s, 2),
            **_validation_miou(reference, labels, parser),
        },
        "bundle_blockwise": {
            "roi": list(bundle.grid(ArrayVolume(image)).roi_size),
            "seconds": round(bundle_s, 2),
            **_validation_miou(pred, labels, parser),
        },
        "label_agreement": round(float((pred == reference).mean()), 5),
    }


def _remove(zarr_path: Path) -> None:
    shutil.rmtree(zarr_path, ignore_errors=True)
    shutil.rmtree(zarr_path.with_name(zarr_path.name + ".blocks"), ignore_errors=True)


def bf16(repeats: int = 5, paper_window: tuple = (296, 296, 24)) -> dict:
    peak_at_start = float32_peak()
    network, parser = _shipped_model()
    window, train_window = parser["infer_window"], parser["train_window"]
    image, labels = _platelet_stack(1)
    volume = ArrayVolume(image, "platelet slice", (10.0, 10.0, 50.0))
    # the last layout is the one inference.json had before its window was fitted to the volume in x and y (16
    # overlapping training windows); channels_last=True converts a network's weights in place, so the contiguous
    # runs get their own copy
    contiguous = copy.deepcopy(network)
    inferences = {
        (layout, name): _slice_inference(
            contiguous if layout == "contiguous" else network, parser, roi, bf16=use_bf16, channels_last=channels_last
        )
        for layout, channels_last, roi in (
            ("contiguous", False, window),
            ("channels_last", True, window),
            ("channels_last, training windows", True, train_window),
        )
        for name, use_bf16 in (("float32", False), ("bfloat16", True))
    }
    outputs = {
        key: REPO / "runs" / "inference_speed" / f"bf16_{key[0].replace(', ', '_')}_{key[1]}.zarr" for key in inferences
    }
    seconds = {key: [] for key in inferences}
    for _ in range(repeats + 1):  # the first round warms up; round-robin, so that the machine's drift hits all alike
        for key, inference in inferences.items():
            _remove(outputs[key])
            seconds[key].append(_timed(lambda: inference(volume, outputs[key]))[1])
    results = {}
    for (layout, name), inference in inferences.items():
        pred = zarr.open_array(outputs[layout, name] / "labels", mode="r")[...].transpose(2, 1, 0)[..., 0]
        results.setdefault(layout, {})[name] = {
            "window": list(inference.grid(volume).roi_size),
            "seconds": round(min(seconds[layout, name][1:]), 3),
            **_validation_miou(pred, labels, parser),
        }
    for result in results.values():
        result["speed_up"] = round(result["float32"]["seconds"] / result["bfloat16"]["seconds"], 2)
        result["miou_all_change"] = round(result["bfloat16"]["miou_all"] - result["float32"]["miou_all"], 4)
    paper = _paper_size_bf16(paper_window)
    peak_at_end = float32_peak()
    peak = higher_peak(peak_at_start, peak_at_end)
    shipped_flops = flops_per_voxel(network, window)
    rows = [
        _throughput(
            {"network and path": "shipped model, block-wise, whole slice", "layout": layout},
            name,
            math.prod(image.shape),
            timing["seconds"],
            shipped_flops,
            peak,
        )
        for layout in results
        for name, timing in results[layout].items()
        if isinstance(timing, dict)
    ]
    paper_flops = flops_per_voxel(HybridUNet2D3D(out_channels=7, features=64).eval(), paper_window)
    rows += [
        _throughput(
            {"network and path": "paper network, forward of one window", "layout": "channels_last"},
            name,
            math.prod(paper_window),
            seconds,
            paper_flops,
            peak,
        )
        for name, seconds in paper["seconds"].items()
    ]
    print("\n" + markdown_table(rows) + "\n")
    return {
        "model": "models/model.pt (configs/inference.json network)",
        "window": window,
        **results,
        "paper_size_forward": paper,
        "fp32_peak_gflops": peak,
        "fp32_rates_start_end": [peak_at_start, peak_at_end],
        "throughput": rows,
    }


def _throughput(what: dict, precision: str, voxels: int, seconds: float, flops: float, peak_gflops: float) -> dict:
    """One row of the throughput table: ``what`` (its first columns), voxels/s, minutes per gigavoxel, and useful
    GFLOP/s against the peak."""
    rate = voxels / seconds
    return {
        **what,
        "precision": precision,
        "voxels/s": round(rate),
        "min per gigavoxel": round(1e9 / rate / 60, 1),
        "% of float32 peak": round(100 * rate * flops / 1e9 / peak_gflops, 1),
    }


def _paper_size_bf16(window: tuple) -> dict:
    """Forward seconds of the paper-size network (random weights) on one channels-last window, float32 and bf16."""
    torch.manual_seed(0)
    network = to_channels_last_3d(HybridUNet2D3D(out_channels=7, features=64).eval())
    batch = torch.randn(1, 1, *window).contiguous(memory_format=torch.channels_last_3d)
    seconds = {}
    with torch.inference_mode():
        for name, use_bf16 in (("float32", False), ("bfloat16", True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                network(batch[..., :5])  # warm-up
                seconds[name] = round(_timed(lambda: network(batch))[1], 2)
    return {"window": list(window), "seconds": seconds, "speed_up": round(seconds["float32"] / seconds["bfloat16"], 2)}


def large_volume(tiles: int = 5, depth: int = 2) -> dict:
    """The shipped model block-wise on the platelet slice tiled ``tiles`` x ``tiles`` and repeated to ``depth``
    sections (4000 x 4000 x 2 by default, several blocks and windows): large_volume.json's blocks and batches against
    those before them (1024 x 1024 x 32 blocks, which capped the window at 256 x 256, four windows a pass),
    float32 and bf16, channels-last."""
    peak_at_start = float32_peak()
    network, parser = _shipped_model(["large_volume.json"])
    image, _ = _platelet_stack(depth)
    tiled = np.tile(image, (tiles, tiles, 1))
    volume = ArrayVolume(tiled, f"platelet slice tiled {tiles} x {tiles}", (10.0, 10.0, 50.0))
    settings = {
        "large_volume.json": {
            "block_size": parser.get_parsed_content("block_size"),
            "sw_batch_voxels": parser["sw_batch_voxels"],
        },
        "before (1024 x 1024 x 32 blocks, 4 windows a pass)": {"block_size": [1024, 1024, 32], "sw_batch_voxels": 0},
    }
    _slice_inference(network, parser, channels_last=True)(ArrayVolume(image[..., :1]), _fresh("warm_up"))
    results, labels = {}, {}
    for name, use_bf16 in (("float32", False), ("bfloat16", True)):
        for path, setting in settings.items():
            inference = _slice_inference(network, parser, bf16=use_bf16, channels_last=True, **setting)
            out = _fresh(f"volume_{name}_{len(results)}")
            seconds = _timed(lambda: inference(volume, out))[1]
            labels[path, name] = zarr.open_array(out / "labels", mode="r")[...]
            grid = inference.grid(volume)
            results.setdefault(path, {})[name] = {"window": list(grid.roi_size), "seconds": round(seconds, 2)}
            _remove(out)
    peak = higher_peak(peak_at_start, float32_peak())
    flops = flops_per_voxel(network, parser["train_window"])
    rows = [
        _throughput(
            {"settings": path, "window": " x ".join(map(str, timing["window"]))},
            name,
            tiled.size,
            timing["seconds"],
            flops,
            peak,
        )
        for path in results
        for name, timing in results[path].items()
    ]
    agreement = {
        name: round(float((labels[first, name] == labels[second, name]).mean()), 5)
        for first, second in [list(settings)]
        for name in ("float32", "bfloat16")
    }
    print(f"\n{volume.path}, {tiled.shape} voxels\n" + markdown_table(rows) + f"\nlabels agree: {agreement}\n")
    return {
        "model": "models/model.pt (configs/inference.json + configs/large_volume.json)",
        "volume_shape": list(tiled.shape),
        "settings": settings,
        **results,
        "labels_agree": agreement,
        "fp32_peak_gflops": peak,
        "throughput": rows,
    }


ALLOCATOR_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import inference_speed as bench
if sys.argv[2] == "reuse":
    bench.reuse_freed_memory()
network = bench.to_channels_last_3d(bench._shipped_model()[0])
image, _ = bench._platelet_stack(1)
section = torch.from_numpy(image.astype("float32"))[None, None]
section = ((section - section.mean()) / section.std()).contiguous(memory_format=torch.channels_last_3d)
report = {}
with torch.inference_mode():
    for name, use_bf16 in (("float32", False), ("bfloat16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            seconds, faults = [], []
            for _ in range(2 + int(sys.argv[3])):  # two passes grow the heap
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds.append(bench._timed(lambda: network(section))[1])
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        report[name] = {"seconds": min(seconds[2:]), "page_faults": sorted(faults[2:])[len(faults[2:]) // 2]}
print(json.dumps(report))
"""


def allocator(rounds: int = 3, passes: int = 6) -> dict:
    """The shipped model's forward on the platelet slice (channels-last) in fresh processes, with glibc's default
    allocator and after ``scripts.allocator.reuse_freed_memory``, alternating ``rounds`` times: seconds (best of
    ``passes``, median over rounds) and page faults per forward."""
    runs = {"default": [], "reuse": []}
    for _ in range(rounds):
        for mode in runs:
            command = [sys.executable, "-c", ALLOCATOR_CHILD, str(Path(__file__).parent), mode, str(passes)]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    rows = []
    for name in ("float32", "bfloat16"):
        median = {
            mode: {k: float(np.median([r[name][k] for r in runs[mode]])) for k in ("seconds", "page_faults")}
            for mode in runs
        }
        rows.append(
            {
                "precision": name,
                "default s": round(median["default"]["seconds"], 4),
                "reuse s": round(median["reuse"]["seconds"], 4),
                "speed-up": round(median["default"]["seconds"] / median["reuse"]["seconds"], 2),
                "page faults, default": int(median["default"]["page_faults"]),
                "page faults, reuse": int(median["reuse"]["page_faults"]),
            }
        )
    print("\n" + markdown_table(rows) + "\n")
    return {"model": "models/model.pt, forward of the 800 x 800 slice", "rounds": runs, "rows": rows}


def _fresh(name: str) -> Path:
    """An output path under runs/inference_speed/ with nothing there."""
    out = REPO / "runs" / "inference_speed" / f"{name}.zarr"
    _remove(out)
    return out


def profile(top: int = 8) -> dict:
    network, parser = _shipped_model()
    image, _ = _platelet_stack(1)
    volume = ArrayVolume(image, "platelet slice", (10.0, 10.0, 50.0))
    section_forward = SectionConv3d.forward
    report = {}
    for path, forward in (
        ("3D convolutions", lambda self, x: self._conv_forward(x, self.weight, self.bias)),
        ("as shipped", section_forward),
    ):
        SectionConv3d.forward = forward
        try:
            for name, use_bf16 in (("float32", False), ("bfloat16", True)):
                inference = _slice_inference(network, parser, bf16=use_bf16)
                out = REPO / "runs" / "inference_speed" / "profile.zarr"
                _remove(out)
                inference(volume, out)  # warm-up
                _remove(out)
                with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
                    seconds = _timed(lambda: inference(volume, out))[1]
                events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                total = sum(e.self_cpu_time_total for e in events)
                rows = [
                    {
                        "operator": e.key,
                        "calls": e.count,
                        "self ms": round(e.self_cpu_time_total / 1e3, 1),
                        "% of self time": round(100 * e.self_cpu_time_total / total, 1),
                    }
                    for e in events[:top]
                ]
                print(f"\n{path}, {name}: {seconds:.2f} s (under the profiler)\n" + markdown_table(rows))
                report.setdefault(path, {})[name] = {"seconds": round(seconds, 3), "operators": rows}
        finally:
            SectionConv3d.forward = section_forward
    return {
        "model": "models/model.pt (configs/inference.json network)",
        "window": _slice_window(network, parser),
        **report,
    }


def compile_trial(repeats: int = 10) -> dict:
    network, parser = _shipped_model()
    batch = torch.randn(1, 1, *_slice_window(network, parser))
    compiled = torch.compile(network)
    rows = []
    with torch.inference_mode():
        for name, use_bf16 in (("float32", False), ("bfloat16", True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                _, compile_seconds = _timed(lambda: compiled(batch))  # the first call compiles
                timings = {}
                for label, forward in (("eager", network), ("compiled", compiled)):
                    forward(batch)
                    timings[label] = min(_timed(lambda: forward(batch))[1] for _ in range(repeats))
            rows.append(
                {
                    "precision": name,
                    "compile s": round(compile_seconds, 1),
                    "eager ms": round(1e3 * timings["eager"], 1),
                    "compiled ms": round(1e3 * timings["compiled"], 1),
                    "speed-up": round(timings["eager"] / timings["compiled"], 2),
                }
            )
    print("\n" + markdown_table(rows) + "\n")
    return {"model": "models/model.pt (configs/inference.json network)", "batch": list(batch.shape), "rows": rows}


def windows(
    sizes: tuple = ((128, 128, 24), (200, 200, 24), (296, 296, 24), (448, 448, 24), (800, 448, 24)),
    features: int = 64,
) -> dict:
    """The paper-size network's float32 forward, channels-last, on one window of each size: GFLOP/s and its share
    of the float32 peak (how the block-wise window size trades the convolutions' speed against overlap)."""
    torch.manual_seed(0)
    network = to_channels_last_3d(HybridUNet2D3D(out_channels=7, features=features).eval())
    per_voxel = flops_per_voxel(network, (64, 64, 8))
    peak_at_start = float32_peak()
    rows = []
    with torch.inference_mode():
        for size in sizes:
            batch = torch.randn(1, 1, *size).contiguous(memory_format=torch.channels_last_3d)
            network(batch[..., :8])  # warm-up
            seconds = _timed(lambda: network(batch))[1]
            rows.append(
                {
                    "window": str(tuple(size)),
                    "seconds": round(seconds, 2),
                    "GFLOP/s": per_voxel * math.prod(size) / seconds / 1e9,
                }
            )
    peak_at_end = float32_peak()
    peak = higher_peak(peak_at_start, peak_at_end)
    for row in rows:
        row["% of float32 peak"] = round(100 * row["GFLOP/s"] / peak, 1)
        row["GFLOP/s"] = round(row["GFLOP/s"], 1)
    print("\n" + markdown_table(rows) + "\n")
    return {
        "network": f"HybridUNet2D3D features {features} (random weights), channels-last, float32",
        "fp32_peak_gflops": peak,
        "fp32_rates_start_end": [peak_at_start, peak_at_end],
        "rows": rows,
    }


def operators(repeats: int = 30) -> dict:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        logits = torch.randn(5, 800, 800, 1, dtype=dtype)
        pooled = torch.randn(4, 23, 128, 128, 1, dtype=dtype)
        coarse = torch.randn(4, 32, 64, 64, 1, dtype=dtype)
        section = torch.randn(4, 16, 128, 128, 1, dtype=dtype)
        volume = torch.randn(2, 16, 96, 96, 8, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        pool, up = StridedMaxPool3d((2, 2, 1)).eval(), NearestUpsample3d((2, 2, 1)).eval()
        norm = InstanceGroupNorm3d(16, affine=True).eval()
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)

        def instance_norm(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)

        def group_norm(x: torch.Tensor, module: InstanceGroupNorm3d) -> torch.Tensor:
            return torch.nn.functional.group_norm(x, module.num_features, module.weight, module.bias, module.eps)

        last = torch.channels_last_3d
        narrow = torch.randn(4, 8, 128, 128, 1, dtype=dtype).contiguous(memory_format=last)
        coarse_map = torch.randn(4, 128, 16, 16, 1, dtype=dtype).contiguous(memory_format=last)
        norm_8, norm_128 = InstanceGroupNorm3d(8, affine=True).eval(), InstanceGroupNorm3d(128, affine=True).eval()

        pairs = {
            "class indices of (5, 800, 800, 1) logits": (lambda: logits.argmax(0), lambda: class_indices(logits)),
            "(2, 2, 1) max-pooling of (4, 23, 128, 128, 1)": (
                lambda: torch.nn.functional.max_pool3d(pooled, (2, 2, 1)),
                lambda: pool(pooled),
            ),
            "(2, 2, 1) nearest up-sampling of (4, 32, 64, 64, 1)": (
                lambda: torch.nn.functional.interpolate(coarse, scale_factor=(2.0, 2.0, 1.0), mode="nearest"),
                lambda: up(coarse),
            ),
            "instance norm of (4, 16, 128, 128, 1)": (lambda: instance_norm(section), lambda: norm(section)),
            "instance norm of channels-last (2, 16, 96, 96, 8)": (lambda: instance_norm(volume), lambda: norm(volume)),
            # where the bundle normalises a channel-first copy: against the channels-last group-norm kernel
            "group norm kernel on channels-last (4, 8, 128, 128, 1)": (
                lambda: group_norm(narrow, norm_8),
                lambda: norm_8(narrow),
            ),
            "group norm kernel on channels-last (4, 128, 16, 16, 1)": (
                lambda: group_norm(coarse_map, norm_128),
                lambda: norm_128(coarse_map),
            ),
        }
        # the norms sum in another order: equal to float32 rounding, or to bf16's where it computes in bf16
        tolerance = 1e-4 if dtype == torch.float32 else 0.1
        with torch.inference_mode():
            for what, (library, bundle) in pairs.items():
                exact = "norm" not in what
                difference = float((library().float() - bundle().float()).abs().max())
                if difference > (0.0 if exact else tolerance):
                    raise AssertionError(f"{what}: the bundle's operator differs from the library's by {difference}")
                times = [min(_timed(f)[1] for _ in range(repeats)) for f in (library, bundle)]
                rows.append(
                    {
                        "operator": what,
                        "precision": str(dtype).replace("torch.", ""),
                        "library ms": round(1e3 * times[0], 3),
                        "bundle ms": round(1e3 * times[1], 3),
                        "library / bundle": round(times[0] / times[1], 2),
                    }
                )
    print("\n" + markdown_table(rows) + "\n")
    return {"threads": torch.get_num_threads(), "rows": rows}


def main(part: str = "speed", output: str | None = None, **kwargs) -> None:
    if not (DATA / "50-slice0-image.tif").exists():
        print(f"SKIPPED: the real platelet slice is not in {DATA} (it ships in the repository's sample_data/)")
        return
    parts = {
        "speed": speed,
        "bf16": bf16,
        "profile": profile,
        "volume": large_volume,
        "allocator": allocator,
        "compile": compile_trial,
        "operators": operators,
        "windows": windows,
    }
    if part not in parts:
        sys.exit(f"--part must be one of {sorted(parts)}, got {part!r}")
    reuse_freed_memory()  # as the bundle's workflows start
    report = {"part": part, **parts[part](**kwargs)}
    print(json.dumps(report, indent=2))
    write_report(report, output or f"benchmarks/results/inference_{part}.json")


if __name__ == "__main__":
    fire.Fire(main)

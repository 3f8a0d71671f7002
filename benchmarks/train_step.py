"""Seconds per training step: the paper-size 2D-3D+3x3x3 network on one (296, 296, 5) window (``--part paper``),
or the default recipe's network and loss on a batch of its training windows (``--part default``: float32 and
bfloat16 autocast, each with the instance norms computed by ``scripts.layers.InstanceGroupNorm3d``, the bundle's,
and by PyTorch's ``instance_norm``, the library's, in one run).

Prints the figures and writes them as JSON. The machine's float32 peak (the higher of MKL's matrix product and
oneDNN's 1 x 1 convolution) is measured in the same run, so that figures from shared, drifting machines can be
compared as ratios.

Usage: python benchmarks/train_step.py [--part paper|default] [--steps 3] [--output benchmarks/results/train_step.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from scripts.layers import InstanceGroupNorm3d  # noqa: E402
from scripts.losses import DiceCELoss, WeightedCrossEntropyLoss  # noqa: E402
from scripts.networks import HybridUNet2D3D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402


def _best_gflops(operation, flops: float, repeats: int) -> float:
    """GFLOP/s of ``operation`` (``flops`` per call), the best of ``repeats`` timed calls after a warm-up call."""
    with torch.inference_mode():
        operation()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            operation()
            seconds.append(time.perf_counter() - start)
    return flops / min(seconds) / 1e9


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of a ``size`` x ``size`` matrix product, the best of ``repeats`` after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return _best_gflops(lambda: a @ b, 2 * size**3, repeats)


def convolution_gflops(channels: int = 512, size: int = 64, repeats: int = 5) -> float:
    """float32 GFLOP/s of a channels-last 1 x 1 convolution (oneDNN's GEMM), the best of ``repeats`` after a warm-up.

    PyTorch's ``torch.mm`` goes to MKL, which runs an AVX2 path on AMD CPUs (2.3x below this figure on an AMD EPYC
    with AVX-512), while every convolution the bundle runs goes to oneDNN: its rate is the peak the networks can
    reach.
    """
    convolution = torch.nn.Conv2d(channels, channels, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last)
    return _best_gflops(lambda: convolution(x), 2 * channels**2 * size**2, repeats)


def float32_peak() -> dict:
    """This machine's float32 rates: MKL's matrix product, oneDNN's 1 x 1 convolution, and the peak, the higher."""
    rates = {"matmul_fp32_gflops": round(matmul_gflops(), 1), "conv1x1_fp32_gflops": round(convolution_gflops(), 1)}
    return {**rates, "fp32_peak_gflops": max(rates.values())}


def higher_peak(*measurements: dict) -> float:
    """The highest ``fp32_peak_gflops`` of several ``float32_peak`` measurements (a shared machine drifts)."""
    return max(m["fp32_peak_gflops"] for m in measurements)


def _median_step_seconds(network, loss_function, optimizer, image, target, steps: int, bf16: bool = False) -> float:
    """Median seconds of ``steps`` training steps after one warm-up step (allocators, kernels)."""
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = network(image)
        loss = loss_function(logits, target)
        loss.backward()
        optimizer.step()
        if image.device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def paper(steps: int, device: torch.device) -> dict:
    network = HybridUNet2D3D().to(device).train()
    loss_function = WeightedCrossEntropyLoss(head_weights=(1.0, 0.33))
    optimizer = torch.optim.Adam(network.l2_parameter_groups(), lr=1e-3)
    image = torch.randn(1, 1, 296, 296, 5, device=device)
    target = torch.cat([torch.randint(0, 7, (1, 1, 296, 296, 5)), torch.rand(1, 1, 296, 296, 5)], 1).float().to(device)
    return {
        "parameters": sum(p.numel() for p in network.parameters()),
        "window_xyz": [296, 296, 5],
        "seconds_per_step": _median_step_seconds(network, loss_function, optimizer, image, target, steps),
    }


def default(steps: int, device: torch.device) -> dict:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE)
    network = parser.get_parsed_content("network_def").to(device).train()
    loss_function = DiceCELoss(head_weights=parser["head_loss_weights"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=parser["learning_rate"])
    window = parser["train_window"]
    image = torch.randn(parser["batch_size"], 1, *window, device=device)
    target = torch.randint(0, 7, (parser["batch_size"], 1, *window), device=device).float()
    group_norm = InstanceGroupNorm3d.forward
    rows = []
    for precision in ("float32", "bf16"):
        seconds = {}
        for norm, forward in (("bundle", group_norm), ("library", lambda self, x: self._apply_instance_norm(x))):
            InstanceGroupNorm3d.forward = forward
            try:
                seconds[norm] = _median_step_seconds(
                    network, loss_function, optimizer, image, target, steps, bf16=precision == "bf16"
                )
            finally:
                InstanceGroupNorm3d.forward = group_norm
        rows.append(
            {
                "precision": precision,
                "instance norm: library s/step": round(seconds["library"], 3),
                "bundle s/step": round(seconds["bundle"], 3),
                "library / bundle": round(seconds["library"] / seconds["bundle"], 2),
            }
        )
    return {"window_xyz": window, "batch": parser["batch_size"], "rows": rows}


def main(part: str = "paper", steps: int = 3, output: str | None = None) -> None:
    parts = {"paper": paper, "default": default}
    if part not in parts:
        sys.exit(f"--part must be one of {sorted(parts)}, got {part!r}")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "part": part,
        "device": str(device),
        "threads": torch.get_num_threads(),
        **parts[part](steps, device),
        **float32_peak(),
    }
    print(json.dumps(result, indent=2))
    write_report(
        result,
        output
        or ("benchmarks/results/train_step.json" if part == "paper" else f"benchmarks/results/train_step_{part}.json"),
    )


if __name__ == "__main__":
    fire.Fire(main)

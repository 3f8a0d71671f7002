"""Seconds per training step of the paper-size 2D-3D+3x3x3 network on one (296, 296, 5) window.

Prints the figures and writes them as JSON. The machine's float32 matrix-multiply rate is measured in the same
run, so that figures from shared, drifting machines can be compared as ratios.

Usage: python benchmarks/train_step.py [--steps 3] [--output benchmarks/results/train_step.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.losses import WeightedCrossEntropyLoss  # noqa: E402
from scripts.networks import HybridUNet2D3D  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of a ``size`` x ``size`` matrix product, the best of ``repeats`` after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds) / 1e9


def main(steps: int = 3, output: str = "benchmarks/results/train_step.json") -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = HybridUNet2D3D().to(device).train()
    loss_function = WeightedCrossEntropyLoss(head_weights=(1.0, 0.33))
    optimizer = torch.optim.Adam(network.l2_parameter_groups(), lr=1e-3)
    image = torch.randn(1, 1, 296, 296, 5, device=device)
    target = torch.cat([torch.randint(0, 7, (1, 1, 296, 296, 5)), torch.rand(1, 1, 296, 296, 5)], 1).float().to(device)
    times = []
    for step in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_function(network(image), target)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in network.parameters()),
        "window_xyz": [296, 296, 5],
        "seconds_per_step": sorted(times)[len(times) // 2],
        "seconds_per_step_all": times,
        "matmul_fp32_gflops": matmul_gflops(),
    }
    print(json.dumps(result, indent=2))
    write_report(result, output)


if __name__ == "__main__":
    fire.Fire(main)

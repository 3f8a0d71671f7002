"""Numerical precision chosen from the machine: bfloat16 autocast where the CPU runs it fast, float32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

PRECISIONS = ("auto", "float32", "bf16")
#: CPU flags of native bfloat16 arithmetic (Intel AMX, AVX-512 BF16): without them bf16 is emulated and slower
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``float32`` or ``bf16`` for ``precision`` (``auto``, ``float32`` or ``bf16``) on ``device``.

    ``auto`` picks bf16 on a CPU with native bf16 instructions and float32 on any other CPU. On CUDA it returns
    float32: there the configs' ``amp`` switch (MONAI's float16 autocast with a gradient scaler) applies instead.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cpu":
        return "float32"
    if precision == "auto":
        found = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
        return "bf16" if found else "float32"
    return precision


def blockwise_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether block-wise inference runs under bfloat16 autocast: where ``precision`` resolves to bf16 on a CPU, and
    on a CUDA GPU that supports bf16 unless ``precision`` is ``float32``."""
    if torch.device(device).type == "cuda":
        return precision != "float32" and torch.cuda.is_bf16_supported()
    return resolve_precision(precision, device) == "bf16"


class _AutocastHooks:
    """Enter a CPU bfloat16 autocast before the module's forward and leave it after: the module, its parameter
    names and its checkpoints stay those of the plain network (a wrapper module would prefix every key)."""

    def __init__(self) -> None:
        self.contexts: list = []

    def enter(self, module: nn.Module, args) -> None:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
        context.__enter__()
        self.contexts.append(context)

    def leave(self, module: nn.Module, args, output):
        self.contexts.pop().__exit__(None, None, None)
        return output


def with_precision(network: nn.Module, precision: str = "auto", device: torch.device | str = "cpu") -> nn.Module:
    """Run ``network``'s forward passes under bfloat16 autocast when ``precision`` resolves to bf16 on a CPU.

    Losses that matter for small probabilities (``scripts.losses``) compute their softmax in float32 anyway. Logs
    the choice.

    Args:
        network: the model, already on ``device``.
        precision: ``auto`` (bf16 where the CPU has native bf16), ``float32`` or ``bf16``.
        device: where the model runs.
    """
    chosen = resolve_precision(precision, device)
    flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS)) if torch.device(device).type == "cpu" else []
    # printed, not logged: the bundle runner's logging config hides INFO from library modules
    print(f"precision: {chosen} (asked: {precision}; device {device}; native bf16 CPU flags: {flags or 'none'})")
    if chosen == "bf16":
        hooks = _AutocastHooks()
        network.register_forward_pre_hook(hooks.enter)
        network.register_forward_hook(hooks.leave)
    return network

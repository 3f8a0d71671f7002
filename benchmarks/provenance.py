"""What every benchmark records beside its figures: the machine (CPU model and flags, cores, threads), the commit
and the library versions, so that a figure in the README can be tied to the code and machine that printed it.

Usage in a benchmark: ``from provenance import write_report`` then ``write_report(figures, path)``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bundle") not in sys.path:
    sys.path.insert(0, str(REPO / "bundle"))
from scripts.io import write_json_atomically  # noqa: E402
from scripts.precision import cpu_flags  # noqa: E402

#: the flags that decide which kernels run fast (native bf16, AMX tiles, AVX-512, AVX2 + FMA)
SPEED_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment() -> dict:
    """CPU model, its speed-relevant flags, cores and torch threads, the commit (``+dirty`` with local changes)
    and the versions of Python, torch, MONAI, ignite and NumPy."""
    import ignite
    import monai
    import numpy
    import torch

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": cpu_model(),
        "cpu_flags": sorted(set(SPEED_FLAGS) & cpu_flags()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit + ("+dirty" if dirty else ""),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "ignite": ignite.__version__,
            "numpy": numpy.__version__,
        },
    }


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` with an ``environment`` entry as JSON through a temporary name; print where, and on what."""
    path = Path(path) if Path(path).is_absolute() else REPO / path
    env = environment()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically({**report, "environment": env}, path, indent=2)
    flags = ", ".join(env["cpu_flags"]) or "none of " + ", ".join(SPEED_FLAGS)
    print(f"machine: {env['cpu']} ({env['cpus']} cores, {env['torch_threads']} threads; flags: {flags})")
    print(f"commit {env['commit']}; json: {path}")
    return path

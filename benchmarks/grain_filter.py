"""Seconds of the grain filter (tree of shapes) for λ = 650 and 3200 on the real 800x800 platelet slice.

The first call compiles (or loads from numba's cache) the kernels and is reported apart; then each area is timed
alone (tree of shapes + filter) and both together (one shared tree, as GrainFilterd does). Prints the figures and
writes them as JSON.

Usage: python benchmarks/grain_filter.py [--repeats 3] [--output benchmarks/results/grain_filter.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
from scripts.grain_filter import grain_filter, grain_filters  # noqa: E402
from scripts.io import SAMPLE_DATA  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance, beside this file
from provenance import write_report  # noqa: E402

SLICE = SAMPLE_DATA / "platelet" / "50-slice0-image.tif"


def _median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(repeats: int = 3, output: str = "benchmarks/results/grain_filter.json", image: str = str(SLICE)) -> None:
    path = Path(image)
    if not path.exists():
        sys.exit(f"benchmark image not found: {path} (it ships in the repository's sample_data/)")
    import itk  # the bundle's TIFF reader

    array = itk.array_from_image(itk.imread(str(path)))
    start = time.perf_counter()
    grain_filter(array[:32, :32], 10)
    warmup = time.perf_counter() - start
    result = {
        "image": str(path.relative_to(REPO.parent)) if path.is_relative_to(REPO.parent) else str(path),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "grey_levels": int(np.unique(array).size),
        "connectivity": 1,
        "first_call_seconds": warmup,
        "repeats": repeats,
    }
    for area in (650, 3200):
        result[f"seconds_area_{area}"] = _median_seconds(lambda: grain_filter(array, area), repeats)
    result["seconds_both_areas_shared_tree"] = _median_seconds(lambda: grain_filters(array, [650, 3200]), repeats)
    filtered = grain_filters(array, [650, 3200])
    result["distinct_levels_after"] = {str(a): int(np.unique(f).size) for a, f in zip((650, 3200), filtered)}
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    write_report(result, output)


if __name__ == "__main__":
    fire.Fire(main)

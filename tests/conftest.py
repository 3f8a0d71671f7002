import os
import sys
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (run_tests.sh: -n 2) each worker gets its share of the cores, and so do the CLI subprocesses
# it starts (they inherit OMP_NUM_THREADS): two workers each running two threads on two cores spin-wait for each
# other and run several times slower than one thread each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED_DATA = Path(os.environ.get("EM_SHARED_DATA", REPO.parent / "shared" / "data"))

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))


def require_shared(*relative: str) -> list[Path]:
    """Paths of real EM files in ``../shared/data``; skip the test with a clear message when absent."""
    paths = [SHARED_DATA / r for r in relative]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real EM data not found ({', '.join(missing)}): place the shared data beside the checkout")
    return paths


#: the network options of configs/train.json and inference.json (beyond the paper's defaults of HybridUNet2D3D), for
#: checkpoints that tests write and the configs load
CONFIG_NETWORK = {"norm": "instance", "upsample": "interpolate"}

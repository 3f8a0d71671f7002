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
#: MONAI's bundle metadata schema, for offline verify_metadata
METADATA_SCHEMA = REPO / "tools" / "schemas" / "meta_schema_20240725.json"

for path in (BUNDLE, REPO):  # the bundle's package `scripts`, and the developer tools package `tools`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from scripts.io import SAMPLE_DATA, data_root  # noqa: E402,F401  (the bundle package is on the path from here)


def require_data(*relative: str) -> list[Path]:
    """Paths of real EM files (``platelet/...`` and ``isbi2012/...`` ship in ``sample_data/``; the data sets under
    non-commercial licences live in ``../shared/data``); skip the test with a clear message when absent."""
    paths = [data_root(r.split("/")[0]) / r for r in relative]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(
            f"real EM data not found ({', '.join(missing)}): it carries a non-commercial licence, so it is not in the "
            "repository; place the shared data beside the checkout (../shared/data) or set EM_SHARED_DATA"
        )
    return paths


#: the network options of configs/train.json and inference.json (beyond the paper's defaults of HybridUNet2D3D), for
#: checkpoints that tests write and the configs load
CONFIG_NETWORK = {"norm": "instance", "upsample": "interpolate", "stem_stride": 2}

import os
import sys
from pathlib import Path

import pytest

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

"""Developer tools beside the bundle: the demo, the release of the shipped model, the experiment runner and the
variant-bundle writer. They drive the bundle (``bundle/``, whose package ``scripts`` they import) the way a user
does; MONAI Label and exported bundles copy ``bundle/`` alone, without them.

Run from the repository root, e.g. ``python -m tools.demo``.
"""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

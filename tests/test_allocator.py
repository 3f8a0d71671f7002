"""The allocator setting (scripts.allocator): repeated forward passes stop faulting their activations in afresh."""

import json
import subprocess
import sys

import pytest

from conftest import BUNDLE

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from scripts.allocator import reuse_freed_memory
from scripts.layers import to_channels_last_3d
from scripts.networks import HybridUNet2D3D
done = reuse_freed_memory() if sys.argv[2] == "reuse" else None
torch.set_num_threads(1)
torch.manual_seed(0)
network = HybridUNet2D3D(out_channels=7, features=16, norm="instance", upsample="interpolate", stem_stride=2)
network = to_channels_last_3d(network.eval())  # as inference runs it
section = torch.randn(1, 1, 800, 800, 1).contiguous(memory_format=torch.channels_last_3d)
faults = []
with torch.inference_mode():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        network(section)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"done": done, "faults": faults[4:]}))  # after the passes that grow the heap
"""


def _page_faults(mode: str) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(BUNDLE), mode], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_repeated_forward_passes_reuse_freed_memory():
    default, reused = _page_faults("default"), _page_faults("reuse")
    assert reused["done"] is True
    # without it glibc maps many activations (about 10 MB each here) afresh, in most passes but not all of them
    assert sum(default["faults"]) > 2000
    assert sum(reused["faults"]) < sum(default["faults"]) / 10

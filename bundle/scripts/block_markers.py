"""Resume bookkeeping of block-wise inference: a completion marker per finished block, and the fingerprint of the
network whose results the blocks hold (a restart with other weights must not mix them)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from scripts.io import write_json_atomically
from scripts.volumes import Box


def network_fingerprint(network: nn.Module) -> str:
    """SHA-256 of the network's structure (``repr``) and weights: what identifies the checkpoint(s) behind it."""
    digest = hashlib.sha256(repr(network).encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class NetworkFingerprint:
    """:func:`network_fingerprint` of one network, hashed again only where its structure or weights may have changed:
    a tensor replaced (another storage) or written in place (its version counter moved). Hashing every weight again
    for each volume of a datalist was a noticeable share of a small volume's inference.

    Args:
        network: the network to identify.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self._key: Optional[tuple] = None
        self._digest = ""

    def __call__(self) -> str:
        try:
            weights = tuple((n, t.data_ptr(), t._version) for n, t in self.network.state_dict().items())
        except RuntimeError:  # inference tensors keep no version counter: hash every time
            return network_fingerprint(self.network)
        key = (repr(self.network), weights)
        if key != self._key:
            self._digest, self._key = network_fingerprint(self.network), key
        return self._digest


class BlockMarkers:
    """Completion markers of finished blocks: one small file per block, written under a temporary name and renamed.

    Args:
        directory: where the markers live (beside the Zarr group, which would take them for foreign nodes).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, box: Box) -> Path:
        (x0, _), (y0, _), (z0, _) = box
        return self.directory / f"x{x0}_y{y0}_z{z0}.done"

    def is_done(self, box: Box) -> bool:
        return self.path(box).is_file()

    def mark_done(self, box: Box) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically({"box": [list(map(int, b)) for b in box]}, self.path(box), indent=None)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

"""Coarse-to-fine cascade (seed 002): a coarse network's class probabilities as extra input channels.

Stage 1 (``configs/variants/cascade_stage1.json``) trains a full-3D network on the volume down-sampled by
``coarse_factor`` per axis: with fewer voxels its windows cover much more of the cell. Stage 2
(``configs/variants/cascade_stage2.json``) trains any of the bundle's networks on full-resolution windows of the
image plus stage 1's up-sampled probabilities; :class:`CoarseProbabilitiesd` computes those channels, in training
(once per volume, cached) and in a single inference call alike.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform, Zoom
from monai.utils import convert_to_dst_type, convert_to_tensor

from scripts.io import load_weights

__all__ = ["CoarseProbabilitiesd"]


class CoarseProbabilitiesd(MapTransform):
    """Append a coarse network's class probabilities to an image as channels: ``(C, X, Y, Z)`` becomes
    ``(C + num_classes, X, Y, Z)``.

    The image, on the fine (network) grid, is down-sampled by ``factor`` per axis with MONAI ``Zoom`` in ``"area"``
    mode (the averaging stage 1 trains on), segmented whole by sliding window, and the softmax is up-sampled
    (trilinear) back onto the image's grid. Meta, affine and transform history are the image's, so ``Invertd``
    maps predictions back as usual. Deterministic: in a config's ``image_features`` hook it sits before the
    ``CacheDataset`` cache boundary and runs once per volume.

    Args:
        keys: image keys.
        network: the stage-1 network; its output channels are the classes.
        checkpoint: the stage-1 weights.
        factor: down-sampling factor per spatial axis, e.g. ``(4, 4, 1)`` for 10 x 10 x 50 nm voxels.
        roi_size: sliding-window size on the coarse grid.
        sw_batch_size: windows per forward pass.
        overlap: sliding-window overlap.
        device: where the network runs; default the image's device.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        checkpoint: str | os.PathLike,
        factor: Sequence[float],
        roi_size: Sequence[int],
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if any(f < 1 for f in factor):
            raise ValueError(f"factor {list(factor)} must be >= 1 on every axis (a down-sampling)")
        self.device = torch.device(device) if device is not None else None
        hint = "train stage 1 first (configs/variants/cascade_stage1.json) or set --coarse_checkpoint"
        self.network = load_weights(network, checkpoint, hint).eval()
        if self.device is not None:
            self.network.to(self.device)
        self.factor = [float(f) for f in factor]
        self.zoom = Zoom(zoom=[1.0 / f for f in self.factor], mode="area", keep_size=False)
        self.inferer = SlidingWindowInferer(roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Stage-1 softmax ``(num_classes, X, Y, Z)`` on the grid of a plain ``(C, X, Y, Z)`` image."""
        if image.ndim - 1 != len(self.factor):
            raise ValueError(f"image shape {tuple(image.shape)} does not match factor {self.factor} (x, y, z)")
        device = self.device or image.device
        coarse = convert_to_tensor(self.zoom(image.float()), track_meta=False)  # Zoom's own meta must not leak out
        with torch.no_grad():
            logits = self.inferer(coarse[None].to(device), self.network)
            prob = torch.softmax(logits.float(), dim=1)
            # align_corners=False puts coarse voxel centres at the centres of the blocks "area" averaged
            fine = F.interpolate(prob, size=tuple(image.shape[1:]), mode="trilinear", align_corners=False)
        return fine[0].to(image.device)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            plain = convert_to_tensor(image, track_meta=False)
            stacked = torch.cat([plain.float(), self.probabilities(plain)])
            # the image's type and device, with its meta (affine, filename...) and transform history
            d[key] = convert_to_dst_type(stacked, image, dtype=torch.float32)[0]
        return d

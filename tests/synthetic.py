"""A small synthetic EM-like volume with the platelet data set's seven classes, for unit tests only: every
capability is also tested on the real EM in ``sample_data/``. Not a substitute for real EM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from scripts.io import write_volume_atomically

# class index -> (mean intensity, texture amplitude) loosely mimicking inverted-contrast SBF-SEM
_APPEARANCE = {
    0: (0.15, 0.05),
    1: (0.55, 0.08),
    2: (0.30, 0.10),
    3: (0.40, 0.04),
    4: (0.85, 0.03),
    5: (0.65, 0.03),
    6: (0.05, 0.02),
}


def _ellipsoids(shape, count, radius_xy, radius_z, rng, inside=None) -> np.ndarray:
    """Union of random axis-aligned ellipsoids whose centres lie in ``inside`` (a mask) if given."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, bool)
    candidates = np.argwhere(inside) if inside is not None else None
    for _ in range(count):
        if candidates is not None and len(candidates):
            cx, cy, cz = candidates[rng.integers(len(candidates))]
        else:
            cx, cy, cz = (rng.integers(s) for s in shape)
        rx, ry = rng.uniform(*radius_xy, size=2)
        rz = rng.uniform(*radius_z)
        mask |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1
    return mask


def synthetic_em_volume(shape=(256, 256, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, 0..65535-like uint16 range) and 7-class label, both ``(X, Y, Z)``.

    Args:
        shape: (x, y, z) size; z is the section axis and the objects are flattened along it, as in SBF-SEM.
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    cells = _ellipsoids(shape, count=max(2, shape[0] * shape[1] // 4000), radius_xy=(25, 45), radius_z=(4, 8), rng=rng)
    label[cells] = 1
    organelles = [(4, 12, (6, 14), (1, 3)), (3, 25, (3, 6), (1, 2)), (2, 15, (3, 8), (1, 2)), (5, 10, (3, 4), (1, 2))]
    scale = shape[0] * shape[1] / 65536
    for cls, count, rxy, rz in organelles:
        label[_ellipsoids(shape, max(1, int(count * scale)), rxy, rz, rng, inside=cells) & cells] = cls
    body = label == 5  # each dense granule has a darker core
    label[ndimage.binary_erosion(body, structure=np.ones((3, 3, 1)), iterations=2)] = 6
    image = np.zeros(shape, np.float32)
    for cls, (mean, texture) in _APPEARANCE.items():
        image[label == cls] = mean
    image += ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma=(2, 2, 0.5)).astype(np.float32) * 0.3
    image = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0.3)) + rng.normal(0, 0.04, shape).astype(np.float32)
    image = np.clip(image, 0, 1) * 60000
    return image.astype(np.float32), label


def write_synthetic_dataset(directory: str | os.PathLike, shape=(256, 256, 8), seed: int = 0) -> Path:
    """Write ``image.tif``, ``labels.tif`` and a ``datalist.json`` (train on y < 3/4, validate on the rest).

    Returns:
        The datalist path; its file paths are relative to ``directory``.
    """
    directory = Path(directory)
    image, label = synthetic_em_volume(shape, seed)
    affine = np.diag([10.0, 10.0, 50.0, 1.0])
    write_volume_atomically(
        torch.from_numpy(image.astype(np.uint16))[None], {"affine": affine}, directory / "image.tif", np.uint16
    )
    write_volume_atomically(torch.from_numpy(label)[None], {"affine": affine}, directory / "labels.tif", np.uint8)
    split = shape[1] * 3 // 4
    item = {"image": "image.tif", "label": "labels.tif", "spacing": [10.0, 10.0, 50.0]}
    datalist = {
        "description": "synthetic EM-like volume (scripts/synthetic.py), not real data",
        "training": [{**item, "region": [[0, shape[0]], [0, split], [0, shape[2]]]}],
        "validation": [{**item, "region": [[0, shape[0]], [split, shape[1]], [0, shape[2]]]}],
        "testing": [{"image": "image.tif", "spacing": [10.0, 10.0, 50.0]}],
    }
    path = directory / "datalist.json"
    path.write_text(json.dumps(datalist, indent=4))
    return path

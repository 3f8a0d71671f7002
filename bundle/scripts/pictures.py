"""Pictures people would rather look at than read: image, ground truth and prediction side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from scripts.io import atomic_path  # noqa: E402
from scripts.objects import mask_outline  # noqa: E402

# distinct colours for up to 10 classes; class 0 (background) is transparent-looking black
CLASS_COLOURS = [
    "#000000",
    "#4e79a7",
    "#e15759",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#edc948",
    "#76b7b2",
    "#ff9da7",
    "#9c755f",
]


def save_comparison_png(
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    path: str | os.PathLike,
    class_names: Sequence[str],
    z: int | None = None,
    title: str = "",
    outline: np.ndarray | None = None,
) -> Path:
    """Save one z-section as three panels: image, ground-truth labels, prediction, with a class legend.

    Args:
        image: ``(X, Y, Z)`` intensities.
        label: ``(X, Y, Z)`` ground truth, or None (then only image and prediction are drawn).
        pred: ``(X, Y, Z)`` predicted classes.
        path: PNG file written (atomically).
        class_names: names by class index.
        z: section index; default the middle one.
        title: figure title.
        outline: ``(X, Y, Z)`` mask whose boundary is drawn in white on the label panels (e.g. missed objects).
    """
    z = image.shape[-1] // 2 if z is None else z
    cmap = ListedColormap(CLASS_COLOURS[: len(class_names)])
    panels = [("image", image[..., z], "gray")]
    if label is not None:
        panels.append(("ground truth", label[..., z], cmap))
    panels.append(("prediction", pred[..., z], cmap))
    height = 5 * image.shape[1] / image.shape[0]  # panels keep the section's aspect ratio
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), max(height, 2.0) + 1.2))
    for ax, (name, data, colours) in zip(np.atleast_1d(axes), panels):
        # arrays are (x, y): transpose so that the picture looks like the TIFF page (rows = y)
        kwargs = {"vmin": 0, "vmax": len(class_names) - 1, "interpolation": "nearest"} if colours is cmap else {}
        ax.imshow(np.asarray(data).T, cmap=colours, **kwargs)
        if outline is not None and colours is cmap:
            edge = np.ma.masked_equal(mask_outline(outline[..., z : z + 1])[..., 0].T.astype(np.uint8), 0)
            ax.imshow(edge, cmap=ListedColormap(["white"]), interpolation="nearest")
        ax.set_title(f"{name} (z = {z})")
        ax.axis("off")
    handles = [Patch(color=CLASS_COLOURS[i], label=f"{i} {n}") for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 7), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 0.92))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path

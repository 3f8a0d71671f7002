"""Dictionary transforms MONAI lacks for EM volumes: section axis, spacing override, regions, input checks, window
sampling by class frequency."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, MapTransform, RandCropByLabelClassesd, SpatialCrop

from scripts.io import InputError

logger = logging.getLogger(__name__)


def _source(array: torch.Tensor) -> str:
    meta = getattr(array, "meta", {})
    return str(meta.get("filename_or_obj", "<in-memory array>"))


def source_volume_loading(keys: KeysCollection, spacing: Sequence[float] | None = None) -> Compose:
    """The configs' loading chain up to, not including, resampling: the files as the datalist gives them (ITK reader,
    channel first, a section axis, the item's ``region``, its voxel spacing). Scoring and pictures use it, as they
    compare predictions with the files.

    Args:
        keys: keys of the file paths.
        spacing: voxel size (x, y, z) for files that lack it; an item's own ``spacing`` entry wins.
    """
    return Compose(
        [
            LoadImaged(keys, reader="ITKReader", ensure_channel_first=True, image_only=True),
            AddSectionAxisd(keys),
            CropRegiond(keys),
            SetSpacingd(keys, spacing=spacing),
        ]
    )


class AddSectionAxisd(MapTransform):
    """Give a single 2D section (``(C, X, Y)``) a trailing z axis of depth 1, so that every input is a volume.

    The affine grows from 3x3 to 4x4 with ``section_thickness`` as the z spacing, and
    ``meta["section_axis_added"]`` is set so that writers can store the result as a single page again.
    Volumes that already have three spatial axes pass unchanged.

    Args:
        keys: keys of channel-first arrays.
        section_thickness: z spacing given to the new axis.
    """

    def __init__(self, keys: KeysCollection, section_thickness: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.section_thickness = section_thickness

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = d[key]
            if array.ndim == 4:
                continue
            if array.ndim != 3:
                raise ValueError(f"{_source(array)}: '{key}' has shape {tuple(array.shape)}; expected a 2D or 3D image")
            meta = dict(array.meta) if isinstance(array, MetaTensor) else {}
            affine_2d = torch.as_tensor(meta.get("affine", torch.eye(3)), dtype=torch.float64)
            affine = torch.eye(4, dtype=torch.float64)
            affine[:2, :2] = affine_2d[:2, :2]
            affine[:2, 3] = affine_2d[:2, 2]
            affine[2, 2] = self.section_thickness
            meta["section_axis_added"] = True
            meta.pop("affine", None)
            # the reader's record of the file's grid, which MONAI Label restores predictions to, becomes 3D too
            meta["spatial_shape"] = np.asarray([*array.shape[1:], 1])
            meta["original_affine"] = affine.numpy()
            d[key] = MetaTensor(torch.as_tensor(array).unsqueeze(-1), affine=affine, meta=meta)
        return d


class SetSpacingd(MapTransform):
    """Set the voxel spacing of arrays whose files lack it (TIFF) or state it wrongly.

    The spacing is taken from ``data[spacing_key]`` (a per-item datalist entry) if present, else from
    ``spacing``; with neither, the file's own spacing stays. Only the affine's scale changes, not the data.

    Args:
        keys: keys of channel-first ``(C, X, Y, Z)`` MetaTensors.
        spacing: default voxel size (x, y, z), e.g. ``[10, 10, 50]`` nm; None keeps the file's.
        spacing_key: item key holding a per-volume spacing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing: Sequence[float] | None = None,
        spacing_key: str = "spacing",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spacing = spacing
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        spacing = d.get(self.spacing_key, self.spacing)
        if spacing is None:
            return d
        spacing = torch.as_tensor([float(s) for s in spacing], dtype=torch.float64)
        for key in self.key_iterator(d):
            array = d[key]
            if spacing.numel() != array.ndim - 1 or bool((spacing <= 0).any()):
                raise ValueError(
                    f"{_source(array)}: spacing {spacing.tolist()} for '{key}' "
                    f"must hold {array.ndim - 1} positive values"
                )
            affine = array.affine.clone().to(torch.float64)
            direction = affine[:3, :3] / torch.linalg.norm(affine[:3, :3], dim=0, keepdim=True)
            affine[:3, :3] = direction * spacing
            array.affine = affine
            d[key] = array
        return d


class CropRegiond(MapTransform):
    """Crop every key to the item's region ``data[region_key] = [[x0, x1], [y0, y1], [z0, z1]]`` (voxels).

    Lets one labelled volume serve as training data in one region and validation data in another. Items
    without a region pass whole. The affine follows the crop (MONAI's ``SpatialCrop``).

    Args:
        keys: keys of channel-first arrays.
        region_key: item key of the region.
    """

    def __init__(self, keys: KeysCollection, region_key: str = "region", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.region_key = region_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        region = d.get(self.region_key)
        if region is None:
            return d
        for key in self.key_iterator(d):
            array = d[key]
            shape = array.shape[1:]
            if len(region) != len(shape) or any(not (0 <= lo < hi <= size) for (lo, hi), size in zip(region, shape)):
                raise ValueError(
                    f"{_source(array)}: region {region} of '{key}' does not fit in its shape {tuple(shape)} (x, y, z)"
                )
            d[key] = SpatialCrop(roi_start=[lo for lo, _ in region], roi_end=[hi for _, hi in region])(array)
        return d


class ValidateVolumed(MapTransform):
    """Stop with a clear message on inputs that would train or segment nonsense.

    Checks: the image holds no NaN/inf and is not constant; the label (if any) has the image's shape and only
    values in ``0 .. num_classes - 1`` (plus ``ignore_index``). Runs right after loading, so the error names the
    file before any long work starts.

    Args:
        image_key: key of the image.
        label_key: key of the label, or None.
        num_classes: number of classes of the label schema.
        ignore_index: an extra allowed label value that marks unlabelled voxels.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        allow_missing_keys: bool = False,
    ):
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        source = _source(image)
        values = torch.as_tensor(image)
        if not bool(torch.isfinite(values).all()):
            raise InputError(f"{source}: image '{self.image_key}' contains NaN or infinite values: fix or mask them")
        if bool(values.max() == values.min()):
            raise InputError(
                f"{source}: image '{self.image_key}' is constant ({float(values.min())}); "
                "it cannot be normalised to mean 0, std 1: check that this is the right file"
            )
        spread = torch.std(values.float())  # what NormalizeIntensityd computes, in float32
        if not bool(torch.isfinite(spread)) or float(spread) == 0.0:
            raise InputError(
                f"{source}: image '{self.image_key}' has intensities up to {float(values.abs().max()):.3g}, whose "
                "standard deviation overflows float32, so it cannot be normalised: rescale it (e.g. to 0..65535)"
            )
        if self.label_key and self.label_key in d:
            label = d[self.label_key]
            label_source = _source(label)
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise InputError(
                    f"{label_source}: label shape {tuple(label.shape[1:])} differs from image {source} "
                    f"shape {tuple(image.shape[1:])} (x, y, z)"
                )
            if self.num_classes is not None:
                label_values = torch.unique(torch.as_tensor(label))
                allowed = set(range(self.num_classes)) | (
                    {self.ignore_index} if self.ignore_index is not None else set()
                )
                bad = sorted(float(v) for v in label_values.tolist() if v not in allowed)
                if bad:
                    raise InputError(
                        f"{label_source}: label '{self.label_key}' has values {bad[:10]} outside the class list "
                        f"0..{self.num_classes - 1}"
                        + (f" and ignore index {self.ignore_index}" if self.ignore_index is not None else "")
                        + (
                            f": if {bad[-1]:g} marks unlabelled voxels, set --ignore_label {bad[-1]:g}"
                            if self.ignore_index is None
                            else ": check the class list (metadata.json) or map the values (label_mapping)"
                        )
                    )
        return d


class RandCropByClassFrequencyd(RandCropByLabelClassesd):
    """MONAI's class-balanced window sampler with each class's share set by its frequency: ``ratio_c ∝ n_c ** power``.

    ``power`` 0 gives every class present the same share of window centres (MONAI's default, which makes a class of
    a few hundred voxels as common in training as the background and teaches the network to predict it where it is
    absent); 1 gives uniformly random centres; in between, rare classes are drawn much more often than their
    frequency but less than the common ones. Counts come from the precomputed per-class voxel indices
    (``ClassesToIndicesd`` without ``max_samples_per_class``, under ``indices_key``).

    Args:
        keys, label_key, spatial_size, num_classes, num_samples, indices_key, allow_smaller: as
            ``RandCropByLabelClassesd``.
        power: exponent of the class counts.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_size: Sequence[int] | int,
        num_classes: int,
        indices_key: str,
        num_samples: int = 1,
        power: float = 0.5,
        allow_smaller: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys,
            label_key,
            spatial_size,
            num_classes=num_classes,
            num_samples=num_samples,
            indices_key=indices_key,
            allow_smaller=allow_smaller,
            allow_missing_keys=allow_missing_keys,
            warn=False,
        )
        self.power = float(power)
        self.indices_key = indices_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> list[dict]:
        counts = [len(indices) for indices in data[self.indices_key]]
        self.cropper.ratios = [float(n) ** self.power if n > 0 else 0.0 for n in counts]
        return super().__call__(data, lazy=lazy)

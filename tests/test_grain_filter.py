"""Grain filter: the tree-of-shapes implementation against a brute-force reading of its definition, its invariants,
the MONAI transform, and real EM."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from scipy import ndimage as ndi

from conftest import require_data
from scripts.grain_filter import GrainFilterd, grain_filter, grain_filters


def reference_grain_filter(image: np.ndarray, area: int, connectivity: int = 1) -> np.ndarray:
    """The definition, literally, by thresholding and labelling (independent of the module's tree of shapes).

    For every threshold t: the upper set [u >= t] (``connectivity``) and the lower set [u < t] (dual connectivity)
    are labelled, inside a one-pixel frame standing for the exterior at the border-median level. Each component not
    connected to the frame gives a shape: the component with its holes filled (everything not reachable from the
    frame through its complement, in the dual connectivity). Shapes of area >= ``area`` are kept, and a pixel
    belongs to the filtered upper set iff the smallest kept shape around it comes from an upper set (else the
    frame's side decides). The filtered image is the stack of these sets: G(u)(x) = max{t : x in filtered [u >= t]}.
    """
    u = np.asarray(image)
    nd = u.ndim
    dual = nd if connectivity == 1 else 1
    s_up, s_low = ndi.generate_binary_structure(nd, connectivity), ndi.generate_binary_structure(nd, dual)
    border = np.sort(np.concatenate([np.moveaxis(u, a, 0)[[0, -1]].ravel() for a in range(nd)]))
    exterior = border[(border.size - 1) // 2] if connectivity == nd else border[border.size // 2]
    inner = (slice(1, -1),) * nd
    corner = (0,) * nd
    out = np.full(u.shape, u.min(), u.dtype)
    for t in np.unique(u):
        upper = np.pad(u >= t, 1, constant_values=bool(exterior >= t))
        kept = []
        for members, struct, dual_struct, is_upper in ((upper, s_up, s_low, True), (~upper, s_low, s_up, False)):
            labels, count = ndi.label(members, struct)
            for k in range(1, count + 1):
                component = labels == k
                if component[corner]:
                    continue  # connected to the exterior: not a shape
                outside, _ = ndi.label(~component, dual_struct)
                shape = (outside != outside[corner])[inner]
                if shape.sum() >= area:
                    kept.append((shape.sum(), is_upper, shape))
        decided = np.full(u.shape, exterior >= t)
        for _, is_upper, shape in sorted(kept, key=lambda s: -s[0]):  # shapes around a pixel are nested
            decided[shape] = is_upper
        out[decided] = t
    return out


def flat_zones(image: np.ndarray) -> int:
    """Number of connected components of constant grey level (8/26-connected)."""
    structure = ndi.generate_binary_structure(image.ndim, image.ndim)
    return sum(ndi.label(image == v, structure)[1] for v in np.unique(image))


@pytest.mark.parametrize("connectivity", [1, 2])
def test_matches_brute_force_2d(connectivity):
    rng = np.random.default_rng(connectivity)
    for trial in range(6):
        image = rng.integers(0, 3 + trial % 3, (12, 12)).astype(np.uint8)
        for area in (2, 4, 9, 30, 150):
            expected = reference_grain_filter(image, area, connectivity)
            np.testing.assert_array_equal(grain_filter(image, area, connectivity), expected, f"{trial=} {area=}")


@pytest.mark.parametrize("connectivity", [1, 3])
def test_matches_brute_force_3d(connectivity):
    rng = np.random.default_rng(10 + connectivity)
    for trial in range(3):
        image = rng.integers(0, 3, (6, 5, 4)).astype(np.int16)
        for area in (2, 5, 20):
            expected = reference_grain_filter(image, area, connectivity)
            np.testing.assert_array_equal(grain_filter(image, area, connectivity), expected, f"{trial=} {area=}")


def test_brute_force_sees_diagonals_and_holes():
    """The reference itself: 8-connected bright diagonal = one shape of 3 pixels; 4-connected = three of 1."""
    image = np.array([[2, 1, 1], [0, 2, 1], [0, 0, 2]], np.uint8)
    np.testing.assert_array_equal(reference_grain_filter(image, 3, connectivity=2), image)
    assert (reference_grain_filter(image, 3, connectivity=1)[np.eye(3, dtype=bool)] < 2).all()
    np.testing.assert_array_equal(grain_filter(image, 3, connectivity=2), image)


def test_contours_unchanged_specks_removed():
    clean = np.full((64, 64), 100, np.uint16)
    clean[10:40, 12:44] = 200  # a large square
    noisy = clean.copy()
    noisy[24:27, 26:29] = 50  # a dark 3x3 speck inside the square
    noisy[50:52, 50:52] = 250  # a bright 2x2 speck outside
    noisy[5, 55] = 0  # a dark single pixel outside
    for connectivity in (1, 2):
        filtered = grain_filter(noisy, 10, connectivity)
        np.testing.assert_array_equal(filtered, clean)  # specks gone, the square's boundary pixel-exact
        assert filtered.dtype == np.uint16
    kept = clean.copy()
    kept[24:27, 26:29] = 50  # the 3x3 speck has area 9: kept at λ = 9, the smaller specks are not
    np.testing.assert_array_equal(grain_filter(noisy, 9), kept)


def test_thin_ring_kept_because_its_shape_includes_the_hole():
    """Unlike an area opening (component area), the grain filter measures the shape: the ring with its hole."""
    image = np.zeros((40, 40), np.uint8)
    image[5:35, 5:35] = 9
    image[6:34, 6:34] = 0  # ring: 116 pixels around a 784-pixel hole
    ring = image == 9
    assert ring.sum() < 650 <= ring.sum() + 28 * 28
    np.testing.assert_array_equal(grain_filter(image, 650), image)
    np.testing.assert_array_equal(grain_filter(image, 901), np.zeros_like(image))


def test_identity_monotone_absorption_and_idempotence():
    rng = np.random.default_rng(3)
    image = ndi.uniform_filter(rng.normal(size=(48, 48)), 3).astype(np.float32)
    for area in (0, 1):
        np.testing.assert_array_equal(grain_filter(image, area), image)
    zones = [flat_zones(grain_filter(image, a)) for a in (1, 4, 16, 64, 256)]
    assert zones == sorted(zones, reverse=True) and zones[0] > zones[-1]
    small, large = grain_filters(image, [8, 40])
    np.testing.assert_array_equal(grain_filter(small, 40), large)  # G_40 G_8 = G_40
    np.testing.assert_array_equal(grain_filter(large, 40), large)  # idempotent
    assert np.isin(large, image).all()  # no new grey level
    assert np.unique(grain_filter(image, image.size + 1)).size == 1


def test_self_dual_and_contrast_invariant():
    rng = np.random.default_rng(4)
    image = rng.integers(-50, 50, (30, 30)).astype(np.int16)
    volume = rng.integers(0, 4, (6, 6, 6)).astype(np.int16)
    for u, full in ((image, 2), (volume, 3)):
        np.testing.assert_array_equal(grain_filter(-u, 12, 1), -grain_filter(u, 12, full))
        warped = np.exp(u / 20.0)  # an increasing contrast change, to float
        np.testing.assert_array_equal(grain_filter(warped, 12, 1), np.exp(grain_filter(u, 12, 1) / 20.0))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2D or 3D"):
        grain_filter(np.zeros(5), 3)
    with pytest.raises(ValueError, match="connectivity"):
        grain_filter(np.zeros((4, 4, 4)), 3, connectivity=2)
    with pytest.raises(ValueError, match="NaN"):
        grain_filter(np.array([[0.0, np.nan], [1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="mode"):
        GrainFilterd("image", mode="2.5d")


def _meta_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    array = ndi.uniform_filter(rng.normal(size=shape), (3, 3, 1)).astype(np.float32)
    affine = torch.diag(torch.tensor([4.0, 4.0, 30.0, 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(array)[None], affine=affine, meta={"filename_or_obj": "stack.tif"})


def test_transform_appends_channels_per_section():
    image = _meta_image((40, 36, 3))
    out = GrainFilterd("image", areas=(6, 40))({"image": image, "label": 1})
    result = out["image"]
    assert isinstance(result, MetaTensor) and result.shape == (3, 40, 36, 3) and result.dtype == torch.float32
    assert torch.equal(result.affine, image.affine) and result.meta["filename_or_obj"] == "stack.tif"
    assert out["label"] == 1
    assert torch.equal(result[0], image[0])  # the input stays channel 0
    for channel, area in ((1, 6), (2, 40)):
        for z in range(3):  # 2d mode: each section is its own image
            np.testing.assert_array_equal(result[channel, ..., z].numpy(), grain_filter(image[0, ..., z].numpy(), area))
    # a change in one section changes only that section's outputs
    changed = image.clone()
    changed[0, 5:9, 5:9, 1] += 3.0
    result2 = GrainFilterd("image", areas=(6, 40))({"image": changed})["image"]
    differs = (result2 != result).flatten(0, 2).any(0)
    assert differs.tolist() == [False, True, False]


def test_transform_3d_mode_and_plain_tensor():
    image = _meta_image((10, 9, 6), seed=1)
    result = GrainFilterd("image", areas=(20,), mode="3d", connectivity=3)({"image": image})["image"]
    assert result.shape == (2, 10, 9, 6)
    np.testing.assert_array_equal(result[1].numpy(), grain_filter(image[0].numpy(), 20, connectivity=3))
    plain = GrainFilterd("image", areas=(5, 9))({"image": torch.rand(2, 12, 12, 2)})["image"]
    assert type(plain) is torch.Tensor and plain.shape == (6, 12, 12, 2)  # 2 inputs, then 2 per area


def test_real_isbi_sections():
    (path,) = require_data("isbi2012/images.tif")
    stack = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(path))
    assert tuple(stack.shape) == (1, 512, 512, 20)
    sections = stack[..., [0, 13]]  # two sections keep the test short
    result = GrainFilterd("image", areas=(650, 3200))({"image": sections})["image"]
    assert result.shape == (3, 512, 512, 2) and result.dtype == torch.float32
    assert torch.equal(result.affine, sections.affine)
    for z in range(2):
        zones = [flat_zones(result[c, ..., z].numpy()) for c in range(3)]
        assert zones[0] > zones[1] > zones[2], zones  # the filters simplify, the larger λ more
        assert zones[2] < zones[0] / 5, zones
        assert np.isin(result[1:, ..., z].numpy(), result[0, ..., z].numpy()).all()  # no new grey level

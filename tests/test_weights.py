"""Weight map W = floor + W_cb + W_ep against values worked out by hand on tiny label volumes.

Most edge tests use ``diffusion=0.6, decay=1.0`` so that one step has easy numbers: the update kernel
``decay * (delta + diffusion * k)``, with the stencil ``k`` = centre -1, edge neighbours 1/6, corners 0.5/6, is
centre 1 - 0.6 = 0.4, edge neighbours 0.6 / 6 = 0.1, corners 0.6 * 0.5 / 6 = 0.05.
"""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.weights import WeightMapd, class_balance_weights, edge_weights, weight_map

EASY = dict(diffusion=0.6, decay=1.0, max_weight=25.0)


def _slice_label(rows: list[list[int]]) -> torch.Tensor:
    """(1, X, Y, 1) label from a hand-written (X, Y) slice."""
    return torch.tensor(rows, dtype=torch.int64)[None, :, :, None]


def _single_pixel(size: int = 5) -> torch.Tensor:
    """(1, size, size, 1): class 1 at the centre, class 0 elsewhere."""
    lab = torch.zeros(1, size, size, 1, dtype=torch.int64)
    lab[0, size // 2, size // 2, 0] = 1
    return lab


def test_edge_one_step_single_pixel():
    # source 1 -> target 0, after one step: edge neighbours 0.1, corners 0.05; minus threshold 0.02: 0.08 and 0.03;
    # scaled to max 25: edges 25, corners 25 * 0.03 / 0.08 = 9.375.
    # source 0 -> target 1: the centre gets 4 * 0.1 + 4 * 0.05 = 0.6, minus 0.02 = 0.58, the only target voxel -> 25.
    w = edge_weights(_single_pixel(), 2, steps=1, threshold=0.02, **EASY)
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 9.375, 25, 9.375, 0],
            [0, 25, 25, 25, 0],
            [0, 9.375, 25, 9.375, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    assert w.shape == (1, 5, 5, 1) and w.dtype == torch.float32
    torch.testing.assert_close(w[0, :, :, 0], expected, atol=1e-4, rtol=1e-5)


def test_edge_one_step_decay():
    # decay 0.5 multiplies the step: edges 0.05, corners 0.025; minus 0.02: 0.03 and 0.005 -> 25 and 25 / 6.
    w = edge_weights(_single_pixel(), 2, steps=1, threshold=0.02, diffusion=0.6, decay=0.5)
    assert w[0, 1, 2, 0] == pytest.approx(25.0, rel=1e-5)
    assert w[0, 1, 1, 0] == pytest.approx(25.0 / 6.0, rel=1e-4)
    assert w[0, 2, 2, 0] == pytest.approx(25.0, rel=1e-5)  # 0.5 * 0.6 - 0.02 = 0.28 > 0, the only target voxel


def test_edge_two_steps_single_pixel():
    # Source at the centre of a 7x7 slice (no wrap-around within 2 steps). Step 1: centre 1, edges 0.1, corners 0.05.
    # Step 2 (offsets from the source, no reset off the source):
    #   (0, 1): 0.4 * 0.1 [itself] + 0.1 * 1 [source] + 2 * 0.1 * 0.05 [(+-1, 1)] + 2 * 0.05 * 0.1 [(+-1, 0)] = 0.16
    #   (1, 1): 0.4 * 0.05 + 0.1 * 0.1 [(0, 1)] + 0.1 * 0.1 [(1, 0)] + 0.05 * 1 [source] = 0.09
    #   (0, 2): 0.1 * 0.1 [(0, 1)] + 2 * 0.05 * 0.05 [(+-1, 1)] = 0.015
    #   (1, 2): 0.1 * 0.05 [(1, 1)] + 0.05 * 0.1 [(0, 1)] = 0.01
    #   (2, 2): 0.05 * 0.05 [(1, 1)] = 0.0025
    # (mass check: centre before reset 0.45 + 4 * 0.16 + 4 * 0.09 + 4 * 0.015 + 8 * 0.01 + 4 * 0.0025 = 1.6 = 1 + 0.6)
    # threshold 0.01 -> 0.15, 0.08, 0.005, 0, 0; scaled by 25 / 0.15.
    w = edge_weights(_single_pixel(7), 2, steps=2, threshold=0.01, **EASY)[0, :, :, 0]
    s = 25.0 / 0.15
    e, c, f = 0.15 * s, 0.08 * s, 0.005 * s
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, f, 0, 0, 0],
            [0, 0, c, e, c, 0, 0],
            [0, f, e, 25, e, f, 0],  # centre: the only class-1 voxel, target of source 0 -> 25
            [0, 0, c, e, c, 0, 0],
            [0, 0, 0, f, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(w, expected, atol=1e-3, rtol=1e-4)


def test_edge_default_threshold_needs_steps():
    # with the paper's constants one step gives edges 0.98 * 0.2 / 6 = 0.0327 < 0.2: nothing survives the threshold
    assert float(edge_weights(_single_pixel(), 2, steps=1).abs().max()) == 0.0
    w = edge_weights(_single_pixel(9), 2)  # 50 steps: the centre (0 -> 1) and the edge neighbours (1 -> 0) get 25
    assert w.max() == pytest.approx(25.0, rel=1e-5)
    assert w[0, 4, 4, 0] == pytest.approx(25.0, rel=1e-5) and w[0, 4, 5, 0] == pytest.approx(25.0, rel=1e-5)


def test_edge_circular_and_replicate_boundaries():
    lab = torch.zeros(1, 5, 5, 1, dtype=torch.int64)
    lab[0, 0, 0, 0] = 1  # source in a corner
    # circular (the authors' FFT): the neighbours wrap, (4, 0), (0, 4) get 0.1 and (4, 4), (1, 4), (4, 1) get 0.05
    w = edge_weights(lab, 2, steps=1, threshold=0.0, padding_mode="circular", **EASY)[0, :, :, 0]
    for xy in [(1, 0), (0, 1), (4, 0), (0, 4)]:
        assert w[xy] == pytest.approx(25.0, rel=1e-5)
    for xy in [(1, 1), (4, 4), (1, 4), (4, 1)]:
        assert w[xy] == pytest.approx(12.5, rel=1e-5)
    assert w[2, 2] == 0
    # replicate (zero flux): the border copies the source, so (1, 0) gets 0.1 [edge] + 0.05 [mirrored corner] = 0.15,
    # (1, 1) gets 0.05 -> 25 and 25 / 3; nothing wraps
    w = edge_weights(lab, 2, steps=1, threshold=0.0, padding_mode="replicate", **EASY)[0, :, :, 0]
    assert w[1, 0] == pytest.approx(25.0, rel=1e-5) and w[0, 1] == pytest.approx(25.0, rel=1e-5)
    assert w[1, 1] == pytest.approx(25.0 / 3.0, rel=1e-5)
    assert w[4, 0] == 0 and w[4, 4] == 0
    # zeros: heat leaves through the border, (1, 0) gets 0.1 and (1, 1) 0.05
    w = edge_weights(lab, 2, steps=1, threshold=0.0, padding_mode="zeros", **EASY)[0, :, :, 0]
    assert w[1, 0] == pytest.approx(25.0, rel=1e-5) and w[1, 1] == pytest.approx(12.5, rel=1e-5)
    assert w[4, 0] == 0


def test_edge_pairs_scaled_separately_over_whole_volume():
    # slice 0: one class-1 voxel; slice 1: two adjacent class-1 voxels at (2, 2), (2, 3); one step, threshold 0.02.
    # 1 -> 0: in slice 1, (1, 2) gets 0.1 [from (2, 2)] + 0.05 [from (2, 3)] = 0.15 -> 0.13, the volume maximum;
    #         slice 0's edge neighbours have 0.08 -> 25 * 0.08 / 0.13 (the scaling is per volume, not per slice).
    # 0 -> 1: slice 0's centre 0.6 -> 0.58 (the maximum); in slice 1 each source voxel has 3 background edge
    #         neighbours and 4 background corners: 0.3 + 0.2 = 0.5 -> 0.48 -> 25 * 0.48 / 0.58.
    lab = torch.zeros(1, 5, 5, 2, dtype=torch.int64)
    lab[0, 2, 2, 0] = 1
    lab[0, 2, 2, 1] = lab[0, 2, 3, 1] = 1
    w = edge_weights(lab, 2, steps=1, threshold=0.02, **EASY)[0]
    assert w[1, 2, 1] == pytest.approx(25.0, rel=1e-5)
    assert w[1, 2, 0] == pytest.approx(25.0 * 0.08 / 0.13, rel=1e-5)
    assert w[1, 1, 1] == pytest.approx(25.0 * (0.05 - 0.02) / 0.13, rel=1e-4)  # (1, 1): corner of (2, 2) only
    assert w[2, 2, 0] == pytest.approx(25.0, rel=1e-5)
    assert w[2, 2, 1] == pytest.approx(25.0 * 0.48 / 0.58, rel=1e-5)
    assert w[2, 3, 1] == pytest.approx(25.0 * 0.48 / 0.58, rel=1e-5)


def test_edge_three_classes_sum_over_pairs():
    # classes 1 and 2 far apart in class 0: pairs (1, 2) and (2, 1) never meet and add nothing (no NaN); each of
    # (1, 0), (0, 1), (2, 0), (0, 2) is scaled to 25 on its own, and they add where they overlap.
    lab = torch.zeros(1, 9, 9, 1, dtype=torch.int64)
    lab[0, 2, 2, 0] = 1
    lab[0, 2, 4, 0] = 2  # (2, 3) is an edge neighbour of both
    w = edge_weights(lab, 3, steps=1, threshold=0.02, **EASY)[0, :, :, 0]
    assert torch.isfinite(w).all()
    assert w[2, 2] == pytest.approx(25.0, rel=1e-5)  # 0 -> 1 only: not adjacent to class 2, so (2, 1) adds nothing
    assert w[2, 4] == pytest.approx(25.0, rel=1e-5)
    assert w[2, 3] == pytest.approx(50.0, rel=1e-5)  # 25 from 1 -> 0 plus 25 from 2 -> 0
    assert w[1, 3] == pytest.approx(2 * 9.375, rel=1e-5)  # corner of both sources
    assert w[2, 1] == pytest.approx(25.0, rel=1e-5)
    # only the pair (0, 1): class 2's neighbourhood gets nothing
    w01 = edge_weights(lab, 3, steps=1, threshold=0.02, class_pairs=[(0, 1)], **EASY)[0, :, :, 0]
    assert w01[2, 3] == pytest.approx(25.0, rel=1e-5) and w01[2, 5] == 0 and w01[2, 4] == 0
    # classes 1 and 2 side by side, only the pair (1, 2): each voxel is the other's only target
    lab2 = torch.zeros(1, 9, 9, 1, dtype=torch.int64)
    lab2[0, 4, 4, 0] = 1
    lab2[0, 4, 5, 0] = 2
    w2 = edge_weights(lab2, 3, steps=1, threshold=0.02, class_pairs=[(1, 2)], **EASY)[0, :, :, 0]
    # 1 -> 2: the class-2 voxel gets 0.1 -> 0.08, the only target -> 25; same for 2 -> 1; nothing else
    assert w2[4, 4] == pytest.approx(25.0, rel=1e-5) and w2[4, 5] == pytest.approx(25.0, rel=1e-5)
    assert float(w2.sum()) == pytest.approx(50.0, rel=1e-5)


def test_class_balance_known_counts():
    # counts: class 0 -> 10, class 1 -> 5, class 2 -> 1, class 3 absent; W_cb = N_min / N_c = 0.1, 0.2, 1
    lab = torch.zeros(1, 4, 4, 1, dtype=torch.int64)
    lab.view(-1)[10:15] = 1
    lab.view(-1)[15] = 2
    w = class_balance_weights(lab, 4)
    assert w.shape == lab.shape and w.dtype == torch.float32
    flat = w.view(-1)
    torch.testing.assert_close(flat[:10], torch.full((10,), 0.1))
    torch.testing.assert_close(flat[10:15], torch.full((5,), 0.2))
    assert flat[15] == pytest.approx(1.0)
    # ignored voxels are not counted: 5 of the class-0 voxels ignored -> counts 5, 5, 1 -> 0.2, 0.2, 1, and 0
    lab_i = lab.clone()
    lab_i.view(-1)[:5] = 255
    wi = class_balance_weights(lab_i, 4, ignore_index=255).view(-1)
    torch.testing.assert_close(wi[:5], torch.zeros(5))
    torch.testing.assert_close(wi[5:15], torch.full((10,), 0.2))
    assert wi[15] == pytest.approx(1.0)


def test_weight_map_sum_and_floor():
    # single pixel, one step: W = 0.01 + W_cb (class 0: 1 / 24, class 1: 1) + W_ep (test_edge_one_step_single_pixel)
    w = weight_map(_single_pixel(), 2, steps=1, threshold=0.02, **EASY)[0, :, :, 0]
    assert w[2, 2] == pytest.approx(0.01 + 1.0 + 25.0, rel=1e-6)
    assert w[1, 2] == pytest.approx(0.01 + 1 / 24 + 25.0, rel=1e-6)
    assert w[1, 1] == pytest.approx(0.01 + 1 / 24 + 9.375, rel=1e-5)
    assert w[0, 0] == pytest.approx(0.01 + 1 / 24, rel=1e-5)
    # single class: no edges, class weight 1
    uniform = torch.full((1, 4, 3, 2), 3)
    torch.testing.assert_close(weight_map(uniform, 5), torch.full((1, 4, 3, 2), 1.01))
    torch.testing.assert_close(weight_map(uniform, 5, class_balance=False), torch.full((1, 4, 3, 2), 0.01))
    only_floor = weight_map(_single_pixel(), 2, floor=0.5, class_balance=False, edge=False)
    torch.testing.assert_close(only_floor, torch.full((1, 5, 5, 1), 0.5))


def test_ignore_index():
    # class 0 with an ignored block: the ignored voxels get 0 and make no edges; class 0 alone -> 0.01 + 1
    lab = torch.zeros(1, 6, 6, 1, dtype=torch.int64)
    lab[0, :3, :3] = 255
    w = weight_map(lab, 2, ignore_index=255)
    assert float(w[lab == 255].abs().max()) == 0.0
    torch.testing.assert_close(w[lab == 0], torch.full((27,), 1.01))
    # an ignored voxel next to a source: it gets 0 but the heat crosses it; the other neighbours are unchanged
    lab = _single_pixel()
    lab[0, 2, 3, 0] = 255
    w = edge_weights(lab, 2, steps=1, threshold=0.02, ignore_index=255, **EASY)[0, :, :, 0]
    assert w[2, 3] == 0
    assert w[1, 2] == pytest.approx(25.0, rel=1e-5) and w[1, 3] == pytest.approx(9.375, rel=1e-5)
    # 0 -> 1: the centre gets 3 * 0.1 + 4 * 0.05 = 0.5 (the ignored neighbour is not a source), still the only target
    assert w[2, 2] == pytest.approx(25.0, rel=1e-5)
    # an ignore index inside the class range: class 0 plays no part, exactly as an out-of-range ignore value
    lab = torch.tensor([[1, 1, 2, 2], [0, 0, 0, 0], [1, 2, 1, 2]])[None, :, :, None]
    w_ign = weight_map(lab, 3, ignore_index=0, steps=1, threshold=0.02, **EASY)
    w_ref = weight_map(torch.where(lab == 0, 255, lab), 3, ignore_index=255, steps=1, threshold=0.02, **EASY)
    assert float(w_ign[0, 1].abs().max()) == 0.0 and float(w_ign[0, 0].min()) > 1.0
    torch.testing.assert_close(w_ign, w_ref)


def test_slices_are_independent():
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (1, 12, 10, 3))
    kwargs = dict(steps=4, threshold=0.02, **EASY)
    w = weight_map(lab, 3, **kwargs)
    # rolling one slice keeps the class counts and, with periodic boundaries, each pair's maximum: only that
    # slice of W changes, and it is the rolled W of the slice
    rolled = lab.clone()
    rolled[..., 1] = torch.roll(lab[..., 1], shifts=(3, -2), dims=(1, 2))
    w_rolled = weight_map(rolled, 3, **kwargs)
    torch.testing.assert_close(w_rolled[..., 0], w[..., 0])
    torch.testing.assert_close(w_rolled[..., 2], w[..., 2])
    torch.testing.assert_close(w_rolled[..., 1], torch.roll(w[..., 1], shifts=(3, -2), dims=(1, 2)))
    assert not torch.equal(w_rolled[..., 1], w[..., 1])
    # no heat along z: a source in slice 1 gives nothing to the voxels above and below it
    lab = torch.zeros(1, 7, 7, 3, dtype=torch.int64)
    lab[0, 3, 3, 1] = 1
    lab[0, 0, 0, 0] = lab[0, 0, 0, 2] = 1
    w = edge_weights(lab, 2, steps=1, threshold=0.0, **EASY)[0]
    assert w[3, 4, 0] == 0 and w[3, 4, 2] == 0 and w[3, 4, 1] > 0
    # the chunking of z-slices does not change the result
    for chunk in (1, 2):
        torch.testing.assert_close(
            edge_weights(lab, 2, chunk_size=chunk, steps=3, **EASY), edge_weights(lab, 2, steps=3, **EASY)
        )


def test_label_types_and_errors():
    lab = _single_pixel()
    ref = weight_map(lab, 2, steps=2)
    torch.testing.assert_close(weight_map(lab.float() + 1e-4, 2, steps=2), ref)  # float labels are rounded
    torch.testing.assert_close(weight_map(lab.numpy().astype(np.uint8), 2, steps=2), ref)  # numpy
    torch.testing.assert_close(weight_map(lab[..., 0], 2, steps=2), ref[..., 0])  # one section as (1, X, Y)
    with pytest.raises(ValueError, match="label values"):
        weight_map(lab, 1)
    for shape in [(2, 4, 4, 1), (4, 4, 1), (1, 1, 4, 4, 1)]:  # channel-first with one channel only
        with pytest.raises(ValueError, match="shape"):
            weight_map(torch.zeros(shape), 2)
    with pytest.raises(ValueError, match="padding_mode"):
        edge_weights(lab, 2, padding_mode="reflect")
    with pytest.raises(ValueError, match="class pair"):
        edge_weights(lab, 2, class_pairs=[(0, 0)])


def test_weight_mapd_transform():
    lab = torch.zeros(1, 6, 5, 2)
    lab[0, 2:4, 1:3] = 2.0
    lab[0, 0, 0, 1] = 1.0
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    meta_label = MetaTensor(lab, affine=affine, meta={"filename_or_obj": "labels.tif"})
    t = WeightMapd(keys="label", num_classes=3, weight_key="weight", steps=3)
    out = t({"label": meta_label, "image": torch.zeros(1, 6, 5, 2)})
    w = out["weight"]
    assert isinstance(w, MetaTensor) and w.dtype == torch.float32 and w.shape == (1, 6, 5, 2)
    torch.testing.assert_close(w.affine, meta_label.affine)
    assert w.meta["filename_or_obj"] == "labels.tif"
    assert w.meta is not meta_label.meta  # a copy: editing one does not edit the other
    torch.testing.assert_close(w.as_tensor(), weight_map(lab, 3, steps=3))
    assert out["label"] is meta_label and "image" in out
    # numpy in, numpy out; missing keys allowed on request
    out_np = WeightMapd(keys="label", num_classes=3, steps=3)({"label": lab.numpy()})
    assert isinstance(out_np["weight"], np.ndarray) and out_np["weight"].dtype == np.float32
    assert WeightMapd(keys="label", num_classes=3, allow_missing_keys=True)({"image": 1}) == {"image": 1}

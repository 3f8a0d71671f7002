"""Weighted cross-entropy (Guay et al. 2020, eq. (1)) against hand and explicit computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from scripts.losses import WeightedCrossEntropyLoss


def _two_voxels() -> tuple[torch.Tensor, torch.Tensor]:
    """2 voxels (X = 2), 2 classes. Voxel a: logits (0, 0) -> log p = (-ln 2, -ln 2); voxel b: logits (ln 3, 0)
    -> p = (3/4, 1/4). Targets a -> class 1, b -> class 0; weights W_a = 2, W_b = 0.5."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).view(1, 2, 2, 1, 1)  # (B, C, X, Y, Z)
    target = torch.tensor([[1.0, 0.0], [2.0, 0.5]]).view(1, 2, 2, 1, 1)  # channel 0 class, channel 1 weight
    return logits, target


def test_hand_example():
    logits, target = _two_voxels()
    # (1 / N) sum W * CE = (2 * ln 2 + 0.5 * ln(4 / 3)) / 2
    expected = (2 * math.log(2.0) + 0.5 * math.log(4.0 / 3.0)) / 2
    assert WeightedCrossEntropyLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # without the weight channel W = 1: (ln 2 + ln(4 / 3)) / 2
    unweighted = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert WeightedCrossEntropyLoss()(logits, target[:, :1]).item() == pytest.approx(unweighted, rel=1e-6)
    assert WeightedCrossEntropyLoss(reduction="sum")(logits, target).item() == pytest.approx(2 * expected, rel=1e-6)
    voxel = WeightedCrossEntropyLoss(reduction="none")(logits, target)
    torch.testing.assert_close(voxel.view(-1), torch.tensor([2 * math.log(2.0), 0.5 * math.log(4.0 / 3.0)]))


def test_unit_weight_matches_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 3, 2)
    cls = torch.randint(0, 4, (2, 1, 5, 3, 2))
    ref = F.cross_entropy(logits, cls[:, 0])
    loss = WeightedCrossEntropyLoss()
    torch.testing.assert_close(loss(logits, cls), ref)  # integer target, no weight channel
    torch.testing.assert_close(loss(logits, cls.float()), ref)  # float target
    ones = torch.cat([cls.float(), torch.ones_like(cls, dtype=torch.float32)], dim=1)
    torch.testing.assert_close(loss(logits, ones), ref)
    # a weight map W gives mean(W * CE)
    w = torch.rand(2, 1, 5, 3, 2)
    ce = F.cross_entropy(logits, cls[:, 0], reduction="none")
    torch.testing.assert_close(loss(logits, torch.cat([cls.float(), w], 1)), (w[:, 0] * ce).mean())


def test_multi_head_weighting():
    torch.manual_seed(1)
    heads = torch.randn(2, 2, 3, 4, 4, 2)  # (B, H, C, X, Y, Z): head 0 = 3D, head 1 = 2D
    target = torch.cat([torch.randint(0, 3, (2, 1, 4, 4, 2)).float(), torch.rand(2, 1, 4, 4, 2)], dim=1)
    single = WeightedCrossEntropyLoss()
    ce3d, ce2d = single(heads[:, 0], target), single(heads[:, 1], target)
    torch.testing.assert_close(WeightedCrossEntropyLoss()(heads, target), 1.0 * ce3d + 0.33 * ce2d)
    torch.testing.assert_close(WeightedCrossEntropyLoss(head_weights=(0.5, 2.0))(heads, target), 0.5 * ce3d + 2 * ce2d)
    three = torch.randn(2, 3, 3, 4, 4, 2)
    torch.testing.assert_close(
        WeightedCrossEntropyLoss(head_weights=(1.0, 0.0, 0.0))(three, target), single(three[:, 0], target)
    )


def test_ignore_index():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 2, requires_grad=True)
    cls = torch.randint(0, 3, (2, 1, 4, 4, 2))
    cls[:, :, :2] = 255  # half of the voxels ignored
    target = torch.cat([cls.float(), 1.0 + torch.rand(2, 1, 4, 4, 2)], dim=1)
    loss = WeightedCrossEntropyLoss(ignore_index=255)
    value = loss(logits, target)
    # predictions that differ only on ignored voxels give the same loss
    other = logits.detach().clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 4, 2) * 10
    torch.testing.assert_close(loss(other, target), value)
    # N counts the non-ignored voxels only: the same as the mean over the kept voxels
    kept = (cls[:, 0] != 255).unsqueeze(1).expand_as(logits)
    ce = F.cross_entropy(logits, torch.where(cls[:, 0] == 255, -100, cls[:, 0]), reduction="none")
    w = target[:, 1]
    torch.testing.assert_close(value, (w * ce)[cls[:, 0] != 255].mean())
    # W = 1 matches torch's ignore_index; the ignored voxels get no gradient
    torch.testing.assert_close(loss(logits, cls), F.cross_entropy(logits, cls[:, 0], ignore_index=255))
    value.backward()
    assert float(logits.grad[~kept].abs().max()) == 0.0 and float(logits.grad[kept].abs().max()) > 0
    # an in-range ignore index, and a batch with nothing but ignored voxels (0, still differentiable)
    cls0 = torch.zeros(1, 1, 2, 2, 1)
    assert WeightedCrossEntropyLoss(ignore_index=0)(torch.randn(1, 2, 2, 2, 1), cls0).item() == 0.0
    multi = WeightedCrossEntropyLoss(ignore_index=255)(torch.randn(2, 2, 3, 4, 4, 2), target)
    assert torch.isfinite(multi)


def test_autocast_and_meta_tensor():
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 4, 4, 2) * 5
    target = torch.randint(0, 3, (1, 1, 4, 4, 2)).float()
    half = logits.to(torch.bfloat16)
    loss = WeightedCrossEntropyLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(half, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(half.float(), target))  # log-softmax on the float32 values
    out = loss(MetaTensor(logits), MetaTensor(target))
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, loss(logits, target))


def test_shape_errors():
    loss = WeightedCrossEntropyLoss()
    target = torch.zeros(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="heads"):
        loss(torch.randn(1, 3, 2, 4, 4, 2), target)  # 3 heads, 2 head weights
    with pytest.raises(ValueError, match="input must be"):
        loss(torch.randn(2, 4, 4, 2), target)
    with pytest.raises(ValueError, match="target must be"):
        loss(torch.randn(1, 2, 4, 4, 2), torch.zeros(1, 3, 4, 4, 2))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(1, 2, 4, 4, 2), torch.zeros(1, 1, 4, 4, 3))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(2, 2, 4, 4, 2), target)
    with pytest.raises(ValueError, match="class indices"):
        loss(torch.randn(1, 2, 4, 4, 2), torch.full((1, 1, 4, 4, 2), 2.0))
    with pytest.raises(ValueError, match="reduction"):
        WeightedCrossEntropyLoss(reduction="batch")
    # 2D data: spatial_dims=2
    two_d = WeightedCrossEntropyLoss(spatial_dims=2)
    logits, cls = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    torch.testing.assert_close(two_d(logits, cls), F.cross_entropy(logits, cls[:, 0]))


def test_dice_ce_equals_monai_dice_ce_on_one_head():
    from monai.losses import DiceCELoss as MonaiDiceCELoss

    from scripts.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 3)
    labels = torch.randint(0, 4, (2, 1, 6, 5, 3)).float()
    ours = DiceCELoss()(logits, labels)
    reference = MonaiDiceCELoss(to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    assert ours.item() == pytest.approx(reference(logits, labels).item(), rel=1e-5)


def test_dice_ce_heads_weight_map_and_ignore():
    from scripts.losses import DiceCELoss

    torch.manual_seed(0)
    heads = torch.randn(2, 2, 3, 6, 5, 1, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 6, 5, 1)).float()
    weight = torch.rand(2, 1, 6, 5, 1) * 3
    target = torch.cat([labels, weight], dim=1)
    loss = DiceCELoss(head_weights=(1.0, 0.33))
    both = loss(heads, target)
    assert both.item() == pytest.approx(
        loss(heads[:, 0], labels).item() + 0.33 * loss(heads[:, 1], labels).item(), rel=1e-5
    )  # the weight channel is left unused without use_weight_map
    weighted = DiceCELoss(head_weights=(1.0, 0.33), use_weight_map=True)(heads, target)
    assert weighted.item() != pytest.approx(both.item())
    both.backward()
    assert heads.grad is not None and torch.isfinite(heads.grad).all()
    # ignored voxels change nothing, whatever their logits
    ignoring = DiceCELoss(ignore_index=255)
    masked = labels.clone()
    masked[:, :, :3] = 255
    changed = heads.detach()[:, 0].clone()
    changed[:, :, :3] = 100.0
    assert ignoring(heads.detach()[:, 0], masked).item() == pytest.approx(ignoring(changed, masked).item(), rel=1e-6)

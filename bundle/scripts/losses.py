"""Segmentation losses for single- and multi-head outputs: the voxelwise weighted cross-entropy of Guay et al. 2020,
equation (1), and its sum with a soft Dice term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch.nn.modules.loss import _Loss

__all__ = ["WeightedCrossEntropyLoss", "DiceCELoss"]


class WeightedCrossEntropyLoss(_Loss):
    """``sum_h head_weights[h] * (1 / N) * sum_i W_i * CE(head h)_i``: the data terms of equation (1) of Guay et al.
    2020 (``1 * CE(3D head) + 0.33 * CE(2D head)``), with ``W`` the voxel weight map (see ``scripts.weights``).

    The L2 terms of equation (1) are not part of this loss: they are applied through the weight decay of the
    optimiser's parameter groups.

    ``input`` is either logits ``(B, C, *spatial)`` (one head, factor 1) or stacked heads ``(B, H, C, *spatial)`` as
    the network returns in training mode (head 0 = 3D head, head 1 = 2D head). ``target`` is ``(B, 1, *spatial)``
    class indices, or ``(B, 2, *spatial)`` with channel 0 the class indices and channel 1 the weight map ``W``
    (label and weight travel together because the trainer passes only ``(pred, label)`` to the loss); without the
    weight channel ``W = 1``. Voxels whose class is ``ignore_index`` contribute nothing and are not counted in ``N``.
    ``log_softmax`` runs in float32, so the loss is safe under autocast.

    Args:
        head_weights: factor of each head of a stacked input; its length must equal ``H``.
        ignore_index: class index whose voxels are left out.
        spatial_dims: number of spatial dimensions (3 for ``(X, Y, Z)``), to tell single from stacked inputs.
        reduction: ``"mean"`` (divide by ``N``, the paper's loss), ``"sum"``, or ``"none"`` (the head-weighted
            voxelwise map ``(B, 1, *spatial)``, 0 at ignored voxels).
        use_weight_map: use the target's weight channel as ``W``; False gives plain cross-entropy (``W = 1``).
    """

    def __init__(
        self,
        head_weights: Sequence[float] = (1.0, 0.33),
        ignore_index: int | None = None,
        spatial_dims: int = 3,
        reduction: str = "mean",
        use_weight_map: bool = True,
    ) -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}.')
        super().__init__(reduction=reduction)
        if len(head_weights) == 0:
            raise ValueError("head_weights must not be empty.")
        self.head_weights = tuple(float(w) for w in head_weights)
        self.ignore_index = ignore_index
        self.spatial_dims = spatial_dims
        self.use_weight_map = bool(use_weight_map)

    def _heads_and_target(
        self, input: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[float, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check shapes; return logits ``(B, H, C, *spatial)``, head weights, class indices ``(B, 1, *spatial)``
        (ignored voxels set to 0), the valid mask and the voxel weight (``W`` times valid)."""
        # plain tensors: avoids MetaTensor bookkeeping on every op; autograd is kept
        if isinstance(input, MetaTensor):
            input = input.as_tensor()
        if isinstance(target, MetaTensor):
            target = target.as_tensor()
        nd = self.spatial_dims
        if input.ndim == nd + 2:
            logits, head_w = input.unsqueeze(1), (1.0,)
        elif input.ndim == nd + 3:
            logits, head_w = input, self.head_weights
            if logits.shape[1] != len(head_w):
                raise ValueError(
                    f"input has {logits.shape[1]} heads (shape {tuple(input.shape)}) but head_weights has "
                    f"{len(head_w)} entries {head_w}."
                )
        else:
            raise ValueError(
                f"input must be (B, C, *spatial) or (B, H, C, *spatial) with {nd} spatial dims, "
                f"got shape {tuple(input.shape)}."
            )
        b, _, num_classes, *spatial = logits.shape
        if target.ndim != nd + 2 or target.shape[1] not in (1, 2):
            raise ValueError(f"target must be (B, 1 or 2, *spatial), got shape {tuple(target.shape)}.")
        if target.shape[0] != b or list(target.shape[2:]) != spatial:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)} "
                "in batch or spatial size."
            )

        cls = target[:, :1]
        cls = (torch.round(cls) if cls.is_floating_point() else cls).long()  # (B, 1, *spatial)
        if self.ignore_index is not None:
            valid = cls != self.ignore_index
            cls = torch.where(valid, cls, torch.zeros_like(cls))  # any in-range index; masked out below
        else:
            valid = torch.ones_like(cls, dtype=torch.bool)
        if bool(((cls < 0) | (cls >= num_classes)).any()):
            raise ValueError(f"target class indices must be in [0, {num_classes}) or ignore_index={self.ignore_index}.")
        weight = valid.to(torch.float32)
        if target.shape[1] == 2 and self.use_weight_map:
            weight = weight * target[:, 1:2].to(torch.float32)
        return logits, head_w, cls, valid, weight

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, *spatial)`` or ``(B, H, C, *spatial)``.
            target: ``(B, 1, *spatial)`` class indices, or ``(B, 2, *spatial)`` class indices and weight map.

        Raises:
            ValueError: on shape mismatches, a number of heads different from ``len(head_weights)``, or class
                indices outside ``[0, C)`` other than ``ignore_index``.
        """
        return self._cross_entropy(*self._heads_and_target(input, target))

    def _cross_entropy(
        self,
        logits: torch.Tensor,
        head_w: tuple[float, ...],
        cls: torch.Tensor,
        valid: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        """Head-weighted ``W * CE`` reduced as ``self.reduction`` says."""
        b, heads, nd, spatial = logits.shape[0], logits.shape[1], self.spatial_dims, logits.shape[3:]
        # float32 even under autocast: half precision loses the small probabilities
        with torch.autocast(device_type=logits.device.type, enabled=False):
            target = cls.expand(b, heads, *spatial).reshape(b * heads, *spatial)
            ce = F.cross_entropy(logits.float().flatten(0, 1), target, reduction="none").view(b, heads, *spatial)
            hw = torch.tensor(head_w, dtype=torch.float32, device=logits.device).view(1, -1, *([1] * nd))
            voxel = (ce * hw).sum(dim=1, keepdim=True) * weight  # (B, 1, *spatial), head-weighted W * CE
            if self.reduction == "none":
                return voxel
            total = voxel.sum()
            if self.reduction == "sum":
                return total
            # N counts the non-ignored voxels; with none, the (zero) sum keeps the graph connected
            return total / valid.sum().clamp(min=1)


class DiceCELoss(WeightedCrossEntropyLoss):
    """``lambda_ce * cross-entropy + lambda_dice * soft Dice``, each head-weighted as in
    :class:`WeightedCrossEntropyLoss` (same inputs, targets, weight map and ignore rule).

    The cross-entropy is the voxel-weighted one of Guay et al. (``use_weight_map=True``) or plain
    (``use_weight_map=False``). The Dice term is MONAI's batch Dice over all classes (softmax, one-hot target,
    ``1 - 2|P∩T| / (|P| + |T|)`` per class over the whole batch, averaged over classes), with ignored voxels left
    out: it gives a rare organelle class as much say as the background however few voxels it has.

    Args:
        head_weights: factor of each head of a stacked input.
        ignore_index: class index whose voxels are left out of both terms.
        spatial_dims: number of spatial dimensions.
        use_weight_map: weight the cross-entropy by the target's second channel when present.
        lambda_ce: factor of the cross-entropy term.
        lambda_dice: factor of the Dice term.
        smooth: added to the Dice numerator and denominator (a class absent from the batch and not predicted
            scores 0 loss).
    """

    def __init__(
        self,
        head_weights: Sequence[float] = (1.0, 0.33),
        ignore_index: int | None = None,
        spatial_dims: int = 3,
        use_weight_map: bool = False,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__(head_weights, ignore_index, spatial_dims, "mean", use_weight_map)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)
        self.smooth = float(smooth)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, head_w, cls, valid, weight = self._heads_and_target(input, target)
        ce = self._cross_entropy(logits, head_w, cls, valid, weight)
        num_classes = logits.shape[2]
        reduce_dims = [0] + list(range(3, logits.ndim))  # batch and spatial of (B, H, C, *spatial)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probs = torch.softmax(logits.float(), dim=2) * valid.unsqueeze(1)  # (B, H, C, *spatial)
            onehot = F.one_hot(cls[:, 0], num_classes).movedim(-1, 1).to(torch.float32) * valid  # (B, C, *sp)
            onehot = onehot.unsqueeze(1)
            intersection = (probs * onehot).sum(dim=reduce_dims)  # (H, C)
            denominator = probs.sum(dim=reduce_dims) + onehot.sum(dim=reduce_dims)
            dice = 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)
            hw = torch.tensor(head_w, dtype=torch.float32, device=logits.device)
            dice_loss = (dice.mean(dim=1) * hw).sum()
        return self.lambda_ce * ce + self.lambda_dice * dice_loss

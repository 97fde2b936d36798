"""Losses for semantic segmentation (the metrics: metrics.py).

Targets are class-id maps (B, H, W) int64: 0/1 for binary segmentation, 0..K-1 for K
classes, and IGNORE_INDEX (255) for pixels that count nowhere (the padding of a resized
image). Logits are (B, 1, H, W) for binary, (B, K, H, W) for K classes.

    structure_loss      binary: weighted BCE + weighted IoU (the paper's, from PraNet)
    ce_dice_loss        multi-class: cross-entropy + soft Dice
    segmentation_loss   the one that fits the logits, plus the routers' aux loss weighted
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

# The routers' aux-loss weight of the paper's training: 1 for binary, 2 for multi-class.
AUX_WEIGHT_BINARY = 1.0
AUX_WEIGHT_MULTICLASS = 2.0


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 \
            or not logits.is_floating_point():
        got = (f"{logits.dtype} tensor of shape {tuple(logits.shape)}"
               if isinstance(logits, torch.Tensor) else type(logits).__name__)
        raise ValueError(f"logits: expected float logits (B, K, H, W), got {got}")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point \
            or target.shape != logits.shape[:1] + logits.shape[2:]:
        got = (f"{target.dtype} tensor of shape {tuple(target.shape)}"
               if isinstance(target, torch.Tensor) else type(target).__name__)
        raise ValueError(f"target: expected integer class ids of shape "
                         f"{tuple(logits.shape[:1] + logits.shape[2:])} (logits "
                         f"{tuple(logits.shape)}), got {got}")
    if target.device != logits.device:
        raise ValueError(f"target: expected a tensor on {logits.device}, got {target.device}")


def _structure_per_image(logits: torch.Tensor, target: torch.Tensor,
                         weighted_bce: bool = True) -> torch.Tensor:
    """structure_loss of each image, (B,) float32."""
    _check(logits, target)
    if logits.shape[1] != 1:
        raise ValueError(f"logits: structure_loss is for binary segmentation, (B, 1, H, W), "
                         f"got {logits.shape[1]} channels; use ce_dice_loss for several")
    x = logits[:, 0].float()
    valid = (target != IGNORE_INDEX).float()
    t = (target == 1).float()
    weight = (1 + 5 * (F.avg_pool2d(t[:, None], 31, stride=1, padding=15)[:, 0] - t).abs())
    weight = weight * valid
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if weighted_bce:
        bce = (weight * bce).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)
    else:
        bce = (valid * bce).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)
    p = torch.sigmoid(x)
    inter = (p * t * weight).sum((1, 2))
    union = ((p + t) * weight).sum((1, 2))
    iou = 1 - (inter + 1) / (union - inter + 1)
    return bce + iou


def structure_loss(logits: torch.Tensor, target: torch.Tensor,
                   weighted_bce: bool = True) -> torch.Tensor:
    """Binary segmentation: BCE + IoU, both weighted by 1 + 5·|avgpool31(t) - t| (pixels
    near the boundary count up to 6x), a float32 scalar: the mean over images of each
    image's loss.

    logits (B, 1, H, W); target (B, H, W) with 0, 1 and IGNORE_INDEX. The PraNet and
    autogluon code pass ``reduce="none"`` to binary_cross_entropy_with_logits, which
    PyTorch reads as the legacy ``reduce=True``: their BCE term is the plain mean.
    ``weighted_bce=False`` reproduces that; the default weights it as described.
    """
    return _structure_per_image(logits, target, weighted_bce).mean()


def _ce_dice_parts(logits: torch.Tensor, target: torch.Tensor,
                   sum_over: Callable[[torch.Tensor], torch.Tensor]):
    """(Σ cross-entropy over valid pixels, the number of valid pixels, soft Dice loss over
    the classes) of ce_dice_loss, with the Dice statistics passed through sum_over."""
    _check(logits, target)
    k = logits.shape[1]
    if k < 2:
        raise ValueError("logits: ce_dice_loss needs K >= 2 classes (background included); "
                         "use structure_loss for binary segmentation")
    x = logits.float()
    valid = target != IGNORE_INDEX
    bad = (target[valid] >= k) | (target[valid] < 0)
    if bad.any():
        raise ValueError(f"target: class ids must be in [0, {k}) or {IGNORE_INDEX} (ignored), "
                         f"got {target[valid][bad].unique()[:5].tolist()}")
    ce_sum = F.cross_entropy(x, target, ignore_index=IGNORE_INDEX, reduction="sum")
    p = torch.softmax(x, 1) * valid[:, None]
    onehot = F.one_hot(target.clamp(0, k - 1) * valid, k).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    inter = sum_over((p * onehot).sum((0, 2, 3)))
    total = sum_over(p.sum((0, 2, 3)) + onehot.sum((0, 2, 3)))
    dice = 1 - ((2 * inter + 1) / (total + 1)).mean()
    return ce_sum, int(valid.sum().item()), dice


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                 dice_weight: float = 1.0) -> torch.Tensor:
    """Multi-class segmentation: cross-entropy + dice_weight · (1 - soft Dice), a float32
    scalar. Dice is computed per class over the batch's valid pixels (smoothed by 1) and
    averaged over the classes; IGNORE_INDEX pixels count in neither term (0 when no pixel
    is valid)."""
    ce_sum, pixels, dice = _ce_dice_parts(logits, target, _identity)
    if pixels == 0:
        return logits.float().sum() * 0
    return ce_sum / pixels + dice_weight * dice


def _aux_weight(binary: bool, aux_weight: Optional[float]) -> float:
    if aux_weight is None:
        return AUX_WEIGHT_BINARY if binary else AUX_WEIGHT_MULTICLASS
    return aux_weight


def _binary(logits) -> bool:
    return isinstance(logits, torch.Tensor) and logits.dim() == 4 and logits.shape[1] == 1


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      aux: Optional[torch.Tensor] = None,
                      aux_weight: Optional[float] = None) -> torch.Tensor:
    """structure_loss for one channel, ce_dice_loss for several, plus aux_weight · aux
    (the routers' aux loss; the paper's weights by default: 1 binary, 2 multi-class)."""
    binary = _binary(logits)
    loss = structure_loss(logits, target) if binary else ce_dice_loss(logits, target)
    if aux is not None:
        loss = loss + _aux_weight(binary, aux_weight) * aux.float()
    return loss


def step_loss(logits: torch.Tensor, target: torch.Tensor, aux: Optional[torch.Tensor],
              aux_weight: Optional[float], step_images: int, step_pixels: int,
              micro_batches: int = 1,
              sum_over: Callable[[torch.Tensor], torch.Tensor] = _identity) -> torch.Tensor:
    """One micro-batch's part of segmentation_loss of an optimizer step whose batch is
    spread over processes (``sum_over``: a sum over them that the gradient passes through,
    gating.SumOverProcesses; identity in one process) and ``micro_batches`` gradient
    accumulation passes; ``step_images`` and ``step_pixels`` count the step's images and
    valid pixels over all of them.

    The terms that are sums over images or pixels (structure_loss, the cross-entropy) are
    summed here and divided by the step's counts, so the parts add up to the whole batch's
    loss exactly. The terms that are not (the soft Dice, the routers' aux loss, functions of
    statistics of a batch) are those of the micro-batch spread over the processes, divided
    by micro_batches. Every process gets the same value."""
    binary = _binary(logits)
    if binary:
        loss = sum_over(_structure_per_image(logits, target).sum()) / max(step_images, 1)
    else:
        ce_sum, _, dice = _ce_dice_parts(logits, target, sum_over)
        loss = sum_over(ce_sum) / max(step_pixels, 1)
        if step_pixels:
            loss = loss + dice / micro_batches
    if aux is not None:
        loss = loss + _aux_weight(binary, aux_weight) * aux.float() / micro_batches
    return loss

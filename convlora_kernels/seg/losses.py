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


def _ce_dice_sums(logits: torch.Tensor, target: torch.Tensor):
    """(Σ cross-entropy over valid pixels, the number of valid pixels, the soft Dice's
    intersections (K,) and totals (K,)) of ce_dice_loss, this batch's."""
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
    inter = (p * onehot).sum((0, 2, 3))
    total = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return ce_sum, int(valid.sum().item()), inter, total


def _dice_of(inter: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """The soft Dice's statistics of a batch, [intersections, totals] (2K,) float32 without
    autograd (what step_loss's ``dice_whole`` sums over passes and processes); None for
    binary logits, whose loss has none."""
    if _binary(logits):
        return None
    with torch.no_grad():
        _, _, inter, total = _ce_dice_sums(logits, target)
    return torch.cat([inter, total])


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                 dice_weight: float = 1.0) -> torch.Tensor:
    """Multi-class segmentation: cross-entropy + dice_weight · (1 - soft Dice), a float32
    scalar. Dice is computed per class over the batch's valid pixels (smoothed by 1) and
    averaged over the classes; IGNORE_INDEX pixels count in neither term (0 when no pixel
    is valid)."""
    ce_sum, pixels, inter, total = _ce_dice_sums(logits, target)
    if pixels == 0:
        return logits.float().sum() * 0
    return ce_sum / pixels + dice_weight * _dice_of(inter, total)


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
              sum_over: Callable[[torch.Tensor], torch.Tensor] = _identity,
              dice_whole: Optional[torch.Tensor] = None, world: int = 1,
              measured: bool = False) -> torch.Tensor:
    """One pass's part of segmentation_loss of an optimizer step whose batch is spread over
    processes (``sum_over``: a sum over them that the gradient passes through,
    gating.SumOverProcesses; identity in one process) and ``micro_batches`` gradient
    accumulation passes; ``step_images`` and ``step_pixels`` count the step's images and
    valid pixels over all of them. The parts' values add up to the whole batch's loss and
    their gradients to its gradient (after DDP's average over the ``world`` processes).

    The terms that are sums over images or pixels (structure_loss, the cross-entropy) are
    summed here and divided by the step's counts. The soft Dice is a function of sums over
    the batch: with ``dice_whole`` (dice_sums of the whole batch, summed over passes and
    processes, measured before the passes) a pass gets 1/micro_batches of its value and,
    through the pass's own sums, its exact gradient; without it, the Dice of the pass's
    sums over the processes, divided by micro_batches (exact with one pass). The routers'
    aux loss ``aux`` comes formed by the layers (gating.routing_scope): ``measured`` says it
    is already a pass's share of the whole batch's (routing_scope(stats=...)), else it is
    the pass's and is divided by micro_batches."""
    binary = _binary(logits)
    if binary:
        loss = sum_over(_structure_per_image(logits, target).sum()) / max(step_images, 1)
    else:
        ce_sum, _, inter, total = _ce_dice_sums(logits, target)
        loss = sum_over(ce_sum) / max(step_pixels, 1)
        if measured and dice_whole is None:
            raise ValueError("dice_whole: a measured step needs the Dice's statistics of the "
                             "whole batch (dice_sums)")
        if step_pixels and dice_whole is not None:
            loss = loss + _dice_share(dice_whole, inter, total, world, micro_batches)
        elif step_pixels:
            loss = loss + _dice_of(sum_over(inter), sum_over(total)) / micro_batches
    if aux is not None:
        loss = loss + _aux_weight(binary, aux_weight) * aux.float() / (
            1 if measured else micro_batches)
    return loss


def _dice_share(whole: torch.Tensor, inter: torch.Tensor, total: torch.Tensor, world: int,
                passes: int) -> torch.Tensor:
    """A pass's share of the soft Dice of the whole batch (statistics ``whole``): 1/passes
    of its value, and the whole Dice's gradient through this pass's sums (times world, for
    DDP's average over processes)."""
    k = whole.numel() // 2
    w_inter, w_total = whole[:k].detach().requires_grad_(), whole[k:].detach().requires_grad_()
    with torch.enable_grad():
        value = _dice_of(w_inter, w_total)
        d_inter, d_total = torch.autograd.grad(value, (w_inter, w_total))
    slope = ((d_inter * (inter - inter.detach())).sum()
             + (d_total * (total - total.detach())).sum())
    return value.detach() / passes + world * slope

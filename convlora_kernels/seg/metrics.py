"""Metrics for semantic segmentation: SegmentationMetrics (IoU, Dice, MAE for binary;
mIoU, per-class IoU and pixel accuracy for multi-class), over targets as losses.py takes
them (class ids, IGNORE_INDEX for pixels that count nowhere)."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from .data import IGNORE_INDEX
from .losses import _check


class SegmentationMetrics:
    """Running metrics over batches: ``update(logits, target)`` then ``compute()``.

    Binary (num_classes == 1): "iou" and "dice" of the foreground, each the mean over
    images of the per-image score, over the images with foreground in prediction or target
    (an image with none in either has nothing to score and is left out, never counted as
    a perfect 1; NaN when no image has any), and "mae", the mean over images of the mean
    |sigmoid(logit) - target| over valid pixels. Multi-class: "miou", the mean over
    classes present in prediction or target of the dataset-wide IoU, "iou_per_class" (NaN
    for a class absent from both) and "pixel_accuracy". IGNORE_INDEX pixels count nowhere;
    compute() raises ValueError when every pixel seen was ignored (no score means
    anything then).
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        k = max(2, self.num_classes)
        self.confusion = torch.zeros(k, k, dtype=torch.int64)
        self.images = self.scored = self.valid_pixels = 0
        self.iou_sum = self.dice_sum = self.mae_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        _check(logits, target)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits: expected {self.num_classes} channels "
                             f"(num_classes), got {logits.shape[1]}")
        valid = target != IGNORE_INDEX
        self.valid_pixels += int(valid.sum().item())
        if self.num_classes == 1:
            prob = torch.sigmoid(logits[:, 0].float())
            pred = (prob > 0.5).long()
            t = (target == 1)
            for b in range(target.shape[0]):
                v = valid[b]
                pb, tb = pred[b][v].bool(), t[b][v]
                inter = (pb & tb).sum().item()
                union = (pb | tb).sum().item()
                both = pb.sum().item() + tb.sum().item()
                if union:  # foreground in prediction or target: something to score
                    self.iou_sum += inter / union
                    self.dice_sum += 2 * inter / both
                    self.scored += 1
                self.mae_sum += ((prob[b][v] - tb.float()).abs().mean().item()
                                 if v.any() else 0.0)
                self.images += 1
            target = t.long()
        else:
            pred = logits.argmax(1)
        k = self.confusion.shape[0]
        tv, pv = target[valid], pred[valid]
        if ((tv < 0) | (tv >= k)).any():
            raise ValueError(f"target: class ids must be in [0, {k}) or {IGNORE_INDEX}, got "
                             f"{tv[(tv < 0) | (tv >= k)].unique()[:5].tolist()}")
        self.confusion += torch.bincount((tv * k + pv).cpu(), minlength=k * k).view(k, k)
        if self.num_classes > 1:
            self.images += target.shape[0]

    def reduce(self, sum_values: Callable[[List[float]], List[float]]) -> None:
        """Replaces the running sums by ``sum_values`` of them (a sum over processes, each
        having seen its share of a dataset): compute() then gives the whole dataset's
        metrics, IoU from summed intersections and unions, never averaged ratios."""
        k = self.confusion.shape[0]
        values = [float(v) for v in self.confusion.flatten().tolist()] + [
            float(self.images), float(self.scored), float(self.valid_pixels), self.iou_sum,
            self.dice_sum, self.mae_sum]
        values = sum_values(values)
        self.confusion = torch.tensor([round(v) for v in values[:k * k]],
                                      dtype=torch.int64).view(k, k)
        images, scored, pixels, self.iou_sum, self.dice_sum, self.mae_sum = values[k * k:]
        self.images, self.scored, self.valid_pixels = round(images), round(scored), round(pixels)

    def compute(self) -> Dict[str, object]:
        if self.valid_pixels == 0:
            raise ValueError(f"metrics: every pixel of the {self.images} image(s) scored is "
                             f"ignored (IGNORE_INDEX, or the --ignore-index value), so no "
                             f"metric means anything; check the masks and --ignore-index")
        c = self.confusion.double()
        inter = c.diag()
        union = c.sum(0) + c.sum(1) - inter
        if self.num_classes == 1:
            n, k = max(self.images, 1), self.scored
            nan = float("nan")
            return {"iou": self.iou_sum / k if k else nan,
                    "dice": self.dice_sum / k if k else nan, "mae": self.mae_sum / n}
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
        seen = union > 0
        return {"miou": iou[seen].mean().item() if seen.any() else float("nan"),
                "iou_per_class": iou.tolist(),
                "pixel_accuracy": (inter.sum() / c.sum().clamp_min(1)).item()}

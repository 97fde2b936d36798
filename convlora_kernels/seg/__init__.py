"""Prompt-free semantic segmentation with Conv-LoRA SAM: the model, losses and metrics,
datasets, and the fine-tuning steps.

    SamSegmenter          SAM + Conv-LoRA, one decoder token per class, batched, no prompts
    segmentation_loss     structure loss (binary) or cross-entropy + Dice, plus the aux loss
    SegmentationMetrics   IoU / Dice / MAE (binary), mIoU and per-class IoU (multi-class)
"""

from .losses import (IGNORE_INDEX, SegmentationMetrics, ce_dice_loss, segmentation_loss,
                     structure_loss)
from .model import SamSegmenter

__all__ = ["IGNORE_INDEX", "SamSegmenter", "SegmentationMetrics", "ce_dice_loss",
           "segmentation_loss", "structure_loss"]

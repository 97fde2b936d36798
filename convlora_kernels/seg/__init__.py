"""Prompt-free semantic segmentation with Conv-LoRA SAM: the model, losses and metrics,
datasets, and the fine-tuning steps (``python -m convlora_kernels.finetune``).

    SamSegmenter          SAM + Conv-LoRA, one decoder token per class, batched, no prompts
    segmentation_loss     structure loss (binary) or cross-entropy + Dice, plus the aux loss
    SegmentationMetrics   IoU / Dice / MAE (binary), mIoU and per-class IoU (multi-class)
    SegmentationDataset   a folder (images/, masks/) or a CSV of image,mask paths
    check_data            every pair of some datasets read once, every bad one listed
    make_synthetic        textured shapes on textured backgrounds, to try the flow
    FinetuneConfig, train, evaluate, predict, load_segmenter, build_sam
                          the fine-tuning steps (convlora_kernels.seg.trainer)
    step_loss             one pass's part of a step's loss over processes and passes
    checkpoint_blocks     activation checkpointing of the encoder's blocks
                          (convlora_kernels.seg.distributed: torchrun, DDP)
"""

from .data import (IGNORE_INDEX, SegmentationDataset, check_data, collate, csv_pairs,
                   folder_pairs, read_image, read_mask)
from .distributed import checkpoint_blocks
from .losses import ce_dice_loss, segmentation_loss, step_loss, structure_loss
from .metrics import SegmentationMetrics
from .model import SamSegmenter
from .synthetic import make_synthetic, synthetic_split
from .trainer import FinetuneConfig, build_sam, evaluate, load_segmenter, predict, train

__all__ = ["FinetuneConfig", "IGNORE_INDEX", "SamSegmenter", "SegmentationDataset",
           "SegmentationMetrics", "build_sam", "ce_dice_loss", "check_data",
           "checkpoint_blocks", "collate",
           "csv_pairs",
           "evaluate", "folder_pairs", "load_segmenter", "make_synthetic", "predict",
           "read_image", "read_mask", "segmentation_loss", "step_loss", "structure_loss",
           "synthetic_split", "train"]

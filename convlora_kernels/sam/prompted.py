"""SAM's box-prompted forward, batched over images, and its loss (BCE + Dice + the IoU
head's error)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import _unwrap


class PromptedMasks(NamedTuple):
    """box_prompted_masks' outputs, with K the boxes per image (no K axis for (B, 4) boxes)
    and M the masks per prompt (1, or 3 with multimask_output)."""

    logits: torch.Tensor            # (B, [K,] M, H, W): mask logits in the images' frame
    iou_predictions: torch.Tensor   # (B, [K,] M): the decoder's estimate of each mask's IoU
    low_res_logits: torch.Tensor    # (B, [K,] M, 256, 256) at 1024: the decoder's output,
                                    # covering the padded square input


def box_prompted_masks(sam: nn.Module, images: torch.Tensor, boxes: torch.Tensor,
                       multimask_output: bool = False) -> PromptedMasks:
    """segment_anything ``Sam``'s masks for box prompts, with gradients (Sam.forward runs
    under no_grad and takes a list of dicts), batched over images.

    images: (B, 3, H, W) float, RGB in 0-255, resized so that the longest side is the
        encoder's input size (1024 for the released models:
        segment_anything.utils.transforms.ResizeLongestSide(1024)); H, W at most that size.
    boxes: (B, 4) or (B, K, 4), x0, y0, x1, y1 in pixels of those images.

    The image encoder runs on the whole batch (after sam.preprocess: normalise, pad to the
    square input); the prompt encoder and mask decoder run per image, since SAM's decoder
    takes one image's embedding (with any number of boxes). ``logits`` are the low-
    resolution logits upsampled to the padded input and cropped to (H, W), as
    ``sam.postprocess_masks`` does, so they line up with the images' pixels. Transformers'
    SamModel does this in its own forward (``input_boxes``).
    """
    root = _unwrap_for_forward(sam)
    for attr in ("image_encoder", "prompt_encoder", "mask_decoder", "preprocess",
                 "postprocess_masks"):
        if not hasattr(root, attr):
            raise TypeError(f"sam: expected segment_anything's Sam (image_encoder, "
                            f"prompt_encoder, mask_decoder), got {type(root).__name__}; "
                            f"transformers' SamModel takes boxes in its forward (input_boxes)")
    size = root.image_encoder.img_size
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor (B, 3, H, W) of RGB values in "
                         f"0-255, got {_describe(images)}")
    b, _, h, w = images.shape
    if h > size or w > size or max(h, w) < 1:
        raise ValueError(f"images: expected H, W at most the encoder's input size {size} "
                         f"(resize the longest side to {size} with ResizeLongestSide({size})), "
                         f"got {h}x{w}")
    if not isinstance(boxes, torch.Tensor) or boxes.dim() not in (2, 3) \
            or boxes.shape[0] != b or boxes.shape[-1] != 4 or boxes.numel() == 0:
        raise ValueError(f"boxes: expected (B, 4) or (B, K, 4) boxes x0, y0, x1, y1 with "
                         f"B = {b} as in images, got {_describe(boxes)}")
    if images.device != root.device or boxes.device != root.device:
        raise ValueError(f"images, boxes: expected tensors on the model's device "
                         f"{root.device}, got {images.device} and {boxes.device}")
    if not isinstance(multimask_output, bool):
        raise TypeError(f"multimask_output: expected a bool, got {multimask_output!r}")
    per_image = boxes if boxes.dim() == 3 else boxes[:, None]
    embeddings = root.image_encoder(root.preprocess(images))
    pe = root.prompt_encoder.get_dense_pe()
    low, iou = [], []
    for i in range(b):
        sparse, dense = root.prompt_encoder(points=None, boxes=per_image[i].float(), masks=None)
        m, q = root.mask_decoder(image_embeddings=embeddings[i:i + 1], image_pe=pe,
                                 sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output)
        low.append(m)
        iou.append(q)
    low_res, ious = torch.stack(low), torch.stack(iou)  # (B, K, M, 256, 256), (B, K, M)
    k, m = low_res.shape[1:3]
    logits = root.postprocess_masks(low_res.flatten(0, 1), (h, w), (h, w))
    logits = logits.reshape(b, k, m, h, w)
    if boxes.dim() == 2:
        logits, ious, low_res = logits[:, 0], ious[:, 0], low_res[:, 0]
    return PromptedMasks(logits, ious, low_res)


def _unwrap_for_forward(model):
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("sam: a DistributedDataParallel / DataParallel wrapper synchronises "
                        "gradients only through its own forward; call box_prompted_masks on "
                        "the Sam inside a module whose forward you wrap instead")
    return _unwrap(model)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def mask_loss(logits: torch.Tensor, targets: torch.Tensor,
              iou_predictions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy + Dice between mask logits and target masks, plus the mean
    squared error of the IoU predictions against the masks' actual IoU: a float32 scalar.

    logits: (..., M, H, W), e.g. box_prompted_masks(...).logits; targets: (..., H, W) (or
    (..., 1, H, W)) in the same frame, 0/1 (bool, integer or float; floats in [0, 1] act
    as soft targets); iou_predictions: (..., M) or None. With M > 1 masks per prompt, each
    prompt takes its lowest mask loss (SAM's multimask training); the IoU term covers every
    mask. Dice is per mask, smoothed by 1.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 3 or not logits.is_floating_point():
        raise ValueError(f"logits: expected float mask logits (..., M, H, W), got "
                         f"{_describe(logits)}")
    lead, (hh, ww) = logits.shape[:-3], logits.shape[-2:]
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a tensor, got {type(targets).__name__}")
    if targets.dim() == logits.dim() and targets.shape[-3] == 1:
        targets = targets.squeeze(-3)
    if targets.shape != lead + (hh, ww):
        raise ValueError(f"targets: expected shape {tuple(lead + (hh, ww))} to match logits "
                         f"{tuple(logits.shape)} (one target per prompt, in the logits' "
                         f"frame), got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets: expected a tensor on {logits.device}, got {targets.device}")
    x = logits.float()
    t = targets.float().unsqueeze(-3).expand_as(x)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean((-2, -1))
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    loss = (bce + dice).min(-1).values.mean()
    if iou_predictions is not None:
        if not isinstance(iou_predictions, torch.Tensor) \
                or iou_predictions.shape != logits.shape[:-2]:
            raise ValueError(f"iou_predictions: expected shape {tuple(logits.shape[:-2])} to "
                             f"match logits, got {_describe(iou_predictions)}")
        with torch.no_grad():
            pred, true = x > 0, t > 0.5
            inter = (pred & true).sum((-2, -1)).float()
            union = (pred | true).sum((-2, -1)).float()
            actual = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        loss = loss + F.mse_loss(iou_predictions.float(), actual)
    return loss

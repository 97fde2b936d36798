"""SamSegmenter: prompt-free semantic segmentation with SAM and Conv-LoRA.

The image encoder gets Conv-LoRA (convlora_kernels.sam.apply_conv_lora); the prompt
encoder is frozen and gives no prompt (its learned "no mask" embedding and no sparse
tokens); the mask decoder trains. Instead of SAM's mask tokens the decoder reads one
token per class, all initialised from SAM's first mask token and sharing its first
hypernetwork MLP (the authors' design for several masks), so each class has a mask
logit map: a sigmoid for binary segmentation (one class), a softmax over the classes
(background included as class 0) for multi-class. The decoder runs batched over images.

Inputs follow SAM's conventions: RGB in 0-255, resized so the longest side is the
encoder's input size (1024 for the released models), normalised with SAM's pixel mean
and std, padded bottom and right to a square. Logits come back at the input resolution.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sam as sam_api

# SAM's pixel statistics (segment_anything's Sam.pixel_mean / pixel_std; transformers'
# SamProcessor uses the same, in 0-1 units).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class _SegmentAnythingParts:
    """The pieces of segment_anything's Sam the segmenter calls."""

    def __init__(self, sam):
        self.sam = sam
        self.decoder = sam.mask_decoder
        self.image_size = sam.image_encoder.img_size

    def encode(self, x):
        return self.sam.image_encoder(x)

    def image_pe(self):
        return self.sam.prompt_encoder.get_dense_pe()

    def no_mask(self):
        return self.sam.prompt_encoder.no_mask_embed.weight

    def transformer(self, src, pos, tokens):
        """(token outputs (B, T, C), image outputs (B, C, h, w))."""
        b, c, h, w = src.shape
        hs, out = self.decoder.transformer(src, pos, tokens)
        return hs, out.transpose(1, 2).reshape(b, c, h, w)

    def upscale(self, src):
        return self.decoder.output_upscaling(src)


class _TransformersParts:
    """The same pieces of transformers' SamModel."""

    def __init__(self, sam):
        self.sam = sam
        self.decoder = sam.mask_decoder
        self.image_size = sam.config.vision_config.image_size

    def encode(self, x):
        return self.sam.get_image_embeddings(x)

    def image_pe(self):
        return self.sam.get_image_wide_positional_embeddings()

    def no_mask(self):
        return self.sam.prompt_encoder.no_mask_embed.weight

    def transformer(self, src, pos, tokens):
        b, c, h, w = src.shape
        hs, out = self.decoder.transformer(point_embeddings=tokens[:, None],
                                           image_embeddings=src,
                                           image_positional_embeddings=pos,
                                           attention_similarity=None)
        return hs[:, 0], out[:, 0].transpose(1, 2).reshape(b, c, h, w)

    def upscale(self, src):
        d = self.decoder
        x = d.activation(d.upscale_layer_norm(d.upscale_conv1(src)))
        return d.activation(d.upscale_conv2(x))


def _parts(sam):
    sa = sys.modules.get("segment_anything.modeling.sam")
    if sa is not None and isinstance(sam, sa.Sam):
        return _SegmentAnythingParts(sam)
    hf = sys.modules.get("transformers.models.sam.modeling_sam")
    if hf is not None and isinstance(sam, hf.SamModel):
        return _TransformersParts(sam)
    raise TypeError(f"sam: expected segment_anything's Sam (sam_model_registry[...]) or "
                    f"transformers' SamModel, got {type(sam).__name__} (SAM 2 and SAM 3 "
                    f"decoders are not supported here; apply_conv_lora adapts their encoders)")


class SamSegmenter(nn.Module):
    """SAM with Conv-LoRA for semantic segmentation without prompts.

    sam: segment_anything ``Sam`` (vit_b / vit_l / vit_h) or transformers ``SamModel``,
        with its pretrained weights; changed in place (Conv-LoRA in its image encoder).
    num_classes: 1 for binary segmentation (foreground logits), or the number of classes
        including the background (class 0) for multi-class.
    The Conv-LoRA settings (r, num_experts, alpha, scales, gating, interpolation, backend,
    blocks) are apply_conv_lora's; the defaults are the paper's (r = 3, 8 experts,
    alpha = 32).

    forward(images) takes (B, 3, H, W) RGB in 0-255 and returns logits (B, num_classes,
    H, W). Trainable: the adapters, the mask decoder's transformer, upscaling and first
    hypernetwork MLP, and the class tokens; SAM's mask tokens, IoU token and head and the
    other hypernetwork MLPs take no part and are frozen. save_adapter(segmenter, path)
    stores what trains; SamSegmenter.from_adapter rebuilds it.
    """

    def __init__(self, sam: nn.Module, num_classes: int = 1, *, r: int = 3,
                 num_experts: int = 8, alpha: float = 32,
                 scales: Optional[Sequence[int]] = None, gating: str = "token",
                 interpolation: str = "bilinear", backend: str = "auto",
                 blocks: Optional[Sequence[int]] = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer (1 for binary "
                             f"segmentation, else the classes including background), got "
                             f"{num_classes!r}")
        parts = _parts(sam)
        self.sam = sam
        self.num_classes = num_classes
        self.image_size = parts.image_size
        decoder = parts.decoder
        dim = decoder.iou_token.weight.shape[-1]
        weight = decoder.mask_tokens.weight
        self.class_tokens = nn.Embedding(num_classes, dim, device=weight.device,
                                         dtype=weight.dtype)
        with torch.no_grad():
            self.class_tokens.weight.copy_(weight[:1].expand(num_classes, dim))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1),
                             persistent=False)
        sam_api.apply_conv_lora(self, r=r, num_experts=num_experts, alpha=alpha, scales=scales,
                                gating=gating, interpolation=interpolation, backend=backend,
                                blocks=blocks, train_mask_decoder=True,
                                modules_to_save=["class_tokens"])
        # SAM's own output heads take no part: frozen, so DDP without
        # find_unused_parameters sees a gradient for every trainable tensor.
        decoder.mask_tokens.requires_grad_(False)
        decoder.iou_token.requires_grad_(False)
        decoder.iou_prediction_head.requires_grad_(False)
        for mlp in decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    @property
    def _parts(self):
        return _parts(self.sam)

    def preprocess(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(the encoder's input (B, 3, S, S), (h, w) the resized content in it) for images
        (B, 3, H, W) in 0-255: longest side resized to S, normalised, padded."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                   if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"images: expected a float tensor (B, 3, H, W) of RGB values in "
                             f"0-255, got {got}")
        s = self.image_size
        hh, ww = images.shape[-2:]
        scale = s / max(hh, ww)
        h, w = int(hh * scale + 0.5), int(ww * scale + 0.5)
        x = images
        if (h, w) != (hh, ww):
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.pixel_mean.to(x)) / self.pixel_std.to(x)
        return F.pad(x, (0, s - w, 0, s - h)), (h, w)

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (B, num_classes, 4h, 4w) from image embeddings
        (B, C, h, w): the mask decoder with the class tokens and no prompt."""
        parts = self._parts
        decoder = parts.decoder
        b, c, h, w = embeddings.shape
        tokens = torch.cat([decoder.iou_token.weight, self.class_tokens.weight])
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        dense = parts.no_mask().reshape(1, -1, 1, 1)
        src = embeddings + dense
        pos = parts.image_pe().expand(b, -1, -1, -1)
        hs, src = parts.transformer(src, pos, tokens)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1:1 + self.num_classes])
        up = parts.upscale(src)
        uc, uh, uw = up.shape[1:]
        return (hyper @ up.reshape(b, uc, uh * uw)).reshape(b, self.num_classes, uh, uw)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hh, ww = images.shape[-2:] if isinstance(images, torch.Tensor) else (0, 0)
        x, (h, w) = self.preprocess(images)
        low = self.decode(self._parts.encode(x))
        s = self.image_size
        logits = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
        if (h, w) != (s, s):  # a copy, not a view (FSDP2 warns of views it returns)
            logits = logits[..., :h, :w].contiguous()
        if (h, w) != (hh, ww):
            logits = F.interpolate(logits, (hh, ww), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class ids (B, H, W) int64: logit > 0 for binary, the arg max otherwise (in eval
        mode whatever the module's mode, which it keeps)."""
        was = self.training
        self.eval()
        try:
            logits = self(images)
        finally:
            self.train(was)
        if self.num_classes == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(1)

    def aux_loss(self) -> torch.Tensor:
        """The routers' aux loss of the last training forward (convlora_kernels.sam.aux_loss)."""
        return sam_api.aux_loss(self)

    @classmethod
    def from_adapter(cls, sam: nn.Module, path, backend: str = "auto") -> "SamSegmenter":
        """A segmenter around ``sam`` (the same pretrained SAM it was trained from) with
        the adapters, decoder and class tokens of a file written by save_adapter, in eval
        mode."""
        from safetensors import safe_open

        cfg = sam_api.read_adapter_config(path)
        if cfg.get("modules_to_save") != ["class_tokens"]:
            raise ValueError(f"path: {os.fspath(path)} was not saved from a SamSegmenter "
                             f"(its modules_to_save are {cfg.get('modules_to_save')}); load it "
                             f"with convlora_kernels.sam.load_adapter")
        with safe_open(os.fspath(path), framework="pt") as f:
            num_classes = f.get_slice("class_tokens.weight").get_shape()[0]
        seg = cls(sam, num_classes, r=cfg["r"], num_experts=cfg["num_experts"],
                  alpha=cfg["alpha"], scales=cfg["scales"], gating=cfg["gating"],
                  interpolation=cfg["interpolation"], backend=backend, blocks=cfg["blocks"])
        sam_api.load_adapter(seg, path)
        return seg.eval()

"""Small Segment Anything models for the SAM tests, a training forward, and the worker of
the two-process DistributedDataParallel test (run by torch.multiprocessing)."""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                       TwoWayTransformer)

from convlora_kernels import ConvLoRALinear, NoisyTopOneRouter
from convlora_kernels.sam import adapter_state_dict, apply_conv_lora, aux_loss

# A 224×224 image in 8×8 patches is a 28×28 token map: windowed blocks see
# (B·4, 14, 14, C) windows, global blocks (B, 28, 28, C), as SAM's do at 1024 (64×64).
IMG, PATCH, WINDOW, GRID = 224, 8, 14, 28
DIM, OUT = 32, 32
DEPTH, GLOBAL_BLOCKS = 3, (1,)

ADAPTER = ("lora_A", "lora_B", "conv_weight", "conv_bias", "router.w_gate", "router.w_noise")
FUSED = dict(backend="cpu")  # the fused CPU kernels (what "auto" takes on CPU tensors)
FAST = dict(FUSED, num_experts=4)  # half the reference's work, where 8 experts add nothing


def tiny_encoder(seed: int = 0, depth: int = DEPTH, global_attn_indexes=GLOBAL_BLOCKS):
    """ImageEncoderViT with windowed and global blocks and relative positions; the
    positional tensors (zero-initialised by segment_anything) are made random so they act."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=depth,
                          num_heads=2, mlp_ratio=2.0, out_chans=OUT,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=WINDOW, global_attn_indexes=global_attn_indexes)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0, 0.5)
    return enc


def tiny_sam(seed: int = 0, depth: int = DEPTH) -> Sam:
    enc = tiny_encoder(seed, depth)
    torch.manual_seed(seed + 1)
    return Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(embed_dim=OUT, image_embedding_size=(GRID, GRID),
                                     input_image_size=(IMG, IMG), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=OUT, mlp_dim=64, num_heads=2),
            transformer_dim=OUT, iou_head_depth=2, iou_head_hidden_dim=32),
    ).eval()


def segment(sam: Sam, images: torch.Tensor, boxes: torch.Tensor):
    """Masks and IoU predictions with gradients (Sam.forward runs under no_grad).

    images: (B, 3, IMG, IMG); boxes: (B, 4) in pixels. Returns low-resolution masks
    (B, 1, 4·GRID, 4·GRID) and IoU predictions (B, 1).
    """
    embeddings = sam.image_encoder(images)
    masks, ious = [], []
    for b in range(images.shape[0]):  # the decoder takes one image's embedding at a time
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[b:b + 1], masks=None)
        m, iou = sam.mask_decoder(image_embeddings=embeddings[b:b + 1],
                                  image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse,
                                  dense_prompt_embeddings=dense, multimask_output=False)
        masks.append(m)
        ious.append(iou)
    return torch.cat(masks), torch.cat(ious)


class Segmenter(nn.Module):
    """A training module around a Sam, as a fine-tuning script would write it."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam

    def forward(self, images, boxes):
        return segment(self.sam, images, boxes)


def random_batch(seed: int, batch: int = 2):
    """Images, boxes, target masks (B, 1, 4·GRID, 4·GRID) and target IoUs (B, 1)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMG, IMG, generator=g)
    lo = torch.randint(0, IMG // 2, (batch, 2), generator=g).float()
    boxes = torch.cat([lo, lo + IMG // 3], dim=1)
    target = (torch.rand(batch, 1, 4 * GRID, 4 * GRID, generator=g) > 0.5).float()
    return images, boxes, target, torch.rand(batch, 1, generator=g)


def task_loss(masks, ious, target, target_iou):
    # The IoU head is part of the trainable decoder: under DDP without
    # find_unused_parameters every trainable tensor must take part in the loss.
    return F.binary_cross_entropy_with_logits(masks, target) + F.mse_loss(ious, target_iou)


def images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def trainable_names(model: nn.Module) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def layer_param_names(layer_names) -> set:
    """The adapter tensors' names of the Conv-LoRA layers called layer_names."""
    return {f"{n}.{t}" for n in layer_names for t in ADAPTER}


def record_routing(model: nn.Module) -> dict:
    """{layer name: [[qkv input, expert_index] per call]}, filled by every forward from now."""
    seen = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ConvLoRALinear):
            calls = seen.setdefault(name, [])
            layer.register_forward_hook(
                lambda m, args, out, c=calls: c.append([args[0], m.expert_index]))
    return seen


def perturb_decoder(sam: nn.Module, seed: int = 2) -> None:
    """Move every mask decoder weight, as fine-tuning would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Nonzero lora_B, conv bias and router weights, so adapters change the output and the
    routers do not tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in adapter_state_dict(model).items():
            if name.endswith(("lora_B", "conv_bias", "w_gate", "w_noise")):
                t.copy_(torch.randn(t.shape, generator=g) * std)


# --- Two-process DDP worker -----------------------------------------------------------

DDP_STEPS = 3
DDP_GATINGS = ("token", "map")


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """For each gating, fine-tune a tiny Sam for DDP_STEPS steps on this rank's own data
    (gloo, CPU) and save to out_dir/{gating}-rank{rank}.pt the adapter tensors before and
    after, each step's loss and, per router call, how many experts were chosen."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for gating in DDP_GATINGS:
            result = _ddp_fine_tune(rank, gating)
            torch.save(result, os.path.join(out_dir, f"{gating}-rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _ddp_fine_tune(rank: int, gating: str) -> dict:
    sam = tiny_sam(seed=0, depth=2)  # the same start on every rank
    apply_conv_lora(sam, r=2, num_experts=4, gating=gating, backend="reference")
    model = nn.parallel.DistributedDataParallel(Segmenter(sam).train(),
                                                find_unused_parameters=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    initial = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    chosen = []  # per router call: how many experts this rank's units chose
    for m in model.modules():
        if isinstance(m, NoisyTopOneRouter):
            m.register_forward_hook(lambda mod, inp, out: chosen.append(out[0].unique().numel()))
    losses = []
    for step in range(DDP_STEPS):
        images, boxes, target, target_iou = random_batch(seed=100 * rank + step, batch=1)
        masks, ious = model(images, boxes)
        loss = task_loss(masks, ious, target, target_iou) + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise AssertionError(f"rank {rank} step {step}: no gradient for {missing}")
        opt.step()
        losses.append(loss.item())
    return {"final": {k: v.clone() for k, v in adapter_state_dict(model).items()},
            "initial": initial, "losses": losses, "experts_chosen": chosen}

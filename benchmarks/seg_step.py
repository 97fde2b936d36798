"""One training step of prompt-free semantic segmentation, end to end, per adapter.

    python benchmarks/seg_step.py                      # CPU: the tiny SAM, batch 4, fp32
    python benchmarks/seg_step.py --device cuda        # ViT-B, batch 4, 1024x1024, bf16

A step is what convlora_kernels.seg.trainer.train does per batch: SamSegmenter's forward
(the image encoder through its adapted qkv layers, the mask decoder), the loss
(segmentation_loss with the routers' aux loss), backward and Adam's update. Rows, side by
side in one run on the same images:
    conv-lora[<backend>]   Conv-LoRA (r = 3, 8 experts, token routing) on each backend
                           that runs on the device
    plain-lora             LoRA of the same rank on the same qkv layers (B A only)
    frozen-encoder         no adapter: the encoder runs without a graph, the decoder trains
Times: the median of --repeats steps after --warmup, CUDA-synchronised on a GPU; the last
column is each row over the frozen encoder. Prints a markdown table, and with --json the
rows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from convlora_kernels import ConvLoRALinear
from convlora_kernels.ops import available_backends
from convlora_kernels.sam import adapters_disabled
from convlora_kernels.seg import SamSegmenter, segmentation_loss
from convlora_kernels.seg.trainer import build_sam


class LoRALinear(nn.Module):
    """Plain LoRA on a frozen linear layer: x Wᵀ + b + s (x Aᵀ) Bᵀ."""

    def __init__(self, base: ConvLoRALinear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B, self.scaling = base.lora_A, base.lora_B, base.scaling

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + \
            F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def _to_plain_lora(seg: SamSegmenter) -> None:
    for name, m in list(seg.named_modules()):
        if isinstance(m, ConvLoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(seg.get_submodule(parent), attr, LoRALinear(m))


def _segmenter(args, backend: str, device, classes: int) -> SamSegmenter:
    sam = build_sam(args.model_type, seed=0)
    seg = SamSegmenter(sam, classes, r=args.r, num_experts=args.experts, backend=backend)
    with torch.no_grad():  # trained adapters: every term does work
        for m in seg.modules():
            if isinstance(m, ConvLoRALinear):
                m.lora_B.normal_(0, 0.02)
                m.router.w_gate.normal_(0, 0.1)
    return seg.to(device).train()


def _step_fn(seg, images, masks, kind, autocast):
    params = [p for p in seg.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4)

    def step():
        with autocast():
            if kind == "frozen-encoder":
                with adapters_disabled(seg):
                    logits = seg(images)
            else:
                logits = seg(images)
        aux = seg.aux_loss() if kind.startswith("conv-lora") else None
        loss = segmentation_loss(logits.float(), masks, aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def _time(step, device, warmup: int, repeats: int):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-type", default=None,
                    help="default: vit_b on cuda, tiny (128x128, 4 blocks) on cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="default: bf16 autocast on cuda, fp32 on cpu")
    ap.add_argument("--classes", type=int, default=1)
    ap.add_argument("--r", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model_type = args.model_type or ("vit_b" if gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    repeats = args.repeats if args.repeats is not None else (10 if gpu else 5)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16")

    rows = []
    kinds = [(f"conv-lora[{b}]", b) for b in available_backends(device)]
    kinds += [("plain-lora", "reference"), ("frozen-encoder", "reference")]
    images = masks = None
    for kind, backend in kinds:
        seg = _segmenter(args, backend, device, args.classes)
        if images is None:
            g = torch.Generator().manual_seed(0)
            s = seg.image_size
            images = (torch.rand(args.batch, 3, s, s, generator=g) * 255).to(device)
            masks = (torch.rand(args.batch, s, s, generator=g) > 0.7).long().to(device)
        if kind == "plain-lora":
            _to_plain_lora(seg)
        try:
            sec = _time(_step_fn(seg, images, masks, kind, autocast), device, warmup, repeats)
            rows.append({"provider": kind, "ms": sec * 1e3, "img_s": args.batch / sec})
        except Exception as e:  # a backend that fails says so in its row
            rows.append({"provider": kind, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        print(f"{kind}: {rows[-1]}", file=sys.stderr, flush=True)
        del seg
        if gpu:
            torch.cuda.empty_cache()

    frozen = next((r["ms"] for r in rows if r["provider"] == "frozen-encoder" and "ms" in r),
                  math.nan)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"\nOne training step, SAM {args.model_type}, batch {args.batch}, {args.dtype}, "
          f"{args.classes} class(es), r = {args.r}, {args.experts} experts, {name}\n")
    print("| adapter | ms / step | images / s | × frozen encoder |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        if "ms" in r:
            print(f"| {r['provider']} | {r['ms']:.1f} | {r['img_s']:.2f} | "
                  f"{r['ms'] / frozen:.2f} |")
        else:
            print(f"| {r['provider']} | {r['error']} | | |")
    print("\nRESULT: " + ", ".join(f"{r['provider']} {r['ms']:.1f} ms" for r in rows
                                   if "ms" in r))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "device": name,
                                               "rows": rows}, indent=1))
    return 0 if all("ms" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

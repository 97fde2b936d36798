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

    python benchmarks/seg_step.py --memory --model-type vit_b,vit_l,vit_h --batch 1,4

--memory: Conv-LoRA on the default backend only, for each model type and batch, without
and with activation checkpointing of the encoder's blocks (--grad-checkpoint): the peak
memory of a training step (GPU: torch.cuda.max_memory_allocated, reset before the step;
CPU: the process's peak resident set, VmHWM, reset through /proc/self/clear_refs), the
part of it above what was held before the first step (activations, gradients, Adam's
state, the workspace: what checkpointing cuts), and images per second.
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


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux)
        f.write("5")


def _memory_bytes(device, peak: bool) -> int:
    """The peak since _reset_peak (peak) or what is held now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_table(args, device, autocast) -> list:
    """Rows {model, batch, checkpointing, peak_gib, step_gib, img_s} of Conv-LoRA training
    steps. On the CPU each row runs in a process of its own: the allocator keeps what a
    row freed, and the resident set would carry it into the next."""
    import subprocess

    rows = []
    for model_type in args.model_type.split(","):
        for batch in (int(b) for b in str(args.batch).split(",")):
            for checkpointed in (False, True):
                if device.type == "cpu" and args.memory_row is None:
                    cmd = [sys.executable, __file__, "--memory", "--device", "cpu",
                           "--memory-row", f"{model_type}:{batch}:{int(checkpointed)}",
                           "--classes", str(args.classes), "--r", str(args.r),
                           "--experts", str(args.experts), "--dtype", args.dtype,
                           "--repeats", str(args.repeats)]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    line = [x for x in p.stdout.splitlines() if x.startswith("ROW ")]
                    row = json.loads(line[-1][4:]) if line else {
                        "model": model_type, "batch": batch, "checkpointing": checkpointed,
                        "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:100]}
                else:
                    row = memory_row(args, device, autocast, model_type, batch, checkpointed)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


def memory_row(args, device, autocast, model_type: str, batch: int, checkpointed: bool):
    """One row of memory_table, in this process."""
    from convlora_kernels.seg.distributed import checkpoint_blocks

    row = {"model": model_type, "batch": batch, "checkpointing": checkpointed}
    try:
        one = argparse.Namespace(**{**vars(args), "model_type": model_type})
        seg = _segmenter(one, "auto", device, args.classes)
        if checkpointed:
            checkpoint_blocks(seg)
        g = torch.Generator().manual_seed(0)
        s = seg.image_size
        images = (torch.rand(batch, 3, s, s, generator=g) * 255).to(device)
        masks = (torch.rand(batch, s, s, generator=g) > 0.7).long().to(device)
        step = _step_fn(seg, images, masks, "conv-lora", autocast)
        # from before the first step (Adam's state is made there): a CPU allocator keeps
        # what it freed, so later steps' peaks would hide in it
        _reset_peak(device)
        start = _memory_bytes(device, peak=False)
        sec = _time(step, device, 1, args.repeats)
        peak = _memory_bytes(device, peak=True)
        row.update(peak_gib=peak / 2 ** 30, step_gib=(peak - start) / 2 ** 30,
                   img_s=batch / sec)
        del seg, images, masks, step
    except Exception as e:  # out of memory, say: the row says so
        row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-type", default=None,
                    help="default: vit_b on cuda, tiny (128x128, 4 blocks) on cpu")
    ap.add_argument("--batch", default="4", help="images per step (--memory: a list)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="default: bf16 autocast on cuda, fp32 on cpu")
    ap.add_argument("--classes", type=int, default=1)
    ap.add_argument("--r", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--memory", action="store_true",
                    help="peak memory and images/s per model type (comma-separated) and "
                         "batch (comma-separated), without and with --grad-checkpoint")
    ap.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)
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

    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    if args.memory_row is not None:  # one row, in a process of its own (memory_table)
        model_type, batch, checkpointed = args.memory_row.split(":")
        row = memory_row(args, device, autocast, model_type, int(batch), checkpointed == "1")
        print("ROW " + json.dumps(row))
        return 0
    if args.memory:
        rows = memory_table(args, device, autocast)
        what = "max_memory_allocated" if gpu else "the process's peak resident set"
        print(f"\nA Conv-LoRA training step's peak memory ({what}), {args.dtype}, "
              f"{args.classes} class(es), r = {args.r}, {args.experts} experts, {name}\n")
        print("| SAM | batch | checkpointing | peak GiB | of it, the step's | images / s |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for r in rows:
            ck = "yes" if r["checkpointing"] else "no"
            if "error" in r:
                print(f"| {r['model']} | {r['batch']} | {ck} | {r['error']} | | |")
            else:
                print(f"| {r['model']} | {r['batch']} | {ck} | {r['peak_gib']:.2f} | "
                      f"{r['step_gib']:.2f} | {r['img_s']:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": vars(args), "device": name,
                                                   "rows": rows}, indent=1))
        return 0 if all("error" not in r for r in rows) else 1
    args.batch = int(args.batch)

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

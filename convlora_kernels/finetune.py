"""Fine-tune SAM with Conv-LoRA for semantic segmentation, from the command line.

    python -m convlora_kernels.finetune synthetic --out data --num-classes 3
    python -m convlora_kernels.finetune train --train data/train --val data/val \\
        --num-classes 3 --out run --checkpoint sam_vit_b_01ec64.pth
    python -m convlora_kernels.finetune eval --weights run/best.safetensors --data data/val
    python -m convlora_kernels.finetune predict --weights run/best.safetensors \\
        --images data/val/images --out masks

Data: a folder with images/ and masks/ (matching names; masks are PNGs of class ids,
0/255 accepted for binary; with more classes 255 marks pixels to ignore) or a CSV file
with image,mask columns. ``--num-classes 1`` is
binary segmentation; otherwise count the background as class 0. The same steps are
Python functions in convlora_kernels.seg.trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .seg.trainer import MODEL_TYPES, FinetuneConfig


class _Defaults(argparse.HelpFormatter):
    """Help that shows a value default ("(default: 4)"), not None or a flag's bool."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, True, False, argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _ignore_index(text: str):
    """--ignore-index: "auto", "none" or a mask value."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a mask value (an integer), "
                                         f"got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convlora_kernels.finetune",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def ignore_arg(q):
        q.add_argument("--ignore-index", type=_ignore_index, default="auto",
                       help="the mask value of pixels to ignore: auto (none for binary masks, "
                            "255 with two classes or more), none, or a value that is no "
                            "class id (a dataset's 'unlabelled' value, e.g. 254)")

    def model_args(q, weights=False):
        q.add_argument("--model-type", choices=MODEL_TYPES, default=None if weights else "vit_b",
                       help="SAM's image encoder; 'tiny' is a small random SAM for trying "
                            "the flow on a CPU" + (" (default: the one --weights records)"
                                                   if weights else ""))
        q.add_argument("--checkpoint", default=None,
                       help="SAM's official weights (sam_vit_b_01ec64.pth, ...)"
                            + (" (default: the file --weights records, where training read "
                               "it; a given file must have its size and SHA-256)" if weights else
                               "; without it the model starts from random weights"))
        q.add_argument("--backend", default="auto",
                       help="Conv-LoRA kernels: auto, cuda, triton, cpu, reference")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        q.add_argument("--no-bf16", dest="bf16", action="store_false",
                       help="float32 on GPU too (bf16 autocast is the default there)")
        q.add_argument("--no-progress", dest="progress", action="store_false")

    t = sub.add_parser("train", help="fine-tune; writes finetune.json, history.json, "
                                     "curve.png, best/last.safetensors and last.pt into --out",
                       formatter_class=_Defaults)
    t.add_argument("--train", required=True, help="training data: a folder or a CSV file")
    t.add_argument("--val", default=None, help="validation data (a folder or a CSV file)")
    t.add_argument("--num-classes", type=int, required=True,
                   help="1 for binary; else the classes including background")
    t.add_argument("--out", required=True, help="the run's folder")
    model_args(t)
    d = FinetuneConfig("", 1, "")
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step, all processes together under torchrun (each "
                        "takes batch-size / processes)")
    t.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam's")
    t.add_argument("--r", type=int, default=d.r, help="Conv-LoRA rank")
    t.add_argument("--experts", type=int, default=d.num_experts, help="Conv-LoRA experts")
    t.add_argument("--alpha", type=float, default=d.alpha, help="LoRA scaling alpha / r")
    t.add_argument("--gating", choices=("token", "map"), default=d.gating,
                   help="one expert per token, or per feature map (the authors')")
    t.add_argument("--interpolation", choices=("bilinear", "bicubic"), default=d.interpolation,
                   help="the experts' resampling (bicubic: the authors')")
    t.add_argument("--aux-weight", type=float, default=None,
                   help="weight of the routers' aux loss (default: 1 binary, 2 multi-class)")
    t.add_argument("--val-every", type=int, default=d.val_every,
                   help="validate and write checkpoints every N steps")
    ignore_arg(t)
    t.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    t.add_argument("--skip-data-check", dest="check_data", action="store_false",
                   help="start without first reading every image and mask (the check "
                        "lists every bad file before the first step)")
    t.add_argument("--seed", type=int, default=d.seed,
                   help="data order, augmentation and, without --checkpoint, SAM's weights")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="make each step's batch in N passes, gradients accumulated (less "
                        "memory; the same step: a forward without autograd first measures "
                        "the batch's Dice and routing statistics)")
    t.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing per encoder block: recompute each block's "
                        "forward in backward instead of keeping its activations (less "
                        "memory, about a third more compute; the same gradients)")
    t.add_argument("--shard", action="store_true",
                   help="under torchrun: shard every weight over the processes (FSDP2, per "
                        "encoder block) instead of a copy per GPU, for encoders that do not "
                        "fit beside their activations; the files are those of an unsharded "
                        "run")
    t.add_argument("--timeout", type=float, default=d.timeout,
                   help="under torchrun: seconds a process waits for the others before "
                        "it fails")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run over the one in --out (refused without it)")

    e = sub.add_parser("eval", help="metrics of a trained model on a dataset",
                       formatter_class=_Defaults)
    e.add_argument("--weights", required=True, help="a run's best.safetensors or last.safetensors")
    e.add_argument("--data", required=True, help="a folder or a CSV file")
    e.add_argument("--batch-size", type=int, default=4, help="images per forward")
    ignore_arg(e)
    model_args(e, weights=True)

    r = sub.add_parser("predict", help="mask PNGs and overlays for images",
                       formatter_class=_Defaults)
    r.add_argument("--weights", required=True)
    r.add_argument("--images", required=True, help="a folder of images or one image")
    r.add_argument("--out", required=True,
                   help="a folder of its own: never the images' folder or a dataset folder")
    r.add_argument("--overwrite", action="store_true",
                   help="replace masks and overlays already in --out (refused without it)")
    model_args(r, weights=True)

    s = sub.add_parser("synthetic", help="write a synthetic dataset (textured shapes)",
                       formatter_class=_Defaults)
    s.add_argument("--out", required=True, help="writes OUT/train and OUT/val")
    s.add_argument("--num-classes", type=int, default=3,
                   help="1 for binary; else the classes including background")
    s.add_argument("--train", type=int, default=64, help="training images")
    s.add_argument("--val", type=int, default=16, help="validation images")
    s.add_argument("--size", type=int, default=256, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="the same seed, the same images")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError, FloatingPointError) as e:
        # bad data or settings, or a loss gone non-finite: said plainly, on a line of its own
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 \
            else "0"
        where = "" if rank == "0" else f"[rank {rank}] "
        print(f"{where}error: {plain_message(e)}", file=sys.stderr)
        return 2


def plain_message(e: BaseException) -> str:
    """The message of ``e``; for an error a DataLoader worker raised (which arrives as
    "Caught ValueError in DataLoader worker process 0" and the worker's traceback), the
    worker's own message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    kind = type(e).__name__ + ": "
    return last[len(kind):] if last.startswith(kind) else last


def _run(args) -> int:
    from .seg import trainer as steps

    if args.command == "train":
        cfg = FinetuneConfig(
            train_data=args.train, val_data=args.val, num_classes=args.num_classes,
            out=args.out, model_type=args.model_type, checkpoint=args.checkpoint,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, r=args.r, num_experts=args.experts,
            alpha=args.alpha, gating=args.gating, interpolation=args.interpolation,
            backend=args.backend, aux_weight=args.aux_weight, val_every=args.val_every,
            device=args.device, bf16=args.bf16, workers=args.workers, seed=args.seed,
            check_data=args.check_data, ignore_index=args.ignore_index,
            grad_accum=args.grad_accum, grad_checkpoint=args.grad_checkpoint,
            timeout=args.timeout, shard=args.shard)
        result = steps.train(cfg, resume=args.resume, progress=args.progress,
                             overwrite=args.overwrite)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps({"step": result["step"], "best": result["best"]}))
    elif args.command == "eval":
        seg = steps.load_segmenter(args.weights, args.model_type, args.checkpoint,
                                   backend=args.backend, device=args.device)
        metrics = steps.evaluate(seg, args.data, batch_size=args.batch_size, bf16=args.bf16,
                                 progress=args.progress, ignore_index=args.ignore_index)
        print(json.dumps(metrics))
    elif args.command == "predict":
        steps.prediction_targets(args.images, args.out, args.overwrite)  # before the model
        seg = steps.load_segmenter(args.weights, args.model_type, args.checkpoint,
                                   backend=args.backend, device=args.device)
        files = steps.predict(seg, args.images, args.out, bf16=args.bf16,
                              progress=args.progress, overwrite=args.overwrite)
        print(f"wrote {len(files)} masks and overlays to {args.out}")
    else:
        from .seg.synthetic import synthetic_split

        synthetic_split(args.out, args.train, args.val, num_classes=args.num_classes,
                        size=args.size, seed=args.seed)
        print(f"wrote {args.train} training and {args.val} validation images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune, evaluate and run a SamSegmenter: the steps behind
``python -m convlora_kernels.finetune`` as Python functions.

    build_sam(model_type, checkpoint)   segment_anything's SAM, from an official .pth or not
    FinetuneConfig                      every setting of a run (the paper's defaults)
    train(config)                       train with periodic validation; best and last
                                        checkpoints; resume
    load_segmenter(weights)             a trained segmenter from its .safetensors file, on
                                        the SAM the file records (type, checkpoint hash or
                                        seed)
    evaluate(segmenter, data)           the metrics on a dataset
    predict(segmenter, images, out)     mask PNGs and overlays

A run's folder holds ``finetune.json`` (the settings), ``history.json`` (training loss and
validation metrics), ``curve.png`` (the two against steps, when matplotlib is installed),
``best.safetensors`` and ``last.safetensors`` (adapters, decoder,
class tokens and Conv-LoRA settings, as save_adapter writes them) and ``last.pt`` (the
same plus the optimizer state and step, to resume). Every file is written beside its
target and renamed into place, so none is ever half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import sam as sam_api
from .._files import write_atomically
from ..gating import PerSampleNoise, routing_scope
from .data import IGNORE_INDEX, SegmentationDataset, _seed_of, check_data, collate, read_image
from .distributed import Processes, checkpoint_blocks, shard_blocks
from .losses import dice_sums, step_loss
from .metrics import SegmentationMetrics
from .model import SamSegmenter

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
CHECKPOINT_FORMAT = "convlora-kernels-finetune"


# --- Models ---------------------------------------------------------------------------

def _tiny_sam() -> nn.Module:
    """A small, randomly initialised SAM (128x128 input, 16x16 token grid in 8x8 windows,
    4 blocks of width 64): for trying the whole flow on a CPU. Not a pretrained model."""
    from functools import partial

    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    size, patch, dim = 128, 8, 64
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=size, patch_size=patch, embed_dim=dim, depth=4, num_heads=2, mlp_ratio=4,
            out_chans=dim, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True,
            use_rel_pos=True, window_size=8, global_attn_indexes=(1, 3)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch,) * 2,
                                     input_image_size=(size, size), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=256, num_heads=4),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
    ).eval()


def build_sam(model_type: str = "vit_b", checkpoint: Optional[str] = None,
              seed: int = 0) -> nn.Module:
    """segment_anything's SAM of ``model_type`` with the weights of ``checkpoint`` (an
    official sam_vit_*.pth), or initialised at random from ``seed`` without one (the same
    seed gives the same weights, so a run's adapters load onto the model they trained
    on). "tiny" is a small random SAM for trying the flow on a CPU."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == "tiny" and checkpoint is not None:
        raise ValueError("checkpoint: the 'tiny' model has no pretrained weights; pass "
                         "--model-type vit_b / vit_l / vit_h with an official checkpoint")
    state = None
    if checkpoint is not None:  # read before building the model: a bad path fails fast
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint: {path} does not exist (the official SAM "
                                    f"weights, e.g. sam_vit_b_01ec64.pth)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint: {path} is not a PyTorch checkpoint of SAM's "
                             f"weights ({type(e).__name__}: {e})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_type == "tiny":
            return _tiny_sam()
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model_type](checkpoint=None)
    if state is not None:
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint: {path} holds a {type(state).__name__}, not a "
                             f"state dict of SAM's weights")
        try:
            sam.load_state_dict(state)
        except RuntimeError as e:  # missing, unexpected or differently shaped tensors
            detail = " ".join(str(e).split())
            raise ValueError(f"checkpoint: {path} does not fit SAM {model_type} "
                             f"({detail[:300]}); is it another model type?") from None
    return sam.eval()


@dataclass
class FinetuneConfig:
    """The settings of a fine-tuning run; the defaults are the paper's (Adam, lr 1e-4,
    weight decay 1e-4, batch 4, r = 3, 8 experts, alpha 32)."""

    train_data: str
    num_classes: int
    out: str
    val_data: Optional[str] = None
    model_type: str = "vit_b"
    checkpoint: Optional[str] = None
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    r: int = 3
    num_experts: int = 8
    alpha: float = 32
    scales: Optional[List[int]] = None
    gating: str = "token"
    interpolation: str = "bilinear"
    backend: str = "auto"
    aux_weight: Optional[float] = None
    val_every: int = 100
    device: str = "auto"
    bf16: bool = True
    hflip: float = 0.5
    scale_jitter: Tuple[float, float] = (0.75, 1.25)
    workers: int = 0
    seed: int = 0
    check_data: bool = True
    # optimizer steps' batch in this many passes (micro-batches), gradients accumulated
    grad_accum: int = 1
    # activation checkpointing of the encoder's blocks (distributed.checkpoint_blocks)
    grad_checkpoint: bool = False
    # seconds a process waits for the others (torchrun) before it fails
    timeout: float = 1800.0
    # under torchrun: FSDP2 (fully_shard per encoder block) instead of DDP
    shard: bool = False
    # the mask value of pixels to ignore: "auto" (none for binary, 255 with two classes or
    # more), None, or a value that is no class id (read_mask)
    ignore_index: Union[str, int, None] = "auto"

    def check(self) -> None:
        for name in ("num_classes", "steps", "batch_size", "val_every", "r", "num_experts",
                     "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got "
                             f"{self.model_type!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {self.workers!r}")
        if not isinstance(self.timeout, (int, float)) or not math.isfinite(self.timeout) \
                or self.timeout <= 0:
            raise ValueError(f"timeout: expected a number of seconds > 0, got {self.timeout!r}")

    def per_process_batch(self, world: int) -> int:
        """The images each of ``world`` processes takes in each of the grad_accum passes of
        a step: batch_size / (world · grad_accum), which must be a whole number."""
        parts = world * self.grad_accum
        if self.batch_size % parts:
            how = (f"{world} processes x {self.grad_accum} accumulation passes"
                   if world > 1 and self.grad_accum > 1 else
                   f"{world} processes" if world > 1 else
                   f"{self.grad_accum} accumulation passes")
            raise ValueError(f"batch_size: {self.batch_size} images per step do not split over "
                             f"{how}; --batch-size is the whole step's batch (all processes, "
                             f"all passes): pass a multiple of {parts}")
        return self.batch_size // parts


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                         f"{device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but PyTorch sees no CUDA device")
    return dev


def _segmenter(cfg: FinetuneConfig, device: torch.device) -> SamSegmenter:
    sam = build_sam(cfg.model_type, cfg.checkpoint, seed=cfg.seed)
    seg = SamSegmenter(sam, cfg.num_classes, r=cfg.r, num_experts=cfg.num_experts,
                       alpha=cfg.alpha, scales=cfg.scales, gating=cfg.gating,
                       interpolation=cfg.interpolation, backend=cfg.backend)
    return seg.to(device)


# --- Writing files --------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomically(path, write)


# --- Train ----------------------------------------------------------------------------

def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=bf16 and device.type == "cuda")


def _score_name(num_classes: int) -> str:
    return "iou" if num_classes == 1 else "miou"


def _score(metrics: Dict[str, object], num_classes: int) -> float:
    return float(metrics[_score_name(num_classes)])


RUN_FILES = ("finetune.json", "history.json", "last.pt", "best.safetensors",
             "last.safetensors", "curve.png")


def _overlap(a: Path, b: Path) -> bool:
    """True when folder a is folder b, holds it or lies inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _data_folders(data) -> List[Path]:
    """The folders a data argument reads: a dataset folder itself (its images/ and masks/
    inside), or the folder of a folder named images/ (its masks/ beside it); nothing for a
    CSV file, whose rows may point anywhere."""
    path = Path(data)
    if not path.is_dir():
        return []
    return [path.parent] if path.name == "images" else [path]


def check_out(out, inputs, what: str) -> None:
    """Refuses an output folder that is, holds or lies inside a folder the command reads
    (``inputs``: data arguments), so no output can replace an input."""
    for data in inputs:
        for folder in _data_folders(data):
            if _overlap(Path(out), folder):
                raise ValueError(f"out: {out} is, holds or lies inside the data folder "
                                 f"{folder} that {what} reads; write to a folder of its own")


def check_run_folder(out, resume: bool, overwrite: bool) -> None:
    """Refuses an output folder that holds a run unless it is resumed or overwritten."""
    held = [f for f in RUN_FILES if (Path(out) / f).exists()]
    if held and not resume and not overwrite:
        raise ValueError(f"out: {out} holds a run ({', '.join(held)}); pass --resume to "
                         f"continue it or --overwrite to start a new one over it")


def train(cfg: FinetuneConfig, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, overwrite: bool = False) -> Dict[str, object]:
    """Fine-tune a SamSegmenter as ``cfg`` says; returns {"step", "best", "history"}.

    Validation (on cfg.val_data, every cfg.val_every steps and at the end) keeps
    best.safetensors at the best IoU (binary) or mIoU; without val_data the last step is
    the best. With ``resume``, training continues from out/last.pt (same settings
    required; steps may grow). An out holding a run is refused unless ``resume`` or
    ``overwrite``, and so is an out that is, holds or lies inside a data folder.

    Under torchrun (WORLD_SIZE > 1) each process trains on its share of every batch
    (cfg.batch_size is the whole step's), the model wrapped in DistributedDataParallel, or
    sharded with FSDP2 (cfg.shard); validation is shared out and its metrics summed; only
    rank 0 logs and writes files. The result is that of one process on the same batches,
    to float rounding. cfg.grad_accum splits each step's batch into passes whose gradients
    add up to the batch's (its statistics measured first, _Steps.measure);
    cfg.grad_checkpoint recomputes the encoder blocks' activations in backward.
    """
    cfg.check()
    check_out(cfg.out, [cfg.train_data] + ([cfg.val_data] if cfg.val_data else []),
              "training")
    check_run_folder(cfg.out, resume, overwrite)
    device = resolve_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cfg.per_process_batch(world)  # before any wait for the other processes
    if cfg.shard and world < 2:
        raise ValueError("shard: --shard splits the weights over the processes of a run; "
                         "start it under torchrun (torchrun --nproc_per_node=N -m "
                         "convlora_kernels.finetune train ... --shard)")
    import torch.distributed as dist

    owned = not (dist.is_available() and dist.is_initialized())
    procs = Processes.from_env(device, cfg.timeout)
    try:
        return _train(cfg, procs, resume, progress, log if procs.main else _quiet)
    finally:
        if owned:
            procs.close()


def _quiet(_text: str) -> None:
    pass


def _train(cfg: FinetuneConfig, procs: Processes, resume: bool, progress: bool,
           log: Callable[[str], None]) -> Dict[str, object]:
    device = procs.device
    per = cfg.per_process_batch(procs.world)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    seg = _segmenter(cfg, device)
    if cfg.grad_checkpoint and checkpoint_blocks(seg) == 0:
        raise ValueError(f"grad_checkpoint: found no encoder blocks with Conv-LoRA layers "
                         f"in SAM {cfg.model_type}")
    train_ds = SegmentationDataset(cfg.train_data, cfg.num_classes, size=seg.image_size,
                                   train=True, hflip=cfg.hflip, scale=tuple(cfg.scale_jitter),
                                   seed=cfg.seed, ignore_index=cfg.ignore_index)
    val_ds = (SegmentationDataset(cfg.val_data, cfg.num_classes, size=seg.image_size,
                                  ignore_index=cfg.ignore_index)
              if cfg.val_data else None)
    split = procs.world * cfg.grad_accum > 1
    if split and len(train_ds) < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} images per step, but the training "
                         f"data has {len(train_ds)}; a step split over processes or passes "
                         f"needs a whole batch")
    if cfg.check_data and procs.main:  # every pair read once: bad data fails before step 1
        check_data([train_ds] + ([val_ds] if val_ds is not None else []), progress=progress)
    run = RunState()
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    rng = optimizer_state = None
    if resume:  # the adapters into the whole model, before it is sharded
        run, rng, optimizer_state = _resume(out / "last.pt", seg, settings)
        log(f"resumed from {out / 'last.pt'} at step {run.step}" + (
            "" if rng is not None else " (a checkpoint without the random state: the run "
                                       "continues, but not bitwise as it would have)"))
    if cfg.shard:
        shard_blocks(seg, device)
    params = [p for p in seg.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        _load_optimizer(seg, opt, optimizer_state, cfg.shard)
    procs.barrier()  # every process has checked and read the run's files: now rank 0 writes
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "finetune.json", asdict(cfg))

    batches = EpochBatches(len(train_ds), cfg.batch_size,
                           drop_last=split or len(train_ds) >= cfg.batch_size, seed=cfg.seed,
                           rank=procs.rank, world=procs.world, passes=cfg.grad_accum)
    # The loader's own generator seeds its workers, so that starting an epoch draws nothing
    # from the global generator.
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches, collate_fn=collate,
                                         num_workers=cfg.workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    model = seg
    if procs.distributed and not cfg.shard:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            seg, device_ids=[device.index] if device.type == "cuda" else None)
    base = describe_base(cfg.model_type, cfg.checkpoint, cfg.seed) if procs.main else None
    bar = _progress(cfg.steps, run.step, progress and procs.main)
    if rng is not None:  # last: nothing may draw between here and the first step
        _set_rng_state(rng)
    trainer = _Steps(cfg, seg, model, opt, procs, PerSampleNoise(seg, cfg.seed),
                     len(train_ds), per)
    try:
        return _train_steps(cfg, trainer, loader, batches, train_ds, val_ds, out, run,
                            settings, base, bar, log)
    finally:
        if bar is not None:  # also on an error, so that its message gets a line of its own
            bar.close()


# Settings a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = ("out", "device", "workers", "steps", "val_every", "check_data",
                     "grad_accum", "grad_checkpoint", "timeout")


def _load_optimizer(seg, opt, state, sharded: bool) -> None:
    """Adam's state from last.pt: a sharded run's is the full state by parameter name
    (torch.distributed.checkpoint's), which each process cuts to its shards; a plain
    run's is opt.state_dict()."""
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    set_optimizer_state_dict(seg, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _saved_state(seg, opt, sharded: bool, main: bool):
    """(adapter tensors, Adam's state) to save, whole: a sharded model's gathered from the
    processes (every process must call this; rank 0 gets them); (None, None) in the other
    processes of an unsharded run, whose rank 0 holds it all."""
    if not sharded and not main:
        return None, None
    adapter = sam_api.adapter_state_dict(seg)
    if not sharded:
        return {k: v.detach().cpu() for k, v in adapter.items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    adapter = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
               for k, v in adapter.items()}
    state = get_optimizer_state_dict(seg, opt, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
    return adapter, state


@dataclass
class RunState:
    """Where a run stands: optimizer steps, the epoch and the batches of it trained, the
    best validation so far and the history."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best: Optional[dict] = None
    history: List[dict] = field(default_factory=list)


class EpochBatches:
    """A training epoch's batches as lists of dataset indices: a permutation drawn from
    (seed, epoch) alone, without the first ``start`` batches (those a resumed run had
    trained on), so a resumed run sees the batches the run would have seen.

    With ``world`` processes and ``passes`` accumulation passes, each step's batch is cut
    into ``passes`` consecutive parts and each part into ``world`` consecutive shares:
    process ``rank`` gets its share of each part in turn (``passes`` lists a step), so
    the processes together see each step the batch one process would."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, rank: int = 0,
                 world: int = 1, passes: int = 1):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, seed
        self.rank, self.world, self.passes = rank, world, passes
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _count(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return max(0, self._count() - self.start) * self.passes

    def __iter__(self):
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, 1))
        perm = torch.randperm(self.n, generator=g).tolist()
        part = self.batch_size // self.passes
        share = part // self.world
        for b in range(self.start, self._count()):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world == self.passes == 1:
                yield batch
                continue
            for a in range(self.passes):
                first = a * part + self.rank * share
                yield batch[first:first + share]


def _rng_state() -> Dict[str, object]:
    """Every random generator a step may draw from (the routers' noise: torch's)."""
    state: Dict[str, object] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Steps:
    """One optimizer step over the batch's parts (this process's share of each
    accumulation pass): forward in the routing scope (per-sample router noise; over
    several processes the routers' statistics summed), step_loss, backward; then Adam."""

    def __init__(self, cfg, seg, model, opt, procs: Processes, noise: PerSampleNoise,
                 n_train: int, per: int):
        self.cfg, self.seg, self.model, self.opt, self.procs = cfg, seg, model, opt, procs
        self.noise, self.n_train, self.per = noise, n_train, per
        self.images = 0  # the last step's, all processes

    def __call__(self, parts: List[dict], epoch: int) -> float:
        cfg, procs, device = self.cfg, self.procs, self.procs.device
        images, pixels = procs.sum([float(sum(len(p["index"]) for p in parts)),
                                    float(sum(int((p["mask"] != IGNORE_INDEX).sum())
                                              for p in parts))])
        self.images = round(images)
        stats = dice = None
        if len(parts) > 1:
            stats, dice = self.measure(parts, epoch)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for a, part in enumerate(parts):
            x = part["image"].to(device, non_blocking=True)
            masks = part["mask"].to(device, non_blocking=True)
            keys = self.keys(part, epoch)
            last = a == len(parts) - 1
            sync = contextlib.nullcontext()
            if procs.distributed and cfg.shard:
                self.model.set_requires_gradient_sync(last)
            elif procs.distributed and not last:
                sync = self.model.no_sync()
            with sync:
                with procs.scope(self.noise.keys(keys), stats, len(parts)):
                    with _autocast(device, cfg.bf16):
                        logits = self.model(x)
                    loss = step_loss(logits.float(), masks, self.seg.aux_loss(),
                                     cfg.aux_weight, round(images), round(pixels),
                                     len(parts), procs.sum_over, dice_whole=dice,
                                     world=procs.world, measured=stats is not None)
                loss.backward()
            total += loss.item()  # a host sync per pass: the bar and the history
        return total

    def keys(self, part: dict, epoch: int) -> List[int]:
        """The samples' router noise keys: index and epoch, whatever process or pass."""
        return [epoch * self.n_train + i for i in part["index"]]

    @torch.no_grad()
    def measure(self, parts: List[dict], epoch: int):
        """The whole batch's statistics before its passes, summed over passes and
        processes: each router's [importance, load] (by id(router)) and the soft Dice's
        [intersections, totals] (None for binary). A forward of every pass without
        autograd, with the noise the passes will draw."""
        procs, device = self.procs, self.procs.device
        collect: Dict[int, torch.Tensor] = {}
        dice = None
        for part in parts:
            x = part["image"].to(device, non_blocking=True)
            masks = part["mask"].to(device, non_blocking=True)
            with routing_scope(noise=self.noise.keys(self.keys(part, epoch)),
                               collect=collect):
                with _autocast(device, self.cfg.bf16):
                    logits = self.model(x)
            d = dice_sums(logits.float(), masks)
            dice = d if dice is None else dice + d
        # routers in the order they ran, which is every process's: one collective
        order = list(collect)
        flat = torch.cat([collect[k] for k in order] + ([dice] if dice is not None else []))
        flat = procs.sum_tensor(flat)
        stats, at = {}, 0
        for k in order:
            stats[k] = flat[at:at + collect[k].numel()]
            at += collect[k].numel()
        return stats, (flat[at:] if dice is not None else None)


def _train_steps(cfg, step, loader, batches, train_ds, val_ds, out, run, settings, base, bar,
                 log) -> Dict[str, object]:
    seg = step.seg
    seg.train()
    seen, t0 = 0, time.perf_counter()
    while run.step < cfg.steps:
        train_ds.set_epoch(run.epoch)
        batches.set_epoch(run.epoch, start=run.position)
        parts: List[dict] = []
        for part in loader:
            parts.append(part)
            if len(parts) < cfg.grad_accum:
                continue
            value = step(parts, run.epoch)
            parts = []
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at step {run.step + 1}; lower "
                                         f"the learning rate (lr={cfg.lr})")
            step.opt.step()
            run.step += 1
            run.position += 1
            seen += step.images
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            run.history.append({"step": run.step, "loss": value})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.1f}")
            if run.step % cfg.val_every == 0 or run.step == cfg.steps:
                _checkpoint(step, cfg, out, run, val_ds, settings, base, log)
                seg.train()
            if run.step >= cfg.steps:
                break
        else:
            run.epoch += 1
            run.position = 0
    return {"step": run.step, "best": run.best, "history": run.history}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _checkpoint(step: "_Steps", cfg, out: Path, run: RunState, val_ds, settings, base,
                log) -> None:
    """Validation (each process its share, the metrics summed), then rank 0 writes the
    run's files: best and last adapters, last.pt (everything to continue bitwise: the
    optimizer, the epoch's position, every random generator), history.json and
    curve.png. Updates run.best (in every process alike)."""
    seg, opt, procs = step.seg, step.opt, step.procs
    record, score = {"step": run.step}, None
    if val_ds is not None:
        share = range(procs.rank, len(val_ds), procs.world)
        # sharded, every process runs as many forwards (each gathers the weights with all)
        rounds = -(-len(range(0, len(val_ds), procs.world)) // step.per) if cfg.shard \
            else None
        metrics = _metrics(seg, val_ds, step.per, procs.device, cfg.bf16, False, share,
                           rounds)
        metrics.reduce(procs.sum)
        metrics = metrics.compute()
        record.update(metrics)
        score = _score(metrics, cfg.num_classes)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                 if k != "iou_per_class"}
        log(f"step {run.step}: validation {shown}")
    run.history.append({"validation": record})
    better = run.best is None or score is None or score > run.best["score"]
    if better:
        run.best = {"step": run.step, "score": score}
    adapter, optimizer_state = _saved_state(seg, opt, cfg.shard, procs.main)
    if not procs.main:
        procs.barrier()  # rank 0 has written the files
        return
    # save_adapter writes beside its target and renames: never half-written
    if better:
        sam_api.save_adapter(seg, out / "best.safetensors", base_model=base,
                             state_dict=adapter)
    sam_api.save_adapter(seg, out / "last.safetensors", base_model=base, state_dict=adapter)
    state = {"format": CHECKPOINT_FORMAT, "step": run.step, "epoch": run.epoch,
             "position": run.position, "best": run.best, "history": run.history,
             "settings": settings, "rng": _rng_state(),
             "adapter": adapter, "optimizer": optimizer_state}
    write_atomically(out / "last.pt", lambda tmp: torch.save(state, tmp))
    _write_json(out / "history.json", run.history)
    write_curve(out / "curve.png", run.history, _score_name(cfg.num_classes))
    procs.barrier()


def write_curve(path: Path, history: list, metric: str, title: str = "fine-tuning") -> bool:
    """The training loss and the validation ``metric`` against steps (a run's history),
    as a PNG at ``path`` (written beside it and renamed); False, writing nothing, without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    val = [(h["validation"]["step"], h["validation"][metric]) for h in history
           if "validation" in h and isinstance(h["validation"].get(metric), float)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lines = ax.plot(steps, losses, color="tab:blue", linewidth=1, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        lines += ax2.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange",
                          label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return True


def _resume(path: Path, seg, settings) -> Tuple[RunState, Optional[dict], dict]:
    """The run state saved in last.pt, its adapters loaded into seg; its random state (None
    for a checkpoint written before it was saved) and Adam's state (_load_optimizer)."""
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} does not exist; a run writes it at its first "
                                f"validation step (val_every)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"resume: {path} is not a checkpoint written by this fine-tuning")
    # a setting added since the checkpoint was written counts as its default
    defaults = asdict(FinetuneConfig("", 1, ""))
    saved = {k: state["settings"].get(k, defaults.get(k)) for k in settings}
    changed = {k: (saved[k], v) for k, v in settings.items()
               if json.loads(json.dumps(saved[k])) != json.loads(json.dumps(v))}
    if changed:
        k, (was, now) = next(iter(changed.items()))
        raise ValueError(f"resume: the run in {path.parent} was trained with {k}={was!r}, now "
                         f"{k}={now!r}; resume with the same settings (only steps, device, "
                         f"workers may change)")
    sam_api.load_adapter_state_dict(seg, state["adapter"])
    run = RunState(step=state["step"], epoch=state["epoch"],
                   position=state.get("position", 0), best=state["best"],
                   history=state["history"])
    return run, state.get("rng"), state["optimizer"]


# --- Evaluate, predict ----------------------------------------------------------------

def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def describe_base(model_type: str, checkpoint: Optional[str], seed: int) -> Dict[str, object]:
    """What a run's weights file records of the SAM it was trained on (save_adapter's
    base_model): the model type, and the checkpoint's file name, size, SHA-256 and path,
    or the seed of the random initialisation without one."""
    base: Dict[str, object] = {"model_type": model_type}
    if checkpoint is None:
        base["seed"] = seed
    else:
        path = os.path.abspath(os.fspath(checkpoint))
        base["checkpoint"] = {"name": os.path.basename(path), "bytes": os.path.getsize(path),
                              "sha256": file_sha256(path), "path": path}
    return base


def _describe_file(rec: Dict[str, object]) -> str:
    return f"{rec['name']} ({rec['bytes']:,} bytes, sha256 {str(rec['sha256'])[:16]}…)"


def base_from_record(weights: Path, base: Dict[str, object], model_type: Optional[str],
                     checkpoint: Optional[str]) -> Tuple[str, Optional[str], int]:
    """(model_type, checkpoint, seed) to rebuild the SAM that ``weights`` recorded: a given
    --model-type or --checkpoint must be that one (the checkpoint's size and SHA-256 are
    checked), and a recorded checkpoint that is not where it was, and not given, is named."""
    recorded = str(base["model_type"])
    if model_type is not None and model_type != recorded:
        raise ValueError(f"model_type: {weights} was trained on SAM {recorded}, not "
                         f"{model_type}; leave --model-type out")
    rec = base.get("checkpoint")
    if rec is None:
        if checkpoint is not None:
            raise ValueError(f"checkpoint: {weights} was trained on a randomly initialised SAM "
                             f"{recorded} (seed {base['seed']}), not on {checkpoint}; leave "
                             f"--checkpoint out")
        return recorded, None, int(base["seed"])
    if checkpoint is None:
        checkpoint = str(rec["path"])
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"checkpoint: {weights} was trained on SAM {recorded} from "
                f"{_describe_file(rec)}, which is no longer at {checkpoint}; pass "
                f"--checkpoint with that file")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint: {checkpoint} does not exist")
    size = os.path.getsize(checkpoint)
    digest = file_sha256(checkpoint) if size == rec["bytes"] else "(not read: another size)"
    if size != rec["bytes"] or digest != rec["sha256"]:
        given = {"name": os.path.basename(checkpoint), "bytes": size, "sha256": digest}
        raise ValueError(f"checkpoint: {checkpoint} is not the file {weights} was trained on: "
                         f"that was {_describe_file(rec)}, this is {_describe_file(given)}")
    return recorded, checkpoint, 0


def load_segmenter(weights, model_type: Optional[str] = None, checkpoint: Optional[str] = None,
                   backend: str = "auto", device: str = "auto") -> SamSegmenter:
    """The segmenter saved in ``weights`` (best/last.safetensors), around the SAM it was
    trained on, as the file records it (describe_base; base_from_record checks a given
    model_type or checkpoint against it). Files without that record: model_type and
    checkpoint from the run's finetune.json beside the file unless given."""
    weights = Path(weights)
    base = sam_api.read_base_model(weights)
    if base is not None:
        model_type, checkpoint, seed = base_from_record(weights, base, model_type, checkpoint)
    else:
        run = weights.parent / "finetune.json"
        if not run.is_file() and model_type is None:
            raise ValueError(f"weights: {weights} records no base model and has no "
                             f"finetune.json beside it; pass --model-type (and --checkpoint "
                             f"for a pretrained SAM)")
        saved = json.loads(run.read_text()) if run.is_file() else {}
        model_type = model_type or saved.get("model_type", "vit_b")
        checkpoint = checkpoint if checkpoint is not None else saved.get("checkpoint")
        seed = saved.get("seed", 0)
    sam = build_sam(model_type, checkpoint, seed=seed)
    return SamSegmenter.from_adapter(sam, weights, backend=backend).to(resolve_device(device))


def evaluate(seg: SamSegmenter, data, batch_size: int = 4, device=None, bf16: bool = True,
             progress: bool = True, ignore_index="auto") -> Dict[str, object]:
    """The metrics (SegmentationMetrics) of ``seg`` on ``data``: a SegmentationDataset or
    what it takes (a folder, a CSV file, (image, mask) pairs; its masks read with
    ``ignore_index``, as read_mask takes it)."""
    if not isinstance(data, SegmentationDataset):
        data = SegmentationDataset(data, seg.num_classes, size=seg.image_size,
                                   ignore_index=ignore_index)
    device = device or next(seg.parameters()).device
    return _metrics(seg, data, batch_size, device, bf16, progress, None).compute()


@torch.no_grad()
def _metrics(seg: SamSegmenter, data: SegmentationDataset, batch_size: int, device,
             bf16: bool, progress: bool, indices, rounds: Optional[int] = None
             ) -> SegmentationMetrics:
    """The running metrics of ``seg`` on the items ``indices`` of data (all: None); with
    ``rounds``, forwards of data's first item that count nowhere make up the batches to
    that many (a sharded model's processes must all run every forward)."""
    was = seg.training
    seg.eval()
    metrics = SegmentationMetrics(seg.num_classes)
    if indices is not None:
        data = torch.utils.data.Subset(data, list(indices))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate)
    bar = _progress(len(loader), 0, progress)
    for batch in loader:
        with _autocast(torch.device(device), bf16):
            logits = seg(batch["image"].to(device))
        metrics.update(logits.float(), batch["mask"].to(device))
        if bar is not None:
            bar.update(1)
    for _ in range((rounds or 0) - len(loader)):
        with _autocast(torch.device(device), bf16):
            seg(collate([data.dataset[0] if indices is not None else data[0]])["image"]
                .to(device))
    if bar is not None:
        bar.close()
    seg.train(was)
    return metrics


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Overlay colours of classes 1.. (class 0, the background, is left as it is).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230))


def prediction_targets(images, out, overwrite: bool = False) -> List[Tuple[Path, Path]]:
    """[(image, its mask file in out)] for ``images`` (a folder, one file or a list),
    checked before anything is written: out must not be, hold or lie inside the images'
    folder (or the dataset folder around an images/ folder), and no mask or overlay may
    exist there already unless ``overwrite``."""
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"images: {images} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        folders = [images]
    else:
        files = [Path(images)] if isinstance(images, (str, os.PathLike)) else \
            [Path(p) for p in images]
        folders = sorted({str(p.parent) for p in files})
    check_out(out, folders, "predict")
    out = Path(out)
    targets = [(p, out / f"{p.stem}.png") for p in files]
    if not overwrite:
        there = [t for _, m in targets for t in (m, m.with_name(f"{m.stem}_overlay.png"))
                 if t.exists()]
        if there:
            shown = ", ".join(str(t) for t in there[:3]) + (", ..." if len(there) > 3 else "")
            raise ValueError(f"out: {len(there)} of the files predict would write exist "
                             f"already ({shown}); pass --overwrite to replace them")
    return targets


@torch.no_grad()
def predict(seg: SamSegmenter, images, out, bf16: bool = True, alpha: float = 0.5,
            progress: bool = True, overwrite: bool = False) -> List[Path]:
    """Segment every image of ``images`` (a folder or a list of files) at its own size;
    writes out/<name>.png (class ids; binary masks as 0/255) and out/<name>_overlay.png
    (prediction_targets checks out first). Returns the mask files."""
    from PIL import Image

    targets = prediction_targets(images, out, overwrite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(seg.parameters()).device
    was = seg.training
    seg.eval()
    written = []
    bar = _progress(len(targets), 0, progress)
    for path, target in targets:
        img = read_image(path)
        with _autocast(device, bf16):
            logits = seg(img[None].to(device))
        ids = (logits[0, 0] > 0).long() if seg.num_classes == 1 else logits[0].argmax(0)
        ids = ids.cpu()
        mask = (ids * 255 if seg.num_classes == 1 else ids).to(torch.uint8).numpy()
        write_atomically(target, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))
        over = img.clone()
        for c in range(1, max(2, seg.num_classes)):
            colour = torch.tensor(PALETTE[(c - 1) % len(PALETTE)], dtype=over.dtype)[:, None]
            sel = ids == c
            over[:, sel] = (1 - alpha) * over[:, sel] + alpha * colour
        pixels = over.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        write_atomically(out / f"{path.stem}_overlay.png",
                            lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
        written.append(target)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seg.train(was)
    return written


__all__ = ["FinetuneConfig", "MODEL_TYPES", "build_sam", "evaluate", "load_segmenter",
           "predict", "resolve_device", "train"]

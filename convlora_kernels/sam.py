"""Conv-LoRA for Segment Anything: set up, train, save and load the adapters.

    apply_conv_lora(model, ...)       qkv of the image encoder's blocks -> ConvLoRALinear
    aux_loss(model)                   the routers' load-balancing loss, to add to the task loss
    adapter_state_dict(model)         exactly the trained tensors; load_adapter_state_dict
    save_adapter / load_adapter       the same in a safetensors file that records the settings
    read_adapter_config(path)         those settings, as apply_conv_lora's keyword arguments
    trainable_parameters(model)       trainable count and share; print_trainable_parameters

Models: segment_anything's ``Sam`` and ``ImageEncoderViT`` and, when transformers is
installed, its ``SamModel``, ``SamVisionModel`` and ``SamVisionEncoder`` (or any module
holding one of these encoders). In both libraries each encoder block's attention calls a
fused ``qkv`` nn.Linear on a channels-last map: (B·nW, 14, 14, C) windows in the windowed
blocks, (B, 64, 64, C) in the global blocks for a 1024×1024 image. ConvLoRALinear takes
that map as is, so with ``gating="map"`` a windowed block routes each 14×14 window and a
global block each image.

The helpers accept the model wrapped in DistributedDataParallel or torch.compile, and blocks
wrapped by torch's activation-checkpoint wrapper; tensor names are those of the unwrapped
model's ``state_dict()``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .modules import ConvLoRALinear

__all__ = [
    "ConvLoRAConfig", "TrainableParameters", "adapter_state_dict", "apply_conv_lora",
    "aux_loss", "load_adapter", "load_adapter_state_dict", "print_trainable_parameters",
    "read_adapter_config", "save_adapter", "trainable_parameters",
]

# The trained tensors of one ConvLoRALinear, by their names inside it.
ADAPTER_TENSORS = ("lora_A", "lora_B", "conv_weight", "conv_bias", "router.w_gate",
                   "router.w_noise")
FILE_FORMAT = "convlora-kernels-adapter"
FILE_FORMAT_VERSION = "1"
# Name segments that module wrappers add and their state_dict() leaves out.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


@dataclass(frozen=True)
class ConvLoRAConfig:
    """What apply_conv_lora set up; kept on the model as ``model.conv_lora_config``.

    The fields are apply_conv_lora's keyword arguments, with ``blocks`` the indices of the
    blocks given Conv-LoRA and ``train_mask_decoder`` True only when the model has a mask
    decoder and it was left trainable.
    """

    r: int
    num_experts: int
    alpha: float
    scales: Tuple[int, ...]
    gating: str
    interpolation: str
    blocks: Tuple[int, ...]
    train_mask_decoder: bool

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --- Finding things in a model -------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _clean(name: str) -> str:
    """A module name as state_dict() spells it: without the segments wrappers insert."""
    return ".".join(p for p in name.split(".") if p and p not in _WRAPPER_SEGMENTS)


def _encoder_types() -> Tuple[Tuple[type, str], ...]:
    """(encoder class, attribute holding its blocks) for the libraries already imported.

    A model of a library that was never imported cannot be in memory, so nothing is
    imported here (transformers in particular is optional and slow to import).
    """
    found = []
    mod = sys.modules.get("segment_anything.modeling.image_encoder")
    if mod is not None:
        found.append((mod.ImageEncoderViT, "blocks"))
    mod = sys.modules.get("transformers.models.sam.modeling_sam")
    if mod is not None:
        found.append((mod.SamVisionEncoder, "layers"))
    return tuple(found)


def _find_encoder(root: nn.Module) -> Tuple[str, nn.ModuleList]:
    """(name of the block list, block list) of the one SAM image encoder in root; raises
    if there is none or several."""
    kinds = _encoder_types()
    hits = [(_clean(f"{name}.{attr}"), getattr(m, attr)) for name, m in root.named_modules()
            for cls, attr in kinds if isinstance(m, cls)]
    if not hits:
        raise ValueError(
            f"model: expected a Segment Anything model or image encoder (segment_anything's "
            f"Sam / ImageEncoderViT, or transformers' SamModel / SamVisionModel), but "
            f"{type(root).__name__} contains no such image encoder")
    if len(hits) > 1:
        raise ValueError(f"model: expected one SAM image encoder, found {len(hits)} "
                         f"(at {', '.join(n for n, _ in hits)}); pass the one to adapt")
    return hits[0]


def _qkv_of(block: nn.Module, where: str) -> Tuple[nn.Module, nn.Module]:
    """(parent module, its .qkv) for an encoder block, looking through wrappers."""
    for name, m in block.named_modules():
        if _clean(name) == "attn" and hasattr(m, "qkv"):
            return m, m.qkv
    raise ValueError(f"model: the encoder block {where} ({type(block).__name__}) has no "
                     f"attn.qkv layer")


def _conv_lora_layers(root: nn.Module) -> Dict[str, ConvLoRALinear]:
    return {_clean(n): m for n, m in root.named_modules() if isinstance(m, ConvLoRALinear)}


def _find_mask_decoder(root: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The shallowest submodule named ``mask_decoder`` (Sam and SamModel have one)."""
    hits = [(_clean(n), m) for n, m in root.named_modules()
            if _clean(n).split(".")[-1] == "mask_decoder"]
    return min(hits, key=lambda h: h[0].count(".")) if hits else None


def _config_of(model: nn.Module) -> Tuple[nn.Module, ConvLoRAConfig]:
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for m in root.modules():
        cfg = getattr(m, "conv_lora_config", None)
        if isinstance(cfg, ConvLoRAConfig):
            return root, cfg
    raise ValueError(f"model: {type(root).__name__} has no Conv-LoRA set up by "
                     f"apply_conv_lora; call apply_conv_lora(model, ...) first, and pass the "
                     f"model given to it (or that model wrapped in DDP / torch.compile)")


# --- Set up ---------------------------------------------------------------------------

def _check_blocks(blocks, depth: int) -> Tuple[int, ...]:
    if blocks is None:
        return tuple(range(depth))
    if isinstance(blocks, (int, str)) or isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks: expected a sequence of block indices in [0, {depth}), "
                        f"got {type(blocks).__name__} {blocks!r}")
    out = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"blocks: expected integer block indices, got {type(b).__name__} "
                            f"{b!r}")
        if not 0 <= b < depth:
            raise ValueError(f"blocks: expected indices in [0, {depth}) (the encoder has "
                             f"{depth} blocks), got {b}")
        if b in out:
            raise ValueError(f"blocks: block {b} is listed twice")
        out.append(b)
    if not out:
        raise ValueError("blocks: expected at least one block index, got an empty sequence")
    return tuple(sorted(out))


def apply_conv_lora(model: nn.Module, r: int = 3, num_experts: int = 8, alpha: float = 32,
                    scales: Optional[Sequence[int]] = None, gating: str = "token",
                    interpolation: str = "bilinear", backend: str = "auto",
                    blocks: Optional[Sequence[int]] = None,
                    train_mask_decoder: bool = True) -> Dict[str, ConvLoRALinear]:
    """Give the SAM image encoder's blocks Conv-LoRA, in place, and freeze the rest.

    Every block's ``attn.qkv`` (or those of the listed ``blocks``, indices into the
    encoder's block list) becomes ``ConvLoRALinear.from_linear(qkv, r, num_experts, alpha,
    scales, gating, interpolation, backend)``, sharing qkv's weight and bias, so the model's
    output is unchanged until the adapters train. Every other parameter is frozen except,
    with ``train_mask_decoder``, the mask decoder's (the paper fine-tunes it fully). New
    layers take the train/eval mode of the layers they replace.

    Call it once, on the model itself (before wrapping it in DistributedDataParallel).
    Returns {name in the model's state_dict: the new ConvLoRALinear}, in block order.
    """
    root = _check_model(model, train_mask_decoder)
    blocks_name, block_list = _find_encoder(root)
    chosen = _check_blocks(blocks, len(block_list))

    # Build every new layer before changing anything, so a bad argument leaves the model
    # as it was.
    plan = [_new_layer(block_list[i], f"{blocks_name}.{i}", dict(
        r=r, num_experts=num_experts, alpha=alpha, scales=scales, gating=gating,
        interpolation=interpolation, backend=backend)) for i in chosen]

    root.requires_grad_(False)
    for parent, layer in plan:  # the new layers' adapter tensors are trainable
        parent.qkv = layer
    decoder = _find_mask_decoder(root)
    train_decoder = train_mask_decoder and decoder is not None
    if train_decoder:
        decoder[1].requires_grad_(True)
    first = plan[0][1]
    root.conv_lora_config = ConvLoRAConfig(
        r=first.r, num_experts=first.num_experts, alpha=first.alpha, scales=first.scales,
        gating=first.gating, interpolation=first.interpolation, blocks=chosen,
        train_mask_decoder=train_decoder)
    return _conv_lora_layers(root)


def _check_model(model, train_mask_decoder) -> nn.Module:
    """The model apply_conv_lora may change (unwrapped from torch.compile), or a clear
    error: a DDP/DataParallel wrapper, not a module, adapters already in it."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("model: apply_conv_lora must run before the model is wrapped in "
                        "DistributedDataParallel / DataParallel (the wrapper has already "
                        "collected the parameters it synchronises)")
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(train_mask_decoder, bool):
        raise TypeError(f"train_mask_decoder: expected a bool, got "
                        f"{type(train_mask_decoder).__name__} {train_mask_decoder!r}")
    existing = _conv_lora_layers(root)
    if existing:
        raise ValueError(f"model: already has {len(existing)} Conv-LoRA layers (e.g. "
                         f"{next(iter(existing))}); apply_conv_lora may be called once per "
                         f"model")
    return root


def _new_layer(block: nn.Module, where: str, options: dict):
    """(the module holding block's attn.qkv, the ConvLoRALinear to put in its place)."""
    parent, qkv = _qkv_of(block, where)
    if not isinstance(qkv, nn.Linear):
        raise TypeError(f"model: expected block {where}'s attn.qkv to be an nn.Linear, "
                        f"got {type(qkv).__name__}")
    layer = ConvLoRALinear.from_linear(qkv, **options)
    layer.train(qkv.training)
    return parent, layer


# --- Training -------------------------------------------------------------------------

def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the routers' aux losses from the last training forward: a differentiable
    float32 scalar; zero (a constant) when every Conv-LoRA layer is in eval mode.

    Add it to the task loss: it is the routers' only gradient, and under
    DistributedDataParallel (find_unused_parameters=False) every router weight needs one.
    """
    root = _unwrap(model)
    layers = _conv_lora_layers(root)
    if not layers:
        raise ValueError(f"model: {type(root).__name__} has no Conv-LoRA layers; call "
                         f"apply_conv_lora(model, ...) first")
    live = {n: m for n, m in layers.items() if m.training and m.aux_loss is not None}
    # A training forward without autograd (torch.no_grad, or reentrant activation
    # checkpointing, which runs the first forward without it) leaves a loss that cannot
    # train the routers, and DDP then misses their gradients: say so instead of failing later.
    cut = [n for n, m in live.items() if m.num_experts > 1 and m.router.w_gate.requires_grad
           and not m.aux_loss.requires_grad]
    if cut and torch.is_grad_enabled():
        warnings.warn(f"aux_loss: the router loss of {cut[0]} ({len(cut)} layer(s) in all) "
                      f"has no gradient: its training forward ran without autograd "
                      f"(torch.no_grad, or activation checkpointing with use_reentrant=True; "
                      f"use use_reentrant=False), so the routers will not train",
                      RuntimeWarning, stacklevel=2)
    losses = [m.aux_loss for m in live.values()]
    if not losses:
        if torch.is_grad_enabled() and not any(m.training for m in layers.values()):
            _warn_eval_mode_once()
        device = next(iter(layers.values())).lora_A.device
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([t.float() for t in losses]).sum()


class TrainableParameters(NamedTuple):
    """Parameter counts of a model (each shared parameter counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """trainable / total (0 for a model without parameters)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.share:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """How many of the model's parameters train, and how many it has."""
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in root.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return TrainableParameters(trainable, total)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …``."""
    print(trainable_parameters(model))


# --- Saving and loading ---------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Exactly the tensors apply_conv_lora left trainable, detached (sharing storage, as
    state_dict() does), under their names in the unwrapped model's state_dict(): each
    Conv-LoRA layer's lora_A, lora_B, conv_weight, conv_bias, router.w_gate and
    router.w_noise, then the mask decoder's state when it was trainable."""
    root, cfg = _config_of(model)
    out: Dict[str, torch.Tensor] = {}
    for name, layer in _conv_lora_layers(root).items():
        for t in ADAPTER_TENSORS:
            out[f"{name}.{t}"] = layer.get_parameter(t).detach()
    if cfg.train_mask_decoder:
        found = _find_mask_decoder(root)
        if found is None:
            raise ValueError("model: its Conv-LoRA settings say the mask decoder trains, but "
                             "it has no mask_decoder module any more")
        prefix, decoder = found
        for k, v in decoder.state_dict().items():
            out[f"{prefix}.{k}" if prefix else k] = v.detach()
    return out


def _describe_keys(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors (as adapter_state_dict gives them) into the model, in place.

    The keys must be exactly those of adapter_state_dict(model) and every shape must
    match; otherwise a ValueError names the difference and nothing is copied. Values are
    cast to each tensor's dtype and device. A plain state dict records no settings:
    save_adapter / load_adapter also check alpha, scales, gating and interpolation.
    """
    root, cfg = _config_of(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    target = adapter_state_dict(root)
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (this model has them): "
                         f"{_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (this model has no such tensor): "
                         f"{_describe_keys(unexpected)}")
        raise ValueError(
            f"state_dict: its tensors do not match this model's Conv-LoRA layers (blocks "
            f"{list(cfg.blocks)}, train_mask_decoder={cfg.train_mask_decoder}); "
            + "; ".join(parts))
    for k, t in target.items():
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict[{k!r}]: expected a tensor, got {type(v).__name__}")
        if v.shape != t.shape:
            raise ValueError(
                f"state_dict[{k!r}]: expected shape {tuple(t.shape)} (this model: r={cfg.r}, "
                f"num_experts={cfg.num_experts}), got {tuple(v.shape)}")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(state_dict[k])


@functools.lru_cache(maxsize=None)
def _warn_eval_mode_once() -> None:
    warnings.warn("aux_loss: every Conv-LoRA layer is in eval mode, so the routers' loss is "
                  "a constant 0 and the routers will not train; call model.train() before "
                  "the training forward (sam_model_registry returns the model in eval mode)",
                  RuntimeWarning, stacklevel=3)


def save_adapter(model: nn.Module, path) -> None:
    """Write adapter_state_dict(model) to a safetensors file, with the settings of
    apply_conv_lora in its metadata. The file is written beside ``path`` and renamed into
    place, so ``path`` is never left half-written."""
    from safetensors.torch import save_file

    _, cfg = _config_of(model)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: the folder {folder} does not exist; create it first "
                                f"(os.makedirs({folder!r}, exist_ok=True))")
    # Copies on the CPU: safetensors refuses tensors that share storage.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model).items()}
    # a new name in the same folder (so the rename is atomic), created with the usual mode
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, tmp, metadata={
            "format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION,
            "conv_lora_config": json.dumps(cfg.to_dict())})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _not_an_adapter_file(path) -> Optional[str]:
    """Why ``path`` cannot be an adapter file (missing, a folder, a PyTorch checkpoint such
    as SAM's own weights, or no safetensors header), else None."""
    if not os.path.exists(path):
        return f"path: {path} does not exist"
    if os.path.isdir(path):
        return f"path: {path} is a folder, not an adapter file written by save_adapter"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (f"path: {path} is a PyTorch checkpoint (torch.save), not an adapter file: "
                f"SAM's own weights load with sam_model_registry[...](checkpoint=...); "
                f"adapter files are the .safetensors files save_adapter writes")
    if len(head) < 8 or int.from_bytes(head, "little") > os.path.getsize(path) - 8:
        return (f"path: {path} is not a safetensors file (no valid header), so not an "
                f"adapter file written by save_adapter")
    return None


def _read_file(path) -> Tuple[ConvLoRAConfig, Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = os.fspath(path)
    why = _not_an_adapter_file(path)
    if why is not None:
        raise (FileNotFoundError if "does not exist" in why else ValueError)(why)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FILE_FORMAT or "conv_lora_config" not in meta:
            raise ValueError(f"path: {path} is not a Conv-LoRA adapter file written by "
                             f"save_adapter (its metadata has no conv_lora_config)")
        if meta.get("format_version") != FILE_FORMAT_VERSION:
            raise ValueError(f"path: {path} has adapter file format version "
                             f"{meta.get('format_version')!r}; this version of convlora-kernels "
                             f"reads version {FILE_FORMAT_VERSION}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    raw = json.loads(meta["conv_lora_config"])
    names = {f.name for f in fields(ConvLoRAConfig)}
    if set(raw) != names:
        raise ValueError(f"path: {path} records the settings {sorted(raw)}, expected "
                         f"{sorted(names)}")
    raw["scales"], raw["blocks"] = tuple(raw["scales"]), tuple(raw["blocks"])
    return ConvLoRAConfig(**raw), tensors


def read_adapter_config(path) -> dict:
    """The settings an adapter file was trained with, as keyword arguments of
    apply_conv_lora: ``apply_conv_lora(sam, **read_adapter_config(path))``."""
    return _read_file(path)[0].to_dict()


def load_adapter(model: nn.Module, path) -> None:
    """Load a file written by save_adapter into a model set up by apply_conv_lora with the
    same settings; a different setting, shape or set of layers raises a ValueError naming
    it, and nothing is loaded."""
    _, cfg = _config_of(model)
    saved, tensors = _read_file(path)
    for f in fields(ConvLoRAConfig):
        a, b = getattr(saved, f.name), getattr(cfg, f.name)
        if a != b:
            raise ValueError(
                f"{path}: the adapter was trained with {f.name}={a!r}, but this model has "
                f"{f.name}={b!r}; set the model up with "
                f"apply_conv_lora(model, **read_adapter_config(path))")
    load_adapter_state_dict(model, tensors)

"""Conv-LoRA for Segment Anything: set up, train, save and load the adapters.

    apply_conv_lora(model, ...)       the encoder blocks' qkv (or q, v) -> ConvLoRALinear
    add_modules_to_save(model, ...)   modules added later (a head) train and are saved too
    box_prompted_masks / mask_loss    a batched box-prompt forward and its loss
    aux_loss(model)                   the routers' load-balancing loss, to add to the task loss
    adapters_disabled(model)          the frozen model for a while (set_adapters_enabled)
    remove_conv_lora(model)           the plain nn.Linear layers back
    adapter_state_dict(model)         exactly the trained tensors; load_adapter_state_dict
    save_adapter / load_adapter       the same in a safetensors file that records the settings
    read_adapter_config(path)         those settings, as apply_conv_lora's keyword arguments
    trainable_parameters(model)       trainable count and share; print_trainable_parameters

Models (or any module holding one of their image encoders):
    SAM      segment_anything's Sam / ImageEncoderViT; transformers' SamModel,
             SamVisionModel; SamHQModel, SamHQVisionModel
    SAM 2    transformers' Sam2Model, Sam2VisionModel, Sam2VideoModel (Hiera); the sam2
             package's SAM2Base / Hiera
    SAM 3    transformers' Sam3Model, Sam3TrackerModel, Sam3VisionModel (a ViT with separate
             q/k/v projections: q and v adapted by default); the sam3 package's ViT
Each encoder block's attention calls its projections on a channels-last map: in SAM,
(B·nW, 14, 14, C) windows in the windowed blocks and (B, 64, 64, C) in the global blocks for
a 1024×1024 image; in Hiera, maps that shrink stage by stage (8×8 windows of a 256×256 map
first). ConvLoRALinear takes each map as it comes, so with ``gating="map"`` a windowed block
routes each window and a global block each image.

The helpers accept the model wrapped in DistributedDataParallel or torch.compile, and blocks
wrapped by torch's activation-checkpoint wrapper; tensor names are those of the unwrapped
model's ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._files import write_atomically
from .modules import ConvLoRALinear

__all__ = [
    "ConvLoRAConfig", "PromptedMasks", "TrainableParameters", "adapter_state_dict",
    "adapters_disabled", "add_modules_to_save", "apply_conv_lora", "aux_loss",
    "box_prompted_masks", "load_adapter", "load_adapter_state_dict", "mask_loss",
    "print_trainable_parameters", "read_adapter_config", "remove_conv_lora", "save_adapter",
    "set_adapters_enabled", "trainable_parameters",
]

# The trained tensors of one ConvLoRALinear, by their names inside it.
ADAPTER_TENSORS = ("lora_A", "lora_B", "conv_weight", "conv_bias", "router.w_gate",
                   "router.w_noise")
# The projection adapted in encoders with one fused qkv layer (all but transformers' SAM 3).
_FUSED_QKV = ("qkv",)
FILE_FORMAT = "convlora-kernels-adapter"
FILE_FORMAT_VERSION = "1"
# Name segments that module wrappers add and their state_dict() leaves out.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


@dataclass(frozen=True)
class ConvLoRAConfig:
    """What apply_conv_lora set up; kept on the model as ``model.conv_lora_config``.

    The fields are apply_conv_lora's keyword arguments, with ``blocks`` the indices of the
    blocks given Conv-LoRA, ``train_mask_decoder`` True only when the model has a mask
    decoder and it was left trainable, ``modules_to_save`` the names (in the module
    holding this config) of the other modules that train and are saved with the adapters,
    and ``targets`` the projections adapted in each block's attention.
    """

    r: int
    num_experts: int
    alpha: float
    scales: Tuple[int, ...]
    gating: str
    interpolation: str
    blocks: Tuple[int, ...]
    train_mask_decoder: bool
    modules_to_save: Tuple[str, ...] = ()
    targets: Tuple[str, ...] = _FUSED_QKV

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


class _EncoderKind(NamedTuple):
    """How to find the projections of one library's image encoder."""

    cls: type
    blocks: str                   # the attribute holding the block list
    attention: str                # the attention module's name inside a block
    projections: Tuple[str, ...]  # the Linear layers inside it that may be adapted
    default: Tuple[str, ...]      # those adapted unless ``targets`` says otherwise

# (module, class, block list, attention, projections, default targets)
_ENCODERS = (
    ("segment_anything.modeling.image_encoder", "ImageEncoderViT", "blocks", "attn",
     _FUSED_QKV, _FUSED_QKV),
    ("transformers.models.sam.modeling_sam", "SamVisionEncoder", "layers", "attn",
     _FUSED_QKV, _FUSED_QKV),
    ("transformers.models.sam_hq.modeling_sam_hq", "SamHQVisionEncoder", "layers", "attn",
     _FUSED_QKV, _FUSED_QKV),
    ("transformers.models.sam2.modeling_sam2", "Sam2HieraDetModel", "blocks", "attn",
     _FUSED_QKV, _FUSED_QKV),
    ("sam2.modeling.backbones.hieradet", "Hiera", "blocks", "attn", _FUSED_QKV, _FUSED_QKV),
    # SAM 3's ViT: separate projections; q and v by default, the usual LoRA choice
    ("transformers.models.sam3.modeling_sam3", "Sam3ViTModel", "layers", "attention",
     ("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")),
    ("sam3.model.vitdet", "ViT", "blocks", "attn", _FUSED_QKV, _FUSED_QKV),
)


def _encoder_types() -> Tuple[_EncoderKind, ...]:
    """The image encoders of the libraries already imported.

    A model of a library that was never imported cannot be in memory, so nothing is
    imported here (transformers in particular is optional and slow to import).
    """
    found = []
    for module, name, blocks, attention, projections, default in _ENCODERS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(_EncoderKind(cls, blocks, attention, projections, default))
    return tuple(found)


def _find_encoder(root: nn.Module) -> Tuple[str, nn.ModuleList, _EncoderKind]:
    """(name of the block list, block list, encoder kind) of the one SAM image encoder
    in root; raises if there is none or several."""
    hits = [(_clean(f"{name}.{kind.blocks}"), getattr(m, kind.blocks), kind)
            for name, m in root.named_modules() for kind in _encoder_types()
            if isinstance(m, kind.cls)]
    if not hits:
        raise ValueError(
            f"model: expected a Segment Anything model or image encoder (segment_anything's "
            f"Sam / ImageEncoderViT; transformers' SamModel, SamHQModel, Sam2Model, "
            f"Sam3Model, Sam3TrackerModel or their vision models; sam2's SAM2Base / Hiera), "
            f"but {type(root).__name__} contains no such image encoder")
    if len(hits) > 1:
        raise ValueError(f"model: expected one SAM image encoder, found {len(hits)} "
                         f"(at {', '.join(n for n, _, _ in hits)}); pass the one to adapt")
    return hits[0]


def _check_targets(targets, kind: _EncoderKind) -> Tuple[str, ...]:
    if targets is None:
        return kind.default
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets: expected a list of projection names among "
                        f"{list(kind.projections)}, got {type(targets).__name__} {targets!r}")
    bad = [t for t in targets if t not in kind.projections]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets: {kind.cls.__name__}'s attention has the projections "
                         f"{list(kind.projections)}; expected a non-empty list of them without "
                         f"repeats, got {list(targets)}")
    return tuple(t for t in kind.projections if t in targets)  # the model's order


def _projections_of(block: nn.Module, where: str, kind: _EncoderKind,
                    targets: Sequence[str]) -> List[Tuple[nn.Module, str, nn.Module]]:
    """[(attention module, projection name, the projection)] of an encoder block, looking
    through wrappers."""
    for name, m in block.named_modules():
        if _clean(name) == kind.attention:
            missing = [t for t in targets if not hasattr(m, t)]
            if missing:
                break
            return [(m, t, getattr(m, t)) for t in targets]
    raise ValueError(f"model: the encoder block {where} ({type(block).__name__}) has no "
                     f"{kind.attention}.{' / '.join(targets)} layer")


def _conv_lora_layers(root: nn.Module) -> Dict[str, ConvLoRALinear]:
    return {_clean(n): m for n, m in root.named_modules() if isinstance(m, ConvLoRALinear)}


def _find_mask_decoder(root: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The shallowest submodule named ``mask_decoder`` (Sam and SamModel have one)."""
    hits = [(_clean(n), m) for n, m in root.named_modules()
            if _clean(n).split(".")[-1] == "mask_decoder"]
    return min(hits, key=lambda h: h[0].count(".")) if hits else None


def _config_of(model: nn.Module) -> Tuple[nn.Module, ConvLoRAConfig]:
    root, _, holder = _config_holder(model)
    return root, holder.conv_lora_config


def _config_holder(model: nn.Module) -> Tuple[nn.Module, str, nn.Module]:
    """(unwrapped model, clean name of the module holding conv_lora_config in it, that
    module); raises if apply_conv_lora never ran on the model or a module inside it."""
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, m in root.named_modules():
        if isinstance(getattr(m, "conv_lora_config", None), ConvLoRAConfig):
            return root, _clean(name), m
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
                    train_mask_decoder: bool = True,
                    modules_to_save: Optional[Sequence[Union[str, nn.Module]]] = None,
                    targets: Optional[Sequence[str]] = None,
                    ) -> Dict[str, ConvLoRALinear]:
    """Give the SAM image encoder's blocks Conv-LoRA, in place, and freeze the rest.

    Every block's ``attn.qkv`` (or those of the listed ``blocks``, indices into the
    encoder's block list) becomes ``ConvLoRALinear.from_linear(qkv, r, num_experts, alpha,
    scales, gating, interpolation, backend)``, sharing qkv's weight and bias, so the model's
    output is unchanged until the adapters train. Transformers' SAM 3 ViT has separate
    ``attention.q_proj / k_proj / v_proj``: ``targets`` picks among them (default q_proj and
    v_proj); the other encoders have only "qkv". Each layer takes its map size from its
    input, so Hiera's stages (SAM 2) and windowed blocks need nothing more. Every other parameter is frozen except,
    with ``train_mask_decoder``, the mask decoder's (the paper fine-tunes it fully), and
    those of ``modules_to_save``: modules of the model (given as modules or by their names
    in ``model.named_modules()``) that train fully and are saved with the adapters, such as
    a head of your own or the encoder's neck. New layers take the train/eval mode of the
    layers they replace.

    Call it once, on the model itself (before wrapping it in DistributedDataParallel).
    Returns {name in the model's state_dict: the new ConvLoRALinear}, in block order.
    """
    root = _check_model(model, train_mask_decoder)
    blocks_name, block_list, kind = _find_encoder(root)
    chosen = _check_blocks(blocks, len(block_list))
    targets = _check_targets(targets, kind)
    decoder = _find_mask_decoder(root)
    train_decoder = train_mask_decoder and decoder is not None

    saved = _resolve_modules_to_save(
        root, modules_to_save, [f"{blocks_name}.{i}.{kind.attention}.{t}" for i in chosen
                                for t in targets],
        [decoder[0]] if train_decoder else [])
    # Build every new layer before changing anything, so a bad argument leaves the model
    # as it was.
    options = dict(r=r, num_experts=num_experts, alpha=alpha, scales=scales, gating=gating,
                   interpolation=interpolation, backend=backend)
    plan = [step for i in chosen
            for step in _new_layers(block_list[i], f"{blocks_name}.{i}", kind, targets, options)]

    root.requires_grad_(False)
    for parent, attr, layer in plan:  # the new layers' adapter tensors are trainable
        setattr(parent, attr, layer)
    if train_decoder:
        decoder[1].requires_grad_(True)
    for name in saved:
        root.get_submodule(_raw_name(root, name)).requires_grad_(True)
    first = plan[0][2]
    root.conv_lora_config = ConvLoRAConfig(
        r=first.r, num_experts=first.num_experts, alpha=first.alpha, scales=first.scales,
        gating=first.gating, interpolation=first.interpolation, blocks=chosen,
        train_mask_decoder=train_decoder, modules_to_save=saved, targets=targets)
    return _conv_lora_layers(root)


def _raw_name(root: nn.Module, clean: str) -> str:
    """The named_modules() name (wrapper segments included) of the module named ``clean``."""
    for name, _ in root.named_modules():
        if _clean(name) == clean:
            return name
    raise ValueError(f"model: it has no module {clean!r} any more")


def _inside(name: str, outer: str) -> bool:
    """Whether module ``name`` is ``outer`` or inside it ("" is the whole model)."""
    return outer == "" or name == outer or name.startswith(outer + ".")


def _resolve_modules_to_save(root: nn.Module, modules, adapted: Sequence[str],
                             saved_already: Sequence[str]) -> Tuple[str, ...]:
    """The clean names in root of ``modules`` (names or submodules), or a clear error: not
    in the model, the whole model, holding an adapted layer (its frozen base would train),
    inside what is saved already, or overlapping another entry."""
    if modules is None:
        return ()
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    elif not isinstance(modules, (list, tuple)):
        raise TypeError(f"modules_to_save: expected a list of module names or modules, got "
                        f"{type(modules).__name__}")
    by_name: Dict[str, nn.Module] = {}
    for n, m in root.named_modules():
        by_name.setdefault(_clean(n), m)
    names: List[str] = []
    for item in modules:
        if isinstance(item, str):
            if item not in by_name or item == "":
                top = [n for n in by_name if n and "." not in n]
                raise ValueError(f"modules_to_save: {item!r} is not the name of a module in "
                                 f"{type(root).__name__} (names as model.named_modules() "
                                 f"gives them; its top-level modules: {', '.join(top)})")
            name = item
        elif isinstance(item, nn.Module):
            hits = [n for n, m in by_name.items() if m is item]
            if not hits:
                raise ValueError(f"modules_to_save: the {type(item).__name__} given is not a "
                                 f"module of the model; add it to the model first")
            name = hits[0]
        else:
            raise TypeError(f"modules_to_save: expected module names or modules, got "
                            f"{type(item).__name__} {item!r}")
        if name == "":
            raise ValueError("modules_to_save: the whole model cannot be saved with the "
                             "adapters; name the modules to train (a head, the neck)")
        held = [a for a in adapted if _inside(a, name)]
        if held:
            raise ValueError(f"modules_to_save: {name!r} holds the Conv-LoRA layer {held[0]} "
                             f"({len(held)} in all), whose frozen base weights would then "
                             f"train; name modules outside the adapted blocks")
        for other in list(saved_already) + names:
            if _inside(name, other) or _inside(other, name):
                raise ValueError(f"modules_to_save: {name!r} overlaps {other!r}, which is "
                                 f"saved with the adapters already")
        names.append(name)
    return tuple(names)


def add_modules_to_save(model: nn.Module,
                        modules: Sequence[Union[str, nn.Module]]) -> Tuple[str, ...]:
    """Make modules added after apply_conv_lora (a head, a new decoder) train and be
    saved with the adapters: apply_conv_lora's ``modules_to_save`` for a model already set
    up. Returns every saved module's name. Call it before building the optimizer."""
    _, holder_name, holder = _config_holder(model)
    cfg = holder.conv_lora_config
    adapted = list(_conv_lora_layers(holder))
    found = _find_mask_decoder(holder) if cfg.train_mask_decoder else None
    names = _resolve_modules_to_save(holder, modules, adapted,
                                     ([found[0]] if found else []) + list(cfg.modules_to_save))
    for name in names:
        holder.get_submodule(_raw_name(holder, name)).requires_grad_(True)
    holder.conv_lora_config = dataclasses.replace(
        cfg, modules_to_save=cfg.modules_to_save + names)
    return holder.conv_lora_config.modules_to_save


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


def _new_layers(block: nn.Module, where: str, kind: _EncoderKind, targets, options: dict):
    """[(the attention module, projection name, the ConvLoRALinear to put in its place)]."""
    out = []
    for parent, attr, linear in _projections_of(block, where, kind, targets):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"model: expected block {where}'s {kind.attention}.{attr} to be an "
                            f"nn.Linear, got {type(linear).__name__}")
        layer = ConvLoRALinear.from_linear(linear, **options)
        layer.train(linear.training)
        out.append((parent, attr, layer))
    return out


# --- Switching the adapters off, removing them ------------------------------------------

def _layers_or_raise(model: nn.Module) -> Tuple[nn.Module, Dict[str, ConvLoRALinear]]:
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = _conv_lora_layers(root)
    if not layers:
        raise ValueError(f"model: {type(root).__name__} has no Conv-LoRA layers; call "
                         f"apply_conv_lora(model, ...) first")
    return root, layers


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every Conv-LoRA layer's branch on or off: off, each layer is its frozen
    nn.Linear again (the model computes what it did before apply_conv_lora) and leaves no
    aux loss; the adapters stay in place, trained and saved as before."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__} {enabled!r}")
    for layer in _layers_or_raise(model)[1].values():
        layer.adapter_enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """``with adapters_disabled(model): ...`` runs the model without its Conv-LoRA branches
    (the frozen model, e.g. a baseline next to the fine-tuned one) and restores each
    layer's previous setting on exit."""
    layers = _layers_or_raise(model)[1]
    before = {name: layer.adapter_enabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.adapter_enabled = False
        yield
    finally:
        for name, layer in layers.items():
            layer.adapter_enabled = before[name]


def remove_conv_lora(model: nn.Module) -> Dict[str, nn.Linear]:
    """Undo apply_conv_lora, in place: each ConvLoRALinear becomes an nn.Linear holding its
    base weight and bias (the same tensors, so the model computes what it did before), and
    the Conv-LoRA settings are dropped. requires_grad is left as it is (the rest of the
    model stays frozen). Save the adapters first if you need them. Returns {name: the
    restored nn.Linear}.

    There is no merge: the experts' term s·E(x Aᵀ) Bᵀ is not linear in x, so a layer with
    B A folded into its weight would still compute x Aᵀ, the experts and a rank-r
    up-projection, the same work as the unmerged layer.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("model: remove_conv_lora changes the model's parameters; call it on "
                        "the model itself, not its DistributedDataParallel / DataParallel "
                        "wrapper")
    root, _ = _layers_or_raise(model)
    found = [(n, m) for n, m in root.named_modules() if isinstance(m, ConvLoRALinear)]
    restored: Dict[str, nn.Linear] = {}
    for name, layer in found:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        linear.train(layer.training)
        setattr(parent, attr, linear)
        restored[_clean(name)] = linear
    for m in root.modules():
        if isinstance(getattr(m, "conv_lora_config", None), ConvLoRAConfig):
            del m.conv_lora_config
    return restored


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


# --- Box prompts ------------------------------------------------------------------------

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
    router.w_noise, then the mask decoder's state when it was trainable, then the state of
    each module of ``modules_to_save``."""
    root, holder_name, holder = _config_holder(model)
    cfg = holder.conv_lora_config
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
    for name in cfg.modules_to_save:
        prefix = f"{holder_name}.{name}" if holder_name else name
        module = holder.get_submodule(_raw_name(holder, name))
        for k, v in module.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach()
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
            f"{list(cfg.blocks)}, train_mask_decoder={cfg.train_mask_decoder}, "
            f"modules_to_save={list(cfg.modules_to_save)}); "
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

    root, cfg = _config_of(model)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: the folder {folder} does not exist; create it first "
                                f"(os.makedirs({folder!r}, exist_ok=True))")
    # Copies on the CPU: safetensors refuses tensors that share storage.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model).items()}
    _warn_unsaved_trainables(root, tensors)
    metadata = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION,
                "conv_lora_config": json.dumps(cfg.to_dict())}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _warn_unsaved_trainables(root: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Warn when trainable parameters are left out of the file: a head or module added
    to the model that was never named in modules_to_save would be lost on reload."""
    stray = [_clean(n) for n, p in root.named_parameters()
             if p.requires_grad and _clean(n) not in saved]
    if not stray:
        return
    owners: List[str] = []
    for n in stray:
        owner = n.rpartition(".")[0]
        if owner and not any(_inside(owner, o) for o in owners):
            owners = [o for o in owners if not _inside(o, owner)] + [owner]
    fix = (f"add_modules_to_save(model, {owners!r}) before training (or apply_conv_lora(..., "
           f"modules_to_save={owners!r}))" if owners else "modules_to_save")
    warnings.warn(f"save_adapter: {len(stray)} trainable parameter(s) are neither adapters, "
                  f"the mask decoder nor modules_to_save, and are not saved: "
                  f"{_describe_keys(stray)}; to save them, {fix}; to silence this, freeze "
                  f"them with requires_grad_(False)", UserWarning, stacklevel=3)


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
    raw.setdefault("modules_to_save", [])  # files written before these existed
    raw.setdefault("targets", list(_FUSED_QKV))
    if set(raw) != names:
        raise ValueError(f"path: {path} records the settings {sorted(raw)}, expected "
                         f"{sorted(names)}")
    for key in ("scales", "blocks", "modules_to_save", "targets"):
        raw[key] = tuple(raw[key])
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
                f"apply_conv_lora(model, **read_adapter_config(path))"
                + (" after adding those modules to it" if f.name == "modules_to_save" else ""))
    load_adapter_state_dict(model, tensors)

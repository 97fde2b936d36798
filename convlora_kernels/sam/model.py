"""Conv-LoRA in a SAM model: finding its image encoder and blocks, putting ConvLoRALinear
in their attention projections, switching the adapters off or removing them, the routers'
aux loss and the trainable-parameter count (the package's docstring lists the models)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..modules import ConvLoRALinear

# The trained tensors of one ConvLoRALinear, by their names inside it.
ADAPTER_TENSORS = ("lora_A", "lora_B", "conv_weight", "conv_bias", "router.w_gate",
                   "router.w_noise")
# The projection adapted in encoders with one fused qkv layer (all but transformers' SAM 3).
_FUSED_QKV = ("qkv",)
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


@functools.lru_cache(maxsize=None)
def _warn_eval_mode_once() -> None:
    warnings.warn("aux_loss: every Conv-LoRA layer is in eval mode, so the routers' loss is "
                  "a constant 0 and the routers will not train; call model.train() before "
                  "the training forward (sam_model_registry returns the model in eval mode)",
                  RuntimeWarning, stacklevel=3)

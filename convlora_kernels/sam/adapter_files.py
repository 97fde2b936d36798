"""The adapters as tensors and as safetensors files that record apply_conv_lora's settings:
adapter_state_dict, load_adapter_state_dict, save_adapter, load_adapter, read_adapter_config,
read_base_model."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._files import write_atomically
from .model import (ADAPTER_TENSORS, ConvLoRAConfig, _FUSED_QKV, _clean, _config_holder,
                    _config_of, _conv_lora_layers, _find_mask_decoder, _inside, _raw_name)

# What save_adapter writes into the file's metadata, and load_adapter requires.
FILE_FORMAT = "convlora-kernels-adapter"
FILE_FORMAT_VERSION = "1"


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


def save_adapter(model: nn.Module, path, base_model: Optional[Mapping[str, object]] = None,
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write adapter_state_dict(model) to a safetensors file, with the settings of
    apply_conv_lora in its metadata, and ``base_model`` (a JSON-serialisable description of
    the model the adapters were trained on: its type, checkpoint file and hash, ...) when
    given, for read_base_model. ``state_dict``: those tensors as gathered elsewhere (the
    full tensors of a model whose parameters are sharded over processes), written instead
    of the model's own; it must hold the same names. The file is written beside ``path``
    and renamed into place, so ``path`` is never left half-written."""
    from safetensors.torch import save_file

    root, cfg = _config_of(model)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: the folder {folder} does not exist; create it first "
                                f"(os.makedirs({folder!r}, exist_ok=True))")
    # Copies on the CPU: safetensors refuses tensors that share storage.
    own = adapter_state_dict(model)
    if state_dict is not None:
        if set(state_dict) != set(own):
            raise ValueError(f"state_dict: expected the names adapter_state_dict(model) gives, "
                             f"got {_describe_keys(sorted(set(state_dict) ^ set(own)))} "
                             f"that differ")
        own = {k: state_dict[k] for k in own}
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in own.items()}
    _warn_unsaved_trainables(root, tensors)
    metadata = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION,
                "conv_lora_config": json.dumps(cfg.to_dict())}
    if base_model is not None:
        try:
            metadata["base_model"] = json.dumps(dict(base_model), sort_keys=True)
        except TypeError as e:
            raise ValueError(f"base_model: expected a JSON-serialisable mapping ({e})") from None
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
        head = f.read(9)
    size = os.path.getsize(path)
    # a safetensors file: an 8-byte little-endian header length, then the JSON header (its
    # first byte may be anything, 0x80 included, so it is recognised before the pickles)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (f"path: {path} is a PyTorch checkpoint (torch.save), not an adapter file: "
                f"SAM's own weights load with sam_model_registry[...](checkpoint=...); "
                f"adapter files are the .safetensors files save_adapter writes")
    return (f"path: {path} is not a safetensors file (no valid header), so not an "
            f"adapter file written by save_adapter")


def _checked_path(path) -> str:
    """``path`` as a string, once it can be an adapter file (else the error saying why)."""
    path = os.fspath(path)
    why = _not_an_adapter_file(path)
    if why is not None:
        raise (FileNotFoundError if "does not exist" in why else ValueError)(why)
    return path


def _read_file(path) -> Tuple[ConvLoRAConfig, Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    path = _checked_path(path)
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


def read_base_model(path) -> Optional[dict]:
    """The description of the base model save_adapter recorded in an adapter file
    (``base_model=``), or None for a file saved without one."""
    from safetensors import safe_open

    path = _checked_path(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"path: {path} is not a Conv-LoRA adapter file written by save_adapter")
    return json.loads(meta["base_model"]) if "base_model" in meta else None


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

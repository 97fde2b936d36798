"""The public op ``conv_lora_linear`` and its backend dispatch.

Backends, all computing the function of ``convlora_kernels.reference``:
    "reference"  pure PyTorch, any device
    "cpu"        fused C++ kernels in convlora_kernels._C
    "cuda"       fused CUDA kernels in convlora_kernels._C
    "triton"     fused Triton kernels in convlora_kernels.triton_kernels
The fused ones run the layer of convlora_kernels.layer with the stencil of their module in
convlora_kernels.backends (which also says what each supplies).
    "auto"       the fastest available one for x's device; falls back to
                 "reference" with a one-time warning saying why.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional, Sequence, Tuple

import torch

from . import _ext, backends, layer
from ._compile import constant_under_compile
from .gating import current_scope, router_noise, scoped_aux_loss
from ._versions import autocast_available
from ._validate import as_map, check_inputs, out_shape
from .reference import reference_layer

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# The fused backends in the order "auto" prefers them, per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


@functools.lru_cache(maxsize=None)
def _backend_module(name: str):
    """(the module of fused backend ``name``, None), or (None, why it is missing): a module
    that does not exist means the backend is not part of this version."""
    modname = backends.MODULES[name]
    try:
        return backends.module(name), None
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        return None, (f"the fused {name!r} kernels are not part of this version of "
                      f"convlora-kernels yet; use backend='reference'")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _device_ok(name: str, device: torch.device) -> Optional[str]:
    if name == "triton" and device.type == "cpu" and _ext.triton_interpreter_requested():
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests)
    want = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}.get(name)
    if want is not None and device.type != want:
        return f"backend={name!r} runs on {want} tensors, but x is on {device}"
    return None


def backend_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "reference":
        return None
    reason = _device_ok(name, device)
    if reason:
        return reason
    module, why = _backend_module(name)
    if module is None:
        return why
    return module.unavailable_reason(name, device)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(device_type: str, reasons: Tuple[str, ...]) -> None:
    warnings.warn(
        f"convlora_kernels: no fused backend for {device_type} tensors, using the PyTorch "
        f"reference (slow): " + "; ".join(reasons), RuntimeWarning, stacklevel=4)


# Constant under torch.compile, so the import machinery behind it never enters a graph.
@constant_under_compile
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for ``backend`` on ``device``; raises for an unusable name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        reasons = []
        for name in _AUTO_ORDER.get(device.type, ()):
            why = backend_unavailable_reason(name, device)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        if not reasons:
            reasons.append(f"none is built for device type {device.type!r}")
        _warn_fallback_once(device.type, tuple(reasons))
        return "reference"
    why = backend_unavailable_reason(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available: {why}")
    return backend


# These take the rank, not the Problem: torch.compile cannot hand a dataclass to a function
# whose result it assumes constant.
@constant_under_compile
def unsupported_reason(name: str, rank: int, dtype: torch.dtype,
                       device: torch.device) -> Optional[str]:
    """None when the kernels of backend ``name`` (available on ``device``) can compute a
    call of rank ``rank`` in ``dtype``, else the error they would raise (a rank or dtype
    limit)."""
    if name == "reference":
        return None
    return _backend_module(name)[0].unsupported(rank, dtype, device)


@constant_under_compile
def _auto_falls_back(name: str, rank: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True (with a one-time warning) when "auto" resolved to fused backend ``name`` but its
    kernels cannot compute a call of rank ``rank``: the call then runs on the reference, as
    "auto" promises."""
    why = unsupported_reason(name, rank, dtype, device)
    if why is not None:
        _warn_unsupported_once(name, why)
    return why is not None


@functools.lru_cache(maxsize=None)
def _warn_unsupported_once(name: str, why: str) -> None:
    warnings.warn(f"convlora_kernels: backend='auto' chose {name!r}, whose kernels cannot run "
                  f"this call ({why}); using the PyTorch reference (slow)", RuntimeWarning,
                  stacklevel=5)


def conv_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     lora_A: torch.Tensor, lora_B: torch.Tensor, conv_weight: torch.Tensor,
                     conv_bias: torch.Tensor, expert_index: torch.Tensor, scaling: float, *,
                     scales: Optional[Sequence[int]] = None, interpolation: str = "bilinear",
                     hw: Optional[Tuple[int, int]] = None, backend: str = "auto",
                     z: Optional[torch.Tensor] = None,
                     check_expert_index: bool = True) -> torch.Tensor:
    """Conv-LoRA linear layer: y = x W0ᵀ + b0 + scaling · (z + E_{e_t}(z)) Bᵀ, z = x Aᵀ.

    Args:
        x:            (B, H, W, C_in), or (B, L, C_in) with hw=(H, W) or L a square.
        weight:       (C_out, C_in), the frozen base weight W0.
        bias:         (C_out,) or None.
        lora_A:       (r, C_in), down-projection.
        lora_B:       (C_out, r), up-projection.
        conv_weight:  (n, r, r, 3, 3), expert i's 3x3 conv weight.
        conv_bias:    (n, r).
        expert_index: (B, H, W) integer tensor, each token's expert in [0, n). One
                      expert per map as ``e.view(B, 1, 1).expand(B, H, W)`` (what the map
                      router returns) runs the cpu/cuda backends' map kernels.
        scaling:      alpha / r.
        scales:       n positive integers, expert i's resampling scale; default 1..n.
        interpolation: "bilinear" (default) or "bicubic" (the authors' choice).
        hw:           (H, W) for a (B, L, C_in) input.
        backend:      "auto", "reference", "cpu", "cuda" or "triton".
        z:            optional x Aᵀ already computed (say by the router), shaped like x
                      with r channels; used instead of recomputing it, so lora_A's
                      gradient then flows through z alone.
        check_expert_index: raise a clear error for an expert_index value outside
                      [0, n). On CUDA this reads two numbers back to the host (a
                      synchronisation; skipped during CUDA graph capture and
                      torch.compile). ConvLoRALinear passes False: its router's
                      indices are in range by construction. Unchecked, the fused
                      kernels never read out of range: such a token's output is NaN.

    Returns:
        x.shape[:-1] + (C_out,), in x's dtype. Differentiable in every tensor
        but expert_index.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    name = resolve_backend(backend, x.device)
    tensors = autocast_inputs(x.device.type, x, weight, bias, lora_A, lora_B, conv_weight,
                              conv_bias, z)
    x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, z = tensors
    p = check_inputs(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                     scaling, scales, interpolation, hw, z=z,
                     check_index_values=check_expert_index)
    if backend == "auto" and _auto_falls_back(name, p.rank, x.dtype, x.device):
        name = "reference"
    elif name != "reference":
        _raise_unsupported(name, p.rank, x.dtype, x.device)
    with torch.autocast(x.device.type, enabled=False) if _autocasting(x.device.type) \
            else contextlib.nullcontext():
        args = (p, as_map(x, p), weight, bias, lora_A, lora_B, conv_weight, conv_bias,
                expert_index, scaling, z)
        y = reference_layer(*args) if name == "reference" else \
            layer.conv_lora_linear(name, *args)
    return y.reshape(out_shape(x, p))


def _raise_unsupported(name: str, rank: int, dtype: torch.dtype, device: torch.device) -> None:
    """The error of an explicitly asked fused backend whose kernels cannot compute a call
    (a rank or dtype limit: ``unsupported_reason``)."""
    why = unsupported_reason(name, rank, dtype, device)
    if why is not None:
        raise (TypeError if why.startswith("x:") else ValueError)(why)


def routed_conv_lora_linear(x: torch.Tensor, weight, bias, lora_A, lora_B, conv_weight,
                            conv_bias, router, scaling: float, scales: Sequence[int],
                            interpolation: str, hw: Tuple[int, int], backend: str
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ConvLoRALinear's forward after autocast's casts: (y, aux loss, expert index
    (B, H, W)) of ``router`` (a NoisyTopOneRouter) choosing experts from z = x Aᵀ, then the
    layer on them.

    On a fused backend the router runs inside the layer's custom-op pair
    (convlora_layer.routed_forward), so z's gradient from the router's load term joins the
    stencil's before dx = dz A + dy W0 is formed once. On the reference (or when "auto" falls
    back to it) the router and conv_lora_linear run as they read."""
    name = resolve_backend(backend, x.device)
    b, h, w = hw
    if name != "reference":
        p = check_inputs(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, None,
                         scaling, scales, interpolation, (h, w))
        if backend != "auto" or not _auto_falls_back(name, p.rank, x.dtype, x.device):
            _raise_unsupported(name, p.rank, x.dtype, x.device)
            n = p.num_experts
            units = b if router.gating == "map" else b * h * w
            noise = None
            if router.training and n > 1:  # the draws noisy_top1_fused makes
                noise = router_noise(router, units, n, x.device, b)
            y, expert_index, aux, load = layer.routed_conv_lora_linear(
                name, p, as_map(x, p), weight, bias, lora_A, lora_B, conv_weight, conv_bias,
                router.w_gate, router.w_noise, noise, router.noise_epsilon, router.loss_coef,
                router.gating, scaling)
            if router.training and current_scope().forms_aux:
                # the aux loss the scope asks for (a whole batch's, over processes or
                # passes) from the units' statistics; the op's own is left undifferentiated
                per_unit = expert_index if router.gating == "token" else expert_index[:, 0, 0]
                importance = torch.bincount(per_unit.reshape(-1).long(), minlength=n)
                aux = scoped_aux_loss(router, importance, load, router.loss_coef, own=aux)
            return y.reshape(out_shape(x, p)), aux, expert_index
    z = torch.nn.functional.linear(x.reshape(b, h, w, x.shape[-1]), lora_A)
    expert_index, aux = router(z)
    y = conv_lora_linear(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                         scaling, scales=scales, interpolation=interpolation, hw=(h, w),
                         backend=backend, z=z.reshape(x.shape[:-1] + (lora_A.shape[0],)),
                         check_expert_index=False)
    return y, aux, expert_index


def _autocasting(device_type: str) -> bool:
    return autocast_available(device_type) and \
        torch.is_autocast_enabled(device_type)


def autocast_inputs(device_type: str, *tensors: Optional[torch.Tensor]):
    """Under torch.autocast for ``device_type``: the tensors in the autocast dtype (None
    stays None), so the whole layer runs in that dtype, as F.linear would, with gradients
    flowing back to the originals. Otherwise the tensors unchanged."""
    if not _autocasting(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # anything but a floating tensor passes unchanged, for the checks to name
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


def fused_backend_order(device_type: str) -> Tuple[str, ...]:
    """The fused backends for tensors of ``device_type``, in the order "auto" prefers them
    (whether they can run here or not)."""
    return _AUTO_ORDER.get(device_type, ())


def available_backends(device: torch.device) -> Tuple[str, ...]:
    """The backends that can run on ``device`` here, fastest first, "reference" last."""
    device = torch.device(device)
    names = [n for n in fused_backend_order(device.type)
             if backend_unavailable_reason(n, device) is None]
    return tuple(names) + ("reference",)

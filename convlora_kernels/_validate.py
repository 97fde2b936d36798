"""Argument checks shared by every backend of ``conv_lora_linear``.

Every error names the argument, what was expected and what came. Checks that
need the values of a tensor (the range of ``expert_index``) synchronise with the
device; they are skipped while torch.compile traces, where values do not exist.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

INTERPOLATIONS = ("bilinear", "bicubic")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_SCALE = 16
# The fused backends' largest rank: csrc/convlora_math.h (kMaxRank) sizes the C++/CUDA
# tiles to it (tests/test_errors.py ties the two).
MAX_FUSED_RANK = 64
# The triton backend's: at a padded rank of 64 the stencil's conv dots ([64 tokens, 4·64]
# x [4·64, 64] a conv row, W_e's three rows kept across the tile) need 256-512 KB of shared
# memory a program (compile_check --ranks 64: the forward, the one-kernel forward and the
# grad kernel, every dtype), more than any GPU has (227 KB on H100/H200); at 32, at most
# 160 KB (tests/test_triton.py holds it).
MAX_TRITON_RANK = 32
MAX_EXPERTS = 16


def rank_way_out(r: int) -> str:
    """The backends that run rank r, for an error that refuses it on the triton backend
    (or on a fused backend above MAX_FUSED_RANK)."""
    if r <= MAX_FUSED_RANK:
        return f"backend='cuda' (ranks up to {MAX_FUSED_RANK}), 'auto' or 'reference'"
    return "backend='auto' (which runs the PyTorch reference for this rank) or 'reference'"


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, after the checks."""

    batch: int
    height: int
    width: int
    in_features: int
    out_features: int
    rank: int
    num_experts: int
    scales: Tuple[int, ...]
    interpolation: str


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


def _need_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(t)}")
    return t


def _need_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def normalize_scales(scales, num_experts: int) -> Tuple[int, ...]:
    """``None`` -> (1, 2, ..., n); otherwise n positive integers up to MAX_SCALE."""
    if scales is None:
        if num_experts > MAX_SCALE:
            raise ValueError(
                f"scales: the default scales 1..{num_experts} exceed the largest supported "
                f"scale {MAX_SCALE}; pass scales explicitly")
        return tuple(range(1, num_experts + 1))
    if isinstance(scales, torch.Tensor):
        scales = scales.tolist()
    try:
        items = list(scales)
    except TypeError:
        raise TypeError(f"scales: expected a sequence of {num_experts} positive integers, "
                        f"got {_describe(scales)}") from None
    if len(items) != num_experts:
        raise ValueError(f"scales: expected one scale per expert ({num_experts}, from "
                         f"conv_weight.shape[0]), got {len(items)}: {items!r}")
    out = []
    for i, s in enumerate(items):
        if isinstance(s, bool):
            raise TypeError(f"scales[{i}]: expected a positive integer, got bool {s!r}")
        try:
            v = operator.index(s)
        except TypeError:
            raise TypeError(f"scales[{i}]: expected a positive integer, got "
                            f"{type(s).__name__} {s!r}") from None
        if not 1 <= v <= MAX_SCALE:
            raise ValueError(f"scales[{i}]: expected a positive integer between 1 and "
                             f"{MAX_SCALE}, got {v}")
        out.append(v)
    return tuple(out)


def resolve_hw(x: torch.Tensor, hw) -> Tuple[int, int, int]:
    """(B, H, W) of the feature map that x holds, from x's shape and ``hw``."""
    if x.dim() == 4:
        b, h, w = x.shape[:3]
        if hw is not None:
            hh, ww = _parse_hw(hw)
            if (hh, ww) != (h, w):
                raise ValueError(f"hw: x is a (B, H, W, C) map of H, W = {h}, {w}, "
                                 f"but hw = {(hh, ww)} was given")
    elif x.dim() == 3:
        b, length = x.shape[:2]
        if hw is not None:
            h, w = _parse_hw(hw)
            if h * w != length:
                raise ValueError(f"hw: x is (B, L, C) with L = {length}, but hw = {(h, w)} "
                                 f"gives H*W = {h * w}")
        else:
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"x: a (B, L, C) input needs hw=(H, W) or a square L; "
                                 f"L = {length} is not a perfect square")
            h = w = side
    else:
        raise ValueError(f"x: expected (B, H, W, C_in) or (B, L, C_in), got {x.dim()} "
                         f"dimensions, shape {tuple(x.shape)}")
    if h < 1 or w < 1:
        raise ValueError(f"x: the feature map must have H, W >= 1, got H, W = {h}, {w}")
    return int(b), int(h), int(w)


def _parse_hw(hw) -> Tuple[int, int]:
    try:
        h, w = hw
        return operator.index(h), operator.index(w)
    except (TypeError, ValueError):
        raise TypeError(f"hw: expected a pair of integers (H, W), got {hw!r}") from None


def check_inputs(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                 scaling, scales, interpolation, hw, z=None,
                 check_index_values: bool = True) -> Problem:
    """Every argument of conv_lora_linear checked, each error naming the argument, what was
    expected and what came; the call's sizes as a Problem."""
    x = _need_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16, float32 or float64 tensor, "
                        f"got {x.dtype}")
    batch, height, width = resolve_hw(x, hw)
    c_in = x.shape[-1]
    c_out, rank, n = _check_parameters(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias)
    if expert_index is not None:  # None: a router inside the layer's op picks the experts
        _check_expert_index(expert_index, x, (batch, height, width), n, check_index_values)
    if z is not None:
        _check_z(z, x, rank)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a Python float (alpha / r), got {_describe(scaling)}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}")
    return Problem(batch, height, width, c_in, c_out, rank, n,
                   normalize_scales(scales, n), interpolation)


def _check_parameters(x, weight, bias, lora_A, lora_B, conv_weight,
                      conv_bias) -> Tuple[int, int, int]:
    """The layer's tensors against x and each other: (C_out, r, n)."""
    c_in = x.shape[-1]
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B),
             ("conv_weight", conv_weight), ("conv_bias", conv_bias)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        _need_tensor(name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (the device of x), "
                             f"got one on {t.device}")

    if weight.dim() != 2 or weight.shape[1] != c_in:
        raise ValueError(f"weight: expected shape (C_out, C_in) with C_in = {c_in} "
                         f"(x.shape[-1]), got {tuple(weight.shape)}")
    c_out = weight.shape[0]
    if bias is not None:
        _need_shape("bias", bias, (c_out,), "(C_out,)")
    if lora_A.dim() != 2 or lora_A.shape[1] != c_in or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A: expected shape (r, C_in) with r >= 1 and C_in = {c_in}, "
                         f"got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    _need_shape("lora_B", lora_B, (c_out, rank), "(C_out, r)")
    if conv_weight.dim() != 5 or conv_weight.shape[0] < 1:
        raise ValueError(f"conv_weight: expected shape (n, r, r, 3, 3) with n >= 1 experts, "
                         f"got {tuple(conv_weight.shape)}")
    n = conv_weight.shape[0]
    if n > MAX_EXPERTS:
        raise ValueError(f"conv_weight: at most {MAX_EXPERTS} experts are supported, got "
                         f"n = {n}")
    _need_shape("conv_weight", conv_weight, (n, rank, rank, 3, 3), "(n, r, r, 3, 3)")
    _need_shape("conv_bias", conv_bias, (n, rank), "(n, r)")
    return c_out, rank, n


def _check_expert_index(expert_index, x, bhw, n: int, check_values: bool) -> None:
    expert_index = _need_tensor("expert_index", expert_index)
    if expert_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"expert_index: expected an integer tensor, got {expert_index.dtype}")
    if expert_index.device != x.device:
        raise ValueError(f"expert_index: expected a tensor on {x.device} (the device of x), "
                         f"got one on {expert_index.device}")
    _need_shape("expert_index", expert_index, bhw, "(B, H, W)")
    if check_values and expert_index.numel() > 0 and not _is_tracing() \
            and not _is_capturing(expert_index):
        lo, hi = (int(v) for v in torch.aminmax(expert_index))  # one sync on CUDA
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"expert_index: expected values in [0, {n - 1}] ({n} experts), "
                             f"found {bad}")


def _check_z(z, x, rank: int) -> None:
    _need_tensor("z", z)
    want = tuple(x.shape[:-1]) + (rank,)
    if tuple(z.shape) != want:
        raise ValueError(f"z: expected x Aᵀ, shape x.shape[:-1] + (r,) = {want}, "
                         f"got {tuple(z.shape)}")
    if z.dtype != x.dtype or z.device != x.device:
        raise TypeError(f"z: expected dtype {x.dtype} on {x.device} (those of x), got "
                        f"{z.dtype} on {z.device}")


def _is_tracing() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _is_capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def as_map(x: torch.Tensor, p: Problem) -> torch.Tensor:
    """View x as (B, H, W, C_in) without copying."""
    return x.reshape(p.batch, p.height, p.width, p.in_features) if x.dim() == 3 else x


def out_shape(x: torch.Tensor, p: Problem) -> Tuple[int, ...]:
    return tuple(x.shape[:-1]) + (p.out_features,)

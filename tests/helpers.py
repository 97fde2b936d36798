"""Test helpers: random problems, an independent float64 Conv-LoRA written from the
resampling rules of docs/design.md, and the accuracy rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from convlora_kernels import conv_lora_linear_ref

TRAINABLE = ("x", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias")


@dataclass
class Case:
    """One random problem; tensors() gives the op's positional arguments."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor
    expert_index: torch.Tensor
    scaling: float
    scales: Tuple[int, ...]
    interpolation: str
    extra: Dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.conv_weight,
                self.conv_bias, self.expert_index, self.scaling)

    def kwargs(self):
        return dict(scales=self.scales, interpolation=self.interpolation)

    def to(self, dtype, requires_grad=False) -> "Case":
        def conv(t):
            if t is None:
                return None
            t = t.detach().to(dtype)
            return t.requires_grad_(requires_grad)
        return Case(conv(self.x), conv(self.weight), conv(self.bias), conv(self.lora_A),
                    conv(self.lora_B), conv(self.conv_weight), conv(self.conv_bias),
                    self.expert_index, self.scaling, self.scales, self.interpolation)

    def grad_inputs(self, with_weight=False):
        names = TRAINABLE + (("weight",) if with_weight else ())
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def make_case(batch=2, height=5, width=6, c_in=8, c_out=12, rank=3, scales=(1, 2, 3, 4),
              interpolation="bilinear", gating="token", bias=True, dtype=torch.float64,
              seed=0, device="cpu") -> Case:
    """Random inputs of unit-ish size; lora_B and the conv bias are nonzero so every
    term of the output and every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    n = len(scales)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(batch, height, width, c_in)
    weight = rnd(c_out, c_in, std=1 / math.sqrt(c_in))
    b = rnd(c_out) if bias else None
    lora_A = rnd(rank, c_in, std=1 / math.sqrt(c_in))
    lora_B = rnd(c_out, rank, std=1 / math.sqrt(rank))
    conv_weight = rnd(n, rank, rank, 3, 3, std=1 / math.sqrt(9 * rank))
    conv_bias = rnd(n, rank, std=0.5)
    if gating == "token":
        idx = torch.randint(0, n, (batch, height, width), generator=g).to(device)
    else:  # expanded on the device, as the map router returns it (the map kernels run)
        idx = torch.randint(0, n, (batch, 1, 1), generator=g).to(device).expand(
            batch, height, width)
    return Case(x, weight, b, lora_A, lora_B, conv_weight, conv_bias, idx, 0.75,
                tuple(scales), interpolation)


# --- Independent math: resampling as matrices, written from docs/design.md (Resampling) -------------

def _cubic_weights(t: float, a: float = -0.75):
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return (far(t + 1), near(t), near(1 - t), far(2 - t))


def resample_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix M with out = M @ in along one axis (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    ratio = n_in / n_out
    for d in range(n_out):
        src = (d + 0.5) * ratio - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            i0 = math.floor(src)
            lam = src - i0
            i1 = min(i0 + 1, n_in - 1)
            m[d, i0] += 1 - lam
            m[d, i1] += lam
        elif mode == "bicubic":
            i0 = math.floor(src)
            for k, w in zip(range(-1, 3), _cubic_weights(src - i0)):
                m[d, min(max(i0 + k, 0), n_in - 1)] += w
        else:
            raise ValueError(mode)
    return m


def _conv3x3(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 cross-correlation as a sum of nine shifted maps. t: (B, r, H, W)."""
    h, wd = t.shape[-2:]
    p = torch.nn.functional.pad(t, (1, 1, 1, 1))
    out = b.view(1, -1, 1, 1).expand(t.shape[0], -1, h, wd).clone()
    for dy in range(3):
        for dx in range(3):
            out = out + torch.einsum("oi,bihw->bohw", w[:, :, dy, dx], p[..., dy:dy + h, dx:dx + wd])
    return out


def expert_math(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s: int, mode: str):
    """E_s(z) for z (B, r, H, W) in float64 via explicit matrices."""
    h, wd = z.shape[-2:]
    if s > 1:
        uh, uw = resample_matrix(h, s * h, mode), resample_matrix(wd, s * wd, mode)
        z = torch.einsum("yh,bchw,xw->bcyx", uh, z, uw)
    c = _conv3x3(z, w, b)
    g = 0.5 * c * (1 + torch.erf(c / math.sqrt(2)))
    if s > 1:
        dh, dw = resample_matrix(s * h, h, mode), resample_matrix(s * wd, wd, mode)
        g = torch.einsum("yh,bchw,xw->bcyx", dh, g, dw)
    return g


def conv_lora_math(c: Case) -> torch.Tensor:
    """The layer in float64 from the matrices above, one expert per token by masking."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x = d(c.x)
    y0 = x @ d(c.weight).t() + (0 if c.bias is None else d(c.bias))
    z = x @ d(c.lora_A).t()
    zc = z.permute(0, 3, 1, 2)
    u = z.clone()
    for i, s in enumerate(c.scales):
        e = expert_math(zc, d(c.conv_weight)[i], d(c.conv_bias)[i], s, c.interpolation)
        mask = (c.expert_index == i).unsqueeze(-1)
        u = u + torch.where(mask, e.permute(0, 2, 3, 1), torch.zeros_like(u))
    return y0 + c.scaling * (u @ d(c.lora_B).t())


# --- Reporting and the accuracy rule --------------------------------------------------

def diff_report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}, " \
           f"max |ref| {b.double().abs().max().item():.3e}"


def assert_close(actual, expected, rtol, atol, what=""):
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: not close (rtol={rtol}, atol={atol}): "
                             f"{diff_report(actual, expected)}")


def outputs_and_grads(fn: Callable, case: Case, dy: torch.Tensor, names: Sequence[str]):
    """fn's output and the gradients of ``names`` for the cotangent dy."""
    y = fn(*case.args(), **case.kwargs())
    grads = torch.autograd.grad(y, [getattr(case, n) for n in names],
                                dy.to(device=y.device, dtype=y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def check_accuracy_rule(fn: Callable, case64: Case, dtype: torch.dtype, floor: float,
                        reference: Callable = conv_lora_linear_ref, seed: int = 1):
    """docs/design.md (accuracy rule): err(fn in dtype) <= 2 * err(reference in dtype) + floor, against the
    reference in float64, for the output and every gradient. Raises AssertionError."""
    names = [n for n in TRAINABLE if getattr(case64, n) is not None]
    g = torch.Generator().manual_seed(seed)
    y_shape = case64.x.shape[:-1] + (case64.weight.shape[0],)
    dy = torch.randn(y_shape, generator=g, dtype=torch.float64)
    truth = outputs_and_grads(reference, case64.to(torch.float64, True), dy, names)
    ref_lp = outputs_and_grads(reference, case64.to(dtype, True), dy, names)
    got = outputs_and_grads(fn, case64.to(dtype, True), dy, names)
    for label, t, r, k in zip(["y"] + [f"d{n}" for n in names], truth, ref_lp, got):
        if k.dtype != dtype:
            raise AssertionError(f"{label}: dtype {k.dtype}, expected {dtype}")
        if not torch.isfinite(k).all():
            raise AssertionError(f"{label}: non-finite values")
        err_ref = (r.double() - t).abs().max().item()
        err = (k.double() - t).abs().max().item()
        bound = 2 * err_ref + floor * max(1.0, t.abs().max().item())
        if err > bound:
            raise AssertionError(f"{label}: error {err:.3e} > 2 x reference error {err_ref:.3e} "
                                 f"+ floor ({bound:.3e}); {diff_report(k, t)}")

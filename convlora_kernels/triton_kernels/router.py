"""The noisy top-1 router's forward as one Triton kernel (convlora_kernels.gating has the
math and the reference): per block of routing units, the logits, the noise, the top-1
expert as int32 and per-block sums of the aux loss's statistics (importance and load).

Bytes per call, U units of r features and n experts: the features once (U·r), the noise
once (U·n fp32, in training), the experts out (U·4) and (U/BU)·2·n partial sums (BU from
block_units); one launch plus the partials' sums (torch, deterministic). At SAM's target
(U = 16384 tokens, r = 8, n = 8, bf16): 256 KB + 512 KB + 64 KB + 16 KB."""

import torch
import triton
import triton.language as tl

from .tables import next_pow2



def block_units(rp: int, np_: int) -> int:
    """Routing units per program: the (BU, RP, NP) products of the logits stay near 4K
    values (32 per thread at 4 warps), so no rank or expert count spills."""
    bu = 64
    while bu > 1 and bu * rp * np_ > 4096:
        bu //= 2
    return bu


@triton.jit
def route_kernel(
        f_ptr,        # (U, r) features, row stride stride_f
        wg_ptr,       # (r, n) w_gate, contiguous
        wn_ptr,       # (r, n) w_noise, contiguous
        noise_ptr,    # (U, n) float32 standard normal draws (NOISY)
        expert_ptr,   # (U,) int32 output: the top-1 expert
        imp_ptr,      # (programs, NP) float32 output: units per expert, this block's
        load_ptr,     # (programs, NP) float32 output: P(top-1 under fresh noise) (NOISY)
        U, r, n, noise_epsilon, stride_f,
        BU: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, NOISY: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BU + tl.arange(0, BU)
    rm = rows < U
    ci = tl.arange(0, RP)
    ei = tl.arange(0, NP)
    em = ei < n
    wmask = (ci[:, None] < r) & em[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_f + ci[None, :],
                mask=rm[:, None] & (ci[None, :] < r), other=0.0).to(tl.float32)
    wg = tl.load(wg_ptr + ci[:, None] * n + ei[None, :], mask=wmask, other=0.0).to(tl.float32)
    clean = tl.sum(f[:, :, None] * wg[None, :, :], axis=1)  # (BU, NP)
    if NOISY:
        wn = tl.load(wn_ptr + ci[:, None] * n + ei[None, :], mask=wmask,
                     other=0.0).to(tl.float32)
        raw = tl.sum(f[:, :, None] * wn[None, :, :], axis=1)
        # softplus as torch computes it (beta 1, linear above 20), in a stable form
        soft = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))
        std = tl.where(raw > 20.0, raw, soft) + noise_epsilon
        noise = tl.load(noise_ptr + rows[:, None] * n + ei[None, :],
                        mask=rm[:, None] & em[None, :], other=0.0)
        logits = clean + noise * std
    else:
        logits = clean
    logits = tl.where(em[None, :], logits, float("-inf"))
    top = tl.max(logits, axis=1)
    # the lowest index among equal maxima, as topk picks on ties (zero router weights)
    win = tl.min(tl.where(logits == top[:, None], ei[None, :], NP), axis=1)
    tl.store(expert_ptr + rows, win.to(tl.int32), mask=rm)
    is_win = (ei[None, :] == win[:, None]) & rm[:, None]
    tl.store(imp_ptr + pid * NP + ei, tl.sum(is_win.to(tl.float32), axis=0))
    if NOISY:
        second = tl.max(tl.where(ei[None, :] == win[:, None], float("-inf"), logits), axis=1)
        # expert j is top-1 under fresh noise when it beats the best other noisy logit
        thr = tl.where(ei[None, :] == win[:, None], second[:, None], top[:, None])
        a = (clean - thr) / std
        p = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        p = tl.where(rm[:, None] & em[None, :], p, 0.0)
        tl.store(load_ptr + pid * NP + ei, tl.sum(p, axis=0))


def route(features, w_gate, w_noise, noise, noise_epsilon):
    """(expert (U,) int32, importance (n,) float32, load (n,) float32); noise (U, n) float32
    in noisy training, None otherwise (load is then the importance)."""
    units, rank = features.shape
    n = w_gate.shape[1]
    dev = features.device
    if features.stride(-1) != 1:
        features = features.contiguous()
    rp, np_ = max(2, next_pow2(rank)), max(2, next_pow2(n))
    bu = block_units(rp, np_)
    programs = max(1, triton.cdiv(units, bu))
    expert = torch.empty(units, dtype=torch.int32, device=dev)
    imp = torch.empty((programs, np_), dtype=torch.float32, device=dev)
    load = torch.empty((programs, np_), dtype=torch.float32, device=dev) if noise is not None \
        else imp
    noisy = noise is not None
    route_kernel[(programs,)](
        features, w_gate.contiguous(), w_noise.contiguous(),
        noise.contiguous() if noisy else imp, expert, imp, load, units, rank, n,
        float(noise_epsilon), features.stride(0), BU=bu, RP=rp, NP=np_,
        NOISY=noisy, num_warps=4)
    importance = imp.sum(0)[:n]
    return expert, importance, (load.sum(0)[:n] if noisy else importance.clone())

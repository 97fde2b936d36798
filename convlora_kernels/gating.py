"""Noisy top-1 router (Shazeer et al. 2017) and its load-balancing loss.

For a routing unit with features f (r values):

    clean = f · w_gate
    train: noisy = clean + randn · (softplus(f · w_noise) + noise_epsilon)
    eval:  noisy = clean
    e     = top-1 of noisy   (its softmax gate is exactly 1)
    aux   = loss_coef · (cv²(importance) + cv²(load))

importance = Σ_units gates, i.e. the number of units per expert; load = Σ_units
P(expert is the top-1 under fresh noise) in noisy training, else the same count;
cv²(v) = var(v) / (mean(v)² + 1e-10) with the unbiased variance, and 0 for a
single expert. Gates are not differentiable (a softmax over one logit is the
constant 1), so the router learns only through the load term.

Routing units:
    "token": f = z_t, one expert per token.
    "map":   f = mean of z over the map, one expert per (B, H, W) map; this is the
             behaviour of the authors' autogluon code.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

GRANULARITIES = ("token", "map")


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, 0 for a one-element vector."""
    if v.numel() <= 1:
        return v.new_zeros(())
    v = v.float()
    return v.var() / (v.mean() ** 2 + 1e-10)


def _normal_cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))


def noisy_top1(features: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor,
               training: bool, noise_epsilon: float = 1e-2,
               loss_coef: float = 1e-2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route U units with features (U, r) among n experts (w_gate, w_noise: (r, n)).

    Returns (expert index (U,) int64, aux loss () float32). Logits are computed in
    float32 whatever the feature dtype.
    """
    f = features.float()
    n = w_gate.shape[1]
    clean = f @ w_gate.float()
    noisy_training = training and n > 1
    if noisy_training:
        noise_std = F.softplus(f @ w_noise.float()) + noise_epsilon
        logits = clean + torch.randn_like(clean) * noise_std
    else:
        logits = clean
    # topk, not argmax: ties (all-zero router weights at initialisation) resolve
    # as in the authors' code.
    top_values, top_indices = logits.topk(min(2, n), dim=1)
    expert = top_indices[:, 0]
    gates = F.one_hot(expert, n).float()
    importance = gates.sum(0)
    if noisy_training:
        # P(expert j is the top-1 under fresh noise, the others' noisy logits held):
        # j must beat the best other logit. For the current winner that is the
        # runner-up (top_values[:, 1]); for every other expert it is the winner.
        is_in = logits > top_values[:, 1:2]
        threshold = torch.where(is_in, top_values[:, 1:2], top_values[:, 0:1])
        load = _normal_cdf((clean - threshold) / noise_std).sum(0)
    else:
        load = importance
    aux = loss_coef * (cv_squared(importance) + cv_squared(load))
    return expert, aux


class NoisyTopOneRouter(nn.Module):
    """Chooses one expert per token or per map from z = x Aᵀ.

    forward(z: (B, H, W, r)) -> (expert_index (B, H, W) int64, aux_loss scalar).
    """

    def __init__(self, rank: int, num_experts: int, granularity: str = "token",
                 noise_epsilon: float = 1e-2, loss_coef: float = 1e-2,
                 device=None, dtype=None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"gating: expected one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.noise_epsilon = noise_epsilon
        self.loss_coef = loss_coef
        kw = dict(device=device, dtype=dtype)
        self.w_gate = nn.Parameter(torch.zeros(rank, num_experts, **kw))
        self.w_noise = nn.Parameter(torch.zeros(rank, num_experts, **kw))

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 4:
            raise ValueError(f"z: expected (B, H, W, r), got shape {tuple(z.shape)}")
        b, h, w, r = z.shape
        if self.granularity == "token":
            expert, aux = noisy_top1(z.reshape(-1, r), self.w_gate, self.w_noise,
                                     self.training, self.noise_epsilon, self.loss_coef)
            return expert.view(b, h, w), aux
        expert, aux = noisy_top1(z.mean(dim=(1, 2)), self.w_gate, self.w_noise,
                                 self.training, self.noise_epsilon, self.loss_coef)
        return expert.view(b, 1, 1).expand(b, h, w), aux

    def extra_repr(self) -> str:
        return f"rank={self.w_gate.shape[0]}, num_experts={self.w_gate.shape[1]}, " \
               f"granularity={self.granularity!r}"

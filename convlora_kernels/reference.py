"""Pure-PyTorch Conv-LoRA: the definition of correct for every backend.

Built only from F.linear, F.interpolate, F.conv2d and F.gelu (plus the gather
that picks each token's expert), so a reader can check it against the paper
(Zhong et al., ICLR 2024) and against docs/design.md (The math) line by line. It is also
the "unfused eager PyTorch" peer of the benchmarks: like the authors' code it
upsamples every expert's whole map.

Shapes (channels last):
    x            (B, H, W, C_in)  or (B, L, C_in) with hw=(H, W) or L square
    weight       (C_out, C_in)    frozen base weight W0
    bias         (C_out,) or None
    lora_A       (r, C_in)        down-projection
    lora_B       (C_out, r)       up-projection
    conv_weight  (n, r, r, 3, 3)  expert i's 3x3 conv
    conv_bias    (n, r)
    expert_index (B, H, W)        integer, expert of each token, in [0, n)
    returns      x.shape[:-1] + (C_out,)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._validate import Problem, as_map, check_inputs, out_shape


def expert_map(z: torch.Tensor, conv_weight_i: torch.Tensor, conv_bias_i: torch.Tensor,
               scale: int, interpolation: str) -> torch.Tensor:
    """E_s(z) = Down_s(GELU(Conv3x3(Up_s(z)))) on a whole map.

    z: (B, r, H, W) channels first; returns (B, r, H, W). For s = 1 there is no
    interpolation call at all.
    """
    height, width = z.shape[-2:]
    if scale != 1:
        z = F.interpolate(z, scale_factor=scale, mode=interpolation, align_corners=False)
    h = F.gelu(F.conv2d(z, conv_weight_i, conv_bias_i, padding=1))
    if scale != 1:
        h = F.interpolate(h, size=(height, width), mode=interpolation, align_corners=False)
    return h


def conv_lora_u(z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                expert_index: torch.Tensor, scales: Sequence[int],
                interpolation: str) -> torch.Tensor:
    """u = z + E_{e_t}(z)_t for every token t.

    z: (B, H, W, r); expert_index: (B, H, W); returns u: (B, H, W, r).
    Every expert runs on every map (the unfused way); each token then takes the
    output of its own expert.
    """
    zc = z.permute(0, 3, 1, 2)
    outs = torch.stack([
        expert_map(zc, conv_weight[i], conv_bias[i], s, interpolation)
        for i, s in enumerate(scales)
    ])  # (n, B, r, H, W)
    idx = expert_index.long()[None, :, None].expand(1, -1, z.shape[-1], -1, -1)
    chosen = outs.gather(0, idx).squeeze(0)  # (B, r, H, W)
    return z + chosen.permute(0, 2, 3, 1)


def conv_lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, lora_B: torch.Tensor, conv_weight: torch.Tensor,
                         conv_bias: torch.Tensor, expert_index: torch.Tensor, scaling: float,
                         *, scales: Optional[Sequence[int]] = None,
                         interpolation: str = "bilinear",
                         hw: Optional[Tuple[int, int]] = None,
                         z: Optional[torch.Tensor] = None,
                         check_expert_index: bool = True) -> torch.Tensor:
    """y = x W0ᵀ + b0 + scaling · (z + E_{e_t}(z)) Bᵀ with z = x Aᵀ (shapes: module doc).

    z, when given, is x Aᵀ already computed (x's leading shape, r channels) and is
    used as is. Computes in x's dtype throughout, differentiable in every tensor
    argument but expert_index.
    """
    p = check_inputs(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                     scaling, scales, interpolation, hw, z=z,
                     check_index_values=check_expert_index)
    y = reference_layer(p, as_map(x, p), weight, bias, lora_A, lora_B, conv_weight,
                        conv_bias, expert_index, scaling, z)
    return y.reshape(out_shape(x, p))


def reference_layer(p: Problem, x4: torch.Tensor, weight, bias, lora_A, lora_B, conv_weight,
                    conv_bias, expert_index, scaling,
                    z: Optional[torch.Tensor]) -> torch.Tensor:
    """conv_lora_linear_ref for arguments already checked (p: their Problem) and x4 the
    (B, H, W, C_in) map: y (B, H, W, C_out). The "reference" backend of ops.py."""
    y0 = F.linear(x4, weight, bias)
    z = F.linear(x4, lora_A) if z is None else z.reshape(p.batch, p.height, p.width, p.rank)
    u = conv_lora_u(z, conv_weight, conv_bias, expert_index, p.scales, p.interpolation)
    return y0 + scaling * F.linear(u, lora_B)


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Plain LoRA on the same linear, eager: x W0ᵀ + b0 + scaling · (x Aᵀ) Bᵀ (a benchmark peer)."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)

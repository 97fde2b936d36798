"""Conversion from the authors' Conv-LoRA layer (autogluon.multimodal's ConvLoRALinear).

Its state dict holds, for r ranks, n experts, C_in -> C_out:
    weight (C_out, C_in) [transposed when fan_in_fan_out], bias (C_out,)
    lora_A (r, C_in), lora_B (C_out, r)
    lora_moe_gating.w_gate, lora_moe_gating.w_noise (r, n)
    lora_moe_gating.mean, lora_moe_gating.std (buffers of its Normal, unused here)
    lora_moe_experts.{i}.0.weight (r, r, 3, 3), lora_moe_experts.{i}.0.bias (r,)
Expert i upsamples by i + 1 with bicubic interpolation and routes one expert per map.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch


def _get(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"module_or_state_dict: autogluon ConvLoRALinear key {key!r} is missing "
                       f"(found keys: {sorted(state)[:12]})")
    return state[key]


def from_autogluon_state_dict(state: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False
                              ) -> Tuple[Dict[str, torch.Tensor], Tuple[int, int, int, int, bool]]:
    """Our ConvLoRALinear state dict from autogluon's, and (C_in, C_out, r, n, has_bias)."""
    lora_A = _get(state, "lora_A")
    lora_B = _get(state, "lora_B")
    w_gate = _get(state, "lora_moe_gating.w_gate")
    w_noise = _get(state, "lora_moe_gating.w_noise")
    weight = _get(state, "weight")
    if fan_in_fan_out:
        weight = weight.t()
    r, c_in = lora_A.shape
    c_out = lora_B.shape[0]
    n = w_gate.shape[1]
    if tuple(weight.shape) != (c_out, c_in):
        raise ValueError(f"module_or_state_dict: weight has shape {tuple(weight.shape)}, "
                         f"expected (C_out, C_in) = {(c_out, c_in)} from lora_A and lora_B "
                         f"(fan_in_fan_out={fan_in_fan_out})")
    experts = sorted({k.split(".")[1] for k in state if k.startswith("lora_moe_experts.")},
                     key=int)
    if len(experts) != n:
        raise ValueError(f"module_or_state_dict: lora_moe_gating.w_gate has {n} experts but "
                         f"{len(experts)} lora_moe_experts entries were found")
    conv_weight = torch.stack([_get(state, f"lora_moe_experts.{i}.0.weight") for i in range(n)])
    conv_bias = torch.stack([_get(state, f"lora_moe_experts.{i}.0.bias") for i in range(n)])
    ours = {
        "weight": weight.contiguous(),
        "lora_A": lora_A,
        "lora_B": lora_B,
        "conv_weight": conv_weight,
        "conv_bias": conv_bias,
        "router.w_gate": w_gate,
        "router.w_noise": w_noise,
    }
    has_bias = "bias" in state and state["bias"] is not None
    if has_bias:
        ours["bias"] = state["bias"]
    return ours, (c_in, c_out, r, n, has_bias)

"""ConvLoRALinear: a drop-in for nn.Linear on (B, H, W, C) or (B, L, C) feature maps."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import (INTERPOLATIONS, MAX_EXPERTS, MAX_FUSED_RANK, MAX_TRITON_RANK,
                        normalize_scales, rank_way_out, resolve_hw)
from .gating import NoisyTopOneRouter
from .ops import BACKENDS, autocast_inputs, routed_conv_lora_linear


class ConvLoRALinear(nn.Module):
    """A frozen linear layer plus a Conv-LoRA branch (docs/design.md, The math).

    Parameters (trainable unless noted):
        weight (C_out, C_in), bias (C_out,)   frozen base layer
        lora_A (r, C_in)                      kaiming-uniform(a=sqrt 5)
        lora_B (C_out, r)                     zero
        conv_weight (n, r, r, 3, 3)           nn.Conv2d's default init, per expert
        conv_bias (n, r)                      zero
        router.w_gate, router.w_noise (r, n)  zero

    forward(x) takes (B, H, W, C_in), or (B, L, C_in) with ``hw`` or L a square,
    and returns only the output. The router's aux loss of the last training
    forward is kept on ``.aux_loss`` (None before the first one), and the experts it
    chose in the last forward on ``.expert_index``: (B, H, W) int32, one expert per map
    expanded over the map with gating="map" (on fused backends the router runs inside
    the layer's op, so hooks on ``.router`` do not see it; read this instead).

    ``adapter_enabled`` (True) switches the Conv-LoRA branch: when False, forward is the
    frozen base layer alone, F.linear(x, weight, bias), and leaves no aux loss.

    The paper's terms: ``num_experts`` is its number of experts (each a 3x3 conv on the
    LoRA features); ``scales`` its scaling ratios (expert i upsamples by scales[i], convolves,
    downsamples back); ``gating`` its router granularity ("token": each token picks its
    expert, ours; "map": one expert per feature map, the authors' code); ``aux_loss`` its
    MoE loss (the router's load-balancing term, weighted by the training script).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 3, num_experts: int = 8,
                 alpha: float = 32, scales: Optional[Sequence[int]] = None,
                 gating: str = "token", interpolation: str = "bilinear",
                 backend: str = "auto", bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive integer rank, got {r!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected a positive integer, got {num_experts!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) \
                or not math.isfinite(alpha):
            raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, "
                             f"got {interpolation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        # the limits every call would hit, said now rather than at the first forward
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts: at most {MAX_EXPERTS} experts are supported, "
                             f"got {num_experts}")
        max_rank = MAX_TRITON_RANK if backend == "triton" else MAX_FUSED_RANK
        if r > max_rank and backend in ("cpu", "cuda", "triton"):
            why = (" (above, its stencil kernels need more shared memory than a GPU has)"
                   if backend == "triton" else "")
            raise ValueError(f"r: backend={backend!r} supports ranks up to {max_rank}{why}, "
                             f"got r = {r}; use {rank_way_out(r)}")
        kw = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.num_experts = num_experts
        self.alpha = alpha
        self.scaling = alpha / r
        self.scales = normalize_scales(scales, num_experts)
        self.interpolation = interpolation
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) \
            if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.conv_weight = nn.Parameter(torch.empty(num_experts, r, r, 3, 3, **kw))
        self.conv_bias = nn.Parameter(torch.empty(num_experts, r, **kw))
        self.router = NoisyTopOneRouter(r, num_experts, gating, **kw)
        self.aux_loss: Optional[torch.Tensor] = None
        self.expert_index: Optional[torch.Tensor] = None
        self.adapter_enabled = True
        self.reset_parameters()

    @property
    def gating(self) -> str:
        return self.router.gating

    def reset_parameters(self) -> None:
        """The authors' initialisation; the base layer as nn.Linear's default."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Re-initialise only the trainable Conv-LoRA tensors (the output returns to the base)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        for i in range(self.num_experts):  # per expert: fan_in = r * 3 * 3, as nn.Conv2d
            nn.init.kaiming_uniform_(self.conv_weight[i], a=math.sqrt(5))
        nn.init.zeros_(self.conv_bias)
        nn.init.zeros_(self.router.w_gate)
        nn.init.zeros_(self.router.w_noise)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 3, num_experts: int = 8,
                    alpha: float = 32, scales: Optional[Sequence[int]] = None,
                    gating: str = "token", interpolation: str = "bilinear",
                    backend: str = "auto") -> "ConvLoRALinear":
        """Wrap ``linear``: its weight and bias become this layer's frozen base (shared, not
        copied); the adapter is freshly initialised, so the output starts equal to linear's."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r=r, num_experts=num_experts,
                    alpha=alpha, scales=scales, gating=gating, interpolation=interpolation,
                    backend=backend, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        return layer

    @classmethod
    def from_autogluon(cls, module_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
                       *, alpha: Optional[float] = None, fan_in_fan_out: Optional[bool] = None,
                       backend: str = "auto") -> "ConvLoRALinear":
        """Our layer in compatibility mode (bicubic, map routing, scales 1..n) holding the
        weights of autogluon.multimodal's ``ConvLoRALinear`` (a module or its state dict).

        A state dict does not record ``lora_alpha``: pass ``alpha`` then.
        """
        from .compat import from_autogluon_state_dict

        if isinstance(module_or_state_dict, nn.Module):
            mod = module_or_state_dict
            for attr in ("lora_A", "lora_moe_gating", "lora_moe_experts", "lora_alpha"):
                if not hasattr(mod, attr):
                    raise TypeError(f"module_or_state_dict: expected autogluon's ConvLoRALinear "
                                    f"(with .{attr}), got {type(mod).__name__}")
            if alpha is None:
                alpha = mod.lora_alpha
            if fan_in_fan_out is None:
                fan_in_fan_out = bool(getattr(mod, "fan_in_fan_out", False))
            state = mod.state_dict()
        else:
            state = module_or_state_dict
        if alpha is None:
            raise TypeError("alpha: a state dict does not record autogluon's lora_alpha; "
                            "pass alpha=... (autogluon's scaling is lora_alpha / r)")
        ours, (c_in, c_out, r, n, has_bias) = from_autogluon_state_dict(
            state, fan_in_fan_out=bool(fan_in_fan_out))
        ref = ours["weight"]
        layer = cls(c_in, c_out, r=r, num_experts=n, alpha=alpha, gating="map",
                    interpolation="bicubic", backend=backend, bias=has_bias,
                    device=ref.device, dtype=ref.dtype)
        layer.load_state_dict(ours)
        return layer

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        b, h, w = resolve_hw(x, hw)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected {self.in_features} input features in the last "
                             f"dimension, got shape {tuple(x.shape)}")
        if not self.adapter_enabled:
            if self.training:
                self.aux_loss = None
            self.expert_index = None
            return F.linear(x, self.weight, self.bias)
        params = (self.weight, self.bias, self.lora_A, self.lora_B, self.conv_weight,
                  self.conv_bias)
        # Under autocast the whole layer, router included, runs in the autocast dtype.
        x, *params = autocast_inputs(x.device.type, x, *params)
        weight, bias, lora_A, lora_B, conv_weight, conv_bias = params
        with torch.autocast(x.device.type, enabled=False):
            # The router on z = x Aᵀ, then the layer; on a fused backend both inside one
            # custom-op pair, so x Aᵀ is computed once and the router's gradient joins the
            # layer's before dx is formed (ops.routed_conv_lora_linear).
            y, aux, self.expert_index = routed_conv_lora_linear(
                x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, self.router,
                self.scaling, self.scales, self.interpolation, (b, h, w), self.backend)
            if self.training:
                self.aux_loss = aux
            return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, alpha={self.alpha}, scales={self.scales}, "
                f"gating={self.gating!r}, interpolation={self.interpolation!r}, "
                f"backend={self.backend!r}"
                + ("" if self.adapter_enabled else ", adapter_enabled=False"))

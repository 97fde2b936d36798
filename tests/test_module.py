"""ConvLoRALinear: construction, initialisation, forward paths, training, autocast,
and the conversion from the authors' autogluon layer."""

import math

import pytest
import torch
import torch.nn as nn

from convlora_kernels import ConvLoRALinear

from helpers import Case, assert_close, conv_lora_math

ADAPTER = ("lora_A", "lora_B", "conv_weight", "conv_bias", "router.w_gate", "router.w_noise")


def _layer(c_in=16, c_out=24, **kw):
    torch.manual_seed(0)
    kw.setdefault("backend", "reference")
    return ConvLoRALinear.from_linear(nn.Linear(c_in, c_out), **kw)


def _randomise_adapter(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("lora_B", "conv_bias", "router.w_gate", "router.w_noise"):
            p = layer.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def test_from_linear_defaults_and_initialisation():
    lin = nn.Linear(32, 96)
    layer = ConvLoRALinear.from_linear(lin)
    assert (layer.r, layer.num_experts, layer.alpha, layer.scaling) == (3, 8, 32, 32 / 3)
    assert layer.scales == tuple(range(1, 9))
    assert (layer.gating, layer.interpolation, layer.backend) == ("token", "bilinear", "auto")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(ADAPTER)
    assert layer.conv_weight.shape == (8, 3, 3, 3, 3) and layer.conv_bias.shape == (8, 3)
    assert (layer.lora_B == 0).all() and (layer.conv_bias == 0).all()
    assert (layer.router.w_gate == 0).all() and (layer.router.w_noise == 0).all()
    # kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in): C_in for lora_A, r*9 per expert
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(32)
    assert layer.lora_A.abs().max() > 0.8 / math.sqrt(32)
    assert layer.conv_weight.abs().max() <= 1 / math.sqrt(27)
    assert layer.conv_weight.abs().max() > 0.8 / math.sqrt(27)
    assert "num_experts=8" in repr(layer)


def test_output_equals_linear_at_initialisation():
    layer = _layer()
    lin = nn.Linear(16, 24)
    lin.weight, lin.bias = layer.weight, layer.bias
    x = torch.randn(2, 7, 5, 16)
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("gating", ["token", "map"])
def test_bl_and_bhwc_paths_agree(gating):
    layer = _layer(gating=gating).eval()
    _randomise_adapter(layer)
    x = torch.randn(3, 6, 6, 16)
    y4 = layer(x)
    y3 = layer(x.reshape(3, 36, 16))
    assert y3.shape == (3, 36, 24)
    assert torch.equal(y3.reshape(y4.shape), y4)
    xr = torch.randn(2, 4, 7, 16)
    assert torch.equal(layer(xr.reshape(2, 28, 16), hw=(4, 7)).reshape(2, 4, 7, 24), layer(xr))


@pytest.mark.parametrize("gating", ["token", "map"])
def test_forward_is_router_plus_reference(gating):
    layer = _layer(gating=gating).eval()
    _randomise_adapter(layer)
    x = torch.randn(2, 5, 4, 16)
    z = x @ layer.lora_A.detach().t()
    idx, _ = layer.router(z)
    c = Case(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.conv_weight,
             layer.conv_bias, idx, layer.scaling, layer.scales, layer.interpolation)
    assert_close(layer(x), conv_lora_math(c), 1e-5, 1e-5, "y")


def test_training_step_reaches_every_adapter_tensor():
    layer = _layer(num_experts=4).train()
    _randomise_adapter(layer)
    x = torch.randn(2, 6, 6, 16)
    y = layer(x)
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    (y.square().mean() + layer.aux_loss).backward()
    for name in ADAPTER:
        g = layer.get_parameter(name).grad
        assert g is not None, name
        assert g.abs().sum() > 0, name
    assert layer.weight.grad is None and layer.bias.grad is None


def test_aux_loss_is_that_of_the_last_training_forward():
    layer = _layer()
    assert layer.aux_loss is None
    layer.eval()
    layer(torch.randn(1, 4, 4, 16))
    assert layer.aux_loss is None
    layer.train()
    layer(torch.randn(1, 4, 4, 16))
    first = layer.aux_loss
    layer.eval()
    layer(torch.randn(1, 4, 4, 16))
    assert layer.aux_loss is first


def test_bf16_autocast_runs_in_bf16():
    layer = _layer().eval()
    _randomise_adapter(layer)
    x = torch.randn(2, 5, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # autocast runs the whole layer in bf16: the same as a bf16 copy of the layer
    assert torch.equal(y, layer.to(torch.bfloat16)(x.to(torch.bfloat16)))


def test_module_in_float64_and_no_bias():
    torch.manual_seed(0)
    layer = ConvLoRALinear(8, 12, r=2, num_experts=3, bias=False, dtype=torch.float64,
                           backend="reference")
    assert layer.bias is None
    y = layer(torch.randn(1, 3, 3, 8, dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (1, 3, 3, 12)


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "r: expected a positive integer"),
    (dict(num_experts=0), "num_experts: expected a positive integer"),
    (dict(scales=(1, 2)), "scales: expected one scale per expert"),
    (dict(scales=[1, 2, 0, 4, 5, 6, 7, 8]), r"scales\[2\]: expected a positive integer"),
    (dict(gating="pixel"), "gating: expected one of"),
    (dict(interpolation="nearest"), "interpolation: expected one of"),
    (dict(backend="cudnn"), "backend: expected one of"),
    (dict(num_experts=17, scales=list(range(1, 18))), "num_experts: at most 16 experts"),
    (dict(r=65, backend="cpu"), r"r: backend='cpu' supports ranks up to 64, got r = 65; use "
                                r"backend='auto'"),
    (dict(r=33, backend="triton"), r"r: backend='triton' supports ranks up to 32 \(above, its "
                                   r"stencil kernels need more shared memory than a GPU has\), "
                                   r"got r = 33; use backend='cuda' \(ranks up to 64\)"),
])
def test_bad_construction(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ConvLoRALinear.from_linear(nn.Linear(8, 8), **kw)


def test_auto_runs_the_reference_for_a_rank_the_kernels_lack(recwarn):
    """backend="auto" with r beyond the fused kernels' limit: set-up succeeds, the forward
    and backward run on the reference (same result as backend="reference") with one
    warning that says why; explicit "cpu" refuses at set-up (test_bad_construction)."""
    import warnings

    from convlora_kernels import ops

    ops._warn_unsupported_once.cache_clear()
    auto, ref = _layer(c_in=8, c_out=12, r=65, backend="auto"), \
        _layer(c_in=8, c_out=12, r=65, backend="reference")
    _randomise_adapter(auto)
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ya = auto.eval()(x)
        auto(x)
    said = [str(w.message) for w in caught if "cannot run this call" in str(w.message)]
    assert len(said) == 1 and "ranks up to 64, got r = 65" in said[0], said
    assert torch.equal(ya, ref.eval()(x))
    ya.square().sum().backward()
    assert auto.lora_B.grad is not None and auto.conv_weight.grad is not None


def test_bad_forward_input():
    layer = _layer()
    with pytest.raises(ValueError, match="x: expected 16 input features"):
        layer(torch.randn(1, 4, 4, 15))
    with pytest.raises(ValueError, match="not a perfect square"):
        layer(torch.randn(1, 10, 16))
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        ConvLoRALinear.from_linear(nn.Conv2d(3, 3, 1))


# --- autogluon compatibility ---------------------------------------------------------

def _autogluon_state_dict(c_in=16, c_out=48, r=3, n=4, seed=0, fan_in_fan_out=False):
    """A state dict laid out as autogluon.multimodal's ConvLoRALinear saves it."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    weight = rnd(c_out, c_in)
    sd = {"weight": weight.t().contiguous() if fan_in_fan_out else weight, "bias": rnd(c_out),
          "lora_A": rnd(r, c_in), "lora_B": rnd(c_out, r),
          "lora_moe_gating.w_gate": rnd(r, n), "lora_moe_gating.w_noise": rnd(r, n),
          "lora_moe_gating.mean": torch.tensor([0.0]), "lora_moe_gating.std": torch.tensor([1.0])}
    for i in range(n):
        sd[f"lora_moe_experts.{i}.0.weight"] = rnd(r, r, 3, 3)
        sd[f"lora_moe_experts.{i}.0.bias"] = rnd(r)
    return sd, weight


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_from_autogluon_reproduces_the_authors_math(fan_in_fan_out):
    """Expected output written from autogluon's forward in eval mode: per map, the mean of
    z = x Aᵀ picks argmax(mean · w_gate); expert i (scale i+1) is bicubic up, conv, GELU,
    bicubic down; y = x Wᵀ + b + (alpha / r) (z + E(z)) Bᵀ."""
    sd, weight = _autogluon_state_dict(fan_in_fan_out=fan_in_fan_out)
    layer = ConvLoRALinear.from_autogluon(sd, alpha=32, fan_in_fan_out=fan_in_fan_out,
                                          backend="reference").eval()
    assert (layer.gating, layer.interpolation, layer.scales) == ("map", "bicubic", (1, 2, 3, 4))
    assert layer.scaling == 32 / 3
    torch.manual_seed(3)
    x = torch.randn(5, 6, 7, 16)
    z = x @ sd["lora_A"].t()
    expert = (z.mean((1, 2)) @ sd["lora_moe_gating.w_gate"]).argmax(1)
    assert len(set(expert.tolist())) > 1, "pick a seed that routes maps to several experts"
    c = Case(x, weight, sd["bias"], sd["lora_A"], sd["lora_B"],
             torch.stack([sd[f"lora_moe_experts.{i}.0.weight"] for i in range(4)]),
             torch.stack([sd[f"lora_moe_experts.{i}.0.bias"] for i in range(4)]),
             expert.view(5, 1, 1).expand(5, 6, 7), 32 / 3, (1, 2, 3, 4), "bicubic")
    expected = conv_lora_math(c)
    assert_close(layer(x), expected, 1e-5, 1e-4, "y")
    # (B, L, C) with L square, as autogluon reshapes it
    xs = torch.randn(2, 36, 16)
    ys = layer(xs)
    assert_close(ys.reshape(2, 6, 6, 48), layer(xs.reshape(2, 6, 6, 16)), 0, 0, "(B, L, C)")


def test_from_autogluon_errors():
    sd, _ = _autogluon_state_dict()
    with pytest.raises(TypeError, match="alpha: a state dict does not record"):
        ConvLoRALinear.from_autogluon(sd)
    broken = dict(sd)
    del broken["lora_moe_experts.2.0.bias"]
    with pytest.raises(KeyError, match="lora_moe_experts.2.0.bias"):
        ConvLoRALinear.from_autogluon(broken, alpha=32)
    with pytest.raises(TypeError, match="expected autogluon's ConvLoRALinear"):
        ConvLoRALinear.from_autogluon(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="weight has shape"):
        ConvLoRALinear.from_autogluon(sd, alpha=32, fan_in_fan_out=True)


def test_from_autogluon_module_duck_typed():
    """A module with autogluon's attributes and state dict layout converts without alpha."""
    sd, _ = _autogluon_state_dict(n=3)

    class FakeAutogluon(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_alpha, self.fan_in_fan_out = 6, False
            self.lora_A = nn.Parameter(sd["lora_A"])
            self.lora_moe_gating = nn.Module()
            self.lora_moe_experts = nn.ModuleList()

        def state_dict(self, *a, **k):
            return sd

    layer = ConvLoRALinear.from_autogluon(FakeAutogluon(), backend="reference")
    assert layer.scaling == 2.0 and layer.num_experts == 3
    assert torch.equal(layer.conv_weight[1], sd["lora_moe_experts.1.0.weight"])
    assert torch.equal(layer.router.w_noise, sd["lora_moe_gating.w_noise"])

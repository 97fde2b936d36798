"""The fused "cpu" and "cuda" backends against the reference: forward, every gradient,
shapes, dtypes, strides, registration (opcheck, torch.compile), determinism."""

import pytest
import torch

from convlora_kernels import ConvLoRALinear, conv_lora_linear, conv_lora_linear_ref, ops, plan
from convlora_kernels.backends.extension import stencil

from helpers import TRAINABLE, assert_close, check_accuracy_rule, make_case

HAS_GPU = torch.cuda.is_available()
BACKENDS = [pytest.param("cpu", id="cpu")] + [
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_GPU, reason="needs a CUDA device")])]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.fixture(autouse=True)
def _require_built(request):
    backend = request.node.callspec.params.get("backend", "cpu") \
        if hasattr(request.node, "callspec") else "cpu"
    why = ops.backend_unavailable_reason(backend, torch.device(_device(backend)))
    if why is not None and (backend == "cpu" or HAS_GPU):
        pytest.fail(f"backend {backend!r} should be available here: {why}")


def _fused(backend):
    return lambda *a, **k: conv_lora_linear(*a, **k, backend=backend)


def _compare(case, backend, rtol, atol, names=None):
    """Output and gradients of the fused backend vs the reference, same dtype and inputs."""
    names = names or [n for n in TRAINABLE if getattr(case, n) is not None]
    y = conv_lora_linear(*case.args(), **case.kwargs(), backend=backend)
    yr = conv_lora_linear_ref(*case.args(), **case.kwargs())
    assert_close(y, yr, rtol, atol, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dy = dy.to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [getattr(case, n) for n in names], dy)
    grads_ref = torch.autograd.grad(yr, [getattr(case, n) for n in names], dy)
    for n, a, b in zip(names, grads, grads_ref):
        assert a.dtype == b.dtype, n
        assert_close(a, b, rtol, atol, f"d{n}")


CASES = [
    # (interpolation, gating, (H, W), scales, rank)
    ("bilinear", "token", (5, 6), (1, 2, 3, 4, 5, 6, 7, 8), 3),
    ("bilinear", "token", (1, 1), (1, 2, 3), 3),
    ("bilinear", "token", (1, 7), (2, 5, 16), 1),
    ("bilinear", "map", (6, 1), (1, 2, 3, 4), 8),
    ("bilinear", "token", (13, 17), (3, 1, 4), 20),
    ("bicubic", "map", (14, 14), (1, 2, 3, 4, 5, 6, 7, 8), 3),
    ("bicubic", "token", (5, 7), (2, 16, 1), 8),
    ("bicubic", "token", (2, 3), (4, 3), 33),
]


@pytest.mark.parametrize("mode,gating,hw,scales,rank", CASES)
def test_cpu_float64_matches_reference(mode, gating, hw, scales, rank):
    c = make_case(batch=2, height=hw[0], width=hw[1], rank=rank, scales=scales,
                  interpolation=mode, gating=gating, seed=hw[0] * 7 + rank).to(torch.float64, True)
    _compare(c, "cpu", 1e-10, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,gating,hw,scales,rank", CASES)
def test_float32_accuracy_across_shapes(backend, mode, gating, hw, scales, rank):
    c = make_case(batch=2, height=hw[0], width=hw[1], rank=rank, scales=scales,
                  interpolation=mode, gating=gating, seed=hw[0] * 7 + rank,
                  device=_device(backend))
    check_accuracy_rule(_fused(backend), c, torch.float32, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_refuses_float64():
    c = make_case(seed=1, device="cuda")
    with pytest.raises(TypeError, match="x: the cuda backend takes float32"):
        conv_lora_linear(*c.args(), **c.kwargs(), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3),
                                         (torch.float16, 1e-4)])
@pytest.mark.parametrize("mode,gating", [("bilinear", "token"), ("bicubic", "map")])
def test_accuracy_rule(backend, dtype, floor, mode, gating):
    c = make_case(height=9, width=7, rank=8, interpolation=mode, gating=gating,
                  scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=3, device=_device(backend))
    check_accuracy_rule(_fused(backend), c, dtype, floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
@pytest.mark.parametrize("rank", [8, 3])
def test_accuracy_rule_with_composed_weights(backend, dtype, floor, rank):
    """CONVLORA_STENCIL_MMA=1 (the per-token bilinear forward as tf32 products by composed
    weights, 16-bit dtypes): the same rule as without, at r = 8 and at the module's default
    r = 3 (the same programs, channels 3 to 7 padding)."""
    from convlora_kernels import _switches
    from convlora_kernels.backends import extension

    c = make_case(height=9, width=7, rank=rank, interpolation="bilinear", gating="token",
                  scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=3, device=_device(backend))
    with _switches.forced({extension.MMA_ENV: "1"}):
        check_accuracy_rule(_fused(backend), c, dtype, floor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_x_without_copy_matches(backend):
    dev = _device(backend)
    c = make_case(height=6, width=5, c_in=8, seed=4, device=dev, dtype=torch.float32)
    big = torch.randn(2, 6, 5, 20, device=dev)
    big[..., 4:12] = c.x
    xs = big[..., 4:12]  # rows of 8 channels with a row stride of 20: a GEMM-able view
    assert not xs.is_contiguous()
    args = (xs,) + c.args()[1:]
    y = conv_lora_linear(*args, **c.kwargs(), backend=backend)
    assert torch.equal(y, conv_lora_linear(*c.args(), **c.kwargs(), backend=backend))
    tr = c.x.transpose(1, 2).contiguous().transpose(1, 2)  # a layout that needs a copy
    assert torch.equal(conv_lora_linear(tr, *c.args()[1:], **c.kwargs(), backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bl_input_precomputed_z_and_no_bias(backend):
    dtype, tol = (torch.float64, 1e-11) if backend == "cpu" else (torch.float32, 1e-4)
    c = make_case(height=4, width=4, bias=False, seed=5, device=_device(backend)).to(dtype, True)
    x3 = c.x.reshape(2, 16, -1)
    z = x3 @ c.lora_A.t()
    args = (x3,) + c.args()[1:]
    y = conv_lora_linear(*args, **c.kwargs(), backend=backend, z=z)
    yr = conv_lora_linear_ref(*args, **c.kwargs())
    assert y.shape == (2, 16, 12)
    assert_close(y, yr, tol, tol, "y")
    dy = torch.randn_like(y)
    ga = torch.autograd.grad(y, [c.x, c.lora_A, c.conv_weight], dy)
    gb = torch.autograd.grad(yr, [c.x, c.lora_A, c.conv_weight], dy)
    for n, a, b in zip(["dx", "dlora_A", "dconv_weight"], ga, gb):
        assert_close(a, b, tol, tol, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_when_it_requires_grad(backend):
    dtype, tol = (torch.float64, 1e-10) if backend == "cpu" else (torch.float32, 1e-4)
    c = make_case(seed=6, device=_device(backend)).to(dtype, True)
    c.weight.requires_grad_(True)
    _compare(c, backend, tol, tol, names=["weight", "x"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    c = make_case(batch=0, seed=7, device=_device(backend)).to(torch.float32, True)
    y = conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)
    assert y.shape == (0, 5, 6, 12)
    y.sum().backward()
    for n in TRAINABLE:
        g = getattr(c, n).grad
        assert g is not None and g.shape == getattr(c, n).shape and (g == 0).all(), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_expert_gets_a_gradient(backend):
    c = make_case(scales=(1, 2, 3, 4), seed=8, device=_device(backend)).to(torch.float32, True)
    c.expert_index = torch.zeros_like(c.expert_index)  # experts 1..3 unused
    conv_lora_linear(*c.args(), **c.kwargs(), backend=backend).square().sum().backward()
    assert c.conv_weight.grad[0].abs().sum() > 0
    assert (c.conv_weight.grad[1:] == 0).all() and (c.conv_bias.grad[1:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index(backend):
    c = make_case(scales=(1, 2, 3), seed=9, device=_device(backend), dtype=torch.float32)
    c.expert_index = c.expert_index.clone()
    c.expert_index[1, 2, 3] = 3
    with pytest.raises(ValueError, match=r"expert_index: expected values in \[0, 2\]"):
        conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)
    # unchecked, the kernels never read out of range; only that token is NaN
    y = conv_lora_linear(*c.args(), **c.kwargs(), backend=backend, check_expert_index=False)
    bad = torch.zeros(y.shape[:-1], dtype=torch.bool, device=y.device)
    bad[1, 2, 3] = True
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_repeat_is_bit_identical(backend):
    c = make_case(height=9, width=8, rank=8, scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=10,
                  device=_device(backend)).to(torch.float32, True)
    names = list(TRAINABLE)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            y = conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)
            dy = torch.ones_like(y).cumsum(-1) / 7
            runs.append([y] + list(torch.autograd.grad(y, [getattr(c, n) for n in names], dy)))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_stencil_opcheck():
    c = make_case(height=4, width=5, rank=3, scales=(1, 2, 3), seed=11, dtype=torch.float32)
    z = torch.randn(2 * 20, 3, requires_grad=True)
    idx = c.expert_index.reshape(-1).to(torch.int32)
    w = c.conv_weight.clone().requires_grad_(True)
    b = c.conv_bias.clone().requires_grad_(True)
    stencil(z, idx, w, b, (1, 2, 3), "bilinear", 4, 5)  # registers fakes and autograd
    for mode in (0, 1):
        for save in (False, True):
            torch.library.opcheck(torch.ops.convlora.stencil_fwd.default,
                                  (z, idx, w, b, [1, 2, 3], mode, 4, 5, save))
        _, pre = torch.ops.convlora.stencil_fwd(z.detach(), idx, w.detach(), b.detach(),
                                                [1, 2, 3], mode, 4, 5, True)
        du = torch.randn(40, 3)
        torch.library.opcheck(torch.ops.convlora.stencil_bwd.default,
                              (du, z.detach(), pre, idx, w.detach(), b.detach(), [1, 2, 3], mode,
                               4, 5))
        prep_args = (z.detach(), w.detach(), b.detach(), [1, 2, 3], mode, 4, 5)
        torch.library.opcheck(torch.ops.convlora.stencil_prep.default, prep_args)
        torch.library.opcheck(torch.ops.convlora.stencil_prep.default, prep_args + (True,))
        prep = torch.ops.convlora.stencil_prep(*prep_args)
        torch.library.opcheck(torch.ops.convlora.stencil_fwd.default,
                              (z, idx, w, b, [1, 2, 3], mode, 4, 5, True, 0, prep))
        torch.library.opcheck(torch.ops.convlora.stencil_bwd.default,
                              (du, z.detach(), pre, idx, w.detach(), b.detach(), [1, 2, 3], mode,
                               4, 5, 0, prep))


def test_torch_compile_traces_without_graph_breaks():
    c = make_case(height=4, width=6, seed=12, dtype=torch.float32).to(torch.float32, True)

    def layer(x, lora_A, lora_B, conv_weight, conv_bias):
        return conv_lora_linear(x, c.weight, c.bias, lora_A, lora_B, conv_weight, conv_bias,
                                c.expert_index, c.scaling, **c.kwargs(), backend="cpu")

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    args = (c.x, c.lora_A, c.lora_B, c.conv_weight, c.conv_bias)
    y = compiled(*args)
    yr = layer(*args)
    assert_close(y, yr, 1e-6, 1e-6, "compiled y")
    ga = torch.autograd.grad(y.square().sum(), args)
    gb = torch.autograd.grad(yr.square().sum(), args)
    for n, a, b in zip(["x", "lora_A", "lora_B", "conv_weight", "conv_bias"], ga, gb):
        assert_close(a, b, 1e-5, 1e-5, f"compiled d{n}")


@pytest.mark.parametrize("gating,mode", [("token", "bilinear"), ("map", "bicubic")])
def test_module_training_step_matches_reference_backend(gating, mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 48)
    layers = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(1)
        layer = ConvLoRALinear.from_linear(lin, r=4, num_experts=4, gating=gating,
                                           interpolation=mode, backend=backend).train()
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.router.w_gate.normal_()
            layer.router.w_noise.normal_()
        layers[backend] = layer
    x = torch.randn(2, 6, 6, 16)
    losses = {}
    for backend, layer in layers.items():
        torch.manual_seed(2)
        y = layer(x)
        losses[backend] = y.square().mean() + layer.aux_loss
        losses[backend].backward()
    assert_close(losses["cpu"], losses["reference"], 1e-5, 1e-6, "loss")
    for name, p in layers["cpu"].named_parameters():
        if p.requires_grad:
            q = layers["reference"].get_parameter(name)
            assert p.grad is not None, name
            assert_close(p.grad, q.grad, 1e-4, 1e-5, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_expert(backend):
    """num_experts = 1: the stencil's two weight gradients come from one buffer; the layer's
    backward still returns them as tensors of their own."""
    c = make_case(scales=(3,), seed=15, device=_device(backend)).to(torch.float64, True) \
        if backend == "cpu" else make_case(scales=(3,), seed=15, dtype=torch.float32,
                                           device=_device(backend)).to(torch.float32, True)
    tol = 1e-10 if backend == "cpu" else 1e-4
    _compare(c, backend, tol, tol)


def _module_pair(gating, mode, dtype=torch.float64, r=3, n=4, backend="cpu"):
    """A ConvLoRALinear on a fused backend (router inside the op) and a copy on the
    reference (router outside), every trainable tensor random."""
    torch.manual_seed(3)
    fused = ConvLoRALinear(8, 12, r=r, num_experts=n, gating=gating, interpolation=mode,
                           backend=backend, dtype=dtype, device=_device(backend)).train()
    with torch.no_grad():
        for p in fused.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ref = ConvLoRALinear(8, 12, r=r, num_experts=n, gating=gating, interpolation=mode,
                         backend="reference", dtype=dtype, device=_device(backend)).train()
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _step(layer, x, loss):
    """(output, aux loss, gradients of x and every trainable tensor) of one training step."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(4)  # the same router noise for both layers
    y = layer(x)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(y, layer.aux_loss),
                                [x] + [layer.get_parameter(n) for n in names],
                                materialize_grads=True)  # zeros for tensors aux never uses
    return y, layer.aux_loss, dict(zip(["x"] + names, grads))


@pytest.mark.parametrize("gating,mode", [("token", "bilinear"), ("token", "bicubic"),
                                         ("map", "bilinear"), ("map", "bicubic")])
@pytest.mark.parametrize("part", ["output and aux", "aux alone", "output alone"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_inside_the_op_matches_the_router_outside(gating, mode, part, backend):
    """ConvLoRALinear on a fused backend routes inside the layer's op
    (convlora_layer.routed_forward): the router's dL/dz joins the stencil's before dx and
    dA are formed. Float64 (cuda: float32), every gradient against the reference module,
    whose router runs outside; 'aux alone' differentiates the load term only, so x, lora_A
    and the router get nothing but the router's part."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    fused, ref = _module_pair(gating, mode, dtype=dtype, backend=backend)
    dev = _device(backend)
    x = torch.randn(2, 5, 6, 8, dtype=dtype).to(dev)
    dy = torch.randn(2, 5, 6, 12, dtype=dtype).to(dev)
    if part == "aux alone":
        def loss(y, aux):
            return aux
    elif part == "output alone":  # the router's weights get no gradient
        def loss(y, aux):
            return (y * dy).sum()
    else:
        def loss(y, aux):
            return (y * dy).sum() + 10 * aux
    y, aux, g = _step(fused, x, loss)
    yr, auxr, gr = _step(ref, x, loss)
    # the same experts, kept on the module as (B, H, W) either way
    assert fused.expert_index.shape == ref.expert_index.shape == (2, 5, 6)
    assert fused.expert_index.dtype == torch.int32
    assert torch.equal(fused.expert_index, ref.expert_index)
    if gating == "map":
        assert (fused.expert_index == fused.expert_index[:, :1, :1]).all()
    tight = 1e-12 if dtype == torch.float64 else 1e-5  # float32: the accuracy rule's scale
    assert_close(y, yr, tight, tight, "y")
    assert_close(aux, auxr, 1e-12, 1e-12, "aux")
    assert aux.dtype == auxr.dtype == torch.float32
    # The router's part is float32 in both (the load term's cv² differentiated by hand in
    # the op, by autograd in the reference): float32 rounding of that part, float64 elsewhere.
    for name, gref in gr.items():
        scale = gref.abs().max().item()
        if part == "aux alone" or name.startswith("router.") or dtype == torch.float32:
            assert_close(g[name], gref, 1e-5, 1e-6 * scale, f"d{name}")
        else:
            assert_close(g[name], gref, 1e-10, 1e-7 * scale, f"d{name}")
    # the router's part is there: its weights and lora_A (through z) get gradients
    for name in ("router.w_gate", "router.w_noise", "lora_A", "x"):
        assert (g[name].abs().max() > 0) == (part != "output alone" or
                                             not name.startswith("router.")), name


def test_router_inside_the_op_in_eval_and_single_expert():
    """No noise (eval, or one expert): the load is a count, so the router gets no gradient,
    and the output still matches the reference."""
    for n, train in ((4, False), (1, True)):
        fused, ref = _module_pair("map", "bicubic", n=n)
        fused.train(train)
        ref.train(train)
        x = torch.randn(2, 4, 4, 8, dtype=torch.float64, requires_grad=True)
        assert_close(fused(x), ref(x), 1e-12, 1e-12, "y")
        fused(x).square().sum().backward()
        assert fused.router.w_gate.grad is None and fused.lora_A.grad is not None


def test_routed_ops_opcheck():
    fused, _ = _module_pair("map", "bicubic", dtype=torch.float32)
    x2 = torch.randn(2 * 4 * 5, 8, requires_grad=True)
    params = [fused.weight, fused.bias, fused.lora_A, fused.lora_B, fused.conv_weight,
              fused.conv_bias, fused.router.w_gate, fused.router.w_noise]
    for gating in ("map", "token"):
        units = 2 if gating == "map" else 40
        for noise in (torch.randn(units, 4), None):
            args = (x2, *params, noise, 1e-2, 1e-2, gating, 2.0, list(fused.scales),
                    "bicubic", 4, 5, "cpu", "bias_first", True)
            torch.library.opcheck(torch.ops.convlora_layer.routed_forward.default, args)


@pytest.mark.parametrize("module_backend", ["cpu", "auto"])
def test_module_compiles_to_one_graph_with_the_router_inside(module_backend):
    """Also with backend='auto' (the default), whose fallback check runs once at trace time."""
    fused, _ = _module_pair("token", "bilinear", dtype=torch.float32)
    fused.backend = module_backend
    fused.eval()  # no noise draw: one graph, nothing random
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    yr = fused(x)
    assert_close(y, yr, 1e-6, 1e-6, "compiled y")
    ga = torch.autograd.grad(y.square().sum(), [x, fused.lora_A])
    gb = torch.autograd.grad(yr.square().sum(), [x, fused.lora_A])
    for a, b, n in zip(ga, gb, ("x", "lora_A")):
        assert_close(a, b, 1e-5, 1e-6, f"compiled d{n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_above_64_is_refused(backend):
    c = make_case(rank=65, scales=(1, 2), height=2, width=2, seed=13, device=_device(backend),
                  dtype=torch.float32)
    with pytest.raises(ValueError, match="ranks up to 64, got r = 65"):
        conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)


# --- GPU only: SAM's shapes, bf16, graphs -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(2, 64, 64, 768), (50, 14, 14, 768)], ids=["global", "window"])
@pytest.mark.parametrize("mode,gating,rank", [("bilinear", "token", 8), ("bilinear", "token", 3),
                                              ("bicubic", "map", 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sam_shapes_on_gpu(shape, mode, gating, rank, dtype):
    b, h, w, c_in = shape
    c = make_case(batch=b, height=h, width=w, c_in=c_in, c_out=3 * c_in, rank=rank,
                  scales=tuple(range(1, 9)), interpolation=mode, gating=gating, seed=14,
                  device="cuda")
    check_accuracy_rule(_fused("cuda"), c, dtype, 1e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(2, 64, 64, 768), (50, 14, 14, 768)], ids=["global", "window"])
def test_sam_shapes_on_gpu_with_composed_weights(shape):
    """CONVLORA_STENCIL_MMA=1: bfloat16 at SAM's shapes still meets the accuracy rule."""
    from convlora_kernels import _switches
    from convlora_kernels.backends import extension

    b, h, w, c_in = shape
    c = make_case(batch=b, height=h, width=w, c_in=c_in, c_out=3 * c_in, rank=8,
                  scales=tuple(range(1, 9)), interpolation="bilinear", gating="token", seed=14,
                  device="cuda")
    with _switches.forced({extension.MMA_ENV: "1"}):
        check_accuracy_rule(_fused("cuda"), c, torch.bfloat16, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("prep_stream", ["0", "1"])
def test_cuda_graph_capture(prep_stream):
    """No host synchronisation inside: the layer (forward and backward) can be captured,
    also with its prep on a second stream (CONVLORA_PREP_STREAM=1: fork and join become
    edges of the graph)."""
    from convlora_kernels import _switches
    from convlora_kernels.backends import extension

    c = make_case(height=14, width=14, rank=8, scales=tuple(range(1, 9)), seed=15,
                  device="cuda", dtype=torch.float32).to(torch.float32, True)

    def step():
        with _switches.forced({extension.PREP_STREAM_ENV: prep_stream}):
            y = conv_lora_linear(*c.args(), **c.kwargs(), backend="cuda",
                                 check_expert_index=False)
        return [y] + list(torch.autograd.grad(y.square().sum(), [c.x, c.conv_weight]))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


AUTOCAST_BACKENDS = [
    pytest.param("reference", torch.bfloat16, id="reference-bf16"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    # the interpreter has no bf16 (its tl.dot would multiply the raw 16-bit patterns)
    pytest.param("triton", torch.float16, id="triton-fp16", marks=pytest.mark.triton),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.gpu,
                 pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]),
]


@pytest.mark.parametrize("backend,dtype", AUTOCAST_BACKENDS)
def test_functional_op_under_autocast(backend, dtype):
    """Under torch.autocast the whole layer runs in the autocast dtype: exactly the call on
    inputs cast to it, and every float32 input gets a float32 gradient."""
    from convlora_kernels import ops

    if backend == "triton":
        why = ops.backend_unavailable_reason("triton", torch.device("cpu"))
        if why is not None:
            pytest.skip(why)
    dev = "cuda" if backend == "cuda" else "cpu"
    c = make_case(height=9, width=7, rank=8, scales=tuple(range(1, 9)), seed=16,
                  device=dev).to(torch.float32, True)
    names = list(TRAINABLE)
    with torch.autocast(dev, dtype=dtype):
        y = conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)
    assert y.dtype == dtype
    cast = c.to(dtype, True)
    y_cast = conv_lora_linear(*cast.args(), **cast.kwargs(), backend=backend)
    assert torch.equal(y, y_cast)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(17)).to(dev, dtype)
    grads = torch.autograd.grad(y, [getattr(c, n) for n in names], dy)
    grads_cast = torch.autograd.grad(y_cast, [getattr(cast, n) for n in names], dy)
    for n, g, gc in zip(names, grads, grads_cast):
        assert g.dtype == torch.float32, n
        assert torch.equal(g, gc.float()), n


OUT_OF_RANGE_CASES = [  # (interpolation, deterministic, the bad token's index), n = 8
    ("bilinear", True, 8), ("bilinear", False, -1), ("bicubic", True, 1000),
    ("bicubic", False, 8)]


@pytest.mark.parametrize("backend,forward_plan,triton_backward", [
    pytest.param("cpu", "bias_first", None, id="cpu"),
    pytest.param("triton", "bias_first", "split", id="triton", marks=pytest.mark.triton),
    pytest.param("triton", "one_kernel", "merged", id="triton-one_kernel-merged",
                 marks=pytest.mark.triton),
    pytest.param("cuda", "bias_first", None, id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")])])
@pytest.mark.parametrize("mode,deterministic,bad_value", OUT_OF_RANGE_CASES)
def test_unchecked_out_of_range_expert_reaches_nothing(backend, forward_plan, triton_backward,
                                                        mode, deterministic, bad_value,
                                                        monkeypatch, switch):
    """An unchecked out-of-range index (no poisoning of outputs): that token's output and
    its own dz are NaN; every other token's output and x gradient equal the run where the
    token has a valid expert and no output gradient (so it contributes nothing). The
    one-kernel forward writes y itself: its spare programs must cover the bad token (the
    Triton outputs are pre-filled with a finite value, so a row no kernel wrote shows)."""
    switch(plan.FORWARD_ENV, forward_plan)
    if backend == "triton":
        from convlora_kernels.triton_kernels import launch

        monkeypatch.setattr(launch, "POISON", 7.0)
        switch(launch.BACKWARD_ENV, triton_backward)
        why = ops.backend_unavailable_reason("triton", torch.device("cpu"))
        if why is not None:
            pytest.skip(why)
    dev = _device(backend)
    c = make_case(height=9, width=7, rank=8, scales=tuple(range(1, 9)), interpolation=mode,
                  seed=18, device=dev).to(torch.float32, True)
    bad = torch.zeros(2, 9, 7, dtype=torch.bool, device=dev)
    bad[1, 4, 3] = True
    good_index = c.expert_index.clone()
    good_index[bad] = 5
    dy = torch.randn(2, 9, 7, 12, generator=torch.Generator().manual_seed(19)).to(dev)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        outs = {}
        for name, index, cot in (("bad", good_index.masked_fill(bad, bad_value), dy),
                                 ("good", good_index, dy.masked_fill(bad[..., None], 0))):
            x = c.x.detach().clone().requires_grad_(True)
            y = conv_lora_linear(x, *c.args()[1:7], index, c.scaling, **c.kwargs(),
                                 backend=backend, check_expert_index=False)
            (dx,) = torch.autograd.grad(y, [x], cot)
            outs[name] = (y.detach(), dx)
    finally:
        torch.use_deterministic_algorithms(was)
    (y_bad, dx_bad), (y_good, dx_good) = outs["bad"], outs["good"]
    assert torch.isnan(y_bad[bad]).all() and torch.isnan(dx_bad[bad]).all()
    assert torch.isfinite(y_bad[~bad]).all() and torch.isfinite(dx_bad[~bad]).all()
    assert_close(y_bad[~bad], y_good[~bad], 1e-6, 1e-6, "y of the other tokens")
    assert_close(dx_bad[~bad], dx_good[~bad], 1e-5, 1e-5, "dx of the other tokens")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mma", ["0", "1"])
@pytest.mark.parametrize("routed", [False, True], ids=["op", "module"])
def test_prep_stream_is_the_same_layer(backend, mma, routed, monkeypatch):
    """CONVLORA_PREP_STREAM=1 (the prep pass started before z = x Aᵀ; on CUDA on a second
    stream): the output and every gradient bit for bit those without it, for the layer's op
    and for the module (router inside its op), with and without the composed weights, and
    a forward under no_grad; the forward takes the early prep (EarlyPrep.take hands it
    over), and a bad value is named."""
    from convlora_kernels import _switches
    from convlora_kernels.backends import extension

    taken = []
    take = extension.EarlyPrep.take
    monkeypatch.setattr(extension.EarlyPrep, "take",
                        lambda self, z2: taken.append(take(self, z2)) or taken[-1])
    dtype = torch.bfloat16

    def run(switch):
        with _switches.forced({extension.PREP_STREAM_ENV: switch, extension.MMA_ENV: mma}):
            if routed:
                layer, _ = _module_pair("token", "bilinear", dtype=dtype, r=8, n=8,
                                        backend=backend)
                x = torch.randn(2, 6, 7, 8, generator=torch.Generator().manual_seed(9))
                return _step(layer, x.to(layer.lora_A.device, dtype),
                             lambda y, aux: (y.float() ** 2).sum() + aux)
            c = make_case(height=6, width=7, rank=8, scales=(1, 2, 3, 4, 5, 6, 7, 8),
                          seed=11, device=_device(backend)).to(dtype, True)
            names = [n for n in TRAINABLE if getattr(c, n) is not None]
            y = conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
            grads = torch.autograd.grad(y, [getattr(c, n) for n in names], dy.to(y))
            return y, dict(zip(names, grads))

    off = run("0")
    assert taken == []
    on = run("1")
    assert len(taken) == 1 and isinstance(taken[0], torch.Tensor)  # the early prep ran
    for a, b in zip(torch.utils._pytree.tree_leaves(off), torch.utils._pytree.tree_leaves(on)):
        assert torch.equal(a, b)
    # a forward with no backward to follow (inference) takes it too
    with torch.no_grad():
        c = make_case(height=6, width=7, rank=8, scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=12,
                      device=_device(backend)).to(dtype)
        outs = []
        for switch in ("0", "1"):
            with _switches.forced({extension.PREP_STREAM_ENV: switch, extension.MMA_ENV: mma}):
                outs.append(conv_lora_linear(*c.args(), **c.kwargs(), backend=backend))
    assert len(taken) == 2 and isinstance(taken[1], torch.Tensor)
    assert torch.equal(outs[0], outs[1])
    with _switches.forced({extension.PREP_STREAM_ENV: "yes"}):
        with pytest.raises(ValueError, match="CONVLORA_PREP_STREAM: expected 0 or 1, got 'yes'"):
            conv_lora_linear(*make_case(device=_device(backend)).args(),
                             **make_case().kwargs(), backend=backend)

"""Backend selection, the compiled extension and its torch.library registration."""

import importlib.util
import os
import warnings

import pytest
import torch

import convlora_kernels
from convlora_kernels import BackendUnavailableError, available_backends, conv_lora_linear, ops
from convlora_kernels import _compile, _ext, _testing

from helpers import make_case

HAS_GPU = torch.cuda.is_available()


def test_extension_is_built():
    mod, why = _ext.load()
    assert mod is not None, why


def _cuda_build_expected():
    if torch.version.cuda is None or os.environ.get("CONVLORA_SKIP_CUDA_BUILD", "0") != "0":
        return False
    if os.environ.get("FORCE_CUDA", "0") in ("", "0") and not HAS_GPU:
        return False  # setup.py builds the C++ kernels alone then
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(not _cuda_build_expected(),
                    reason="no GPU and no FORCE_CUDA=1, no CUDA toolkit or a CPU build of "
                           "torch: a C++-only build is right")
def test_cuda_kernels_were_compiled():
    """With nvcc and a CUDA build of torch present, the build must include the CUDA code."""
    assert _ext.has_cuda_kernels(), "convlora_kernels._C was built without its CUDA kernels"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_op_runs_the_shared_math_on_cpu(dtype):
    x = torch.linspace(-6, 6, 2001, dtype=dtype).reshape(3, 667)
    y = _testing.gelu_probe(x)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), rtol=tol, atol=tol)
    # strided input
    torch.testing.assert_close(_testing.gelu_probe(x.t()), torch.nn.functional.gelu(x.t()),
                               rtol=tol, atol=tol)


def test_probe_op_opcheck():
    x = torch.randn(4, 5)
    torch.library.opcheck(torch.ops.convlora.gelu_probe.default, (x,),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_probe_op_on_gpu():
    x = torch.randn(10_000, device="cuda")
    torch.testing.assert_close(_testing.gelu_probe(x), torch.nn.functional.gelu(x))


def _gelu_float64(x):
    """(GELU(x), GELU'(x)) in float64 from math.erf (independent of torch's GELU)."""
    import math

    xd = x.double()
    phi = 0.5 * (1 + torch.tensor([math.erf(v / math.sqrt(2)) for v in xd.tolist()],
                                  dtype=torch.float64))
    return xd * phi, phi + xd * torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)


def _gelu_probe_points(device):
    """Float32 points over [-20, 20]: a dense grid, where the two erfc forms meet (0), the
    tails, and random ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-20, 20, 40_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30]),
                   torch.randn(20_000, generator=g) * 3])
    return x.to(device)


@pytest.mark.parametrize("sixteen_bit,tol", [(True, 5e-7), (False, 1e-6)])
def test_stencil_gelu_and_slope_against_float64(sixteen_bit, tol):
    """The stencils' GELU with its slope (convlora_math.h gelu_and_grad): for 16-bit calls
    the one-exponential form (within 4.3e-7 of float64 over [-20, 20]), for float32 the
    exact one (within float32's rounding of values up to 20); both slopes against the
    derivative Phi(x) + x phi(x), not against each other."""
    x = _gelu_probe_points("cpu")
    y, slope = _testing.gelu_slope_probe(x, sixteen_bit)
    ref, dref = _gelu_float64(x)
    scale = ref.abs().clamp_min(1.0)
    assert ((y.double() - ref).abs() / scale).max().item() <= tol
    assert (slope.double() - dref).abs().max().item() <= tol
    # one pass of code either way: the strided input gives the same values
    xs = torch.stack([x, x], 1)[:, 0]
    assert not xs.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(_testing.gelu_slope_probe(xs, sixteen_bit),
                                                 (y, slope)))


def test_gelu_slope_probe_opcheck():
    torch.library.opcheck(torch.ops.convlora.gelu_slope_probe.default, (torch.randn(4, 5), True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("sixteen_bit,tol", [(True, 5e-7), (False, 1e-6)])
def test_stencil_gelu_and_slope_on_gpu(sixteen_bit, tol):
    """The same on the GPU (its special-function unit's reciprocal and exponential for the
    16-bit form), and within 2e-7 of the CPU's."""
    x = _gelu_probe_points("cuda")
    y, slope = _testing.gelu_slope_probe(x, sixteen_bit)
    ref, dref = _gelu_float64(x.cpu())
    scale = ref.abs().clamp_min(1.0)
    assert ((y.cpu().double() - ref).abs() / scale).max().item() <= tol
    assert (slope.cpu().double() - dref).abs().max().item() <= tol
    yc, sc = _testing.gelu_slope_probe(x.cpu(), sixteen_bit)
    assert ((y.cpu() - yc).abs() / scale.float()).max().item() <= 2e-7
    assert (slope.cpu() - sc).abs().max().item() <= 2e-7


def test_auto_falls_back_to_reference_with_one_warning():
    """Meta tensors have no fused backend: auto warns once, names why, runs the reference."""
    ops._warn_fallback_once.cache_clear()
    c = make_case(dtype=torch.float32, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = conv_lora_linear(*c.args(), **c.kwargs(), check_expert_index=False)
        conv_lora_linear(*c.args(), **c.kwargs(), backend="auto", check_expert_index=False)
    msgs = [str(w.message) for w in caught if "no fused backend" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "meta" in msgs[0] and "reference" in msgs[0]
    assert y1.shape == (2, 5, 6, 12) and y1.device.type == "meta"


def test_auto_takes_the_fused_cpu_backend():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert available_backends("cpu") == ("cpu", "reference")
    c = make_case(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        y = conv_lora_linear(*c.args(), **c.kwargs())
    torch.testing.assert_close(y, conv_lora_linear(*c.args(), **c.kwargs(), backend="reference"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_named_backend_that_cannot_run_says_why(backend):
    c = make_case(dtype=torch.float32)
    reason = ops.backend_unavailable_reason(backend, torch.device("cpu"))
    if reason is None:
        pytest.skip(f"{backend} runs here")
    with pytest.raises(BackendUnavailableError, match=f"backend='{backend}' is not available: "):
        conv_lora_linear(*c.args(), **c.kwargs(), backend=backend)


def test_gpu_backends_refuse_cpu_tensors():
    assert "runs on cuda tensors, but x is on cpu" in \
        ops.backend_unavailable_reason("cuda", torch.device("cpu"))
    assert "runs on cuda tensors" in ops.backend_unavailable_reason("triton", torch.device("cpu"))
    assert available_backends("cpu")[-1] == "reference"


def test_triton_kernels_live_inside_the_package():
    import convlora_kernels.triton_kernels as tk

    assert tk.__name__ == "convlora_kernels.triton_kernels"
    root = os.path.dirname(os.path.dirname(convlora_kernels.__file__))
    assert not os.path.exists(os.path.join(root, "triton_kernels", "__init__.py"))
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or "convlora" not in (spec.origin or "")


def test_private_torch_apis_still_mean_what_we_use_them_for():
    """The two private torch APIs the package relies on, each behind one function
    (_compile.constant_under_compile, _ext.has_cuda_kernels): fail loudly when torch changes
    them. torch.compiler.assume_constant_result must still mark by the attribute we set
    without importing torch._dynamo, and the dispatcher query must still answer."""
    def probe():
        return 1

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert getattr(_compile.constant_under_compile(lambda: 1), "_dynamo_marked_constant") is True
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::add.Tensor", "CPU") is True
    mod, why = _ext.load()  # registers the convlora ops
    assert mod is not None, why
    assert has("convlora::stencil_fwd", "CPU") is True

"""Suite-wide set-up: Triton's interpreter for the Triton tests on machines without a GPU.

Triton runs kernels on CPU tensors through its interpreter when TRITON_INTERPRET=1 is in
the environment. Triton reads the variable when a kernel is defined, that is when the
module holding it is imported, so it must be set before anything imports the Triton
kernels of convlora_kernels. That is why it is set here, at import of the first file
pytest loads, and only when no CUDA device is present: with one, the compiled kernels
run. `import torch` alone does not import triton (test_triton.py checks it), and
torch.cuda.is_available() asks the driver without creating a CUDA context, so nothing
here changes what other tests see at import time, except that triton itself is imported
here (see below).

The variable has a second reader: convlora_kernels.ops lets backend="triton" take CPU
tensors while it is set. Tests that describe the default environment (which backends
refuse CPU tensors, and with which message) must not see it, so it is removed from
os.environ for the duration of every test not marked `triton`. Kernels defined under the
interpreter stay interpreted.
"""

import contextlib
import os

import pytest
import torch

INTERPRETER = not torch.cuda.is_available()
if INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"
    # Triton builds its own @jit library functions (the combine functions of tl.sum,
    # tl.max, ...) when triton is imported, interpreted or not as the variable says then.
    # torch.compile and opcheck import triton too, during tests that run without the
    # variable; import it here, while it is set.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

try:
    import triton  # noqa: F401,E402
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@pytest.fixture(autouse=True)
def _interpreter_only_for_triton_tests(request, monkeypatch):
    if request.node.get_closest_marker("triton") is not None and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRETER and request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


@pytest.fixture
def switch():
    """switch(NAME, value): force the internal switch NAME (convlora_kernels._switches) for
    the rest of the test; value None means not forced, whatever the environment says."""
    from convlora_kernels import _switches

    with contextlib.ExitStack() as stack:
        yield lambda name, value: stack.enter_context(_switches.forced({name: value}))

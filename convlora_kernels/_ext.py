"""Loading of the compiled extension convlora_kernels._C, never at import time of
the package, so a missing or broken build only matters to the backends that need it."""

from __future__ import annotations

import functools
import os
import shutil
from typing import Optional, Tuple

REBUILD = "pip install --no-build-isolation -e .  (from the convlora-kernels checkout)"


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[object], str]:
    """(the _C module or None, why it is missing). Importing _C registers torch.ops.convlora."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return None, (f"the compiled extension convlora_kernels._C could not be imported "
                      f"({e}); rebuild it with: {REBUILD}")
    return _C, ""


def has_cuda_kernels() -> bool:
    """Whether _C was compiled with its CUDA stencil kernels (a CPU-only build registers none).
    Asks the dispatcher through a private torch API (no public one answers "is there a
    CUDA kernel for this op"); tests/test_backends.py fails loudly if it changes."""
    mod, _ = load()
    if mod is None:
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("convlora::stencil_fwd", "CUDA")


def cuobjdump() -> Optional[str]:
    """The CUDA toolkit's cuobjdump (CUDA_HOME, else /usr/local/cuda, else the PATH), else
    the one the triton wheel ships; None without any. Reads the machine code of _C (its
    resources for the tests, its SASS for benchmarks/cost_model.py)."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "cuobjdump")
    except ImportError:
        bundled = None
    for cand in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                              "cuobjdump"), shutil.which("cuobjdump"), bundled):
        if cand and os.path.exists(cand):
            return cand
    return None


def triton_interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET=1 asks Triton to run kernels on CPU tensors (tests); read
    on every call, as Triton reads it when the kernels are first imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"

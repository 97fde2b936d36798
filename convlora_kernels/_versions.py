"""Differences between the torch and Triton releases the package supports (torch 2.11-2.14,
Triton 3.6-3.8), each behind one small function named after what it does. Nothing else in
the package tests a version number."""

from __future__ import annotations

import torch


def _version_tuple(text: str):
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TORCH_VERSION = _version_tuple(torch.__version__)


def autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available(device_type), traceable by Dynamo.

    torch 2.11's Dynamo cannot trace the builtin behind it
    (torch._C._is_autocast_available) and breaks the graph, which fails fullgraph
    compilation; 2.14 traces it (2.12 and 2.13, untested, take the constant too). Autocast
    exists for exactly these device types on every supported release, so the answer is a
    constant of the string (tests/test_versions.py compares it with torch's own)."""
    if TORCH_VERSION >= (2, 14):
        return torch.amp.is_autocast_available(device_type)
    return device_type in _AUTOCAST_DEVICE_TYPES


# The device types torch 2.11 accepts in torch.autocast, with the privateuse1 backend's name
# as it stands when the package is imported.
_AUTOCAST_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "xla", "hpu", "ipu", "mtia",
                                    "maia", torch._C._get_privateuse1_backend_name()})


def patch_triton_interpreter() -> None:
    """Make Triton 3.6's interpreter work with NumPy 2.5 (tests only: the interpreter runs
    kernels on CPU tensors when TRITON_INTERPRET=1).

    The interpreter keeps a kernel's scalar arguments as one-element 1-D arrays and turns
    them into Python ints for ``range(0, n, BLOCK)`` with ``int(array)``, which NumPy 2.5
    refuses for arrays of rank > 0 ("only 0-dimensional arrays can be converted to Python
    scalars"). Triton 3.8 squeezes the array first; this gives 3.6 and 3.7 the same
    ``tensor.__index__`` for the duration of each interpreted launch (the interpreter
    restores the class afterwards, as it does for its own patches). A no-op elsewhere."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if _version_tuple(triton.__version__) >= (3, 8):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_convlora_squeezes", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._convlora_squeezes = True
    interpreter._patch_lang_tensor = _patch_lang_tensor

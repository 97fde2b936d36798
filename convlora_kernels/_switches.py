"""The internal switches (docs/design.md, "Internal switches"): environment variables that
force one candidate of the layer's plan or of the Triton kernels, for timing alternatives
on a GPU and for tests. A leaf module: it imports nothing of the package.

The environment is read once, at the first question asked, so a variable set later in the
process changes nothing; within a process, benchmarks and tests force a value with

    with forced({"CONVLORA_LAYER_FORWARD": "post_add"}):
        ...

(a value of None there means "not forced", whatever the environment says). The values are
returned as given: each reader checks them and names the variable in its error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, List, Mapping, Optional

NAMES = (
    "CONVLORA_LAYER_FORWARD",      # plan.FORWARD_ENV
    "CONVLORA_LAYER_DY",           # plan.DY_ENV
    "CONVLORA_LAYER_DX",           # plan.DX_ENV
    "CONVLORA_MAP_KERNELS",        # backends.extension.MAP_KERNELS_ENV
    "CONVLORA_STENCIL_SMEM_KB",    # backends.extension.SMEM_KB_ENV
    "CONVLORA_STENCIL_MMA",        # backends.extension.MMA_ENV
    "CONVLORA_PREP_STREAM",        # backends.extension.PREP_STREAM_ENV
    "CONVLORA_TRITON_AUTOTUNE",    # triton_kernels.launch.AUTOTUNE_ENV
    "CONVLORA_TRITON_BACKWARD",    # triton_kernels.launch.BACKWARD_ENV
    "CONVLORA_TRITON_Z_CELLS",  # triton_kernels.launch.Z_CELLS_ENV
)

_environment: Optional[Dict[str, str]] = None
_forced: List[Mapping[str, Optional[str]]] = []
_lock = threading.Lock()


def _from_environment() -> Dict[str, str]:
    global _environment
    if _environment is None:
        with _lock:
            if _environment is None:
                _environment = {k: os.environ[k] for k in NAMES if os.environ.get(k)}
    return _environment


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """The value of switch ``name``: the innermost forced() that names it, else the
    environment as it was at the first call, else ``default``."""
    if name not in NAMES:
        raise KeyError(f"{name} is not one of the switches {NAMES}")
    for layer in reversed(_forced):
        if name in layer:
            value = layer[name]
            return default if value is None else value
    return _from_environment().get(name, default)


@contextlib.contextmanager
def forced(values: Mapping[str, Optional[str]]) -> Iterator[None]:
    """Within: get() answers ``values`` for the switches they name (None: not forced)."""
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise KeyError(f"{unknown} are not switches; the switches are {NAMES}")
    entry = dict(values)
    _forced.append(entry)
    try:
        yield
    finally:
        del _forced[next(i for i, e in enumerate(_forced) if e is entry)]

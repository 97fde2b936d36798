"""The layer's plan: which candidate runs its forward, and which its pass over dy
(convlora_kernels.layer describes each candidate).

Forward candidates: "post_add", "bias_first", "one_kernel" (triton only).
Dy candidates:      "two_gemms", "one_pass".

``choose`` answers, in this order: the internal switches CONVLORA_LAYER_FORWARD and
CONVLORA_LAYER_DY when set (for benchmarks/plan_time.py), else the winner measured for the
device type and backend (MEASURED, copied from reports under benchmarks/results/), else
the candidate that moves the fewest bytes in memory-bound passes (``modeled_bytes``;
MEASURED_ONLY never by the model). A candidate the backend cannot run
(its ``candidate_unavailable``) is never chosen.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

from . import _switches, backends
from ._compile import constant_under_compile
from ._validate import Problem

FORWARD_CANDIDATES = ("post_add", "bias_first", "one_kernel")
DY_CANDIDATES = ("two_gemms", "one_pass")
FORWARD_ENV = "CONVLORA_LAYER_FORWARD"
DY_ENV = "CONVLORA_LAYER_DY"

# The winners measured per (device type, backend), each naming the report it was copied
# from (written by benchmarks/plan_time.py). A pair without an entry gets the candidate
# with the fewest modeled bytes.
MEASURED = {
    # benchmarks/results/cpu-ci/plans.json: the 2-core CI machine, fp32, (1, 32, 32) and
    # (1, 64, 64) x 768 -> 2304, r = 8; the same as the modeled choice (no candidate was
    # more than 2% faster than it)
    ("cpu", "cpu"): {FORWARD_ENV: "bias_first", DY_ENV: "one_pass"},
}

# Candidates the byte model cannot rank: the one-kernel forward's base GEMM is a Triton
# kernel, not the vendor BLAS the model takes as compute-bound, and its 64 x 64 tile (the
# stencil shares its registers) re-reads x and W0 from L2 several times more than a
# 128 x 256 BLAS tile does (benchmarks/fused_design.md counts it). Whether that costs more
# than the pass over y it saves, only a GPU can tell: a measurement selects it, the model
# never does.
MEASURED_ONLY = ("one_kernel",)


def modeled_bytes(candidate: str, p: Problem, element_size: int) -> int:
    """Bytes a candidate moves in memory-bound passes, for N = B·H·W tokens.

    A GEMM with K = C_in or C_out is compute-bound on every target (at SAM's sizes its
    arithmetic intensity is far above the machine balance), so an operand its epilogue
    reads or writes costs no time of its own and is not counted; rank-r GEMMs (K = r) and
    elementwise passes are memory-bound and counted in full."""
    n = p.batch * p.height * p.width
    e = element_size
    if candidate == "post_add":    # the rank-r GEMM reads u and y, writes y
        return n * p.rank * e + 2 * n * p.out_features * e
    if candidate == "bias_first":  # the rank-r GEMM reads u, writes C
        return n * p.rank * e + n * p.out_features * e
    if candidate == "one_kernel":  # u (float32) written for the backward
        return n * p.rank * 4
    if candidate == "two_gemms":   # each GEMM reads dy and u-sized operands
        return 2 * n * p.out_features * e + 2 * n * p.rank * (e + 4)
    if candidate == "one_pass":
        return n * p.out_features * e + n * p.rank * (e + 4)
    raise ValueError(f"candidate: expected one of {FORWARD_CANDIDATES + DY_CANDIDATES}, got "
                     f"{candidate!r}")


def by_model(candidates: Sequence[str]) -> str:
    """The candidate with the fewest modeled bytes (never one of MEASURED_ONLY)."""
    # The ranking is the same at every size (each candidate saves whole passes over y or
    # dy against the one before), so one representative problem decides.
    p = Problem(4, 64, 64, 768, 2304, 8, 8, tuple(range(1, 9)), "bilinear")
    return min((c for c in candidates if c not in MEASURED_ONLY),
               key=lambda c: modeled_bytes(c, p, 2))


@functools.lru_cache(maxsize=None)
def unavailable(candidate: str, backend: str) -> Optional[str]:
    """None when ``candidate`` can run for ``backend``, else why not (asked once per pair:
    choose() runs on every call)."""
    return backends.module(backend).candidate_unavailable(candidate, backend)


@constant_under_compile
def choose(backend: str, device_type: str) -> Tuple[str, str]:
    """(forward candidate, dy candidate) for ``backend`` on ``device_type`` (module doc)."""
    chosen = []
    for env, names in ((FORWARD_ENV, FORWARD_CANDIDATES), (DY_ENV, DY_CANDIDATES)):
        forced = _switches.get(env)
        if forced:
            if forced not in names:
                raise ValueError(f"{env}: expected one of {names}, got {forced!r}")
            why = unavailable(forced, backend)
            if why is not None:
                raise ValueError(f"{env}={forced}: {why}")
            chosen.append(forced)
            continue
        measured = MEASURED.get((device_type, backend), {}).get(env)
        if measured in names and unavailable(measured, backend) is None:
            chosen.append(measured)
        else:
            chosen.append(by_model([c for c in names if unavailable(c, backend) is None]))
    return chosen[0], chosen[1]

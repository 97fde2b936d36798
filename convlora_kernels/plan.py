"""The layer's plan: which candidate runs its forward, which its pass over dy, and which
forms dx (convlora_kernels.layer describes each candidate).

Forward candidates: "post_add", "bias_first", "one_kernel" (triton only), "two_source"
                    (cuda, triton).
Dy candidates:      "two_gemms", "one_pass".
Dx candidates:      "accumulate", "two_source" (cuda, triton).

``choose`` answers, in this order: the internal switches CONVLORA_LAYER_FORWARD,
CONVLORA_LAYER_DY and CONVLORA_LAYER_DX when set (for benchmarks/plan_time.py), else the
winner measured for the
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

FORWARD_CANDIDATES = ("post_add", "bias_first", "one_kernel", "two_source")
DY_CANDIDATES = ("two_gemms", "one_pass")
DX_CANDIDATES = ("accumulate", "two_source")
FORWARD_ENV = "CONVLORA_LAYER_FORWARD"
DY_ENV = "CONVLORA_LAYER_DY"
DX_ENV = "CONVLORA_LAYER_DX"
SWITCHES = ((FORWARD_ENV, FORWARD_CANDIDATES), (DY_ENV, DY_CANDIDATES),
            (DX_ENV, DX_CANDIDATES))

# The winners measured per (device type, backend), each naming the report it was copied
# from (written by benchmarks/plan_time.py). A pair without an entry gets the candidate
# with the fewest modeled bytes.
MEASURED = {
    # benchmarks/results/cpu-ci/plans.json: the 2-core CI machine, fp32, (1, 32, 32) and
    # (1, 64, 64) x 768 -> 2304, r = 8; the same as the modeled choice (no candidate was
    # more than 2% faster than it)
    ("cpu", "cpu"): {FORWARD_ENV: "bias_first", DY_ENV: "one_pass"},
}

# Candidates the byte model cannot rank: their big GEMM is a Triton kernel, not the vendor
# BLAS the model takes as compute-bound at its peak. The one-kernel forward's 64 x 64 tile
# (the stencil shares its registers) re-reads x and W0 from L2 several times more than a
# 128 x 256 BLAS tile does (benchmarks/fused_design.md counts it); the two-source GEMMs
# take vendor-sized tiles, but whether Triton's GEMM keeps up with cuBLAS there is a
# measurement too. Whether what they save (a pass over y or dx) outweighs that, only a GPU
# can tell: a measurement selects them, the model never does.
MEASURED_ONLY = ("one_kernel", "two_source")


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
    if candidate == "two_source":  # forward: u read by y's GEMM; dx: dz read by dx's GEMM
        return n * p.rank * e
    if candidate == "accumulate":  # dx = dz A (a rank-r GEMM) writes dx, reads dz
        return n * p.rank * e + n * p.in_features * e
    if candidate == "two_gemms":   # each GEMM reads dy and u-sized operands
        return 2 * n * p.out_features * e + 2 * n * p.rank * (e + 4)
    if candidate == "one_pass":
        return n * p.out_features * e + n * p.rank * (e + 4)
    raise ValueError(f"candidate: expected one of "
                     f"{FORWARD_CANDIDATES + DY_CANDIDATES + DX_CANDIDATES}, got {candidate!r}")


def epilogue_bytes(candidate: str, p: Problem, element_size: int) -> int:
    """Bytes the base GEMM's epilogue reads on top of its own operands for a candidate (C in
    "bias_first", dz A in "accumulate"): DRAM traffic that modeled_bytes leaves out because
    a compute-bound GEMM hides it. modeled_bytes + epilogue_bytes is what a candidate adds
    to the step's DRAM traffic beyond the GEMMs' inputs and outputs."""
    n = p.batch * p.height * p.width
    if candidate == "bias_first":
        return n * p.out_features * element_size
    if candidate == "accumulate":
        return n * p.in_features * element_size
    modeled_bytes(candidate, p, element_size)  # the candidate's name checked
    return 0


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
def choose(backend: str, device_type: str) -> Tuple[str, str, str]:
    """(forward, dy, dx candidates) for ``backend`` on ``device_type`` (module doc)."""
    chosen = []
    for env, names in SWITCHES:
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
    return chosen[0], chosen[1], chosen[2]

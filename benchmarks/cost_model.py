"""What the CUDA stencil kernels cost, counted on the CPU from the code as built.

    python benchmarks/cost_model.py                        # the table, every case
    python benchmarks/cost_model.py --phases               # and each kernel's phases
    python benchmarks/cost_model.py --design docs/design.md   # rewrite the table there
    python benchmarks/cost_model.py --json cost.json
    python benchmarks/cost_model.py --sites "global token r8"   # a case's accesses by line

No GPU is needed. For each case (a SAM shape, routing, rank, interpolation) and each
kernel the stencil ops launch (prep, the tile or map program, fold, reduce):

- shared-memory wavefronts, from the checked CPU build (csrc/smem_trace.h): the block
  programs run on one image or a few windows of the shape, every shared read and write (a
  4-byte word, or the four words of a 128-bit load) recorded per thread and phase with its
  place in the code, the threads grouped into warps of 32, the k-th access of each lane at one
  place taken as one warp instruction (lanes that skip it idle), and each such access
  costing as many wavefronts as the most distinct words one of the 32 banks holds; scaled
  to the SAM shape by its number of blocks. "Per access" is the wavefronts over the fewest
  the accesses' distinct words allow (one per scalar access; a 128-bit load of 32 lanes'
  distinct words needs four);
- instructions, from the machine code of the built extension (nvdisasm -gi of its sm_90
  bf16 cubin: the build has line information), cut at its barriers into the phases' code
  (a barrier ends each phase, in program order) and into basic blocks, each block
  weighted by how often a warp runs it: as often as the checked build counted the warp
  accesses of the source lines of its shared-memory instructions (a line's count shared
  by its copies: unrolled loops), else as often as the most frequent block of the
  innermost loop that holds it, else as the less frequent of the blocks with shared
  accesses before and after it at its depth of loops, else once a warp and run of the
  phase (phase_instructions).
  On the build the first H100 run measured, this gives 0.95 to 1.00 times ncu's warp
  instructions of the same problems (a phase's static ratio of all instructions to shared
  ones, the count before, gave 0.79 to 0.96, and priced code that runs once an item, an
  item's GELUs, at the rate of the conv loop before it). Without nvdisasm: that ratio
  times the phase's counted accesses;
- bytes to and from DRAM (inputs, outputs, saved GELU slopes, partials), counted
  from the shapes;
- the busiest warp's shared accesses per phase, a ~30-clock load each with about four in
  flight (the latency chain of a block when its work sits on a few threads).

An estimated H100 time is the largest of: shared wavefronts at one per clock per SM,
instructions at four per clock per SM, DRAM bytes at 3.35 TB/s, and the latency chain of
each SM's blocks run as many at once as fit (the assumptions are printed with the table).
These are estimates from counting, not measurements; benchmarks/gpu_check.sh prints them
beside the measured stencil times so the model can be corrected. The first H100 run did:
the "H100-fitted" estimate takes each block's critical path (the busiest warp of every
phase) at the clocks per instruction that run measured, and the SM's instructions at the
issue rate it measured (see H100 below).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CHECKED_NS = "convlora_cost"

# The card the estimate is for, and what the estimate assumes of it.
H100 = dict(card="H100 SXM", sms=132, clock_ghz=1.755, dram_bytes_per_s=3.35e12,
            wavefronts_per_clock=1, issue_per_clock=4, shared_latency_clocks=30,
            loads_in_flight=4,
            shared_bytes_per_sm=228 * 1024, block_reserved_bytes=1024, max_blocks_per_sm=32,
            threads_per_sm=2048, registers_per_sm=65536,
            fitted_chain_clocks=6.8, fitted_issue_per_clock=0.95, fitted_small_kernel_us=3.0)
# The H100-fitted estimate, from the first H100 run (benchmarks/results/h100, commit
# 5c20a52), where the tile kernels took 4.5 to 7 times the throughput estimate. Two numbers
# fit its four tile kernels (global and windows token r8, fwd and bwd) within 3 %, with
# that build's instructions counted by basic block (phase_instructions):
# - fitted_chain_clocks: a block takes this many clocks per instruction of its critical
#   path, the busiest warp's instructions of each phase summed over the phases (the
#   barriers wait for it). Three kernels are bound by it and took 6.91, 6.95 and 6.61
#   clocks per such instruction (two blocks of four warps per SM, two warps per
#   scheduler): each warp issues about once per 6.8 clocks, its dependent latencies not
#   hidden.
# - fitted_issue_per_clock: the SM's warp instructions per clock when more warps are
#   resident. The windows forward, four blocks on its busiest SMs, issued 0.95 per clock,
#   not the 4 that issue_per_clock assumes.
# (With each phase's static ratio of instructions to shared ones, the count before, the
# same run gave 9 clocks and 0.85 per clock, within 7 %.) The SM runs its blocks as many at
# once as shared memory, threads and registers allow, in waves; the estimate is the
# largest of the chain of every wave, the instructions at fitted_issue_per_clock, the
# quarter-warp shared time and DRAM. The map kernels (one run at another shape, not refit)
# issued 1.0 to 1.16 per clock; the fit is weakest there.
# - fitted_small_kernel_us: what a small kernel (prep, fold, reduce) takes
#   beyond its DRAM bytes. The second H100 run (benchmarks/results/h100/run2-bench.log,
#   torch.profiler) timed prep_kernel at 3.1-4.0 us for a few KB, fold_kernel at 2.9 us,
#   reduce_dw_kernel at 3.1-3.2 us for 4 maps' partials and at 4.1 and 5.8-5.9 us for the
#   1.4 and 2.2 us of DRAM of the global and windows token r8 partials: DRAM plus 2.9 to
#   3.7 us. The throughput estimate counts DRAM alone.
INTERP = {"bilinear": 0, "bicubic": 1}
MAP_THREADS = 256  # threads per block of the map programs (stencil_grid reports the tile's)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    routing: str        # "token" (per-token programs) or "map" (one expert per map)
    mode: str           # interpolation
    shape: Tuple[int, int, int]   # (B, H, W) at the SAM shape
    rank: int
    counted: Tuple[int, int, int]  # (B, H, W) the checked build runs
    experts: int = 8
    mma: bool = False   # the composed-weight programs (the ops' mma argument)

    @property
    def scales(self) -> List[int]:
        return list(range(1, self.experts + 1))


CASES = [
    # ViT-B global attention at 1024 x 1024, token routing: the target shape
    Case("global token r8", "token", "bilinear", (4, 64, 64), 8, (1, 64, 64)),
    # the same with the composed-weight programs (tf32 MMA; CONVLORA_STENCIL_MMA=1)
    Case("global token r8 mma", "token", "bilinear", (4, 64, 64), 8, (1, 64, 64), mma=True),
    # and at the module's default rank (the same programs: R = 8 at every rank up to 8)
    Case("global token r3 mma", "token", "bilinear", (4, 64, 64), 3, (1, 64, 64), mma=True),
    Case("global token r3", "token", "bilinear", (4, 64, 64), 3, (1, 64, 64)),
    Case("global token r16", "token", "bilinear", (4, 64, 64), 16, (1, 64, 64)),
    Case("global token r8 bicubic", "token", "bicubic", (4, 64, 64), 8, (1, 64, 64)),
    # ViT-B windowed attention: 25 windows of 14 x 14 per image
    Case("windows token r8", "token", "bilinear", (100, 14, 14), 8, (8, 14, 14)),
    # the authors' setting: one expert per map, r = 3, bicubic, 14 x 14 windows
    Case("authors map r3 bicubic", "map", "bicubic", (100, 14, 14), 3, (8, 14, 14)),
    Case("windows map r8", "map", "bilinear", (100, 14, 14), 8, (8, 14, 14)),
]

# Budgets of the estimate (bf16, H100), forward and backward (all of the backward's
# launches), in microseconds.
BUDGETS_US = {
    "global token r8": (8.0, 20.0),
    "authors map r3 bicubic": (15.0, 30.0),
}


# Wavefronts per shared access (over the fewest its words allow) every phase should reach
# (1.0: no bank conflict).
WAVEFRONTS_PER_ACCESS_CEILING = 1.3
# Phases above that today ("case/pass/phase": the ratio they must not exceed) and
# estimates above BUDGETS_US today ("case/pass": us not to exceed), held by
# tests/test_stencil_kernels.py: lower a value when a kernel improves, drop it once it is
# under the ceiling or the budget.
OVER_CEILING: Dict[str, float] = {
    # the forward's combine at 256-item rounds: the lanes of a warp read four tokens' item
    # rows (R + 1 words) at item indices the expert sort scatters; a small phase (~3 % of
    # the block's instructions)
    "global token r8/fwd/combine": 1.46,
    "global token r8/bwd/conv": 1.34,
    # the composed-weight forward's A loads: a warp's 8 tokens' cells, which the key sort
    # scatters over the tile, each in the bank quad of its cell index mod 8 (12 words a
    # cell): ~2.5 tokens in the fullest quad, as 8 balls in 8 bins. The shared-memory
    # pipe's time stays small: 0.7 us at the target, 7.2 us fitted.
    "global token r8 mma/fwd/mma": 2.08,
    # the composed-weight backward's delta stores (a 128-bit store a channel: a quarter
    # warp's 2 places x 4 channel pairs meet in 4 bank quads; the layout serves the mma
    # phase's loads, which are conflict-free) and its out phase (a token's nine dz terms
    # from the places the sort gave its sources, 64-bit loads): 0.3 us of shared-memory
    # time between them at the target
    "global token r8 mma/bwd/delta": 1.89,
    "global token r8 mma/bwd/out": 1.51,
    # the same programs at r = 3: z staged a word a lane (the 16-byte path needs rows of
    # R = 8 channels), a warp's 4 cells 12 words apart overlapping in 4 banks; the other
    # phases as at r = 8
    "global token r3 mma/fwd/load": 1.87,
    "global token r3 mma/fwd/mma": 2.06,
    "global token r3 mma/bwd/load": 1.85,
    "global token r3 mma/bwd/delta": 1.89,
    "global token r3 mma/bwd/out": 1.53,
    "global token r3/fwd/combine": 1.52,
    "global token r3/bwd/conv": 1.33,
    "global token r3/bwd/gather": 1.7,
    "global token r16/bwd/conv": 1.35,
    # bicubic: each source token writes its up to 16 items at its start; starts a multiple
    # of 16 apart share banks (the phase is ~2 % of the forward's instructions)
    "global token r8 bicubic/fwd/list": 2.01,
    "global token r8 bicubic/bwd/list": 1.42,
    # the map backward's weight gradients at 256 threads: more runs of conv rows an input
    # (R = 4: six, three at 128 threads), whose lanes read dC rows of other runs at once
    # (1.27 and 1.24 at 128 threads)
    "authors map r3 bicubic/bwd/dw": 1.32,
    "windows map r8/bwd/dw": 1.32,
    "windows token r8/fwd/combine": 1.38,
    "windows token r8/fwd/conv": 1.31,
    "windows token r8/bwd/conv": 1.36,
}
OVER_BUDGET_US: Dict[str, float] = {
}


# --- the checked build ----------------------------------------------------------------

def build_checked(build_dir: Optional[str] = None):
    """The CPU kernels built with CONVLORA_CHECKED (bounds checks, race checks and the
    shared-memory counts) under torch.ops.convlora_cost."""
    from torch.utils.cpp_extension import load

    if hasattr(torch.ops, CHECKED_NS) and hasattr(getattr(torch.ops, CHECKED_NS), "smem_trace"):
        return getattr(torch.ops, CHECKED_NS)
    build_dir = build_dir or os.path.join(tempfile.gettempdir(), "convlora_cost_build")
    os.makedirs(build_dir, exist_ok=True)
    load(name=CHECKED_NS, sources=[os.path.join(CSRC, "ops.cpp"),
                                   os.path.join(CSRC, "stencil_cpu.cpp")],
         extra_cflags=["-O1", "-g", "-std=c++20", "-DCONVLORA_CHECKED",
                       f"-DCONVLORA_NS={CHECKED_NS}"],
         extra_include_paths=[CSRC], build_directory=build_dir, is_python_module=False,
         verbose=False)
    return getattr(torch.ops, CHECKED_NS)


def _problem(case: Case, seed: int = 0):
    b, h, w = case.counted
    g = torch.Generator().manual_seed(seed)
    n, r, tokens = case.experts, case.rank, b * h * w
    # bf16 activations, as the estimate assumes: the staging's vector width depends on it
    z = torch.randn(tokens, r, generator=g).bfloat16()
    du = torch.randn(tokens, r, generator=g).bfloat16()
    if case.routing == "map":  # every expert (scale) on as many maps
        idx = (torch.arange(b) % n).to(torch.int32)
    else:
        idx = torch.randint(0, n, (tokens,), generator=g, dtype=torch.int32)
    cw = (torch.randn(n, r, r, 3, 3, generator=g) / (3 * r ** 0.5)).bfloat16()
    cb = torch.randn(n, r, generator=g).bfloat16()
    return z, du, idx, cw, cb


def _parse_traffic(text: str) -> List[dict]:
    """smem_traffic()'s report -> one dict per call: blocks, bytes, phases."""
    calls = []
    for line in text.splitlines():
        f = line.split()
        if f[0] == "call":
            calls.append(dict(blocks=int(f[1]), bytes=int(f[2]), phases={}))
        else:
            calls[-1]["phases"][f[0]] = dict(zip(
                ("runs", "lane_accesses", "warp_accesses", "wavefronts", "busiest_warp",
                 "ideal", "quarter_wavefronts", "global_accesses", "mma_ops", "busiest_mma"),
                map(int, f[1:])))
    return calls


def count_shared(ops, case: Case) -> Dict[str, dict]:
    """{"fwd": call, "bwd": call, "sites": the same counts by site (smem_sites' text)} of
    the block programs at case.counted (checked build)."""
    z, du, idx, cw, cb = _problem(case)
    _, h, w = case.counted
    m = INTERP[case.mode]
    ops.smem_trace(True)
    try:
        _, pre = ops.stencil_fwd(z, idx, cw, cb, case.scales, m, h, w, True, 0, None, case.mma)
        ops.stencil_bwd(du, z, pre, idx, cw, cb, case.scales, m, h, w, 0, None, case.mma)
        calls = _parse_traffic(ops.smem_traffic())
        sites = ops.smem_sites()
    finally:
        ops.smem_trace(False)
    if len(calls) != 2:
        raise RuntimeError(f"{case.name}: expected two block-program calls, got {len(calls)}")
    return {"fwd": calls[0], "bwd": calls[1], "sites": sites}


def count_sites(ops, case: Case) -> Dict[str, List[dict]]:
    """{"fwd": [...], "bwd": [...]}: each site's (place in the code, reads or writes) warp
    accesses, wavefronts and ideal per phase, its place resolved to file:line (the checked
    build has debug information)."""
    return parse_sites(count_shared(ops, case)["sites"])


def parse_sites(text: str) -> Dict[str, List[dict]]:
    """smem_sites' text of a forward and a backward call -> count_sites' dict."""
    so = None
    calls: List[List[dict]] = []
    for line in text.splitlines():
        f = line.split(None, 6)
        if f[0] == "library":
            so = f[1] if os.path.exists(f[1]) else None
            continue
        if f[0] == "call":
            calls.append([])
            continue
        calls[-1].append(dict(phase=f[0], rw=f[1], offset=f[2], array=f[6],
                              warp_accesses=int(f[3]), wavefronts=int(f[4]), ideal=int(f[5])))
    offsets = sorted({s["offset"] for c in calls for s in c})
    where = {}
    if so is not None and offsets and shutil.which("addr2line"):
        # -i prints the inlined chain, innermost first; -a marks each address's start
        out = subprocess.run(["addr2line", "-a", "-i", "-e", so] + offsets,
                             capture_output=True, text=True).stdout
        addr = None
        for ln in out.splitlines():
            if ln.startswith("0x"):
                addr = ln
                continue
            loc = ln.split(" (")[0]
            if addr is not None and "shared_array.h" not in loc and ":" in loc:
                f, n = loc.rsplit(":", 1)  # file:line, as sass_lines names an instruction's
                where.setdefault(int(addr, 16), f"{os.path.basename(f)}:{n}")
    for c in calls:
        for s in c:
            s["line"] = where.get(int(s["offset"], 16), s["offset"])
    return {"fwd": calls[0], "bwd": calls[1]}


def site_table(sites: Dict[str, List[dict]], conflicted: bool = True) -> List[str]:
    """A case's sites (only those with bank conflicts when `conflicted`), most wavefronts
    beyond the fewest first."""
    out = ["| pass | phase | r/w | array | line | warp accesses | wavefronts | per access |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for direction, ss in sites.items():
        merged: Dict[tuple, dict] = {}
        for s in ss:  # one line may hold several sites (unrolled copies)
            k = (s["phase"], s["rw"], s["array"], s["line"])
            m = merged.setdefault(k, dict(warp_accesses=0, wavefronts=0, ideal=0))
            for f in ("warp_accesses", "wavefronts", "ideal"):
                m[f] += s[f]
        for (phase, rw, array, line), m in merged.items():
            rows.append((m["wavefronts"] - m["ideal"], direction, phase, rw, array, line, m))
    rows.sort(key=lambda t: -t[0])
    for excess, direction, phase, rw, array, line, m in rows:
        if conflicted and excess <= 0:
            continue
        out.append(f"| {direction} | {phase} | {rw} | {array} | {line} | "
                   f"{m['warp_accesses']:,} | {m['wavefronts']:,} | "
                   f"{m['wavefronts'] / max(1, m['ideal']):.2f} |")
    return out


# --- the SASS ----------------------------------------------------------------------

def _demangle(names: List[str]) -> List[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [re.sub(r"\(.*", "", o.replace("convlora::", "").replace("cuda_kernels::", ""))
            for o in out]


@functools.lru_cache(maxsize=None)
def sass_counts(arch: int = 90) -> Dict[str, Dict[str, int]]:
    """{demangled kernel: {"total", "shared", "lds", "sts", "ffma", "bar", "ldg", "stg"}}
    static instruction counts of the built extension's machine code for sm_<arch>
    ({} when the extension has no CUDA kernels or cuobjdump is missing)."""
    from convlora_kernels import _ext

    mod, _ = _ext.load()
    tool = _ext.cuobjdump()
    if mod is None or tool is None or not _ext.has_cuda_kernels():
        return {}
    out = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", mod.__file__],
                         capture_output=True, text=True).stdout
    counts: Dict[str, Dict[str, int]] = {}
    names: List[str] = []
    cur = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            names.append(m.group(1))
            cur = counts.setdefault(m.group(1), dict(total=0, shared=0, lds=0, sts=0, ffma=0,
                                                     bar=0, ldg=0, stg=0, nc=0, mma=0,
                                                     segments=[]))
            seg = dict(total=0, shared=0, nc=0, mma=0)
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m is None or cur is None:
            continue
        op = m.group(1).split(".")[0]
        if op == "NOP":
            continue
        cur["total"] += 1
        seg["total"] += 1
        for key, ops in (("lds", ("LDS", "LDSM")), ("sts", ("STS",)), ("ffma", ("FFMA",)),
                         ("bar", ("BAR",)), ("ldg", ("LDG",)), ("stg", ("STG",))):
            if op in ops:
                cur[key] += 1
        # generic loads and stores (LD, ST) are the weight and weight-gradient arrays, which
        # sit in shared memory unless the budget moves them out (SArr cannot say which)
        if op in ("LDS", "LDSM", "STS", "ATOMS", "LD", "ST"):
            cur["shared"] += 1
            seg["shared"] += 1
        # loads through the read-only path: the global arrays a kernel reads through SArr
        # (the composed weights), which the checked build counts as global accesses
        if op == "LDG" and ".CONSTANT" in m.group(1):
            cur["nc"] += 1
            seg["nc"] += 1
        if op == "HMMA":  # the warp-level MMAs (mma.sync), which the checked build counts
            cur["mma"] += 1
            seg["mma"] += 1
        if op == "BAR":  # the end of a phase: its code is the stretch since the last one
            cur["segments"].append(seg)
            seg = dict(total=0, shared=0, nc=0, mma=0)
    return dict(zip(_demangle(names), (counts[n] for n in names)))


SHARED_OPS = ("LDS", "LDSM", "STS", "ATOMS", "LD", "ST")
_CSRC_FILES = frozenset(os.listdir(CSRC)) if os.path.isdir(CSRC) else frozenset()


@functools.lru_cache(maxsize=None)
def sass_lines(arch: int = 90) -> Dict[str, List[dict]]:
    """{demangled kernel: [instruction]} of the bf16 translation unit's machine code for
    sm_<arch>, each instruction a dict: addr, op (its base opcode), nc (a read-only global
    load), target (the address a branch goes to, or None), label (a branch target starts
    here), line (its source line, "file.h:N": the innermost place of its inlined chain in
    csrc/ outside shared_array.h, as parse_sites resolves the checked build's sites; the
    file's name without its folder). From
    nvdisasm -gi of the extension's cubin (the build has -lineinfo); {} without them."""
    from convlora_kernels import _ext

    mod, _ = _ext.load()
    tool = _ext.cuobjdump()
    if mod is None or tool is None or not _ext.has_cuda_kernels():
        return {}
    nvdisasm = os.path.join(os.path.dirname(tool), "nvdisasm")
    nvdisasm = nvdisasm if os.path.exists(nvdisasm) else shutil.which("nvdisasm")
    if nvdisasm is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", "all", mod.__file__], cwd=tmp, capture_output=True,
                       check=True)
        cubins = [f for f in os.listdir(tmp) if "bf16" in f and f.endswith(f".sm_{arch}.cubin")]
        if len(cubins) != 1:
            return {}
        return code_of_cubin(os.path.join(tmp, cubins[0]), nvdisasm)


def code_of_cubin(cubin: str, nvdisasm: str) -> Dict[str, List[dict]]:
    """sass_lines' dict of one cubin."""
    text = subprocess.run([nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
    funcs: Dict[str, List[dict]] = {}
    cur, line, chain, waiting = None, None, [], []
    labels: Dict[Tuple[str, str], int] = {}  # (function, label): address
    branches: List[Tuple[str, dict, str]] = []
    fname = ""
    for ln in text.splitlines():
        m = re.match(r"\.text\.(\S+):$", ln)
        if m:
            fname = m.group(1)
            cur = funcs.setdefault(fname, [])
            chain, line, waiting = [], None, []
            continue
        if cur is None:
            continue
        if ln.lstrip().startswith("//## File"):
            # an instruction's inlined chain, innermost first, over as many lines as it has
            # frames: each line "File X, line N inlined at Y, line M"
            chain += [(a or c, int(b or d)) for a, b, c, d in re.findall(
                r"File \"([^\"]+)\", line (\d+)|at \"([^\"]+)\", line (\d+)", ln)]
            continue
        m = re.match(r"(\.L_x_\d+):$", ln)
        if m:
            waiting.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", ln)
        if m is None:
            continue
        if chain:
            # the innermost place in the kernels' own sources (a load's is the line that
            # reads an SArr, not shared_array.h's or a CUDA header's such as __ldg's)
            f, n = next(((f, n) for f, n in chain if os.path.basename(f) in _CSRC_FILES
                         and not f.endswith("shared_array.h")), chain[0])
            line = f"{os.path.basename(f)}:{n}"
            chain = []
        op = m.group(2).split(".")[0]
        ins = dict(addr=int(m.group(1), 16), op=op, target=None, label=bool(waiting),
                   nc=op == "LDG" and ".CONSTANT" in m.group(2), line=line)
        for name in waiting:
            labels[fname, name] = ins["addr"]
        waiting = []
        t = re.search(r"`\((\.L_x_\d+)\)", m.group(3))
        if op == "BRA" and t:
            branches.append((fname, ins, t.group(1)))
        cur.append(ins)
    for fname, ins, name in branches:
        ins["target"] = labels.get((fname, name))
    names = list(funcs)
    return dict(zip(_demangle(names), (funcs[n] for n in names)))


def phase_instructions(code: List[dict], phases: Dict[str, dict], sites: List[dict],
                       warps: int, detail: Optional[List[tuple]] = None
                       ) -> Optional[Dict[str, float]]:
    """{phase: warp instructions (all the counted call's blocks), HMMAs excluded} from the
    machine code's basic blocks, each weighted by how often a warp runs it: a block with
    shared-memory instructions (or loads and stores of counted global arrays) runs as often
    as the checked build counted the warp accesses of their source lines (a line's count shared by
    its copies in the code: unrolled loops); a block without any, as often as the most
    frequent block of the innermost loop that holds it (a back branch's range), else as the
    less frequent of the blocks with accesses before and after it inside no other loop (a
    branch not taken counts as its stores do: zero), else once a warp and run of its
    phase. None when the code's barriers do not match the phases. So code that runs once
    a thread (an item's GELUs) counts once, not at the rate of the loop before it, as a
    phase's single ratio of all instructions to shared ones would. detail, when given,
    gets each block's (phase, address, instructions, runs, source lines)."""
    segs: List[List[dict]] = [[]]
    for ins in code:
        if ins["op"] == "NOP":
            continue
        segs[-1].append(ins)
        if ins["op"] == "BAR":
            segs.append([])
    segs = [g for g in segs if g]
    if len(segs) < len(phases):
        return None
    out: Dict[str, float] = {}
    for (name, p), seg in zip(phases.items(), segs):
        dyn: Dict[str, float] = {}
        for st in sites:
            if st["phase"] == name:
                dyn[st["line"]] = dyn.get(st["line"], 0) + st["warp_accesses"]
        # the lines whose global stores the checked build counted ('G': a global array
        # written through SArr, such as the composed-weight backward's partials)
        stored = {st["line"] for st in sites if st["phase"] == name and st["rw"] == "G"}

        def counted(i):  # shared accesses, loads of counted global arrays (nc), their stores
            return (i["op"] in SHARED_OPS or i["nc"]
                    or (i["op"] == "STG" and i["line"] in stored))

        static: Dict[str, int] = {}
        for ins in seg:
            if counted(ins):
                static[ins["line"]] = static.get(ins["line"], 0) + 1
        # basic blocks: a label or the instruction after a branch starts one
        blocks: List[List[dict]] = []
        for i, ins in enumerate(seg):
            if not blocks or ins["label"] or seg[i - 1]["op"] in ("BRA", "EXIT", "RET", "BAR"):
                blocks.append([])
            blocks[-1].append(ins)
        own: List[Optional[float]] = []
        for b in blocks:
            w = [dyn[i["line"]] / static[i["line"]] for i in b
                 if counted(i) and i["line"] in dyn]
            own.append(sum(w) / len(w) if w else None)
        loops = [(i["target"], i["addr"]) for i in seg
                 if i["target"] is not None and i["target"] <= i["addr"]]
        once = p["runs"] * warps

        def around(a):  # the loops holding address a
            return {l for l in loops if l[0] <= a <= l[1]}

        total = 0.0
        for j, (b, w) in enumerate(zip(blocks, own)):
            if w is None:
                a = b[0]["addr"]
                mine = around(a)
                for lo, hi in sorted(mine, key=lambda l: l[1] - l[0]):
                    inside = [v for bb, v in zip(blocks, own)
                              if v is not None and lo <= bb[0]["addr"] <= hi]
                    if inside:
                        w = max(inside)
                        break
            if w is None:
                # the blocks with shared accesses before and after it at this depth of loops
                # or outside them, the less frequent: code between two loads runs as often
                # as they do, a branch not taken as its stores (zero)
                near = [next((v for bb, v in zip(seq, ws)
                              if v is not None and around(bb[0]["addr"]) <= mine), None)
                        for seq, ws in ((blocks[j + 1:], own[j + 1:]),
                                        (blocks[:j][::-1], own[:j][::-1]))]
                near = [v for v in near if v is not None]
                w = min(near) if near else once
            n = sum(1 for i in b if i["op"] != "HMMA")
            total += w * n
            if detail is not None:  # (phase, address, instructions, runs, source lines)
                detail.append((name, b[0]["addr"], n, w, sorted({i["line"] for i in b})))
        out[name] = total
    return out


@functools.lru_cache(maxsize=None)
def resources() -> Dict[Tuple[int, str], Dict[str, int]]:
    """{(arch, demangled kernel): {"REG", "STACK", "SHARED", "LOCAL", ...}} of every kernel
    of the built extension ({} without CUDA kernels or cuobjdump)."""
    from convlora_kernels import _ext

    mod, _ = _ext.load()
    tool = _ext.cuobjdump()
    if mod is None or tool is None or not _ext.has_cuda_kernels():
        return {}
    out = subprocess.run([tool, "--dump-resource-usage", mod.__file__],
                         capture_output=True, text=True, check=True).stdout
    keys, values, arch, name = [], [], None, None
    for line in out.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        if "REG:" in line and name:
            keys.append((arch, name))
            values.append({k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)})
            name = None
    names = _demangle([n for _, n in keys])
    return {(a, d): v for (a, _), d, v in zip(keys, names, values)}


def _signature(kernel: str, R: int, mode: str, bwd: bool) -> str:
    """The demangled name of the bf16 instantiation of a block-program kernel."""
    if kernel == "stencil_cells_kernel":  # the composed-weight programs: rank, direction
        return f"{kernel}<{R}, {'true' if bwd else 'false'}, c10::BFloat16>"
    if kernel == "prep_kernel":  # rank bound, the weights' dtype
        return f"{kernel}<{R}, c10::BFloat16>"
    return f"{kernel}<{R}, {INTERP[mode]}, {'true' if bwd else 'false'}, c10::BFloat16>"


def _registers_of(kernel: str, R: int, mode: str, bwd: bool, arch: int = 90) -> Optional[int]:
    want = _signature(kernel, R, mode, bwd)
    for (a, name), v in resources().items():
        if a == arch and name.replace("void ", "").strip() == want:
            return v["REG"]
    return None


def _code_of(kernel: str, R: int, mode: str, bwd: bool) -> Optional[List[dict]]:
    want = _signature(kernel, R, mode, bwd)
    for name, code in sass_lines().items():
        if name.replace("void ", "").strip() == want:
            return code
    return None


def _sass_of(kernel: str, R: int, mode: str, bwd: bool) -> Optional[Dict[str, int]]:
    want = _signature(kernel, R, mode, bwd)
    for name, c in sass_counts().items():
        if name.replace("void ", "").strip() == want:
            return c
    return None


def prep_matrix_warps(code: Optional[List[dict]], threads: int = 256, word0: int = 32,
                      words: int = 128) -> Optional[List[int]]:
    """The instructions of each warp of one composed-matrix block of prep_kernel (the
    composed weights, stencil_cuda.cuh; its machine code, sass_lines), or None where the
    code is not that shape. The block (threads word0 .. word0 + words: kCellWordThread0,
    kCellWordThreads): the entry; the words threads read their channel pair's weights
    (the others branch past them); threads < 6 (warp 0) compute the 18 factors (the others
    branch past them to the first barrier); threads < 81 the products (the others branch
    past them to the second); the threads past the words exit, the words threads loop over
    their cells (a cell a trip: (tid - word0) / 64, + words / 64, ...). Straight-line but
    for those loops, the search for the matrix's expert (counted one trip: a few
    instructions a trip short) and the identity-or-resample choice of the factors' taps
    (both counted: an upper bound there)."""
    if not code:
        return None
    bars = [i["addr"] for i in code if i["op"] == "BAR"]
    if len(bars) != 2:
        return None
    b1, b2 = bars
    step = code[1]["addr"] - code[0]["addr"]

    def count(lo: int, hi: int) -> int:  # instructions at addresses [lo, hi)
        return sum(1 for i in code if lo <= i["addr"] < hi)

    def forward(lo: int, hi: int, reach: int) -> Optional[dict]:
        """The first forward branch at [lo, hi) whose target is at most `reach`."""
        return next((i for i in code if i["target"] is not None and lo <= i["addr"] < hi
                     and i["addr"] < i["target"] <= reach), None)

    skip_factors = next((i for i in code if i["target"] is not None and i["addr"] < b1
                         and b1 - 4 * step <= i["target"] <= b1), None)
    if skip_factors is None:
        return None
    skip_weights = forward(0, skip_factors["addr"], skip_factors["addr"])
    skip_products = forward(b1, b2, b2)
    leave = next((i for i in code if i["op"] == "EXIT" and i["addr"] > b2), None)
    loop = next((i for i in code if i["target"] is not None and i["addr"] > b2
                 and i["target"] < i["addr"]), None)
    if None in (skip_weights, skip_products, leave, loop):
        return None
    after = skip_weights["addr"] + step
    body = count(loop["target"], loop["addr"] + step)
    warps = []
    for w in range(threads // 32):
        wt = 32 * w - word0  # its first words thread (words threads: whole warps)
        is_words = 0 <= wt < words
        n = count(0, after) + (count(after, skip_weights["target"]) if is_words else 0)
        n += count(skip_weights["target"], skip_factors["addr"] + step)
        n += (count(skip_factors["addr"] + step, b1 + step) if w == 0
              else count(skip_factors["target"], b1 + step))
        n += (count(b1 + step, b2 + step) if 32 * w < 81
              else count(b1 + step, skip_products["addr"] + step)
              + count(skip_products["target"], b2 + step))
        n += (count(b2 + step, loop["target"]) + len(range(wt // 64, 9, words // 64)) * body
              if is_words else count(b2 + step, leave["addr"] + step))
        warps.append(n)
    return warps


def prep_matrices(case: Case) -> int:
    """Composed-weight matrices of a pass at case.shape (row and column classes x phases
    per axis squared, per expert); the prep writes each with a block, into both passes."""
    _, H, W = case.shape
    classes = (3 if H >= 3 else H) * (3 if W >= 3 else W)
    return sum(classes * (1 if s % 2 else 2) ** 2 for s in case.scales)


# --- the model -----------------------------------------------------------------------

def rank_bound(r: int) -> int:
    return next(b for b in (4, 8, 16, 32, 64) if r <= b)


def kernel_rank(case: Case) -> int:
    """The rank bound R of the kernels that run case: the composed-weight programs' is 8 at
    every rank up to 8 (stencil_cells.h: cells_bound)."""
    return 8 if case.mma else rank_bound(case.rank)


def _grid(case: Case, bwd: bool) -> Dict[str, int]:
    keys = ("bytes", "w_smem", "dw_smem", "threads", "tile_h", "tile_w", "round", "mma")
    return dict(zip(keys, (_OPS or build_checked()).stencil_grid(
        case.rank, case.experts, INTERP[case.mode], bwd, 0, case.mma)))


def _blocks_at_shape(case: Case, call: dict, bwd: bool) -> int:
    """The block count of the SAM shape, from the counted call's."""
    (B, H, W), (b, h, w) = case.shape, case.counted
    if (H, W) == (h, w):
        return call["blocks"] * B // b
    g = _grid(case, bwd)
    return B * math.ceil(H / g["tile_h"]) * math.ceil(W / g["tile_w"])


def cell_bytes(case: Case, bwd: bool = False) -> int:
    """The composed weights of the composed-weight programs at case.shape (stencil_cells.h:
    row and column classes x phases per axis squared x 9 R x R floats per expert; the
    forward's R biases an expert after them, the backward's fold tables, kFoldWords floats
    per expert)."""
    R = kernel_rank(case)
    tail = case.experts * (2 * 3 * 2 * 9 if bwd else R) * 4
    return prep_matrices(case) * 9 * 8 * R * 4 + tail


def _pre_slots(mode: str) -> int:
    return 4 if mode == "bilinear" else 16


def kernel_rows(case: Case, counted: Dict[str, dict], dev=H100) -> List[dict]:
    """One dict per kernel of the forward and the backward at case.shape (bf16)."""
    B, H, W = case.shape
    N, r, n, e = B * H * W, case.rank, case.experts, 2
    R = kernel_rank(case)
    rows = []
    clock = dev["clock_ghz"] * 1e3  # clocks per microsecond
    grad_stride = R * 9 * R + R
    sites = parse_sites(counted["sites"]) if counted.get("sites") else None
    for direction, bwd in (("fwd", False), ("bwd", True)):
        call = counted[direction]
        kernel = ("stencil_map_kernel" if case.routing == "map" else
                  "stencil_cells_kernel" if case.mma else "stencil_tile_kernel")
        blocks = _blocks_at_shape(case, call, bwd)
        scale = blocks / call["blocks"]
        ph = call["phases"]
        wavefronts = sum(p["wavefronts"] for p in ph.values()) * scale
        quarter = sum(p["quarter_wavefronts"] for p in ph.values()) * scale
        accesses = sum(p["warp_accesses"] for p in ph.values()) * scale
        ideal = sum(p["ideal"] for p in ph.values()) * scale
        chain = sum(p["busiest_warp"] for p in ph.values()) * scale / blocks  # per block
        sass = _sass_of(kernel, R, case.mode, bwd)
        instr = None
        by_phase = bool(sass) and len(sass["segments"]) == len(ph)
        # a phase's counted loads: its shared accesses, and its loads of global arrays read
        # through SArr (the composed weights), which the SASS holds as read-only loads; its
        # MMAs (HMMA in the SASS, counted by the checked build) are an instruction each, not
        # scaled by the ratio
        counted_loads = {k: p["warp_accesses"] + p.get("global_accesses", 0)
                         for k, p in ph.items()}
        mmas = {k: p.get("mma_ops", 0) for k, p in ph.items()}

        def ratio(p, g):  # instructions but the MMAs per counted load
            loads = g["shared"] + (g["nc"] if p.get("global_accesses", 0) else 0)
            return (g["total"] - (g["mma"] if p.get("mma_ops", 0) else 0)) / max(1, loads)

        # per block of the counted call, per phase
        phase_instr = {k: None for k in ph}
        per_load = {}
        threads = MAP_THREADS if kernel == "stencil_map_kernel" else _grid(case, bwd)["threads"]
        code = _code_of(kernel, R, case.mode, bwd)
        dyn = (phase_instructions(code, ph, sites[direction], threads // 32)
               if code is not None and sites is not None and by_phase else None)
        if dyn is not None:
            # the machine code's basic blocks, weighted by how often they run
            for k in ph:
                per_load[k] = dyn[k] / max(1, counted_loads[k])
                phase_instr[k] = (dyn[k] + mmas[k]) / call["blocks"]
            instr = sum(phase_instr.values()) * call["blocks"] * scale
        elif by_phase:
            # one barrier ends each phase, in program order: each phase's own ratio
            for (k, p), g in zip(ph.items(), sass["segments"]):
                per_load[k] = ratio(p, g)
                phase_instr[k] = (counted_loads[k] * per_load[k] + mmas[k]) / call["blocks"]
            instr = sum(phase_instr.values()) * call["blocks"] * scale
        elif sass:
            instr = accesses * sass["total"] / max(1, sass["shared"])
        # the critical path: each phase's busiest warp, its instructions at its phase's ratio
        chain_instr = None
        if instr is not None:
            chain_instr = sum(
                p["busiest_warp"] * (per_load[k] if by_phase
                                     else sass["total"] / max(1, sass["shared"]))
                + p.get("busiest_mma", 0)
                for k, p in ph.items() if counted_loads[k] > 0) * scale / blocks
        regs = _registers_of(kernel, R, case.mode, bwd) or 128
        resident = max(1, min(dev["max_blocks_per_sm"],
                              dev["shared_bytes_per_sm"] // (call["bytes"]
                                                              + dev["block_reserved_bytes"]),
                              dev["threads_per_sm"] // threads,
                              dev["registers_per_sm"] // (regs * threads)))
        per_sm = math.ceil(blocks / dev["sms"])
        if direction == "fwd":
            dram = 2 * N * r * e + N * _pre_slots(case.mode) * r * 4
        else:
            dram = 3 * N * r * e + N * _pre_slots(case.mode) * r * 4
            dram += blocks * n * grad_stride * 4  # the blocks' weight-gradient partials
            if case.routing == "map":              # the dz partials of tile and halo
                dram += blocks * (1 + 2 * (2 if case.mode == "bicubic" else 1) / 8) ** 2 * 64 * R * 4
        t = dict(
            smem=wavefronts / blocks * per_sm / (dev["wavefronts_per_clock"] * clock),
            issue=(instr / blocks * per_sm / (dev["issue_per_clock"] * clock)
                   if instr is not None else 0.0),
            dram=dram / dev["dram_bytes_per_s"] * 1e6,
            latency=(chain * math.ceil(per_sm / resident) * dev["shared_latency_clocks"]
                     / dev["loads_in_flight"] / clock),
        )
        bound = max(t, key=t.get)
        # the same if a 128-bit access takes each quarter warp apart (smem_trace.h)
        smem_q = quarter / blocks * per_sm / (dev["wavefronts_per_clock"] * clock)
        # the first H100 run's rates: the critical path of every wave, the SM's issue
        waves = math.ceil(per_sm / resident)
        fitted_chain = (waves * chain_instr * dev["fitted_chain_clocks"] / clock
                        if chain_instr is not None else 0.0)
        fitted = (instr / blocks * per_sm / (dev["fitted_issue_per_clock"] * clock)
                  if instr is not None else 0.0)
        rows.append(dict(case=case.name, direction=direction, kernel=kernel, blocks=blocks,
                         quarter_smem_us=smem_q, quarter_est_us=max(smem_q, t[bound]),
                         fitted_issue_us=fitted, fitted_chain_us=fitted_chain,
                         calibrated_us=max(smem_q, t["dram"], fitted, fitted_chain),
                         chain_instructions=chain_instr, threads=threads, registers=regs,
                         resident=resident, shared_bytes=call["bytes"],
                         wavefronts_per_block=wavefronts / blocks,
                         wavefronts_per_access=wavefronts / max(1.0, ideal),
                         instructions_per_block=(instr / blocks if instr is not None else None),
                         instructions_by_phase=by_phase,
                         instructions_by_blocks=dyn is not None,
                         dram_bytes=dram, times_us=t, bound=bound, est_us=t[bound],
                         phases={k: dict({f: v[f] / call["blocks"] for f in v},
                                         wavefronts_per_access=v["wavefronts"]
                                         / max(1, v["ideal"]),
                                         instructions=phase_instr[k])
                                 for k, v in ph.items()}))
    # the small kernels: prep (once per step: the layer hands the forward's prep buffer to
    # the backward), reduce (backward; the map backward's with its fold)
    partial_bytes = rows[1]["blocks"] * n * grad_stride * 4
    if case.routing == "map":  # the fold (dz from the halo partials) in the reduce's launch
        partial_bytes += 3 * N * r * 4
    # the prep writes the composed weights of both passes with its tables (mma), which every
    # block then reads from L2
    prep_bytes = cell_bytes(case) + cell_bytes(case, True) if case.mma else 0
    small = [("fwd", "prep_kernel", prep_bytes / dev["dram_bytes_per_s"] * 1e6),
             ("bwd", "fold_reduce_kernel" if case.routing == "map" else "reduce_dw_kernel",
              partial_bytes / dev["dram_bytes_per_s"] * 1e6)]
    # the prep's composed matrices, a block each (prep_matrix_warps): their instructions
    # at the fitted issue rate, the busiest warp's at the fitted chain rate (one wave)
    prep = dict(issue=0.0, chain=0.0, instructions=None)
    code = _code_of("prep_kernel", R, case.mode, False) if case.mma else None
    if code is not None:  # (no machine code without a CUDA build: DRAM alone, as above)
        warps = prep_matrix_warps(code)
        if warps is None:
            raise RuntimeError("prep_kernel's composed-matrix blocks not found in its "
                               "machine code (prep_matrix_warps)")
        per_sm = math.ceil(prep_matrices(case) / dev["sms"])
        prep = dict(issue=per_sm * sum(warps) / (dev["fitted_issue_per_clock"] * clock),
                    chain=max(warps) * dev["fitted_chain_clocks"] / clock,
                    instructions=sum(warps))
    for direction, name, us in small:
        extra = prep if name == "prep_kernel" else dict(issue=0.0, chain=0.0,
                                                        instructions=None)
        rows.append(dict(case=case.name, direction=direction, kernel=name, blocks=None,
                         times_us=dict(dram=us), bound="dram", est_us=us, quarter_est_us=us,
                         fitted_issue_us=extra["issue"], fitted_chain_us=extra["chain"],
                         instructions_per_block=extra["instructions"],
                         calibrated_us=max(us, extra["issue"], extra["chain"])
                         + dev["fitted_small_kernel_us"], phases={}))
    return rows


def totals(rows: List[dict]) -> Dict[Tuple[str, str], Dict[str, float]]:
    """{(case, direction): {"us": the kernels' estimates summed, "launches": count}}."""
    out: Dict[Tuple[str, str], Dict[str, float]] = {}
    for row in rows:
        t = out.setdefault((row["case"], row["direction"]), dict(us=0.0, launches=0,
                                                                   quarter_us=0.0,
                                                                   calibrated_us=0.0))
        t["us"] += row["est_us"]
        t["quarter_us"] += row["quarter_est_us"]
        t["calibrated_us"] += row["calibrated_us"]
        t["launches"] += 1
    return out


def over_limits(rows: List[dict]) -> List[str]:
    """What is worse than the ceilings and budgets allow (empty when nothing is)."""
    bad = []
    for row in rows:
        for name, p in row["phases"].items():
            key = f"{row['case']}/{row['direction']}/{name}"
            limit = OVER_CEILING.get(key, WAVEFRONTS_PER_ACCESS_CEILING)
            if p["wavefronts_per_access"] > limit + 1e-9:
                bad.append(f"{key}: {p['wavefronts_per_access']:.3f} wavefronts per shared "
                           f"access, above {limit}")
    for (case, direction), t in totals(rows).items():
        key = f"{case}/{direction}"
        budget = BUDGETS_US.get(case)
        limit = OVER_BUDGET_US.get(key, None if budget is None
                                    else budget[0 if direction == "fwd" else 1])
        if limit is not None and t["us"] > limit + 1e-9:
            bad.append(f"{key}: est. {t['us']:.2f} us, above {limit}")
    return bad


def present_limits(rows: List[dict]) -> str:
    """OVER_CEILING and OVER_BUDGET_US as this code stands (`--limits` prints them, to
    paste above when a kernel improves)."""
    lines = ["OVER_CEILING: Dict[str, float] = {"]
    for row in rows:
        for name, p in row["phases"].items():
            v = p["wavefronts_per_access"]
            if v > WAVEFRONTS_PER_ACCESS_CEILING:
                lines.append(f'    "{row["case"]}/{row["direction"]}/{name}": '
                             f'{math.ceil(v * 100) / 100},')
    lines += ["}", "OVER_BUDGET_US: Dict[str, float] = {"]
    for (case, direction), t in totals(rows).items():
        budget = BUDGETS_US.get(case)
        if budget and t["us"] > budget[0 if direction == "fwd" else 1]:
            lines.append(f'    "{case}/{direction}": {math.ceil(t["us"] * 10) / 10},')
    return "\n".join(lines + ["}"])


_OPS = None


def run(cases=CASES, ops=None) -> List[dict]:
    """Every kernel row of every case; ops: the checked build (built when not given)."""
    global _OPS
    ops = _OPS = ops or build_checked()
    rows = []
    for case in cases:
        rows += kernel_rows(case, count_shared(ops, case))
    return rows


# --- output --------------------------------------------------------------------------

def assumptions(dev=H100) -> str:
    return (f"{dev['card']}: {dev['sms']} SMs at {dev['clock_ghz']} GHz, one shared-memory "
            f"wavefront and {dev['issue_per_clock']} warp instructions per clock per SM, "
            f"DRAM {dev['dram_bytes_per_s'] / 1e12:.2f} TB/s, a shared load "
            f"{dev['shared_latency_clocks']} clocks with {dev['loads_in_flight']} in flight "
            f"per warp, {dev['shared_bytes_per_sm'] // 1024} KB "
            f"of shared memory per SM; bf16; estimates, not measurements. H100-fitted (to "
            f"the first H100 run, benchmarks/results/h100): the largest of the "
            f"128-bit-by-quarter-warps shared time, DRAM, the instructions at "
            f"{dev['fitted_issue_per_clock']:g} per clock per SM and each wave's critical "
            f"path (the busiest warp of every phase) at {dev['fitted_chain_clocks']:g} clocks "
            f"per instruction, with as many blocks per SM as shared memory, threads and "
            f"registers allow; a small kernel (prep, fold, reduce) the largest of its DRAM "
            f"time and (the prep's composed matrices) their instructions at those two rates, "
            f"plus {dev['fitted_small_kernel_us']:g} us")


def table(rows: List[dict]) -> List[str]:
    out = ["| case | pass | kernel | blocks | wavefronts / block | per access | "
           "instructions / block | est. us (smem / issue / dram / latency) | bound | "
           "smem us, 128-bit by quarter warps | threads, blocks per SM | critical path "
           "instructions | issue / chain us, H100-fitted | est. us, H100-fitted |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["blocks"] is None:
            continue
        t = row["times_us"]
        ipb = row["instructions_per_block"]
        chain = row["chain_instructions"]
        out.append(
            f"| {row['case']} | {row['direction']} | {row['kernel']} | {row['blocks']} | "
            f"{row['wavefronts_per_block']:,.0f} | {row['wavefronts_per_access']:.2f} | "
            f"{'n/a' if ipb is None else f'{ipb:,.0f}'} | "
            f"**{row['est_us']:.1f}** ({t['smem']:.1f} / {t['issue']:.1f} / {t['dram']:.1f} / "
            f"{t['latency']:.1f}) | {row['bound']} | {row['quarter_smem_us']:.1f} | "
            f"{row['threads']}, {row['resident']} | "
            f"{'n/a' if chain is None else f'{chain:,.0f}'} | "
            f"{row['fitted_issue_us']:.1f} / {row['fitted_chain_us']:.1f} | "
            f"**{row['calibrated_us']:.1f}** |")
    return out


def prep_table(rows: List[dict]) -> List[str]:
    """The prep launches that write composed weights (mma): their counted instructions."""
    out = ["| case | prep: composed matrices (a block each, both passes) | "
           "warp instructions / matrix | "
           "issue / chain us, H100-fitted | est. us, H100-fitted |",
           "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row["kernel"] == "prep_kernel" and row["instructions_per_block"] is not None:
            case = next(c for c in CASES if c.name == row["case"])
            out.append(f"| {row['case']} | {prep_matrices(case)} | "
                       f"{row['instructions_per_block']:,} | {row['fitted_issue_us']:.1f} / "
                       f"{row['fitted_chain_us']:.1f} | **{row['calibrated_us']:.1f}** |")
    return out


def totals_table(rows: List[dict]) -> List[str]:
    out = ["| case | pass | launches | est. us (kernels) | budget | "
           "est. us, 128-bit by quarter warps | est. us, H100-fitted |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (case, direction), t in totals(rows).items():
        budget = BUDGETS_US.get(case)
        b = "" if budget is None else f"{budget[0 if direction == 'fwd' else 1]:.0f}"
        out.append(f"| {case} | {direction} | {t['launches']} | {t['us']:.1f} | {b} | "
                   f"{t['quarter_us']:.1f} | **{t['calibrated_us']:.1f}** |")
    return out


def phase_table(rows: List[dict]) -> List[str]:
    """Per block (averaged over the counted call's blocks) and phase."""
    out = ["| case | pass | phase | runs | warp accesses | wavefronts | per access | "
           "busiest warp | instructions |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for name, p in row["phases"].items():
            instr = "" if p["instructions"] is None else f"{p['instructions']:,.0f}"
            out.append(f"| {row['case']} | {row['direction']} | {name} | {p['runs']:.1f} | "
                       f"{p['warp_accesses']:,.0f} | {p['wavefronts']:,.0f} | "
                       f"{p['wavefronts_per_access']:.2f} | {p['busiest_warp']:,.0f} | "
                       f"{instr} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", action="store_true", help="also each kernel's phases")
    ap.add_argument("--design", help="rewrite the cost-model section of this markdown file")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--limits", action="store_true",
                    help="print OVER_CEILING and OVER_BUDGET_US as the code stands")
    ap.add_argument("--sites", metavar="CASE",
                    help="only this case's shared accesses with bank conflicts, by line "
                         "(the counted map, all its blocks)")
    args = ap.parse_args(argv)
    if args.sites:
        case = {c.name: c for c in CASES}.get(args.sites)
        if case is None:
            ap.error(f"--sites: no case {args.sites!r}; cases: {[c.name for c in CASES]}")
        print("\n".join(site_table(count_sites(build_checked(), case))))
        return 0
    rows = run()
    print(assumptions())
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(prep_table(rows)))
    print()
    print("\n".join(totals_table(rows)))
    if args.phases:
        print()
        print("\n".join(phase_table(rows)))
    t = totals(rows)
    fwd, bwd = t[(CASES[0].name, "fwd")]["us"], t[(CASES[0].name, "bwd")]["us"]
    qf, qb = t[(CASES[0].name, "fwd")]["quarter_us"], t[(CASES[0].name, "bwd")]["quarter_us"]
    cf = t[(CASES[0].name, "fwd")]["calibrated_us"]
    cb = t[(CASES[0].name, "bwd")]["calibrated_us"]
    print(f"\nRESULT: modeled {CASES[0].name} stencil fwd {fwd:.1f} us, bwd {bwd:.1f} us "
          f"(est. {H100['card']}; 128-bit by quarter warps: {qf:.1f}, {qb:.1f} us; "
          f"H100-fitted: {cf:.1f}, {cb:.1f} us)")
    if args.limits:
        print()
        print(present_limits(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(assumptions=H100, rows=rows), f, indent=1)
    if args.design:
        from convlora_kernels._design_tables import commit_of, write_section

        head = (f"{assumptions()}; torch {torch.__version__}, commit {commit_of(args.design)} "
                f"(regenerate: `python benchmarks/cost_model.py --design docs/design.md`):")
        write_section(args.design, "<!-- cost_model --design: begin -->",
                      "<!-- cost_model --design: end -->", head,
                      table(rows) + [""] + prep_table(rows) + [""] + totals_table(rows)
                      + [""] + phase_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

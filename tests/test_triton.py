"""The Triton backend against the reference: forward and every gradient, both modes.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py) on CPU tensors in float32, on tiny shapes; the interpreter is slow, so each
case keeps the number of experts and tiles small. Every buffer a kernel must fill is
poisoned with NaN first (launch.POISON). Tests marked `gpu` need a CUDA device.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from convlora_kernels import ConvLoRALinear, conv_lora_linear, conv_lora_linear_ref, plan

triton = pytest.importorskip("triton")
from convlora_kernels.backends import triton as op  # noqa: E402
from convlora_kernels.triton_kernels import compile_check, launch, stencil, tables  # noqa: E402
tl = triton.language

from helpers import assert_close, check_accuracy_rule, make_case, resample_matrix  # noqa: E402

pytestmark = pytest.mark.triton

HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
FLOOR32 = 1e-6
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def triton_op(*args, **kwargs):
    return conv_lora_linear(*args, **kwargs, backend="triton")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", float("nan"))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def close(actual, expected, what, tol=1e-5):
    """max |actual - expected| <= tol · max(1, max |expected|) (fp32 against fp32)."""
    bound = tol * max(1.0, expected.detach().abs().max().item()) if expected.numel() else 0
    assert_close(actual.detach(), expected.detach(), 0, bound, what)


def case(**kw):
    kw.setdefault("device", DEV)
    return make_case(**kw)


# --- environment ------------------------------------------------------------------------

def test_imports_and_reasons_without_triton():
    """`import torch` and `import convlora_kernels` do not import triton (conftest relies on
    it), and without triton the backend module imports and says how to get it."""
    code = (
        "import sys\n"
        "import torch\n"
        "assert 'triton' not in sys.modules, 'import torch imported triton'\n"
        "import convlora_kernels\n"
        "assert 'triton' not in sys.modules, 'import convlora_kernels imported triton'\n"
        "sys.modules['triton'] = None\n"
        "from convlora_kernels.backends import triton as op\n"
        "print(op.unavailable_reason('triton', torch.device('cuda')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "triton is not installed: pip install triton"


# The most shared memory a program may have on the GPUs the kernels are built for (227 KB
# on H100/H200; A100's 163 KB is checked by the sm_80 figures a GPU run reports).
SMEM_LIMIT = 227 * 1024


def _compile_check(*args):
    """compile_check's sm_90 lines for ``args`` (run as a script, without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "convlora_kernels.triton_kernels.compile_check",
                          "--arch", "90", *args], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("sm_90")], out.stdout


def _spilled(lines):
    """The lines of variants at r <= 16 with a stack frame (spills)."""
    return [line for line in lines if int(line.split()[4][2:]) <= 16
            and int(next(w for w in line.split() if w.startswith("STACK:"))[6:]) > 0]


@pytest.mark.slow  # builds ~280 kernel variants for sm_90: ~7 min on 2 cores
def test_kernels_compile_for_the_gpu_without_spills():
    """Every kernel builds for sm_90 as the JIT would build it at the layer's launches (the
    interpreter cannot show that): bf16, fp16 and fp32, bilinear and bicubic, r = 8 and 16
    and the triton backend's largest rank, the first autotuning candidate, both stencil
    backwards; none spills (STACK in ptxas' resource usage) at r <= 16, and none needs more
    shared memory than a GPU has at any rank."""
    from convlora_kernels._validate import MAX_TRITON_RANK

    lines, stdout = _compile_check("--first", "--ranks", f"8,16,{MAX_TRITON_RANK}")
    built = {line.split()[1] for line in lines}
    assert built == {"stencil_fwd", "layer_forward", "stencil_grad", "stencil_scatter",
                     "stencil_bwd", "dy_pass", "route", "gather_dz", "expert_sum",
                     "expert_counts", "expert_order", "two_source_gemm", "route_backward",
                     "nan_out_of_range"}, stdout
    assert len({tuple(line.split()[2:5]) for line in lines}) == 18, stdout
    big = [line for line in lines
           if int(next(w for w in line.split() if w.startswith("SMEM:"))[5:]) > SMEM_LIMIT]
    assert not big, "more shared memory than a GPU has:\n" + "\n".join(big)
    spilled = _spilled(lines)
    assert not spilled, "spills at r <= 16:\n" + "\n".join(spilled)
    lines = [line for line in lines if int(line.split()[4][2:]) <= 16]
    # three 4-warp programs per SM (<= 168 registers) for the stencil forward at the
    # target (bilinear r = 8, the 16-bit dtypes): its z cells are held in registers
    # (launch.CELL_FLOATS); the backward kernels take two (<= 255, no spills: above)
    crowded = [line for line in lines if "bilinear r=8 " in line
               and line.split()[1] == "stencil_fwd" and line.split()[2] != "fp32"
               and int(next(w for w in line.split() if w.startswith("REG:"))[4:]) > 168]
    assert not crowded, "\n".join(crowded)
    # the generated table of docs/design.md ("Triton kernel resources") is what the bf16
    # kernels compile to under the Triton release it names
    version, table = _design_table()
    if version == triton.__version__:
        rows = [_parsed(line) for line in lines if line.split()[2] == "bf16"]
        assert compile_check.design_rows(rows)[2:] == table, (
            "docs/design.md's resource table is stale: regenerate it with python -m "
            "convlora_kernels.triton_kernels.compile_check --design docs/design.md")


def test_measured_holds_build_without_spills():
    """launch.FORWARD_HOLDS and SPLIT_HOLDS (bicubic at RZ = 4, held cells measured faster
    on an H100: the forward 1.9x, the split backward 1.35x the merged one loaded): the
    stencil forward compiles with HOLD=True and no spills in the 16-bit dtypes, the split
    backward with atomic sums held in bfloat16, and every other backward keeps loading
    its cells (fp32, float16, deterministic sums, merged)."""
    assert ("bicubic", 4) in launch.FORWARD_HOLDS and ("bicubic", 4) in launch.SPLIT_HOLDS
    lines, stdout = _compile_check("--first", "--dtypes", "bf16,fp16,fp32", "--interpolations",
                                   "bicubic", "--ranks", "3", "--kernels",
                                   "stencil_fwd,stencil_grad,stencil_scatter,stencil_bwd")
    fwd = {line.split()[2]: line for line in lines if line.split()[1] == "stencil_fwd"}
    assert set(fwd) == {"bf16", "fp16", "fp32"}, stdout
    for dtype, line in fwd.items():
        assert ("HOLD=True" in line) == (dtype != "fp32"), line
    split = [line for line in lines if line.split()[1] in ("stencil_grad", "stencil_scatter")]
    assert {(f[1], f[2]) for f in map(str.split, split)} == {
        (k, d) for k in ("stencil_grad", "stencil_scatter") for d in ("bf16", "fp16", "fp32")}
    for line in split:
        held = line.split()[2] == "bf16" and "ATOMIC=True" in line
        assert ("HOLD=True" in line) == held, line
    assert all("HOLD=False" in line for line in lines if line.split()[1] == "stencil_bwd"), \
        stdout
    spilled = _spilled(lines)
    assert not spilled, "spills:\n" + "\n".join(spilled)


def test_backward_plan_holds_the_cells_where_measured(monkeypatch, switch):
    """backward_plan on a GPU (launch.GPU_TILING): bicubic at RZ = 4 in bfloat16 with atomic
    sums runs split with its cells held, unless CONVLORA_TRITON_BACKWARD=merged asks for
    merged (its cells loaded then); deterministic sums, float16, fp32, other ranks and
    bilinear keep the tiling's choice, merged by default."""
    monkeypatch.setattr(launch, "GPU_TILING", True)

    def plan(interpolation, rank, dtype, atomic):
        tiling = launch.Tiling(8, 8, rank, 8, range(1, 9), interpolation, dtype, DEV)
        return launch.backward_plan(tiling, atomic)

    assert plan("bicubic", 3, torch.bfloat16, True) == (False, True)
    assert plan("bicubic", 4, torch.bfloat16, True) == (False, True)
    for case in [("bicubic", 3, torch.bfloat16, False), ("bicubic", 3, torch.float16, True),
                 ("bicubic", 8, torch.bfloat16, True), ("bicubic", 3, torch.float32, True)]:
        assert plan(*case) == (True, False), case
    assert plan("bilinear", 3, torch.bfloat16, True) == (True, True)
    switch(launch.BACKWARD_ENV, "merged")
    assert plan("bicubic", 3, torch.bfloat16, True) == (True, False)
    switch(launch.BACKWARD_ENV, "split")
    assert plan("bicubic", 3, torch.bfloat16, True) == (False, True)
    switch(launch.Z_CELLS_ENV, "loaded")
    assert plan("bicubic", 3, torch.bfloat16, True) == (False, False)


@pytest.mark.slow  # ~9 min on 2 cores (the one-kernel forward's candidates, most of it)
def test_every_autotune_candidate_builds_without_spills():
    """The autotuned kernels (the dy pass, the one-kernel forward, the two-source GEMM) at
    every candidate of their lists, bf16, fp16 and fp32, bilinear and bicubic, r = 8 and
    16, as the layer launches them: none spills, so whichever autotuning picks on a GPU
    (the test above builds the first candidates only)."""
    lines, stdout = _compile_check("--ranks", "8,16", "--kernels",
                                   "dy_pass,layer_forward,two_source_gemm")
    assert {line.split()[1] for line in lines} == {"dy_pass", "layer_forward",
                                                   "two_source_gemm"}, stdout
    # (dtype, warps, tile) of the dy pass: three candidates a 16-bit dtype, two in fp32
    dy = {(f[2], next(w for w in f if w.startswith("warps=")),
           line[line.index("{"):line.index("}") + 1])
          for line in lines for f in [line.split()] if f[1] == "dy_pass"}
    assert len(dy) == 8, sorted(dy)
    spilled = _spilled(lines)
    assert not spilled, "spills at r <= 16:\n" + "\n".join(spilled)


def _parsed(line):
    """A printed compile_check line as the fields of its design table row."""
    f = line.split()
    value = {w.split(":")[0]: int(w.split(":")[1]) for w in f
             if w.startswith(("REG:", "STACK:", "SMEM:"))}
    return dict(kernel=f[1], mode=f[3], r=int(f[4][2:]),
                flags=" ".join(w for w in f if w.split("=")[0] in compile_check.FLAGS),
                warps=int(next(w for w in f if w.startswith("warps="))[6:]), **value)


def _design_table():
    """(the Triton release docs/design.md's resource table names, its rows)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "design.md")) as fh:
        text = fh.read()
    section = text[text.index(compile_check.DESIGN_BEGIN):text.index(compile_check.DESIGN_END)]
    version = re.search(r"Triton (\S+), commit", section)
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith(
        ("| kernel ", "| ---"))]
    assert version and rows, "docs/design.md has no generated resource table"
    return version.group(1), rows


def test_cost_loops_are_backward_branches_not_detours():
    """cost_triton.loops: a branch back to an earlier address is a loop, unless it returns
    from a block placed out of line (after an unconditional branch) that a branch from
    before its target enters: ptxas' fallback for a shuffle in a warp not converged."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks"))
    try:
        import cost_triton
    finally:
        sys.path.pop(0)
    sass = [(0x00, "MOV R1, R2"),
            (0x10, "@P0 BRA 0x80"),          # into the detour, from before its return target
            (0x20, "FADD R3, R3, R4"),       # the detour returns here
            (0x30, "FADD R5, R5, R3"),       # a loop: 0x30 .. 0x40
            (0x40, "@P1 BRA 0x30"),
            (0x50, "EXIT"),
            (0x60, "BRA 0x60"),              # the trap after EXIT: no loop
            (0x70, "NOP"),
            (0x80, "SHFL.BFLY PT, R3, R3, 0x1, 0x1f"),
            (0x90, "BRA 0x20")]
    assert cost_triton.loops(sass) == [(0x30, 0x40)]
    # the same block entered from inside the span it returns to is a loop
    looped = sass[:1] + [(0x10, "NOP"), (0x20, "@P0 BRA 0x80")] + sass[3:]
    assert cost_triton.loops(looped) == [(0x20, 0x90), (0x30, 0x40)]


@pytest.mark.slow  # compiles the stencil kernels of four cases for sm_90: ~1 min
def test_stencil_cost_within_budgets(tmp_path):
    """benchmarks/cost_triton.py (the stencil kernels' SASS, loops x trip counts): every
    kernel's loop structure is the one its trip counts name, the target's estimates are
    under the budgets (forward <= 12 us, backward <= 30 us, est. H100), and docs/design.md
    has the table this code gives (under the Triton release it names)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "cost_triton.py"),
                          "--json", str(tmp_path / "cost.json")], capture_output=True,
                         text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import cost_triton
    finally:
        sys.path.pop(0)
    rows = json.loads((tmp_path / "cost.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"stencil_fwd", "stencil_grad", "stencil_scatter",
                                           "stencil_bwd"}
    assert all(r["warp_instructions"] > 0 and r["stack"] == 0 for r in rows), rows
    assert not cost_triton.over_limits(rows), cost_triton.over_limits(rows)
    with open(os.path.join(root, "docs", "design.md")) as fh:
        text = fh.read()
    section = text[text.index(cost_triton.DESIGN_BEGIN):text.index(cost_triton.DESIGN_END)]
    if f"Triton {triton.__version__}," in section:
        for line in cost_triton.table(rows) + cost_triton.totals_table(rows):
            assert line in section, ("docs/design.md's Triton cost table is stale: "
                                     "regenerate it with python benchmarks/cost_triton.py "
                                     "--design docs/design.md\n" + line)


@pytest.mark.slow  # compiles two stencil forwards for sm_90: ~20 s
def test_compile_check_builds_both_z_cell_layouts():
    """compile_check --z-cells: the stencil compiled with its z cells held and loaded (the
    GPU's choice to settle, launch.Z_CELLS_ENV), each line naming which (HOLD), where the
    layer would pick one by their size; a name it does not know is refused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "convlora_kernels.triton_kernels.compile_check", "--first",
           "--dtypes", "bf16", "--interpolations", "bilinear", "--ranks", "8",
           "--kernels", "stencil_fwd", "--z-cells"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd + ["held,loaded"], capture_output=True, text=True, env=env,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("sm_90")]
    assert [next(w for w in f if w.startswith("HOLD=")) for f in lines] == \
        ["HOLD=True", "HOLD=False"], out.stdout
    assert all("STACK:0" in f for f in lines), out.stdout
    out = subprocess.run(cmd + ["hoisted"], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 2 and "--z-cells: expected some of ('held', 'loaded')" in \
        out.stderr, out.stderr


def test_design_table_reads_back():
    """The table's parser and compile_check's writer agree (the staleness check above
    compares them only under the Triton release the table names)."""
    version, rows = _design_table()
    line = ("sm_90 stencil_fwd       bf16  bilinear r=8   NBP=4                  warps=8 {} "
            "REG:114 STACK:0 SHARED:0 SMEM:0 (1.0s)")
    v = _parsed(line)
    assert v == dict(kernel="stencil_fwd", mode="bilinear", r=8, flags="NBP=4", warps=8,
                     REG=114, STACK=0, SMEM=0)
    assert compile_check.design_rows([v])[2] == \
        "| stencil_fwd | bilinear | 8 | NBP=4 | 8 | 114 | 0 | 0 |"
    assert any(r.startswith("| stencil_fwd | bilinear | 8 |") for r in rows)


_TWICE = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import make_case
from convlora_kernels import conv_lora_linear
torch.use_deterministic_algorithms(True)
c = make_case(batch=2, height=5, width=6, rank=4, scales=(1, 2, 3), seed=7).to(torch.float32,
                                                                              True)
y = conv_lora_linear(*c.args(), **c.kwargs(), backend="triton")
grads = torch.autograd.grad(y.square().sum(), [c.x, c.lora_A, c.lora_B, c.conv_weight,
                                               c.conv_bias])
torch.save([y.detach()] + list(grads), sys.argv[1])
"""


def test_deterministic_mode_is_bitwise_equal_across_processes(tmp_path):
    """Deterministic mode gives the same bits in two fresh processes (autotuning, whose
    winner can differ between processes, is off; the reductions run in a fixed order):
    forward and every gradient."""
    tests = os.path.dirname(os.path.abspath(__file__))
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.pt"
        r = subprocess.run([sys.executable, "-c", _TWICE.format(tests=tests), str(out)],
                           capture_output=True, text=True, env=dict(os.environ),
                           cwd=os.path.dirname(tests), timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(torch.load(out))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_deterministic_mode_pins_the_first_candidate(switch):
    """Deterministic mode never autotunes: the winner of a timing run can differ between
    processes, and candidates reduce in different orders."""
    pair = ("tuned", "first")
    was = torch.are_deterministic_algorithms_enabled()
    try:
        switch(launch.AUTOTUNE_ENV, "1")
        torch.use_deterministic_algorithms(False)
        assert launch._tuned_or_first(pair) == "tuned"
        torch.use_deterministic_algorithms(True)
        assert launch._tuned_or_first(pair) == "first"
        torch.use_deterministic_algorithms(False)
        switch(launch.AUTOTUNE_ENV, "0")
        assert launch._tuned_or_first(pair) == "first"
    finally:
        torch.use_deterministic_algorithms(was)


def test_unavailable_reason_on_cpu(monkeypatch):
    assert op.unavailable_reason("triton", torch.device("cuda")) is None
    if not launch.INTERPRETED:
        pytest.skip("the kernels are compiled for the GPU here")
    assert op.unavailable_reason("triton", torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in op.unavailable_reason("triton", torch.device("cpu"))
    assert "cuda" in op.unavailable_reason("triton", torch.device("meta"))


def test_clear_errors_for_unsupported_inputs():
    c = case(height=2, width=3, scales=(1, 2), dtype=torch.float64)
    with pytest.raises(TypeError, match="x: the triton backend takes float16, bfloat16 or "
                                        "float32 tensors, got torch.float64"):
        triton_op(*c.args(), **c.kwargs())
    c = case(height=2, width=3, rank=33, scales=(1,), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora_A: the triton backend supports ranks r <= 32 "
                                         r"\(above, its stencil kernels need more shared "
                                         r"memory than a GPU has\), got r = 33; use "
                                         r"backend='cuda' \(ranks up to 64\)"):
        triton_op(*c.args(), **c.kwargs())
    c = case(height=2, width=3, rank=65, scales=(1,), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"got r = 65; use backend='auto' \(which runs the "
                                         r"PyTorch reference for this rank\) or 'reference'"):
        triton_op(*c.args(), **c.kwargs())
    with pytest.raises(ValueError, match=r"r: backend='triton' supports ranks up to 32 "
                                         r"\(above, .*\), got r = 33"):
        ConvLoRALinear(16, 16, r=33, backend="triton")


# --- the stencil tables -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_table_resampling_is_designs_rules(mode):
    """The matrices behind the tables (from F.interpolate) are the rules of docs/design.md (Resampling), as
    written independently in tests/helpers.py."""
    for n in (1, 3, 9):
        for s in (2, 3, 4, 7, 16):
            up, down = tables._resample(n, s, mode)
            assert_close(up, resample_matrix(n, s * n, mode), 0, 1e-12, f"Up_{s} n={n}")
            assert_close(down, resample_matrix(s * n, n, mode), 0, 1e-12, f"Down_{s} n={n}")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_compressed_table_rows_equal_full_tables(mode):
    """A table keeps 2·BORDER + 1 rows; every index of a long axis maps to a row equal to
    its own (up to float64 rounding of the source positions)."""
    scales = tuple(range(1, 17))
    halo, taps = tables.halo(scales, mode), max(tables.down_taps(scales, mode))
    nbp = tables.next_pow2(2 * halo + 1)
    for n in (1, 2, 8, 9, 10, 23):
        small, om_small = tables.axis_tables(n, scales, mode, halo, taps, nbp)
        full, om_full = tables.axis_tables(n, scales, mode, halo, taps, nbp, rows=n)
        for h in range(n):
            row = tables.row_of(h, n)
            assert_close(small[:, row], full[:, h], 0, 1e-13, f"T n={n} h={h}")
            assert_close(om_small[:, row], om_full[:, h], 0, 1e-13, f"omega n={n} h={h}")


def test_halo_and_taps_follow_design():
    """docs/design.md (Resampling): halo 1 for bilinear; bicubic 3 at s = 2 and 2 above; one down tap for
    odd s, two (bilinear) or four (bicubic) for even s."""
    for s in range(1, 17):
        assert tables.halo((s,), "bilinear") == 1
        assert tables.halo((s,), "bicubic") == (1 if s == 1 else 3 if s == 2 else 2)
        assert tables.down_taps((s,), "bilinear") == (1 if s % 2 else 2,)
        assert tables.down_taps((s,), "bicubic") == (1 if s % 2 else 4,)



def test_tiles_run_heaviest_experts_first():
    """The stencil kernels take the experts with the most conv outputs first (their tiles
    fill the first wave); ties keep index order."""
    ntaps = tables.stencil_tables(5, 6, (1, 2, 3, 4), "bicubic", torch.device("cpu"))[4]
    assert ntaps.tolist() == [1, 4, 1, 4] + [1, 3, 0, 2]


def test_stencil_tables_outlive_any_graph():
    """The tables a launch reads are never evicted (a captured CUDA graph keeps their
    addresses): many geometries later, the first one's tensors are still the same."""
    first = tables.stencil_tables(7, 9, (1, 2), "bilinear", torch.device("cpu"))
    for h in range(2, 80):
        tables.stencil_tables(h, h + 1, (1, 3), "bilinear", torch.device("cpu"))
    again = tables.stencil_tables(7, 9, (1, 2), "bilinear", torch.device("cpu"))
    assert all(a is b for a, b in zip(first[:5], again[:5]))
    assert tables.stencil_tables.cache_info().maxsize is None

# --- forward and every gradient against the reference ------------------------------------

CASES = {
    # name: make_case arguments
    "bilinear-token": dict(height=5, width=6, rank=3, scales=(1, 2, 3, 4)),
    "bicubic-map": dict(height=5, width=7, rank=3, scales=(1, 2, 3), interpolation="bicubic",
                        gating="map"),
    "bicubic-token-even": dict(batch=1, height=4, width=3, rank=2, scales=(2, 4),
                               interpolation="bicubic"),
    "rank-1": dict(batch=1, height=4, width=5, rank=1, scales=(1, 2)),
    "rank-8": dict(batch=1, height=3, width=5, rank=8, scales=(3, 2)),
    "rank-20": dict(batch=1, height=3, width=4, rank=20, scales=(1, 2)),
    # a power-of-two rank: 4 channels of a token a thread (launch.Tiling.zv), cells loaded
    "rank-16": dict(batch=1, height=3, width=5, rank=16, scales=(3, 2)),
    # 2 channels a thread, bicubic's loaded cells and its scatter in row passes
    "rank-4-bicubic": dict(batch=1, height=4, width=4, rank=4, scales=(2, 1),
                           interpolation="bicubic"),
    "map-1x1": dict(batch=3, height=1, width=1, scales=(1, 2, 3), gating="map"),
    "map-1x7-bicubic": dict(batch=2, height=1, width=7, scales=(2, 5),
                            interpolation="bicubic", gating="map"),
    "scales-16-1-6": dict(batch=1, height=3, width=4, scales=(16, 1, 6),
                          interpolation="bicubic", gating="map"),
    "scale-16-bilinear": dict(batch=1, height=6, width=1, scales=(16, 7)),
    "no-bias": dict(batch=1, height=4, width=4, scales=(1, 2), bias=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_forward_and_every_gradient(name):
    c = case(seed=len(name), **CASES[name])
    check_accuracy_rule(triton_op, c, torch.float32, FLOOR32)


@pytest.mark.parametrize("name", ["bilinear-token", "bicubic-map", "rank-20", "scales-16-1-6",
                                  "no-bias"])
@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("taps_once", [True, False], ids=["taps-once", "taps-twice"])
def test_merged_backward_matches_reference(name, det, taps_once, monkeypatch, switch):
    """The merged stencil backward (one launch: g, dL/dconv_bias and dL/dW with each conv
    output's taps built once or twice, then dL/dz from g), forward and every gradient,
    both reduction paths; and bit-identical twice in deterministic mode."""
    switch(launch.BACKWARD_ENV, "merged")
    monkeypatch.setattr(launch, "merged_taps_once", lambda rz, dtype: taps_once)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        c = case(seed=len(name) + 50, **CASES[name])
        check_accuracy_rule(triton_op, c, torch.float32, FLOOR32)
        if det:
            c = c.to(torch.float32, True)
            names = ["x", "lora_A", "lora_B", "conv_weight", "conv_bias"]

            def run():
                y = triton_op(*c.args(), **c.kwargs())
                return torch.autograd.grad(y, [getattr(c, n) for n in names], torch.cos(y))

            for n, a, b in zip(names, run(), run()):
                assert torch.equal(a, b), n
    finally:
        torch.use_deterministic_algorithms(was)


CHUNKED = {"bicubic-rank-6": dict(batch=1, height=5, width=4, rank=6, scales=(1, 2, 3),
                                  interpolation="bicubic"),
           "bicubic-map-rank-7": dict(batch=2, height=4, width=5, rank=7, scales=(2, 3),
                                      interpolation="bicubic", gating="map")}


@pytest.mark.parametrize("name", list(CHUNKED))
@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("backward", launch.BACKWARDS)
def test_backward_in_channel_chunks(name, det, backward, monkeypatch, switch):
    """The backward's dL/dz phase (split: the scatter kernel's; merged: its last) runs
    RC < r channels at a time here (the second chunk partly past r), bicubic's in passes
    of AH < 7 rows of the neighbourhood, the cells loaded (the GPU's configuration,
    launch.GPU_TILING): forward and every gradient, both reduction paths."""
    switch(launch.BACKWARD_ENV, backward)
    monkeypatch.setattr(launch, "GPU_TILING", True)
    kw = CHUNKED[name]
    tiling = launch.Tiling(kw["height"], kw["width"], kw["rank"], len(kw["scales"]),
                           kw["scales"], kw.get("interpolation", "bilinear"), torch.float32,
                           DEV)
    assert tiling.rc < kw["rank"] < 2 * tiling.rc, (tiling.rc, kw["rank"])
    assert tiling.ah < 2 * tiling.halo + 1 and not tiling.hold, (tiling.ah, tiling.hold)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        check_accuracy_rule(triton_op, case(seed=len(name) + 70, **kw), torch.float32,
                            FLOOR32)
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("name", ["bicubic-map", "bicubic-token-even", "bilinear-token",
                                  "scales-16-1-6", "rank-8"])
@pytest.mark.parametrize("cells", launch.Z_CELLS)
@pytest.mark.parametrize("backward", launch.BACKWARDS)
def test_z_cells_held_or_loaded_match_reference(name, cells, backward, monkeypatch, switch):
    """Every stencil kernel with its z cells held across the tile's conv outputs ("held",
    the default where they fit) and loaded by each conv row ("loaded"): forward and every
    gradient, split and merged backward, either way."""
    switch(launch.Z_CELLS_ENV, cells)
    switch(launch.BACKWARD_ENV, backward)
    kw = CASES[name]
    tiling = launch.Tiling(kw["height"], kw["width"], kw.get("rank", 4), len(kw["scales"]),
                           kw["scales"], kw.get("interpolation", "bilinear"), torch.float32, DEV)
    assert tiling.hold == (cells == "held")
    check_accuracy_rule(triton_op, case(seed=len(name) + 90, **kw), torch.float32, FLOOR32)


def test_z_cells_default_follows_their_size(monkeypatch, switch):
    """Without the switch the z cells are held where they fit launch.CELL_FLOATS per
    thread (bilinear at r <= 8, not bicubic's 49 cells); a tile is 64 tokens in 4 warps,
    ZV channels of a token a thread (4 at the target's bilinear r = 8)."""
    monkeypatch.delenv(launch.Z_CELLS_ENV, raising=False)
    monkeypatch.setattr(launch, "GPU_TILING", True)
    for interpolation, rank, hold, bt, warps, zv in [
            ("bicubic", 3, False, 64, 4, 1), ("bicubic", 8, False, 64, 4, 4),
            ("bicubic", 16, False, 64, 4, 4), ("bilinear", 3, True, 64, 4, 1),
            ("bilinear", 4, True, 64, 4, 2), ("bilinear", 8, True, 64, 4, 4),
            ("bilinear", 16, False, 64, 4, 4)]:
        tiling = launch.Tiling(8, 8, rank, 8, range(1, 9), interpolation, torch.bfloat16, DEV)
        assert (tiling.hold, tiling.bt, tiling.warps, tiling.zv) == (hold, bt, warps, zv), \
            (interpolation, rank)
        # every thread of the tile holds a distinct part of it: no replicated layout
        assert tiling.bt * tiling.rz // tiling.zv >= 32 * tiling.warps, (interpolation, rank)
    switch(launch.Z_CELLS_ENV, "hoisted")
    with pytest.raises(ValueError, match="CONVLORA_TRITON_Z_CELLS: expected one of"):
        launch.hold_z_cells(1)


def test_backward_switch_names_its_values(monkeypatch, switch):
    switch(launch.BACKWARD_ENV, "fused")
    with pytest.raises(ValueError, match="CONVLORA_TRITON_BACKWARD: expected one of"):
        launch.backward_kernels()
    switch(launch.BACKWARD_ENV, "merged")
    assert launch.backward_kernels() == "merged"


def test_merged_backward_builds_the_taps_once_where_they_fit():
    """16-bit dtypes at a padded rank <= 8: once (compile_check: no spills); above, and in
    fp32, twice."""
    for rz, dtype, once in [(4, torch.bfloat16, True), (8, torch.float16, True),
                            (16, torch.bfloat16, False), (8, torch.float32, False)]:
        assert launch.merged_taps_once(rz, dtype) == once, (rz, dtype)


def test_fp32_runs_what_builds_without_spills(monkeypatch):
    """fp32 on a GPU (launch.GPU_TILING): the merged backward only where it builds without
    spills (not with held cells at RZ = 16: bilinear), and the forward and grad programs
    with the register cap ptxas allocates them in without spilling (compile_check); the
    16-bit dtypes as ptxas chooses. Under the interpreter merged runs wherever asked."""
    monkeypatch.setattr(launch, "GPU_TILING", True)
    for interpolation, rank, dtype, merged, caps in [
            ("bilinear", 16, torch.float32, False, (None, None, None, None)),
            ("bilinear", 8, torch.float32, True, (168, 184, None, None)),
            ("bilinear", 3, torch.float32, True, (168, 184, None, 184)),
            ("bicubic", 16, torch.float32, True, (168, 168, 240, 240)),
            ("bicubic", 8, torch.float32, True, (168, 168, 240, 240)),
            ("bilinear", 16, torch.bfloat16, True, (None, None, None, None)),
            ("bicubic", 8, torch.float16, True, (None, None, None, None))]:
        tiling = launch.Tiling(8, 8, rank, 8, range(1, 9), interpolation, dtype, DEV)
        assert tiling.merged == merged, (interpolation, rank, dtype)
        got = tuple(tiling.launch(k).get("maxnreg") for k in ("fwd", "grad", "scatter", "bwd"))
        assert got == caps, (interpolation, rank, dtype, got)
    monkeypatch.setattr(launch, "GPU_TILING", False)
    assert launch.Tiling(8, 8, 16, 8, range(1, 9), "bilinear", torch.float32, DEV).merged


def test_a_refused_merged_backward_warns_once(monkeypatch, switch):
    """Merged is the default backward where it builds; where it does not (fp32, held cells
    at RZ = 16 on a GPU) the split pair runs, silently by default, and with a warning once
    per rank and dtype where CONVLORA_TRITON_BACKWARD=merged asked for it; "split" runs
    split everywhere."""
    monkeypatch.setattr(launch, "GPU_TILING", True)
    monkeypatch.setattr(launch, "_MERGED_REFUSED", set())
    refused = launch.Tiling(8, 8, 16, 8, range(1, 9), "bilinear", torch.float32, DEV)
    builds = launch.Tiling(8, 8, 8, 8, range(1, 9), "bilinear", torch.float32, DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launch.runs_merged(builds)  # the default
        assert not launch.runs_merged(refused)  # not asked for: nothing to say
        switch(launch.BACKWARD_ENV, "split")
        assert not launch.runs_merged(builds)
        switch(launch.BACKWARD_ENV, "merged")
        assert launch.runs_merged(builds)
    with pytest.warns(RuntimeWarning, match=r"CONVLORA_TRITON_BACKWARD=merged: the merged "
                      r"stencil backward spills registers in torch.float32 with its z cells "
                      r"held at padded rank 16, so the split pair .* runs instead"):
        assert not launch.runs_merged(refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not launch.runs_merged(refused)  # once


def test_deterministic_mode_is_accurate_and_bit_identical(deterministic):
    c = case(height=5, width=4, rank=3, scales=(1, 2, 5), seed=21)
    check_accuracy_rule(triton_op, c, torch.float32, FLOOR32)
    c = c.to(torch.float32, True)
    names = ["x", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias"]

    def run():
        y = triton_op(*c.args(), **c.kwargs())
        grads = torch.autograd.grad(y, [getattr(c, n) for n in names], torch.cos(y))
        return [y] + list(grads)

    first, second = run(), run()
    for n, a, b in zip(["y"] + names, first, second):
        assert torch.equal(a, b), f"{n} differs between two deterministic runs"


def test_weight_gradient():
    c = case(batch=1, height=3, width=4, scales=(1, 2), seed=22).to(torch.float32, True)
    c.weight.requires_grad_(True)
    dy = torch.randn(1, 3, 4, 12, device=DEV)
    ga = torch.autograd.grad(triton_op(*c.args(), **c.kwargs()), [c.weight, c.x], dy)
    gb = torch.autograd.grad(conv_lora_linear_ref(*c.args(), **c.kwargs()), [c.weight, c.x],
                             dy)
    for n, a, b in zip(["dweight", "dx"], ga, gb):
        close(a, b, n)


@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
def test_unused_experts_get_zero_gradients(det, request):
    if det:
        request.getfixturevalue("deterministic")
    c = case(batch=1, height=4, width=4, scales=(1, 2, 3), seed=23).to(torch.float32, True)
    c.expert_index = torch.full_like(c.expert_index, 1)
    y = triton_op(*c.args(), **c.kwargs())
    y.square().sum().backward()
    g_w, g_b = c.conv_weight.grad, c.conv_bias.grad
    assert torch.isfinite(g_w).all() and torch.isfinite(g_b).all()
    assert g_w[1].abs().sum() > 0 and g_b[1].abs().sum() > 0
    assert (g_w[0] == 0).all() and (g_w[2] == 0).all()
    assert (g_b[0] == 0).all() and (g_b[2] == 0).all()


@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
def test_all_tokens_on_one_expert_match_reference(det, request):
    """Every token on one expert, over two 64-token tiles, the others with none: forward and
    every gradient against the reference."""
    if det:
        request.getfixturevalue("deterministic")
    c = case(batch=2, height=8, width=9, rank=8, scales=(1, 2, 3), seed=31)
    c.expert_index = torch.full_like(c.expert_index, 1)
    check_accuracy_rule(triton_op, c, torch.float32, FLOOR32)


@pytest.fixture(params=["bias_first", "one_kernel"])
def forward_plan(request, monkeypatch, switch):
    """The forward candidates that run the stencil apart from the GEMMs and inside them."""
    switch(plan.FORWARD_ENV, request.param)
    return request.param


def test_bl_input_strided_x_and_index(forward_plan):
    c = case(batch=2, height=3, width=4, scales=(1, 2), seed=24)
    big = torch.randn(2, 6, 4, 16, dtype=c.x.dtype, device=DEV)
    big[:, ::2, :, 4:12] = c.x
    xs = big[:, ::2, :, 4:12]
    big_idx = torch.zeros(2, 3, 8, dtype=torch.int64, device=DEV)
    big_idx[:, :, ::2] = c.expert_index
    args = (xs,) + c.args()[1:7] + (big_idx[:, :, ::2], c.scaling)
    assert not xs.is_contiguous()
    y = triton_op(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                    for a in args], **c.kwargs())
    ref = conv_lora_linear_ref(*c.args(), **c.kwargs())
    close(y, ref, "strided y")
    c32 = c.to(torch.float32)
    x3 = c32.x.reshape(2, 12, -1)
    y3 = triton_op(x3, *c32.args()[1:], **c32.kwargs(), hw=(3, 4))
    assert y3.shape == (2, 12, 12)
    close(y3.reshape(2, 3, 4, 12), ref, "(B, L, C) y")
    with torch.no_grad():  # inference: the one-kernel forward keeps no u
        close(triton_op(*c32.args(), **c32.kwargs()), ref, "y without grad")


def test_precomputed_z_carries_lora_A_gradient():
    c = case(batch=1, height=4, width=3, scales=(1, 2), seed=25).to(torch.float32, True)
    dy = torch.randn(1, 4, 3, 12, device=DEV)
    y = conv_lora_linear_ref(*c.args(), **c.kwargs())
    ga = torch.autograd.grad(y, [c.x, c.lora_A, c.conv_weight], dy)
    z = c.x @ c.lora_A.t()
    yz = triton_op(*c.args(), **c.kwargs(), z=z)
    close(yz, y, "y")
    gz = torch.autograd.grad(yz, [c.x, c.lora_A, c.conv_weight], dy)
    for n, a, b in zip(["dx", "dlora_A", "dconv_weight"], gz, ga):
        close(a, b, n)
    # z is used as given, and its gradient is returned for it alone
    z2 = (2 * z).detach().requires_grad_(True)
    y2 = triton_op(*c.args(), **c.kwargs(), z=z2)
    close(y2, conv_lora_linear_ref(*c.args(), **c.kwargs(), z=z2), "y(2z)")
    g_ref = torch.autograd.grad(conv_lora_linear_ref(*c.args(), **c.kwargs(), z=z2), z2, dy)
    close(torch.autograd.grad(y2, z2, dy)[0], g_ref[0], "dz")


@pytest.mark.parametrize("n,experts,low,high", [
    (1, 1, 0, 1), (7, 3, -2, 5), (3 * launch.SORT_BLOCK + 17, 8, 0, 8),
    (2 * launch.SORT_BLOCK + 1, 16, -3, 20), (130, 5, 0, 5)])
def test_counting_sort_is_a_stable_sort_by_expert(n, experts, low, high):
    """sort_tokens against torch's stable sort: the same bounds, and the same order of every
    in-range token; every token exactly once (out-of-range ones outside the bounds)."""
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(low, high, (n,), generator=g).to(DEV)
    perm, bounds = launch.sort_tokens(idx, experts)
    keys, order = torch.sort(idx.to(torch.int32), stable=True)
    ref = torch.searchsorted(keys, torch.arange(experts + 1, dtype=torch.int32, device=DEV))
    assert perm.dtype == torch.int64 and bounds.dtype == torch.int32
    assert torch.equal(bounds, ref.to(torch.int32))
    assert torch.equal(perm[bounds[0]:bounds[-1]], order[ref[0]:ref[-1]])
    assert torch.equal(perm.sort().values, torch.arange(n, device=DEV))


@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
def test_dy_pass_sums_across_programs(det, monkeypatch):
    """The dy pass against torch with more row blocks than programs, twice. Deterministic
    mode keeps DY_PARTIALS slots of partial sums whatever N is (here 3 for 7 row blocks),
    each program adding its row blocks into its own slot. With atomics the programs add
    into accumulators that are zero between launches and the last program writes the sums
    out and zeroes them again: the second call gives the same sums, and the accumulators
    and the ticket counter are zero after it."""
    from convlora_kernels.triton_kernels import device

    monkeypatch.setattr(launch, "DY_PARTIALS", 3)
    shapes = []
    empty = launch._empty
    monkeypatch.setattr(launch, "_empty", lambda shape, dtype, dev: (
        shapes.append(tuple(shape)), empty(shape, dtype, dev))[1])
    g = torch.Generator().manual_seed(40)
    n, c_out, r, s = 7 * launch.DY_BT - 5, 20, 3, 0.7
    dy, lora_b, u = (torch.randn(*shape, generator=g).to(DEV)
                 for shape in ((n, c_out), (c_out, r), (n, r)))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        first = launch.dy_pass(dy, lora_b, u, s, True, True)
        du, d_lora_b, d_bias = launch.dy_pass(dy, lora_b, u, s, True, True)
    finally:
        torch.use_deterministic_algorithms(was)
    close(du, s * dy @ lora_b, "du")
    close(d_lora_b, s * dy.t() @ u, "dlora_B")
    close(d_bias, dy.sum(0), "dbias")
    for a, b in zip(first[1:], (d_lora_b, d_bias)):
        close(a, b, "the first call")
    dev = torch.device(DEV)
    if det:
        assert (3, c_out, r) in shapes and (3, c_out) in shapes, shapes
    else:
        assert not any(len(sh) == 3 for sh in shapes), shapes  # no partial slots
        assert device.zeroed(dev, c_out * r + c_out, torch.float32).eq(0).all()
        assert device.ticket_counter(dev).item() == 0


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_float16_by_the_accuracy_rule(mode, forward_plan):
    """float16 runs under the interpreter too (bfloat16 does not: its tl.dot multiplies
    the raw 16-bit patterns), so every kernel's half-precision path, the one-kernel forward's
    included, is checked here against the reference, forward and every gradient."""
    c = case(batch=1, height=5, width=6, rank=3, scales=(1, 2, 3), interpolation=mode,
             seed=5)
    check_accuracy_rule(triton_op, c, torch.float16, 1e-4)


@triton.jit
def _gelu_probe_kernel(x_ptr, y_ptr, d_ptr, n, SIXTEEN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m)
    tl.store(y_ptr + i, stencil.gelu(x, SIXTEEN), mask=m)
    tl.store(d_ptr + i, stencil.gelu_grad(x, SIXTEEN), mask=m)


@pytest.mark.parametrize("sixteen,tol", [(True, 5e-7), (False, 1e-6)])
def test_stencil_gelu_forms_against_float64(sixteen, tol):
    """stencil.gelu and gelu_grad, as the kernels take them for 16-bit inputs (the one-
    exponential form the C++ stencils share) and for float32 (erf), against float64 over
    [-20, 20]: the GELU within tol of max(1, |GELU|), the slope within tol."""
    import math

    x = torch.cat([torch.linspace(-20, 20, 4_001), torch.tensor([0.0, -0.0, 1e-30]),
                   torch.randn(2_000, generator=torch.Generator().manual_seed(0)) * 3])
    x = x.to(DEV)
    y, d = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    block = 1024
    _gelu_probe_kernel[(triton.cdiv(x.numel(), block),)](x, y, d, x.numel(), sixteen, block)
    xd = x.cpu().double()
    phi = 0.5 * (1 + torch.tensor([math.erf(v / math.sqrt(2)) for v in xd.tolist()],
                                  dtype=torch.float64))
    ref, dref = xd * phi, phi + xd * torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
    assert ((y.cpu().double() - ref).abs() / ref.abs().clamp_min(1)).max().item() <= tol
    assert (d.cpu().double() - dref).abs().max().item() <= tol


def test_empty_batch_forward_and_backward(forward_plan):
    c = case(batch=0, scales=(1, 2), seed=26).to(torch.float32, True)
    y = triton_op(*c.args(), **c.kwargs())
    assert y.shape == (0, 5, 6, 12)
    y.sum().backward()
    for n in ("lora_A", "lora_B", "conv_weight", "conv_bias", "bias"):
        g = getattr(c, n).grad
        assert g is not None and (g == 0).all(), n
    assert c.x.grad.shape == c.x.shape


@pytest.mark.parametrize("gating,interpolation", [("token", "bilinear"), ("map", "bicubic")])
def test_module_backend_triton_matches_reference(gating, interpolation):
    """The router inside the layer's op (one expert per map reaches the Triton stencil as
    one per token) against the reference module's router outside, every gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 12, device=DEV)
    layers = [ConvLoRALinear.from_linear(lin, r=3, num_experts=2, backend=b, gating=gating,
                                         interpolation=interpolation).train()
              for b in ("triton", "reference")]
    with torch.no_grad():
        for p in ("lora_B", "conv_bias", "router.w_gate", "router.w_noise"):
            layers[0].get_parameter(p).normal_()
        layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 3, 4, 8, device=DEV)
    outs = []
    for module in layers:
        torch.manual_seed(1)  # the same router noise
        y = module(x)
        ((y * torch.cos(y.detach())).sum() + module.aux_loss).backward()
        outs.append((y, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    close(outs[0][0], outs[1][0], "y")
    for n, g in outs[1][1].items():
        close(outs[0][1][n], g, f"d{n}")


def test_torch_compile_sees_no_graph_break():
    c = case(batch=1, height=3, width=3, scales=(1, 2), seed=27).to(torch.float32, True)
    # the public op, backend resolution included, traces to one graph
    fn = torch.compile(conv_lora_linear, fullgraph=True, backend="aot_eager")
    y = fn(*c.args(), **c.kwargs(), backend="triton")
    y.square().sum().backward()
    ref = c.to(torch.float32, True)
    y_ref = conv_lora_linear_ref(*ref.args(), **ref.kwargs())
    y_ref.square().sum().backward()
    close(y, y_ref, "y")
    close(c.conv_weight.grad, ref.conv_weight.grad, "dconv_weight")


def test_opcheck():
    c = case(batch=1, height=2, width=3, scales=(1, 2), seed=28).to(torch.float32, True)
    idx = c.expert_index.reshape(-1)
    for forward_plan in plan.FORWARD_CANDIDATES:
        args = (c.x.reshape(-1, c.x.shape[-1]), c.weight, c.bias, c.lora_A, c.lora_B,
                c.conv_weight, c.conv_bias, idx, None, c.scaling, list(c.scales),
                c.interpolation, 2, 3, "triton", forward_plan, True)
        torch.library.opcheck(torch.ops.convlora_layer.forward.default, args)
    # the layer with its router inside (ConvLoRALinear's path), both gatings
    n = c.conv_weight.shape[0]
    w_gate, w_noise = torch.randn(c.lora_A.shape[0], n), torch.randn(c.lora_A.shape[0], n)
    for gating, units in (("map", 1), ("token", 6)):
        args = (c.x.reshape(-1, c.x.shape[-1]), c.weight, c.bias, c.lora_A, c.lora_B,
                c.conv_weight, c.conv_bias, w_gate, w_noise, torch.randn(units, n), 1e-2, 1e-2,
                gating, c.scaling, list(c.scales), c.interpolation, 2, 3, "triton",
                "bias_first", True)
        torch.library.opcheck(torch.ops.convlora_layer.routed_forward.default, args)


# --- the two-source GEMM -------------------------------------------------------------------

@pytest.mark.parametrize("m,k1,n", [(3, 1, 5), (37, 33, 130), (129, 70, 17), (5, 64, 256)])
@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
def test_two_source_gemm_matches_float64(m, k1, n, r):
    """C = A1 B1 + alpha · A2 B2 + bias against float64: every K remainder of the first
    tile (BK = 32) and of the padded rank, M and N not multiples of the tile, B operands as
    the transposed parameter views the layer passes, A1 with a row stride wider than K1,
    the output poisoned (NaN) before the kernel writes it."""
    g = torch.Generator().manual_seed(m * 1000 + k1 * 10 + r)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    wide, w0, u, lora_b, bias = rnd(m, k1 + 7), rnd(n, k1), rnd(m, r), rnd(n, r), rnd(n)
    a1 = wide[:, :k1]
    alpha = 0.37
    expected = a1 @ w0.t() + alpha * (u @ lora_b.t()) + bias
    f32 = [t.to(torch.float32).to(DEV) for t in (wide, w0, u, lora_b, bias)]
    got = launch.two_source_gemm(f32[0][:, :k1], f32[1].t(), f32[2], f32[3].t(), alpha, f32[4])
    assert got.shape == (m, n) and got.dtype == torch.float32
    close(got.double().cpu(), expected, f"C ({m}, {k1}, {n}, r = {r})")
    # no bias; dx's operands: B1 = W0 itself, B2 = lora_A (r, n) as stored
    lora_a, w_dx = rnd(r, n), rnd(k1, n)
    expected = a1 @ w_dx + u @ lora_a
    got = launch.two_source_gemm(f32[0][:, :k1], w_dx.float().to(DEV), f32[2],
                                 lora_a.float().to(DEV), 1.0)
    close(got.double().cpu(), expected, f"dx-like C ({m}, {k1}, {n}, r = {r})")


# --- GPU only ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_go_to_the_tensors_device(deterministic):
    """Tensors on cuda:1 while cuda:0 is current: every Triton launch goes to cuda:1
    (triton_kernels/device.py), so forward and every gradient equal a run with cuda:1
    current, bit for bit (deterministic mode)."""
    c = case(batch=2, height=8, width=8, rank=8, scales=tuple(range(1, 9)), seed=90,
             device="cuda:1").to(torch.bfloat16, True)

    def run():
        y = triton_op(*c.args(), **c.kwargs())
        return [y] + list(torch.autograd.grad(y.float().square().sum(),
                                              [c.x, c.lora_A, c.lora_B, c.conv_weight]))

    with torch.cuda.device(0):
        away = run()
    with torch.cuda.device(1):
        home = run()
    for a, b in zip(away, home):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


@pytest.fixture
def untuned(monkeypatch, switch):
    """GPU tests check each kernel's first autotuning candidate: compiling and timing every
    candidate of every kernel would take most of their time (one test covers tuning)."""
    switch("CONVLORA_TRITON_AUTOTUNE", "0")


@pytest.mark.gpu
@gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("dtype,floor,mode,gating", [
    (torch.bfloat16, 1e-3, "bilinear", "token"), (torch.bfloat16, 1e-3, "bicubic", "map"),
    (torch.float16, 1e-4, "bilinear", "token")])
def test_gpu_half_precision_accuracy(dtype, floor, mode, gating, forward_plan):
    c = case(batch=2, height=14, width=14, c_in=64, c_out=96, rank=8,
             scales=tuple(range(1, 9)), interpolation=mode, gating=gating, seed=30)
    check_accuracy_rule(triton_op, c, dtype, floor)


@pytest.mark.gpu
@gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("shape,mode,gating", [((2, 64, 64, 768), "bilinear", "token"),
                                               ((50, 14, 14, 768), "bicubic", "map")])
def test_gpu_sam_shapes(shape, mode, gating, forward_plan):
    b, h, w, c_in = shape
    c = case(batch=b, height=h, width=w, c_in=c_in, c_out=3 * c_in, rank=8,
             scales=tuple(range(1, 9)), interpolation=mode, gating=gating, seed=31)
    check_accuracy_rule(triton_op, c, torch.bfloat16, 1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.usefixtures("untuned")
def test_gpu_deterministic_runs_are_bit_identical(deterministic):
    c = case(batch=2, height=32, width=32, c_in=64, c_out=192, rank=8,
             scales=tuple(range(1, 9)), seed=32)
    check_accuracy_rule(triton_op, c, torch.bfloat16, 1e-3)
    c = c.to(torch.bfloat16, True)
    names = ["x", "lora_A", "lora_B", "conv_weight", "conv_bias"]

    def run():
        y = triton_op(*c.args(), **c.kwargs())
        return [y] + list(torch.autograd.grad(y, [getattr(c, n) for n in names],
                                              torch.cos(y)))

    for n, a, b in zip(["y"] + names, run(), run()):
        assert torch.equal(a, b), f"{n} differs between two deterministic runs"


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_training_step(deterministic):
    """A training step of the triton backend (forward and every gradient) captured in a
    CUDA graph and replayed gives what the step gives eagerly, bit for bit (deterministic
    mode): no launch synchronises with the host, and every table a captured launch reads
    stays alive (tables.stencil_tables never evicts)."""
    c = case(batch=2, height=16, width=16, c_in=64, c_out=96, rank=8,
             scales=tuple(range(1, 9)), seed=35).to(torch.bfloat16, True)
    names = ["x", "lora_A", "lora_B", "conv_weight", "conv_bias"]
    params = [getattr(c, n) for n in names]

    def step():
        y = triton_op(*c.args(), **c.kwargs())
        return [y] + list(torch.autograd.grad(y.float().square().sum(), params))

    # Detached: a live graph would keep the leaves' AccumulateGrad nodes, made on the default
    # stream, and the captured backward would then sync with that stream, which breaks the
    # capture.
    want = [t.detach() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) off the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for n, a, b in zip(["y"] + names, got, want):
        assert torch.equal(a, b), f"{n} differs between the graph's replay and the eager step"


@pytest.mark.gpu
@gpu
def test_gpu_autotuning_keeps_results(monkeypatch, switch):
    """Timing runs of kernels that accumulate (y, dL/dz, atomics) restore their outputs."""
    switch("CONVLORA_TRITON_AUTOTUNE", "1")
    c = case(batch=2, height=16, width=16, c_in=64, c_out=96, rank=8,
             scales=tuple(range(1, 9)), seed=33)
    check_accuracy_rule(triton_op, c, torch.bfloat16, 1e-3)  # tunes on the first call
    check_accuracy_rule(triton_op, c, torch.bfloat16, 1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_compile_check_agrees_with_the_jit():
    """compile_check compiles a launch as the JIT does: for the same launch of the dL/dz
    gather, its cubin's registers, stack and shared memory equal those of the kernel the
    JIT built and ran."""
    from convlora_kernels.triton_kernels import dense

    n, h, w, r, halo = 2 * 14 * 14, 14, 14, 8, 3
    nb = 2 * halo + 1
    du = torch.randn(n, r, device="cuda")
    part = torch.randn(n, nb, nb, r, device="cuda")
    dz = torch.empty(n, r, device="cuda", dtype=torch.bfloat16)
    args = (du, part, dz, n, h, w, r)
    kwargs = dict(BT=launch.GATHER_BT, RP=16, HALO=halo, num_warps=4)
    dense.gather_dz_kernel[(triton.cdiv(n, launch.GATHER_BT),)](*args, **kwargs)
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    ran = list(dense.gather_dz_kernel.device_caches[device][0].values())
    arch = torch.cuda.get_device_capability()
    built = compile_check.compile_launch(dense.gather_dz_kernel, args, kwargs,
                                         arch[0] * 10 + arch[1])
    usage = compile_check._usage(built.asm["cubin"])
    assert usage and any(compile_check._usage(k.asm["cubin"]) == usage for k in ran), \
        (usage, [compile_check._usage(k.asm["cubin"]) for k in ran])
    assert any(k.metadata.shared == built.metadata.shared for k in ran)

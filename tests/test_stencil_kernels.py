"""The tiled stencil kernels themselves: how a call is cut (stencil_grid), the GPU
resources of the compiled CUDA kernels (read from the build, no GPU needed), the checked
CPU build (bounds-checked shared memory, poisoned buffers), and the stencil ops on maps
of many tiles, partial tiles and every shared/global memory path against the reference."""

import os
import re

import pytest
import torch

from convlora_kernels import _ext
from convlora_kernels.backends.extension import INTERPOLATION_CODES

from helpers import assert_close

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
RANK_BOUNDS = (4, 8, 16, 32, 64)
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # shared memory per SM (A100, H100)
SMEM_PER_BLOCK_RESERVED = 1024  # the runtime's reservation per resident block


def _grid(r, n, mode, backward, smem_kb=0):
    keys = ("bytes", "w_smem", "dw_smem", "threads", "tile_h", "tile_w", "round")
    return dict(zip(keys, torch.ops.convlora.stencil_grid(r, n, INTERPOLATION_CODES[mode],
                                                          backward, smem_kb)))


@pytest.fixture(scope="module", autouse=True)
def _built():
    mod, why = _ext.load()
    if mod is None:
        pytest.fail(why)


def test_rank_limit_is_the_extensions():
    """_validate.MAX_FUSED_RANK, which the Python side checks, is the extension's kMaxRank."""
    from convlora_kernels._validate import MAX_FUSED_RANK

    assert RANK_BOUNDS[-1] == MAX_FUSED_RANK
    _grid(MAX_FUSED_RANK, 8, "bilinear", True)
    with pytest.raises(RuntimeError, match=rf"r must be in \[1, {MAX_FUSED_RANK}\]"):
        _grid(MAX_FUSED_RANK + 1, 8, "bilinear", True)


def test_stencil_grid_at_the_target_configuration():
    """r = 8, 8 experts, bilinear: weights (and in the backward the transposed weights and
    the weight-gradient sums) in shared memory, and at least two blocks per SM of an H100
    in both directions (the forward also on an A100); the forward's blocks of 256 threads
    take a round of 256 items, one a thread."""
    for backward in (False, True):
        p = _grid(8, 8, "bilinear", backward)
        print(f"backward={backward}: {p}")
        assert p["threads"] == (128 if backward else 256), p
        assert (p["tile_h"], p["tile_w"]) == (8, 8)
        if not backward:
            assert p["round"] == p["threads"], p
        assert p["w_smem"] == 1 and p["dw_smem"] == int(backward), p
        per_block = p["bytes"] + SMEM_PER_BLOCK_RESERVED
        assert 2 * per_block <= SMEM_PER_SM[90], p
        if not backward:
            assert 2 * per_block <= SMEM_PER_SM[80], p
    # Every configuration fits one block's opt-in shared memory on an A100 (163 KB).
    largest = max(_grid(r, 16, mode, backward)["bytes"] for r in range(1, 65)
                  for mode in ("bilinear", "bicubic") for backward in (False, True))
    assert largest <= 163 * 1024, largest


# --- GPU resources, read from the compiled extension --------------------------------

def _resources():
    """{(arch, kernel signature): {REG, STACK, SHARED, LOCAL}} of every kernel in _C."""
    return _cost_model().resources()


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="_C was built without CUDA kernels")
def test_cuda_kernel_resources():
    """No stack frame and no local memory in any tile kernel at R <= 16, every dtype and
    mode; at most 128 registers at R <= 8 (four 128-thread or two 256-thread blocks per
    SM). The prep kernel (one thread per table entry, once per call) keeps one tap record
    on its stack."""
    if _ext.cuobjdump() is None:
        pytest.fail("cuobjdump not found (neither in CUDA_HOME/bin, on PATH nor in triton)")
    res = _resources()
    tiles = {k: v for k, v in res.items() if "stencil_tile_kernel" in k[1]}
    print("\n".join(f"sm_{a} {n}: {v}" for (a, n), v in sorted(tiles.items())))
    # Every architecture the build holds machine code for: sm_80 and sm_90 by default
    # (setup.py), the card's own when TORCH_CUDA_ARCH_LIST names it (benchmarks/gpu_check.sh).
    archs = sorted({a for a, _ in tiles})
    assert archs, "no stencil_tile_kernel machine code in _C"
    for arch in archs:
        kernels = [(n, v) for (a, n), v in tiles.items() if a == arch]
        # R x interp x (fwd, bwd) x dtype
        assert len(kernels) == len(RANK_BOUNDS) * 2 * 2 * 3, (arch, len(kernels))
        for name, v in kernels:
            R = int(re.search(r"stencil_tile_kernel<(\d+),", name).group(1))
            if R <= 16:
                assert v["STACK"] == 0 and v["LOCAL"] == 0, (arch, name, v)
            if R <= 8:
                assert v["REG"] <= 128, (arch, name, v)
        # the composed-weight forward and backward (R = 8) x dtype: no stack, at most 128
        # registers
        cells = [(n, v) for (a, n), v in res.items() if a == arch and "stencil_cells" in n]
        assert len(cells) == 2 * 3, (arch, cells)
        for name, v in cells:
            assert v["STACK"] == 0 and v["LOCAL"] == 0 and v["REG"] <= 128, (arch, name, v)
        # the prep, with the composed weights' entries (eight tap tables computed each):
        # no stack (compact keeps a Taps in registers)
        preps = [v for (a, n), v in res.items() if a == arch and "prep_kernel" in n]
        assert preps and all(v["STACK"] == 0 and v["LOCAL"] == 0 for v in preps), preps
        # the map programs (r <= 8) and their fold (with the reduce): no stack, no local
        # memory, <= 128 regs
        maps = [(n, v) for (a, n), v in res.items() if a == arch and
                ("stencil_map_kernel" in n or "fold_reduce_kernel" in n)]
        assert len(maps) == 2 * 2 * 3 * 3, (arch, len(maps))  # R x interp x (fwd, bwd, fold)
        for name, v in maps:
            assert v["STACK"] == 0 and v["LOCAL"] == 0 and v["REG"] <= 128, (arch, name, v)


# --- The checked CPU build ---------------------------------------------------------

def _build_checked(tmp_path_factory, namespace, *defines):
    """The CPU kernels built again with CONVLORA_CHECKED under torch.ops.<namespace>."""
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp(namespace)
    load(name=namespace, sources=[os.path.join(CSRC, "ops.cpp"),
                                  os.path.join(CSRC, "stencil_cpu.cpp")],
         extra_cflags=["-O1", "-g", "-std=c++20", "-DCONVLORA_CHECKED",
                       f"-DCONVLORA_NS={namespace}", *defines],
         extra_include_paths=[CSRC], build_directory=str(build), is_python_module=False,
         verbose=False)
    return getattr(torch.ops, namespace)


@pytest.fixture(scope="module")
def checked_ops(tmp_path_factory):
    return _build_checked(tmp_path_factory, "convlora_checked")


STENCIL_CASES = [
    # (mode, (B, H, W), scales, rank): many tiles, partial tiles, every scale parity,
    # weights and weight-gradient sums in shared or in global memory
    ("bilinear", (2, 17, 23), tuple(range(1, 9)), 8),
    ("bilinear", (1, 9, 8), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16), 3),
    ("bilinear", (2, 9, 12), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 6),
    ("bilinear", (3, 5, 11), (2, 1, 4), 16),
    ("bilinear", (1, 10, 9), (3, 2), 20),
    ("bilinear", (1, 9, 11), (2, 1, 4), 40),
    ("bicubic", (2, 19, 10), tuple(range(1, 9)), 4),
    ("bicubic", (2, 11, 13), tuple(range(1, 9)), 8),
    ("bicubic", (1, 9, 6), (2, 3, 4), 24),
    ("bicubic", (1, 7, 9), (2, 16, 1), 33),
]


def _stencil_problem(mode, bhw, scales, rank, dtype, seed=0, per_map=False):
    """Random operands; per_map: expert_index (B,), one expert per map (the map programs)."""
    b, h, w = bhw
    g = torch.Generator().manual_seed(seed)
    n, tokens = len(scales), b * h * w
    z = torch.randn(tokens, rank, generator=g, dtype=torch.float64).to(dtype)
    du = torch.randn(tokens, rank, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, n, (b if per_map else tokens,), generator=g, dtype=torch.int32)
    cw = (torch.randn(n, rank, rank, 3, 3, generator=g, dtype=torch.float64) /
          (3 * rank ** 0.5)).to(dtype)
    cb = torch.randn(n, rank, generator=g, dtype=torch.float64).to(dtype)
    return z, du, idx, cw, cb, [int(s) for s in scales], INTERPOLATION_CODES[mode], h, w


def _reference_stencil(z, du, idx, cw, cb, scales, mode, h, w):
    """u = z + E(z) and its VJP from the reference layer with identity projections."""
    from convlora_kernels.reference import conv_lora_linear_ref

    r = z.shape[1]
    if idx.numel() != z.shape[0]:  # one expert per map
        idx = idx.repeat_interleave(h * w)
    eye = torch.eye(r, dtype=z.dtype)
    zz = z.detach().clone().reshape(-1, h, w, r).requires_grad_(True)
    cwr, cbr = cw.clone().requires_grad_(True), cb.clone().requires_grad_(True)
    u = conv_lora_linear_ref(zz, torch.zeros(r, r, dtype=z.dtype), None, eye, eye, cwr, cbr,
                             idx.reshape(-1, h, w).long(), 1.0, scales=scales,
                             interpolation=["bilinear", "bicubic"][mode])
    grads = torch.autograd.grad(u, [zz, cwr, cbr], du.reshape(u.shape))
    return u.reshape(-1, r), [g.reshape(t.shape) for g, t in zip(grads, (z, cw, cb))]


@pytest.mark.parametrize("mode,bhw,scales,rank", STENCIL_CASES)
def test_stencil_ops_match_the_reference_in_float64(mode, bhw, scales, rank):
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, torch.float64)
    u, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    dz, dw, db = torch.ops.convlora.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    u_ref, (dz_ref, dw_ref, db_ref) = _reference_stencil(z, du, idx, cw, cb, sc, m, h, w)
    for name, a, b in [("u", u, u_ref), ("dz", dz, dz_ref), ("dconv_weight", dw, dw_ref),
                       ("dconv_bias", db, db_ref)]:
        assert_close(a, b, 1e-10, 1e-10, name)


def test_stencil_cases_cover_every_memory_path():
    seen = set()
    for mode, _, scales, rank in STENCIL_CASES:
        p = _grid(rank, len(scales), mode, True)
        seen.add((p["w_smem"], p["dw_smem"]))
    assert seen == {(1, 1), (1, 0), (0, 0)}, seen


@pytest.mark.parametrize("mode,bhw,scales,rank", STENCIL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checked_build_matches(checked_ops, mode, bhw, scales, rank, dtype):
    """The checked build runs the same phases with every shared index bounds-checked and
    each buffer poisoned (NaN) before the phase that writes it: a read outside the staged
    halo, or before the barrier that publishes a value, raises or turns the result NaN."""
    args = _stencil_problem(mode, bhw, scales, rank, dtype, seed=rank)
    z, du, idx, cw, cb, sc, m, h, w = args
    u, pre = checked_ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    grads = checked_ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    assert torch.isfinite(u).all() and all(torch.isfinite(g).all() for g in grads)
    u_main, pre_main = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    assert torch.equal(u, u_main)
    for name, a, b in zip(("dz", "dconv_weight", "dconv_bias"), grads,
                          torch.ops.convlora.stencil_bwd(du, z, pre_main, idx, cw, cb, sc, m, h,
                                                         w)):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close(a, b, tol, tol, name)


MAP_CASES = [
    # (mode, (B, H, W), scales, rank): one expert per map. Several maps (each scale parity),
    # partial tiles, 4 x 4 tiles (bicubic R = 8), maps smaller than the halo, and r > 8
    # (the per-token programs with the map's expert on every token).
    ("bicubic", (6, 19, 10), tuple(range(1, 9)), 3),
    ("bicubic", (5, 14, 14), (2, 16, 1, 3, 8), 8),
    ("bicubic", (4, 3, 2), (2, 5), 1),
    ("bilinear", (6, 17, 23), tuple(range(1, 9)), 4),
    ("bilinear", (5, 9, 8), (1, 2, 7, 16, 6), 7),
    ("bicubic", (3, 9, 10), (1, 2, 4), 12),
]


@pytest.mark.parametrize("mode,bhw,scales,rank", MAP_CASES)
def test_map_programs_match_the_reference_in_float64(mode, bhw, scales, rank):
    """expert_index (B,): the map programs (csrc/stencil_map.h), forward and every gradient,
    against the reference with each map's expert on all its tokens; the per-token programs
    on that expanded index agree."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, torch.float64,
                                                       seed=rank, per_map=True)
    assert len(set(idx.tolist())) > 1
    u, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    grads = torch.ops.convlora.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    u_ref, grads_ref = _reference_stencil(z, du, idx, cw, cb, sc, m, h, w)
    tok = idx.repeat_interleave(h * w)
    u_tok, pre_tok = torch.ops.convlora.stencil_fwd(z, tok, cw, cb, sc, m, h, w, True)
    grads_tok = torch.ops.convlora.stencil_bwd(du, z, pre_tok, tok, cw, cb, sc, m, h, w)
    assert_close(pre, pre_tok, 1e-12, 1e-12, "pre-activations")
    for name, a, b, c in zip(("u", "dz", "dconv_weight", "dconv_bias"), (u, *grads),
                             (u_ref, *grads_ref), (u_tok, *grads_tok)):
        assert_close(a, b, 1e-10, 1e-10, name)
        assert_close(a, c, 1e-12, 1e-12, name + " (per-token programs)")


@pytest.mark.parametrize("mode,bhw,scales,rank", MAP_CASES[:5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checked_build_runs_the_map_programs(checked_ops, mode, bhw, scales, rank, dtype):
    """The map programs in the checked build: every shared index bounds-checked, buffers
    poisoned, the race check on, and the list invariants (conv rows in order, at most two
    token taps per conv row) asserted."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, dtype,
                                                       seed=rank, per_map=True)
    u, pre = checked_ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    grads = checked_ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    assert torch.isfinite(u).all() and all(torch.isfinite(g).all() for g in grads)
    u_main, pre_main = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(u, u_main, tol, tol, "u")
    for name, a, b in zip(("dz", "dconv_weight", "dconv_bias"), grads,
                          torch.ops.convlora.stencil_bwd(du, z, pre_main, idx, cw, cb, sc, m, h,
                                                         w)):
        assert_close(a, b, tol, tol, name)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("bhw", [(16, 9, 7), (16, 3, 5), (16, 16, 12)])
def test_map_lists_at_every_scale(checked_ops, mode, bhw):
    """Every scale 1..16 on its own map (the axis lists a warp builds from running counts:
    down taps per token, conv rows, U rows, readers), maps smaller than a tile, partial
    tiles and whole ones: the checked build (list invariants, bounds, races) against the
    per-token programs on the expanded index, forward and every gradient, float64."""
    scales = tuple(range(1, 17))
    z, du, _, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, 4, torch.float64,
                                                     seed=bhw[1], per_map=True)
    idx = torch.arange(16, dtype=torch.int32)
    u, pre = checked_ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    grads = checked_ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    tok = idx.repeat_interleave(h * w)
    u_tok, pre_tok = torch.ops.convlora.stencil_fwd(z, tok, cw, cb, sc, m, h, w, True)
    grads_tok = torch.ops.convlora.stencil_bwd(du, z, pre_tok, tok, cw, cb, sc, m, h, w)
    for name, a, b in zip(("u", "dz", "dconv_weight", "dconv_bias"), (u, *grads),
                          (u_tok, *grads_tok)):
        assert_close(a, b, 1e-12, 1e-12, name)


def test_map_programs_mark_an_out_of_range_expert(checked_ops):
    """A map whose expert is out of range: its tokens NaN (u and dz), no weight gradient
    from it, every other map finite, nothing read out of range (checked build)."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bicubic", (3, 9, 10), (1, 2, 3), 4,
                                                       torch.float32, per_map=True)
    idx = idx.clone()
    idx[1] = 3
    for ops in (checked_ops, torch.ops.convlora):
        u, pre = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
        dz, dw, db = ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
        bad = torch.zeros(3, 90, dtype=torch.bool)
        bad[1] = True
        bad = bad.reshape(-1)
        for t in (u, dz):
            assert torch.isnan(t[bad]).all() and torch.isfinite(t[~bad]).all()
        assert torch.isfinite(dw).all() and torch.isfinite(db).all()
        keep = torch.tensor([0, 2])
        _, (_, dw_ref, db_ref) = _reference_stencil(
            z.reshape(3, 90, 4)[keep].reshape(-1, 4).double(),
            du.reshape(3, 90, 4)[keep].reshape(-1, 4).double(), idx[keep], cw.double(),
            cb.double(), sc, m, h, w)
        assert_close(dw.double(), dw_ref, 1e-4, 1e-4, "dconv_weight")
        assert_close(db.double(), db_ref, 1e-4, 1e-4, "dconv_bias")


def test_checked_build_marks_an_out_of_range_expert(checked_ops):
    """An out-of-range expert reads nothing out of range: its token is NaN, others finite."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (1, 9, 10), (1, 2, 3), 4,
                                                       torch.float32)
    idx = idx.clone()
    idx[37] = 3
    u, pre = checked_ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    dz, dw, db = checked_ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)
    bad = torch.zeros(90, dtype=torch.bool)
    bad[37] = True
    for t in (u, dz):
        assert torch.isnan(t[bad]).all() and torch.isfinite(t[~bad]).all()
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()


# --- The forward as composed weights (mma: tf32 tensor-core products) ----------------

MMA_CASES = [
    # (mode, (B, H, W), scales, rank, expert draw): bilinear, r <= 8 (R = 8 for every rank:
    # below 8 the channels from r on are padding); many keys a 16-token group (random), one
    # expert for every token, experts without tokens; partial tiles; maps of one and two
    # rows or columns (their own row classes); every scale up to 16
    ("bilinear", (2, 17, 23), tuple(range(1, 9)), 8, "random"),
    ("bilinear", (2, 9, 12), (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 6, "random"),
    ("bilinear", (1, 9, 8), tuple(range(1, 17)), 8, "random"),
    ("bilinear", (1, 11, 9), (4, 1, 2), 8, "one"),
    ("bilinear", (1, 8, 16), (3, 2, 5, 8), 8, "two"),
    ("bilinear", (1, 9, 10), (2, 5, 1), 7, "two"),
    ("bilinear", (3, 1, 5), (1, 2, 3, 4), 8, "random"),
    ("bilinear", (2, 2, 3), (2, 1, 6), 5, "random"),
    # ranks of the rank bound 4 (the module's default rank is 3) on the same programs
    ("bilinear", (2, 9, 12), tuple(range(1, 9)), 3, "random"),
    ("bilinear", (1, 9, 10), (2, 5, 1), 4, "two"),
    ("bilinear", (1, 11, 9), (4, 1, 2), 2, "one"),
    ("bilinear", (2, 2, 3), (2, 1, 6), 1, "random"),
]


def _tf32(t):
    """t rounded to float32, then to tf32 (10 mantissa bits, to nearest, ties away from
    zero), as the composed-weight forward rounds its weights."""
    b = t.to(torch.float32).contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32).to(torch.float64)


def _preactivations(z, idx, cw, cb, scales, mode, h, w, mma=False):
    """The conv pre-activations C of every token's slots, as the forward saves them with
    raw_preact (the backward's input is GELU'(C) instead)."""
    return torch.ops.convlora.stencil_fwd(z, idx, cw, cb, scales, mode, h, w, True, 0, None, mma,
                                          True)[1]


def _composed_weights(z, idx, cw, cb, scales, mode, h, w):
    """Each token's composed weights M (the derivative of its pre-activations by its 3 x 3
    z cells) in tf32, a cell and an input channel at a time, and the pre-activations at z = 0
    (the biases): yields (pre0, None, None, None) first, then (cell, inside, ci, m): m (N, 4, r)
    the derivative of every token's pre-activations by channel ci of z at token cell[t]
    (inside[t]: that cell is in the map). M is read off the float64 multiply-add forward
    (tested against the reference elsewhere in this file), which is linear in z but for the
    bias: z is 1 in one channel of every third row and column, so each token sees one cell
    of its 3 x 3, and the pre-activations less the bias are that cell's column of M; 9 x r
    such calls give every column."""
    r, ops = z.shape[1], torch.ops.convlora
    cw64, cb64 = cw.double(), cb.double()
    zero = torch.zeros(z.shape, dtype=torch.float64)
    pre0 = ops.stencil_fwd(zero, idx, cw64, cb64, scales, mode, h, w, True, 0, None, False,
                           True)[1]
    yield pre0, None, None, None
    ys = torch.arange(h).repeat_interleave(w).repeat(z.shape[0] // (h * w))
    xs = torch.arange(w).repeat(z.shape[0] // w)
    tok = torch.arange(z.shape[0])
    for a in range(3):
        for b in range(3):
            dy = (a - ys + 1) % 3 - 1  # the row of the token's 3 x 3 that is a mod 3
            dx = (b - xs + 1) % 3 - 1
            inside = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            cell = torch.where(inside, tok + dy * w + dx, tok)
            for ci in range(r):
                probe = zero.clone()
                probe[(ys % 3 == a) & (xs % 3 == b), ci] = 1.0
                m = ops.stencil_fwd(probe, idx, cw64, cb64, scales, mode, h, w, True, 0, None,
                                    False, True)[1] - pre0
                yield cell, inside, ci, _tf32(m)


def _phase_weights(idx, scales):
    """Per token: the down-sampling weight of each of its 4 pre-activation slots (0 for
    the slots of phases it does not have)."""
    ph = torch.tensor([1 if s % 2 else 2 for s in scales])[idx.long()]  # down taps per axis
    weight = torch.where(ph == 1, 1.0, 0.25).double()
    slots = torch.arange(4)[None, :] < (ph * ph)[:, None]
    return weight[:, None] * slots


def _tf32_reference(z, idx, cw, cb, scales, mode, h, w):
    """(u, the pre-activations) in float64 with the composed weights (_composed_weights)
    and z rounded to tf32."""
    z64 = z.double()
    zt = _tf32(z64)  # the operand A: float32 z rounded to tf32 (16-bit z is already)
    probes = _composed_weights(z, idx, cw, cb, scales, mode, h, w)
    pre = next(probes)[0].clone()
    for cell, inside, ci, m in probes:
        zc = torch.where(inside, zt[cell, ci], torch.zeros_like(zt[:, 0]))
        pre += m * zc[:, None, None]
    g = torch.nn.functional.gelu(pre) * _phase_weights(idx, scales)[:, :, None]
    return z64 + g.sum(1), pre


def _tf32_backward_reference(du, z, pre, idx, cw, cb, scales, mode, h, w):
    """(dz, dconv_weight, dconv_bias) in float64 as the composed-weight backward rounds its
    operands: delta = w_down du GELU'(pre) and z rounded to tf32, the composed weights in
    tf32 (_composed_weights) for dz; dW = sum over tokens and slots of delta x U with U the
    up-sampled tf32 z at the slot's nine conv inputs, read off the float64 forward with one
    unit tap as weights (U(k)[c] = the pre-activation of channel c when W[c, c, k] = 1)."""
    n, r = cw.shape[0], z.shape[1]
    x = pre.double()
    gelu_grad = 0.5 * (1 + torch.erf(x / 2 ** 0.5)) + x * torch.exp(-0.5 * x * x) / (
        2 * torch.pi) ** 0.5
    delta = _tf32(_phase_weights(idx, scales)[:, :, None] * du.double()[:, None, :] * gelu_grad)
    dz = du.double().clone()
    probes = _composed_weights(z, idx, cw, cb, scales, mode, h, w)
    next(probes)
    for cell, inside, ci, m in probes:
        dz[:, ci].index_add_(0, cell[inside], (m * delta).sum((1, 2))[inside])
    zt, dw = _tf32(z.double()), torch.zeros(n, r, r, 9, dtype=torch.float64)
    for k in range(9):
        unit = torch.zeros(n, r, r, 9, dtype=torch.float64)
        unit[:, torch.arange(r), torch.arange(r), k] = 1.0
        u_k = torch.ops.convlora.stencil_fwd(zt, idx, unit.reshape(n, r, r, 3, 3),
                                             torch.zeros(n, r, dtype=torch.float64), scales,
                                             mode, h, w, True, 0, None, False, True)[1]
        for e in range(n):
            sel = idx.long() == e
            dw[e, :, :, k] = torch.einsum("tjo,tji->oi", delta[sel], u_k[sel])
    db = torch.stack([delta[idx.long() == e].sum((0, 1)) for e in range(n)])
    return dz, dw.reshape(n, r, r, 3, 3), db


def _assert_tf32_close(u, u_ref, what):
    """u against the tf32 reference: float32 rounding, but where a composed weight computed
    in float32 rounds to the other tf32 neighbour than the float64 one (a few outputs move
    by up to ~2e-4). The backward's dz to the same: its deltas also round in float32 (from
    the saved slopes), and a dz sums up to 288 of them: measured mean up to 4.4e-7 and
    0.7 % of outputs above 1e-5."""
    err = (u.cpu().double() - u_ref).abs()
    assert err.max() < 5e-4 and err.mean() < 1e-6 and (err > 1e-5).double().mean() < 0.02, \
        (what, err.max().item(), err.mean().item(), (err > 1e-5).double().mean().item())


def _mma_problem(mode, bhw, scales, rank, draw, seed):
    args = list(_stencil_problem(mode, bhw, scales, rank, torch.float32, seed=seed))
    idx, n = args[2], len(scales)
    if draw == "one":
        args[2] = torch.full_like(idx, 1)
    elif draw == "two":  # experts 0 and n - 1 only, in runs of tokens
        args[2] = torch.where(torch.arange(idx.numel()) % 7 < 3, 0, n - 1).to(idx.dtype)
    return args


@pytest.mark.parametrize("mode,bhw,scales,rank,draw", MMA_CASES)
def test_mma_forward_matches_a_tf32_reference(checked_ops, mode, bhw, scales, rank, draw):
    """mma=True: the composed-weight forward (m16n8k8 tf32 products, the warp phase
    emulated lane by lane on the CPU), in the checked build (bounds, races, poisoned shared
    memory) and the main one, against the reference with the composed weights in tf32:
    float32 rounding, but for the few outputs where a weight rounds to the other tf32
    neighbour. A misplaced or missing term moves an output by ~0.1; the float32 programs
    (no tf32 rounding) are off by ~1e-4 on most outputs, which the test tells apart. The
    saved pre-activations: the same conv outputs in the same slots, zero in the unused
    ones (raw_preact; the slopes: test_the_forward_saves_the_gelu_slopes)."""
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem(mode, bhw, scales, rank, draw, seed=rank)
    grid = dict(zip(("bytes", "w_smem", "dw_smem", "threads", "tile_h", "tile_w", "round",
                     "mma"), torch.ops.convlora.stencil_grid(rank, len(sc), m, False, 0, True)))
    assert grid["mma"] == 1 and grid["round"] == 64 and grid["threads"] == 256, grid
    u_ref, pre_ref = _tf32_reference(z, idx, cw, cb, sc, m, h, w)
    u_plain = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)[0]
    for ops in (checked_ops, torch.ops.convlora):
        u, pre = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, True, True)
        assert torch.isfinite(u).all() and torch.isfinite(pre).all()
        _assert_tf32_close(u, u_ref, str(ops))
        assert_close(pre, pre_ref.float(), 5e-4, 5e-4, f"pre-activations ({ops})")
        unused = pre_ref == 0  # slots of phases a token does not have
        assert torch.equal(pre[unused], torch.zeros_like(pre[unused]))
        u_fwd = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, False, 0, None, True)[0]
        assert torch.equal(u_fwd, u)
    plain = (u_plain.double() - u_ref).abs()  # the test tells tf32 from float32
    assert plain.mean() > 2e-5 and (plain > 1e-5).double().mean() > 0.5, plain.mean()


def test_mma_forward_in_16_bit_dtypes():
    """bfloat16 and float16 z (exact in tf32: the operand A as staged), weights in z's
    dtype or in float32: the composed-weight forward against the tf32 reference of the
    same (rounded) operands, within the dtype's rounding of u."""
    for dtype, wdtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        z, du, idx, cw, cb, sc, m, h, w = _mma_problem("bilinear", (2, 9, 12), tuple(range(1, 9)),
                                                       8, "random", seed=3)
        z, cw, cb = z.to(dtype), cw.to(wdtype), cb.to(wdtype)
        u_ref = _tf32_reference(z.float(), idx, cw.float(), cb.float(), sc, m, h, w)[0]
        u = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, False, 0, None, True)[0]
        assert u.dtype == dtype
        eps = torch.finfo(dtype).eps
        err = (u.double() - u_ref).abs() / (u_ref.abs() + 1)
        assert err.max() < eps, (dtype, err.max().item())


def test_mma_forward_bad_expert_and_empty_tiles():
    """An expert index out of range gives NaN for its token only (and zero pre-activation
    slots); a partial tile's missing tokens are never written."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (1, 9, 10), (1, 2, 3), 8,
                                                       torch.float32)
    idx = idx.clone()
    idx[37] = 3
    u, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, True)
    bad = torch.zeros(90, dtype=torch.bool)
    bad[37] = True
    assert torch.isnan(u[bad]).all() and torch.isfinite(u[~bad]).all()
    assert torch.equal(pre[37], torch.zeros_like(pre[37]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,bhw,scales,rank,draw", MMA_CASES)
def test_mma_forward_on_the_gpu(mode, bhw, scales, rank, draw):
    """The tensor cores (mma.sync) against the same tf32 reference, with the CPU's
    criteria (the hardware sums an MMA's products in its own order), and the saved
    slopes against the CPU's emulation."""
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem(mode, bhw, scales, rank, draw, seed=rank)
    u_ref = _tf32_reference(z, idx, cw, cb, sc, m, h, w)[0]
    u, pre = torch.ops.convlora.stencil_fwd(z.cuda(), idx.cuda(), cw.cuda(), cb.cuda(), sc, m,
                                            h, w, True, 0, None, True)
    _assert_tf32_close(u, u_ref, "cuda")
    pre_cpu = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, True)[1]
    assert_close(pre.cpu(), pre_cpu, 1e-5, 1e-5, "GELU slopes, GPU against CPU")


def _assert_tf32_grads(dw, db, dw_ref, db_ref, what):
    """Weight gradients against the tf32 reference, relative to the largest: float32
    sums, and a few deltas rounding to the other tf32 neighbour (computed in float32, not
    float64): measured up to 4e-6 (max) and 6e-8 (mean). The float32 programs, which do
    not round the operands to tf32, are off by 9e-5 .. 7e-4 (max) and 1.5e-5 .. 4e-5 (mean)
    on the cases here."""
    for got, ref, name in ((dw, dw_ref, "dconv_weight"), (db, db_ref, "dconv_bias")):
        err = (got.cpu().double() - ref).abs() / ref.abs().max()
        assert err.max() < 3e-5 and err.mean() < 1e-6, (what, name, err.max().item(),
                                                         err.mean().item())


@pytest.mark.parametrize("mode,bhw,scales,rank,draw", MMA_CASES)
def test_mma_backward_matches_a_tf32_reference(checked_ops, mode, bhw, scales, rank, draw):
    """mma=True in the backward: dz by the transposed composed weights and the weight
    gradients by products of the deltas and the z cells folded into the taps (m16n8k8 tf32,
    emulated lane by lane on the CPU), checked build and main build, against the reference
    with the deltas, z and the composed weights in tf32. dz to the forward's criteria; the
    weight gradients to float32 sums. The float32 multiply-add backward (no tf32 rounding)
    fails both, which the test checks: it can tell them apart."""
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem(mode, bhw, scales, rank, draw, seed=rank)
    grid = dict(zip(("bytes", "w_smem", "dw_smem", "threads", "tile_h", "tile_w", "round",
                     "mma"), torch.ops.convlora.stencil_grid(rank, len(sc), m, True, 0, True)))
    assert grid["mma"] == 1 and grid["round"] == 64 and grid["threads"] == 256, grid
    slopes = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)[1]
    pre = _preactivations(z, idx, cw, cb, sc, m, h, w)
    dz_ref, dw_ref, db_ref = _tf32_backward_reference(du, z, pre, idx, cw, cb, sc, m, h, w)
    for ops in (checked_ops, torch.ops.convlora):
        dz, dw, db = ops.stencil_bwd(du, z, slopes, idx, cw, cb, sc, m, h, w, 0, None, True)
        assert torch.isfinite(dz).all() and torch.isfinite(dw).all()
        _assert_tf32_close(dz, dz_ref, f"dz ({ops})")
        _assert_tf32_grads(dw, db, dw_ref, db_ref, str(ops))
    dz, dw, db = torch.ops.convlora.stencil_bwd(du, z, slopes, idx, cw, cb, sc, m, h, w)
    plain = (dz.double() - dz_ref).abs()
    assert plain.mean() > 2e-5 and (plain > 1e-5).double().mean() > 0.5, plain.mean()
    with pytest.raises(AssertionError):
        _assert_tf32_grads(dw, db, dw_ref, db_ref, "the float32 programs")


def test_mma_backward_in_16_bit_dtypes():
    """bfloat16 and float16 z and du, weights in z's dtype or float32: dz within the
    dtype's rounding of the tf32 reference, the weight gradients (float32) to its sums."""
    for dtype, wdtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        z, du, idx, cw, cb, sc, m, h, w = _mma_problem("bilinear", (2, 9, 12), tuple(range(1, 9)),
                                                       8, "random", seed=5)
        z, du, cw, cb = z.to(dtype), du.to(dtype), cw.to(wdtype), cb.to(wdtype)
        slopes = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None,
                                                True)[1]
        pre = _preactivations(z, idx, cw, cb, sc, m, h, w, mma=True)
        dz_ref, dw_ref, db_ref = _tf32_backward_reference(du.float(), z.float(), pre, idx,
                                                          cw.float(), cb.float(), sc, m, h, w)
        dz, dw, db = torch.ops.convlora.stencil_bwd(du, z, slopes, idx, cw, cb, sc, m, h, w, 0,
                                                    None, True)
        assert dz.dtype == dtype and dw.dtype == torch.float32
        err = (dz.double() - dz_ref).abs() / (dz_ref.abs() + 1)
        assert err.max() < torch.finfo(dtype).eps, (dtype, err.max().item())
        _assert_tf32_grads(dw, db, dw_ref, db_ref, str(dtype))


def test_mma_backward_bad_expert_and_partial_tiles():
    """An expert index out of range: NaN in dz for its token only, finite weight
    gradients, those of the map with a zero delta at that token (its delta is not taken;
    float32 sums in another order)."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (1, 9, 10), (1, 2, 3), 8,
                                                       torch.float32)
    idx = idx.clone()
    idx[37] = 3
    slopes = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, True)[1]
    dz, dw, db = torch.ops.convlora.stencil_bwd(du, z, slopes, idx, cw, cb, sc, m, h, w, 0, None,
                                                True)
    bad = torch.zeros(90, dtype=torch.bool)
    bad[37] = True
    assert torch.isnan(dz[bad]).all() and torch.isfinite(dz[~bad]).all()
    du0 = du.clone()
    du0[37] = 0.0  # the bad token's delta is zero either way: the same gradients
    idx0 = idx.clone()
    idx0[37] = 0
    slopes0 = slopes.clone()
    slopes0[37] = 0.0
    _, dw0, db0 = torch.ops.convlora.stencil_bwd(du0, z, slopes0, idx0, cw, cb, sc, m, h, w, 0,
                                                 None, True)
    assert_close(dw, dw0, 1e-6, 1e-6, "dconv_weight")
    assert_close(db, db0, 1e-6, 1e-6, "dconv_bias")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,bhw,scales,rank,draw", MMA_CASES)
def test_mma_backward_on_the_gpu(mode, bhw, scales, rank, draw):
    """The tensor cores' backward against the tf32 reference, with the CPU's criteria."""
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem(mode, bhw, scales, rank, draw, seed=rank)
    slopes = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)[1]
    pre = _preactivations(z, idx, cw, cb, sc, m, h, w)
    dz_ref, dw_ref, db_ref = _tf32_backward_reference(du, z, pre, idx, cw, cb, sc, m, h, w)
    dz, dw, db = torch.ops.convlora.stencil_bwd(du.cuda(), z.cuda(), slopes.cuda(), idx.cuda(),
                                                cw.cuda(), cb.cuda(), sc, m, h, w, 0, None, True)
    _assert_tf32_close(dz, dz_ref, "cuda")
    _assert_tf32_grads(dw, db, dw_ref, db_ref, "cuda")


def test_mma_forward_elsewhere_runs_the_multiply_add_programs():
    """mma=True where the composed-weight programs do not run (r above 8, bicubic,
    float64): the multiply-add programs' result, bit for bit, forward and backward."""
    for mode, bhw, scales, rank, dtype, kb in [("bilinear", (1, 9, 10), (1, 2, 3), 16,
                                                torch.float32, 0),
                                               ("bicubic", (1, 9, 10), (1, 2, 3), 3,
                                                torch.float32, 0),
                                               ("bicubic", (1, 9, 10), (1, 2, 3), 8,
                                                torch.float32, 0),
                                               ("bicubic", (1, 9, 10), (1, 2, 3), 8,
                                                torch.float64, 0),
                                               ("bilinear", (1, 9, 10), (1, 2, 3), 8,
                                                torch.float64, 40)]:
        z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, dtype)
        if dtype == torch.float32:
            assert torch.ops.convlora.stencil_grid(rank, len(sc), m, False, kb, True)[7] == 0
        a = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, kb, None, True)
        b = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, kb)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (rank, dtype, kb)
        if dtype == torch.float32:
            assert torch.ops.convlora.stencil_grid(rank, len(sc), m, True, kb, True)[7] == 0
        ga = torch.ops.convlora.stencil_bwd(du, z, a[1], idx, cw, cb, sc, m, h, w, kb, None, True)
        gb = torch.ops.convlora.stencil_bwd(du, z, a[1], idx, cw, cb, sc, m, h, w, kb)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)), (rank, dtype, kb)


def test_mma_switch_reaches_the_layer_in_16_bit_dtypes_only():
    """CONVLORA_STENCIL_MMA=1: the stencil's forward in bfloat16 runs the composed weights
    (within bfloat16 rounding of the multiply-add result), float32 stays bit-exact; the
    layer's forward (its prep with the composed weights) agrees with the shapes its fake
    kernels give; the switch's values are checked."""
    from convlora_kernels import _switches
    from convlora_kernels.backends import extension

    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (2, 9, 12), tuple(range(1, 9)),
                                                       8, torch.float32)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for on in ("0", "1"):
            with _switches.forced({extension.MMA_ENV: on}):
                assert extension.mma_for(dtype) == (on == "1" and dtype == torch.bfloat16)
                zz = z.to(dtype).requires_grad_(True)
                u = extension.stencil(zz, idx, cw.to(dtype), cb.to(dtype), sc, "bilinear", h, w)
                outs[dtype, on] = (u.detach(), torch.autograd.grad(u, zz, du.to(dtype))[0])
                # the layer's path: the prep buffer its fake kernels size (with the composed
                # weights under the switch in 16-bit dtypes)
                got = extension.stencil_forward(zz.detach(), idx, cw.to(dtype), cb.to(dtype),
                                                sc, "bilinear", h, w, True)
                want = extension.saved_shapes(z.shape[0], 8, sc, "bilinear", h, w, dtype, True,
                                              None)
                assert [tuple(t.shape) for t in got] == [tuple(s) for s, _ in want]
                assert torch.equal(got[0], outs[dtype, on][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[torch.float32, "0"],
                                                 outs[torch.float32, "1"]))
    assert not torch.equal(outs[torch.bfloat16, "0"][0], outs[torch.bfloat16, "1"][0])
    for a, b in zip(outs[torch.bfloat16, "0"], outs[torch.bfloat16, "1"]):
        assert_close(a, b, 2e-2, 2e-2, "bfloat16 with and without MMA")
    with _switches.forced({extension.MMA_ENV: "yes"}):
        with pytest.raises(ValueError, match="CONVLORA_STENCIL_MMA: expected 0 or 1, got 'yes'"):
            extension.mma_on()


def test_checked_build_reports_a_missing_barrier(tmp_path_factory):
    """The same kernels with one barrier removed (the backward's contributions and gather in
    one phase): the race check names the shared array and the two threads."""
    faulty = _build_checked(tmp_path_factory, "convlora_no_barrier",
                            "-DCONVLORA_CHECKED_DROP_A_BARRIER")
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (1, 9, 10), (1, 2, 3), 4,
                                                       torch.float32)
    _, pre = faulty.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)  # the forward is untouched
    with pytest.raises(RuntimeError, match=r"shared array taps index \d+ (read|written) by "
                                           r"thread \d+ and thread \d+ in one phase"):
        faulty.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w)


@pytest.mark.parametrize("program", ["tile", "map", "mma"])
def test_the_forward_saves_the_gelu_slopes(program):
    """What the backward reads of each pre-activation C is GELU'(C) = Phi(C) + C phi(C),
    saved by the forward (zero in the slots a token does not use); raw_preact saves C. The
    multiply-add programs in float64 (the slope to rounding), the composed-weight forward in
    float32 (its C is a tf32 product: the slope of the C it computed)."""
    mode, bhw, scales, rank, dtype = {
        "tile": ("bicubic", (2, 9, 11), tuple(range(1, 9)), 5, torch.float64),
        "map": ("bicubic", (6, 10, 9), tuple(range(1, 9)), 3, torch.float64),
        "mma": ("bilinear", (2, 9, 12), tuple(range(1, 9)), 8, torch.float32)}[program]
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, dtype, seed=4,
                                                       per_map=program == "map")
    mma = program == "mma"
    u, slopes = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, mma)
    u_raw, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, None, mma,
                                                True)
    assert torch.equal(u, u_raw)
    x = pre.double()
    want = 0.5 * (1 + torch.erf(x / 2 ** 0.5)) + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
    unused = pre == 0  # the slots a token does not use (a conv output of exactly 0: none)
    assert unused.any() and not unused.all()
    want[unused] = 0.0
    tol = 1e-13 if dtype == torch.float64 else 2e-7
    assert_close(slopes.double(), want, tol, tol, "GELU slopes")
    assert torch.equal(slopes[unused], torch.zeros_like(slopes[unused]))
    grads = []  # through autograd, raw_preact's C is not taken for slopes: recomputed
    for raw in (False, True):
        zz = z.clone().requires_grad_(True)
        u = torch.ops.convlora.stencil_fwd(zz, idx, cw, cb, sc, m, h, w, True, 0, None, mma,
                                           raw)[0]
        grads.append(torch.autograd.grad(u, zz, du)[0])
    assert torch.equal(grads[0], grads[1])


def test_stencil_bwd_needs_the_saved_preactivations():
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (1, 5, 6), (1, 2), 3,
                                                       torch.float32)
    u, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, False)
    assert pre.numel() == 0
    u2, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True)
    assert torch.equal(u, u2) and pre.shape == (30, 4, 3)
    with pytest.raises(RuntimeError, match="preact must be the forward's saved GELU slopes"):
        torch.ops.convlora.stencil_bwd(du, z, torch.empty(0), idx, cw, cb, sc, m, h, w)


@pytest.mark.parametrize("mode,bhw,scales,rank", [("bilinear", (2, 5, 6), (1, 2, 3), 3),
                                                ("bicubic", (1, 7, 4), (4, 1), 8),
                                                ("bilinear", (3, 3, 3), (2,), 5)])
def test_a_forward_and_its_backward_share_one_prep(mode, bhw, scales, rank):
    """stencil_prep's output given to stencil_fwd and stencil_bwd (the layer's path: one prep
    pass per step) gives bitwise what the ops compute with their own prep, for per-token and
    per-map experts (the map programs); a prep of another geometry or rank is refused by
    name."""
    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem(mode, bhw, scales, rank, torch.float32)
    prep = torch.ops.convlora.stencil_prep(z, cw, cb, sc, m, h, w)
    size = torch.ops.convlora.stencil_prep_bytes(rank, len(sc), m, h, w, sc, False)
    assert prep.dtype == torch.uint8 and prep.shape == (size,)
    per_map = idx.reshape(bhw[0], -1)[:, 0].contiguous()
    for index in (idx, per_map):
        want_u, want_pre = torch.ops.convlora.stencil_fwd(z, index, cw, cb, sc, m, h, w, True)
        want = torch.ops.convlora.stencil_bwd(du, z, want_pre, index, cw, cb, sc, m, h, w)
        u, pre = torch.ops.convlora.stencil_fwd(z, index, cw, cb, sc, m, h, w, True, 0, prep)
        got = torch.ops.convlora.stencil_bwd(du, z, pre, index, cw, cb, sc, m, h, w, 0, prep)
        assert torch.equal(u, want_u) and torch.equal(pre, want_pre)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    other = torch.ops.convlora.stencil_prep(z, cw, cb, sc, m, h + 1, w)
    with pytest.raises(RuntimeError, match=r"prep must be stencil_prep's output for this "
                                           r"call's rank, experts and geometry \(\d+ "
                                           r"(or, with mma, \d+ )?uint8"):
        torch.ops.convlora.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, other)
    with pytest.raises(RuntimeError, match="prep must be stencil_prep's output"):
        torch.ops.convlora.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w, 0, prep.float())


@pytest.mark.parametrize("rank", [3, 8])
def test_mma_prep_holds_the_composed_weights(rank):
    """stencil_prep(..., mma=True) (the layer's prep under CONVLORA_STENCIL_MMA=1): the
    tables and padded weights as without mma, then the composed weights of both passes
    (stencil_prep_bytes says its size). The composed-weight forward and backward given it,
    given a prep made without mma (their weights then written by the call) and given none
    agree bit for bit, and the multiply-add programs read the same buffer; where the
    composed-weight programs do not run (bicubic, r above 8, float64) mma adds nothing; a
    buffer of another size is refused, naming both sizes it could have."""
    ops = torch.ops.convlora
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem("bilinear", (2, 9, 12), tuple(range(1, 9)),
                                                   rank, "random", seed=5)
    plain = ops.stencil_prep(z, cw, cb, sc, m, h, w)
    full = ops.stencil_prep(z, cw, cb, sc, m, h, w, True)
    assert plain.numel() == ops.stencil_prep_bytes(rank, len(sc), m, h, w, sc, False)
    assert full.numel() == ops.stencil_prep_bytes(rank, len(sc), m, h, w, sc, False, True)
    assert full.numel() > plain.numel() + 2 * 8 * 9 * 8 * 4 * len(sc)
    assert torch.equal(full[:plain.numel()], plain)
    outs = []
    for prep in (None, plain, full):
        u, pre = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, prep, True)
        outs.append((u, pre) + tuple(ops.stencil_bwd(du, z, pre, idx, cw, cb, sc, m, h, w, 0,
                                                     prep, True)))
    for got in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], got))
    u_plain = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, plain)
    u_full = ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, full)
    assert torch.equal(u_plain[0], u_full[0]) and not torch.equal(u_full[0], outs[0][0])
    for mode, r, dtype in ((1, rank, torch.float32), (0, 16, torch.float32),
                           (0, rank, torch.float64)):
        zz, _, _, c_w, c_b, ss, mm, hh, ww = _stencil_problem(
            "bicubic" if mode else "bilinear", (1, 5, 6), (1, 2, 3), r, dtype)
        assert torch.equal(ops.stencil_prep(zz, c_w, c_b, ss, mm, hh, ww, True),
                           ops.stencil_prep(zz, c_w, c_b, ss, mm, hh, ww)), (mode, r, dtype)
    with pytest.raises(RuntimeError, match=rf"prep must be stencil_prep's output for this "
                                           rf"call's rank, experts and geometry "
                                           rf"\({plain.numel()} or, with mma, {full.numel()} "
                                           rf"uint8"):
        ops.stencil_fwd(z, idx, cw, cb, sc, m, h, w, True, 0, full[:-4], True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [3, 8])
def test_mma_prep_on_the_gpu(rank):
    """stencil_prep(..., mma=True) on the GPU (prep_kernel: a block per composed matrix,
    both passes' words from one sum): its composed weights against the CPU's within a tf32
    rounding (the GPU fuses the products' multiply-adds), and the forward and backward given
    it the same, bit for bit, as those that write their own."""
    ops = torch.ops.convlora
    z, du, idx, cw, cb, sc, m, h, w = _mma_problem("bilinear", (2, 9, 12), tuple(range(1, 9)),
                                                   rank, "random", seed=7)
    plain = ops.stencil_prep(z, cw, cb, sc, m, h, w)
    cpu = ops.stencil_prep(z, cw, cb, sc, m, h, w, True)
    zc, ic, cwc, cbc, duc = z.cuda(), idx.cuda(), cw.cuda(), cb.cuda(), du.cuda()
    gpu = ops.stencil_prep(zc, cwc, cbc, sc, m, h, w, True)
    assert gpu.numel() == cpu.numel()
    start = plain.numel() + (-plain.numel()) % 16  # the composed weights: 16-byte aligned
    assert_close(gpu[start:].cpu().view(torch.float32), cpu[start:].view(torch.float32),
                 2.0 ** -9, 1e-6, "composed weights, GPU against CPU")
    outs = []
    for prep in (None, gpu):
        u, pre = ops.stencil_fwd(zc, ic, cwc, cbc, sc, m, h, w, True, 0, prep, True)
        outs.append((u, pre) + tuple(ops.stencil_bwd(duc, zc, pre, ic, cwc, cbc, sc, m, h, w,
                                                     0, prep, True)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_shared_memory_budget(switch):
    """The ops' smem_kb moves the weights and weight-gradient sums between shared and global
    memory (benchmarks/stencil_time.py times the choices on a GPU); results agree. The
    layer passes the internal switch CONVLORA_STENCIL_SMEM_KB, checked and named."""
    from convlora_kernels.backends import extension

    z, du, idx, cw, cb, sc, m, h, w = _stencil_problem("bilinear", (2, 17, 23),
                                                       tuple(range(1, 9)), 8, torch.float64)
    runs = {}
    for kb, staged in ((48, (0, 0)), (80, (1, 0)), (96, (1, 1))):
        p = _grid(8, 8, "bilinear", True, kb)
        assert (p["w_smem"], p["dw_smem"]) == staged and p["bytes"] <= kb * 1024, p
        switch("CONVLORA_STENCIL_SMEM_KB", str(kb))
        assert extension.smem_kb() == kb
        u, pre, prep = extension.stencil_forward(z, idx, cw, cb, list(sc), "bilinear", h, w,
                                                 True)
        runs[kb] = (u,) + tuple(extension.stencil_backward(du, z, pre, prep, idx, cw, cb,
                                                           list(sc), "bilinear", h, w))
    assert _grid(8, 8, "bilinear", True) == _grid(8, 8, "bilinear", True, 96)  # the default
    for kb in (48, 80):
        for a, b in zip(runs[kb], runs[96]):
            assert_close(a, b, 1e-12, 1e-12, f"budget {kb} KB")
    for bad in ("lots", "0", "228"):
        switch("CONVLORA_STENCIL_SMEM_KB", bad)
        with pytest.raises(ValueError, match="CONVLORA_STENCIL_SMEM_KB: expected a number of "
                                             f"KB in \\[1, 227\\], got '{bad}'"):
            extension.smem_kb()
    with pytest.raises(RuntimeError, match="smem_kb must be 0 \\(the default budget\\) or a "
                                           "number of KB in \\[1, 227\\], got 300"):
        _grid(8, 8, "bilinear", True, 300)


def test_layer_hands_the_map_programs_a_per_map_index(monkeypatch, switch):
    """An index expanded from (B, 1, 1), as the map router returns it, reaches the stencil
    as (B,) (the map programs); a materialised one per token; CONVLORA_MAP_KERNELS=0 (the
    internal switch a GPU measurement may need) keeps the per-token programs."""
    from convlora_kernels.gating import NoisyTopOneRouter
    from convlora_kernels.backends.extension import stencil_index

    e = torch.tensor([2, 0, 1]).view(3, 1, 1).expand(3, 5, 4)
    idx = stencil_index(e)
    assert idx.dtype == torch.int32 and idx.tolist() == [2, 0, 1]
    assert stencil_index(e.contiguous()).shape == (60,)
    routed, _ = NoisyTopOneRouter(4, 3, "map")(torch.randn(3, 5, 4, 4))
    assert stencil_index(routed).shape == (3,)
    switch("CONVLORA_MAP_KERNELS", "0")
    assert stencil_index(e).shape == (60,)


# --- The cost model (benchmarks/cost_model.py) ----------------------------------------

def _cost_model():
    import importlib
    import sys

    bench = os.path.join(os.path.dirname(CSRC), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("cost_model")


@pytest.mark.parametrize("words,expected", [
    (list(range(32)), 1),                 # one word per bank
    (list(range(0, 64, 2)), 2),           # stride 2: two words in each even bank
    ([5] * 32, 1),                        # one word for every lane: a broadcast
    (list(range(0, 32 * 32, 32)), 32),    # stride 32: every lane in bank 0
    (list(range(0, 9 * 8, 8)), 3),        # nine taps at stride 8: banks 0, 8, 16, 24
    (list(range(0, 9 * 9, 9)), 1),        # ... at stride 9: nine banks
    (list(range(128)), 4),                # a 128-bit load, 32 lanes' consecutive words
    ([0, 1, 2, 3] * 32, 1),               # ... of one row of four: a broadcast
    ([e * 36 + q for e in range(8) for q in range(4)], 1),  # 8 experts' rows, 36 apart
    ([e * 32 + q for e in range(8) for q in range(4)], 8),  # ... 32 apart: one bank set
    ([], 0),
])
def test_wavefront_count(checked_ops, words, expected):
    """The count the cost model rests on: the most distinct words one bank holds."""
    assert checked_ops.smem_wavefronts(words) == expected


@pytest.fixture(scope="module")
def cost_rows(checked_ops):
    return _cost_model().run(ops=checked_ops)


def test_cost_model_counts_every_phase(cost_rows):
    """Every block-program kernel of every case has its phases counted (a phase that stops
    being traced would count as free), with warp accesses <= the fewest wavefronts their
    words allow <= wavefronts, and at most 32 lanes of four words (a 128-bit load) each;
    and the SASS cut at its barriers matches the phases."""
    cm = _cost_model()
    blocks = [r for r in cost_rows if r["phases"]]
    assert len(blocks) == 2 * len(cm.CASES)
    for row in blocks:
        names = set(row["phases"])
        want = ({"load", "list", "conv", "store"} if row["kernel"] == "stencil_tile_kernel"
                else {"load", "taps", "cols_up"})
        if row["kernel"] == "stencil_cells_kernel":  # the composed-weight programs
            want = ({"load", "list", "delta", "mma", "out"} if row["direction"] == "bwd"
                    else {"load", "list", "mma", "out"})
        assert want <= names, (row["case"], row["direction"], names)
        for name, p in row["phases"].items():
            assert p["warp_accesses"] <= p["ideal"] + 1e-9, (row["case"], name, p)
            assert p["ideal"] <= p["wavefronts"] + 1e-9, (row["case"], name, p)
            assert p["lane_accesses"] <= 128 * p["warp_accesses"] + 1e-9, (row["case"], name, p)
            # by quarter warps (128-bit accesses): each quarter at most the warp's count
            assert p["wavefronts"] <= p["quarter_wavefronts"] + 1e-9, (row["case"], name, p)
            assert p["quarter_wavefronts"] <= 4 * p["wavefronts"] + 1e-9, (row["case"], name, p)
        assert row["wavefronts_per_block"] > 0 and row["est_us"] > 0, row
        # with the CUDA build, the SASS has one barrier per counted phase, so each phase's
        # instructions come from its own code, by basic block where nvdisasm reads the
        # build's line information (it comes with triton, as cuobjdump does)
        if row["instructions_per_block"] is not None:
            assert row["instructions_by_phase"], (row["case"], row["direction"])
            if _cost_model().sass_lines():
                assert row["instructions_by_blocks"], (row["case"], row["direction"])
                assert all(p["instructions"] > 0 for p in row["phases"].values()
                           if p["warp_accesses"] > 0), row["phases"]


def test_cost_model_counts_the_prep_of_the_composed_weights(cost_rows):
    """The prep of the composed weights (mma cases) is priced by its instructions: each
    matrix's block read from the machine code (prep_matrix_warps: eight warps, warp 0 the
    factors, warps 1 to 4 the words), at most 2,400 warp instructions (1,953 as built: a
    thread per word, before, ran about a thousand instructions a word), and its fitted time
    includes their issue."""
    cm = _cost_model()
    preps = [r for r in cost_rows if r["kernel"] == "prep_kernel"
             and next(c for c in cm.CASES if c.name == r["case"]).mma]
    assert preps
    if not cm.sass_lines():
        pytest.skip("no machine code to count (a build without the CUDA kernels)")
    warps = cm.prep_matrix_warps(cm._code_of("prep_kernel", 8, "bilinear", False))
    assert warps is not None and len(warps) == 8
    assert warps[0] > warps[5] and min(warps[1:5]) > warps[5], warps
    for row in preps:
        assert row["instructions_per_block"] == sum(warps) <= 2400, row
        assert row["fitted_issue_us"] > 0 and row["fitted_chain_us"] > 0, row
        assert row["calibrated_us"] >= (max(row["fitted_issue_us"], row["fitted_chain_us"])
                                        + cm.H100["fitted_small_kernel_us"] - 1e-9), row


def test_cost_model_matches_counted_memory_instructions_to_their_lines(checked_ops):
    """The basic-block count weights a block by the checked build's accesses of its source
    lines, so every memory instruction it counts must carry its kernel's line: in the
    composed-weight backward (the kernel with loads of global arrays through SArr::ldg and
    stores through SArr::stcg2), each shared access, read-only global load and store of
    its mma phase sits on a line of csrc/ (not a CUDA header's: nvdisasm prints an inlined
    chain over several lines), each counted site's line has instructions, and the
    partial's stores are the phase's only global stores."""
    cm = _cost_model()
    if not cm.sass_lines():
        pytest.skip("no CUDA kernels in this build, or no nvdisasm")
    case = next(c for c in cm.CASES if c.mma)
    code = cm._code_of("stencil_cells_kernel", 8, case.mode, True)
    bars = [i for i, ins in enumerate(code) if ins["op"] == "BAR"]
    mma = code[bars[2] + 1:bars[3] + 1]  # load, list, delta, then the mma phase
    counted = [ins for ins in mma if ins["op"] in cm.SHARED_OPS or ins["nc"]
               or ins["op"] == "STG"]
    csrc = set(os.listdir(CSRC))
    assert counted and all(ins["line"].split(":")[0] in csrc for ins in counted), \
        sorted({ins["line"] for ins in counted})
    sites = [s for s in cm.count_sites(checked_ops, case)["bwd"] if s["phase"] == "mma"]
    lines = {ins["line"] for ins in counted}
    assert all(s["line"] in lines for s in sites), (sorted({s["line"] for s in sites}), lines)
    stored = {s["line"] for s in sites if s["rw"] == "G"}
    assert stored and stored == {ins["line"] for ins in mma if ins["op"] == "STG"}, stored


def test_cost_model_counts_128_bit_accesses_by_quarter_warps_too(cost_rows):
    """The second count (smem_trace.h): scalar phases count the same; the map forward's
    conv, whose lanes all read expert e's weight rows in 128-bit loads (a broadcast: one
    wavefront a warp, one a quarter), counts more, and so does its estimate."""
    rows = {(r["case"], r["direction"]): r for r in cost_rows if r["phases"]}
    conv = rows[("authors map r3 bicubic", "fwd")]["phases"]["conv"]
    assert conv["quarter_wavefronts"] > 1.5 * conv["wavefronts"], conv
    taps = rows[("authors map r3 bicubic", "fwd")]["phases"]["taps"]  # scalar accesses
    assert taps["quarter_wavefronts"] == taps["wavefronts"], taps
    for row in rows.values():
        assert row["quarter_est_us"] >= row["est_us"] - 1e-9, row


def test_cost_model_sites_add_up_to_the_phases(checked_ops):
    """`cost_model.py --sites`: the accesses by site sum to each phase's counts, and each
    site resolves to a line of the kernels' code (the checked build has debug information;
    without addr2line a site stays an offset)."""
    import shutil

    cm = _cost_model()
    case = cm.CASES[0]
    counted = cm.count_shared(checked_ops, case)
    sites = cm.count_sites(checked_ops, case)
    for direction in ("fwd", "bwd"):
        for name, p in counted[direction]["phases"].items():
            mine = [s for s in sites[direction] if s["phase"] == name and s["rw"] not in "gG"]
            for f in ("warp_accesses", "wavefronts", "ideal"):
                assert sum(s[f] for s in mine) == p[f], (direction, name, f)
            glob = [s for s in sites[direction] if s["phase"] == name and s["rw"] in "gG"]
            assert sum(s["warp_accesses"] for s in glob) == p["global_accesses"], name
        if shutil.which("addr2line"):
            lines = {s["line"] for s in sites[direction]}
            assert all(re.fullmatch(r"stencil_(tile|map)\.h:\d+", x) for x in lines), lines
    table = cm.site_table(sites, conflicted=False)
    assert len(table) == 2 + len({(d, s["phase"], s["rw"], s["array"], s["line"])
                                  for d, ss in sites.items() for s in ss})


def test_cost_model_within_ceilings(cost_rows):
    """No phase gets more bank-conflicted, and no estimate slower, than cost_model.py's
    ceilings and budgets allow (WAVEFRONTS_PER_ACCESS_CEILING, BUDGETS_US, and the phases
    and cases listed over them today, each at its present value)."""
    problems = _cost_model().over_limits(cost_rows)
    assert not problems, "\n".join(problems)


def test_cost_model_table_in_design_doc_is_current(cost_rows):
    """docs/design.md's per-phase table is what the model counts for this code (the SASS
    columns of the kernel table depend on the build, the phase table only on the code)."""
    cm = _cost_model()
    with open(os.path.join(os.path.dirname(CSRC), "docs", "design.md")) as f:
        doc = f.read()
    begin, end = "<!-- cost_model --design: begin -->", "<!-- cost_model --design: end -->"
    section = doc[doc.index(begin):doc.index(end)]
    missing = [row for row in cm.phase_table(cost_rows) if row not in section]
    assert not missing, ("docs/design.md's cost-model table is stale; regenerate it with "
                         "`python benchmarks/cost_model.py --design docs/design.md`:\n"
                         + "\n".join(missing[:10]))

"""The benchmarks run end to end on a tiny shape and write complete reports; the floors'
counting model matches docs/design.md (Performance) by hand; activation memory is counted right.

The benchmarks themselves live under benchmarks/ (not collected here); these tests
import them and keep to a few seconds.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)  # the scripts, and their helpers in benchlib
import run as bench  # noqa: E402
import stencil_time  # noqa: E402
from benchlib import common, floors, measure, render  # noqa: E402

TINY = ["--preset", "smoke", "--only", "smoke-2x6x7-C32-r3-map", "--repeats", "1",
        "--warmup", "0", "--rotate", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny run of the main job with an extra provider that always raises."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    real = common.providers

    def with_broken(device, compile_reference=False, authors=False):
        provs = real(device, compile_reference, authors)

        def broken(inp):
            raise RuntimeError("kernel exploded")
        provs["conv-lora[broken]"] = common.Provider(broken, "conv-lora")
        return provs

    common.providers = with_broken
    try:
        bench.main(TINY + ["--out", str(out)])
    finally:
        common.providers = real
    return out


def test_main_job_writes_json_markdown_and_plot(report, capsys):
    data = json.loads(report.read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["command"].startswith("python benchmarks/run.py --preset smoke")
    assert len(env["source_sha256"]) == 16 and set(env["backends"]) == {"cuda", "triton", "cpu"}
    assert data["rates"]["bandwidth_bytes_per_s"] > 1e8 and data["rates"]["matmul_flop_per_s"] > 1e8
    rows = [r for r in data["results"] if r["provider"] != "conv-lora[broken]"]
    assert {r["provider"] for r in rows} >= {"conv-lora[reference]", "plain-lora", "frozen-linear"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["floor"]["ms"] > 0
        assert r["floor"]["bytes"] == sum(b for b, _ in r["floor"]["terms"].values())
    train = {r["provider"]: r for r in rows if r["mode"] == "fwd+bwd"}
    # The reference keeps upsampled expert maps alive; the frozen linear keeps only x.
    assert train["conv-lora[reference]"]["saved_new_mb"] > 0
    assert train["frozen-linear"]["saved_new_mb"] == 0 and train["frozen-linear"]["saved_mb"] > 0
    md = report.with_suffix(".md").read_text()
    assert "| shape | mode | provider | x floor | x frozen linear |" in md
    assert "median ms" not in md  # a CPU report prints ratios only
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_provider_is_recorded_and_hides_nothing(report):
    data = json.loads(report.read_text())
    broken = [r for r in data["results"] if r["provider"] == "conv-lora[broken]"]
    assert len(broken) == 2 and all(r["error"] == "RuntimeError: kernel exploded" for r in broken)
    text = render.text_table(data)
    assert "RuntimeError: kernel exploded" in text and "plain-lora" in text


def test_ratios_and_renderer_cli(report, tmp_path, capsys):
    data = json.loads(report.read_text())
    (_, group), = [g for g in render.groups(data) if g[0][1] == "fwd"]
    ref, lin = group["conv-lora[reference]"], group["frozen-linear"]
    d = render.derived(data, lin, group)
    assert d["x_linear"] == 1.0
    assert d["speedup_ref"] == pytest.approx(ref["median_ms"] / lin["median_ms"])
    assert d["x_floor"] == pytest.approx(lin["median_ms"] / lin["floor"]["ms"])
    render.main([str(report), "--out-dir", str(tmp_path)])
    assert "conv-lora[reference]" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists()


def test_gpu_rows_show_times_and_card():
    env = dict(device="cuda", card="NVIDIA H100 80GB HBM3", torch="x")
    shape = common.Shape("s", 1, 2, 2, 4, 1).as_dict()
    rows = [dict(shape=shape, mode="fwd", provider=p, median_ms=m, floor=dict(ms=0.5))
            for p, m in (("conv-lora[reference]", 4.0), ("frozen-linear", 1.0))]
    data = dict(environment=env, args=dict(dtype="bfloat16"), results=rows,
                baselines=dict(reference="conv-lora[reference]", linear="frozen-linear"))
    md = render.markdown(data)
    assert "NVIDIA H100 80GB HBM3" in md and "| median ms | floor ms |" in md
    assert "| s | fwd | frozen-linear | 1.0000 | 0.5000 | 2.00 | 1.00 | 4.00 |" in md


def test_floor_counts_match_the_design_example():
    """docs/design.md (Performance): N = 16384, C = 768, C_out = 2304, r = 8, bf16."""
    shape = common.Shape("t", 4, 64, 64, 768, 8).as_dict()
    n, c, d, r = 16384, 768, 2304, 8
    lin = floors.counts(shape, "fwd", "linear", 2, 8)
    assert lin["flops"] == 2 * n * c * d  # 58 GFLOP
    assert lin["bytes"] == 2 * (n * c + n * d + d * c + d)  # x, y, W0, b0
    lin2 = floors.counts(shape, "fwd+bwd", "linear", 2, 8)
    assert lin2["flops"] == 2 * lin["flops"]  # dx = dy W0, no dW for a frozen base
    assert lin2["bytes"] == lin["bytes"] + 2 * (n * d + n * c + d * c)  # dy, dx, W0 again
    cl = floors.counts(shape, "fwd", "conv-lora", 2, 8)
    stencil = n * 2 * 9 * r * r * (1 + 4 + 1 + 4 + 1 + 4 + 1 + 4) / 8
    assert cl["flops"] == lin["flops"] + 2 * n * r * (c + d) + stencil
    conv_params = 8 * (r * r * 9 + r)
    assert cl["bytes"] == lin["bytes"] + 2 * (r * c + d * r) + n * 8 + 2 * conv_params
    rates = dict(bandwidth_bytes_per_s=3e12, matmul_flop_per_s=800e12)
    f = floors.floor(lin2, rates)
    assert f["bound"] == "compute" and f["ms"] == pytest.approx(0.145, rel=0.01)  # ~145 us
    slow = floors.floor(lin2, dict(rates, bandwidth_bytes_per_s=1e11))
    assert slow["bound"] == "memory" and slow["ms"] == pytest.approx(1e3 * lin2["bytes"] / 1e11)
    with pytest.raises(ValueError):
        floors.counts(shape, "bwd", "linear", 2, 8)


def test_saved_activation_memory_counts_each_storage_once():
    x = torch.randn(256, 64)
    w = torch.randn(64, 64)
    inp = {"x": x, "weight": w, **{k: torch.zeros(1) for k in common.TRAINABLE if k != "x"}}

    def fn(t):
        h = t["x"] @ t["weight"]  # saves weight (an input)
        g = h.sin()  # saves h: 256 x 64 floats, new
        return g * g  # saves g twice: counted once
    got = measure.saved_for_backward(fn, inp)
    new = 2 * 256 * 64 * 4 / 2 ** 20
    assert got["saved_new_mb"] == pytest.approx(new)
    # x is not saved: mm keeps it only to give the frozen weight a gradient
    assert got["saved_mb"] == pytest.approx(new + 64 * 64 * 4 / 2 ** 20)


def test_presets_cover_the_sam_shapes():
    sam = common.preset_shapes("sam")
    assert len(sam) == 3 * 3 * 2 * 2  # C x r x (global, window) x (token, map)
    assert {(s.height, s.channels, s.rank, s.gating) for s in sam} == {
        (h, c, r, g) for h in (64, 14) for c in (768, 1024, 1280) for r in (3, 8, 32)
        for g in ("token", "map")}
    window = next(s for s in sam if s.height == 14)
    assert window.batch == 4 * 25 and window.out_features == 3 * window.channels
    check = common.preset_shapes("gpu-check")
    assert {s.channels for s in check} == {768} and {s.rank for s in check} == {3, 8}
    assert [(s.gating, s.interpolation) for s in check].count(("map", "bilinear")) == 1
    # the authors' setting: map routing, bicubic, r = 3, at (4, 64, 64) and (100, 14, 14)
    compat = [s for s in check if s.interpolation == "bicubic"]
    assert [(s.batch, s.height, s.rank, s.gating) for s in compat] == [
        (4, 64, 3, "map"), (100, 14, 3, "map")]
    assert all(common.authors_applies(s) for s in compat)
    assert [(s.batch, s.height) for s in common.preset_shapes("compat")] == [(1, 64), (25, 14)]
    # SAM 2's Hiera-B+ qkv per stage, SAM 3's q/v projections (C -> C), at 4 images
    hiera = common.preset_shapes("sam2")
    assert {(s.batch, s.height, s.channels, s.out_features) for s in hiera} == {
        (4096, 8, 112, 336), (4096, 4, 224, 672), (100, 14, 448, 1344), (4, 64, 448, 1344),
        (100, 7, 896, 2688)}
    sam3 = common.preset_shapes("sam3")
    assert {(s.batch, s.height, s.channels, s.out_features) for s in sam3} == {
        (36, 24, 1024, 1024), (4, 72, 1024, 1024)}
    with pytest.raises(ValueError):
        common.preset_shapes("nope")


def test_pytest_benchmark_suite_runs(tmp_path):
    """One case of benchmarks/test_microbench.py, in this process (no second torch import)."""
    out = tmp_path / "pb.json"
    # importlib mode: benchmarks/conftest.py must not meet another "conftest" module
    code = pytest.main([BENCH, "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                        "--benchmark-only",
                        "--bench-preset", "smoke", "--bench-only", "smoke-2x6x7-C32-r3-map",
                        "--bench-repeats", "2", "--bench-warmup", "0", "-k", "fwd-frozen-linear",
                        f"--benchmark-json={out}"])
    assert code == 0
    data = json.loads(out.read_text())
    assert len(data["benchmarks"]) == 1
    info = data["benchmarks"][0]["extra_info"]
    assert info["problem"] == "linear" and info["floor_ms"] > 0 and info["x_floor"] > 0
    assert data["machine_info"]["convlora"]["torch"] == torch.__version__


def test_gpu_check_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_check.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_stencil_time_runs_on_cpu(capsys):
    """benchmarks/stencil_time.py (a gpu_check.sh stage) runs and reports the target shape."""
    assert stencil_time.main(["--device", "cpu", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "stencil-bwd" in out and "RESULT: cpu-1x32x32-C768-r8: layer fwd+bwd" in out
    assert "stencil-bwd bicubic" in out and "stencil-fwd bicubic" in out


def test_authors_layer_left_out_with_a_note(monkeypatch, capsys):
    """Without the autogluon wheel the authors' provider is left out, saying why, and the
    other providers still run."""
    from benchlib import authors

    monkeypatch.setenv("CONVLORA_AUTOGLUON_WHEEL", "/nonexistent/autogluon.whl")
    authors.load.cache_clear()
    try:
        provs = common.providers(torch.device("cpu"), authors=True)
    finally:
        authors.load.cache_clear()
    assert common.AUTHORS not in provs and common.LINEAR in provs
    assert "authors[autogluon] left out" in capsys.readouterr().err


def test_seg_step_runs_on_cpu(tmp_path):
    """benchmarks/seg_step.py (a gpu_check.sh stage): one segmentation training step per
    adapter, every row timed."""
    pytest.importorskip("segment_anything")
    out = tmp_path / "seg_step.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "seg_step.py"), "--repeats", "1",
                        "--warmup", "0", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["provider"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"conv-lora[cpu]", "conv-lora[reference]", "plain-lora",
                         "frozen-encoder"}
    assert all(row["ms"] > 0 for row in rows.values())
    assert "| conv-lora[cpu] |" in r.stdout and "× frozen encoder" in r.stdout


def test_seg_step_memory_rows_on_cpu(tmp_path):
    """seg_step.py --memory: a row per batch, without and with activation checkpointing,
    each in a process of its own on the CPU, with its peak memory and throughput."""
    pytest.importorskip("segment_anything")
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "seg_step.py"), "--memory",
                        "--batch", "1,2", "--repeats", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["batch"], x["checkpointing"]) for x in rows] == [
        (1, False), (1, True), (2, False), (2, True)]
    for x in rows:
        assert x["model"] == "tiny" and x["img_s"] > 0, x
        assert 0.1 < x["peak_gib"] < 20 and 0 <= x["step_gib"] < x["peak_gib"], x
    assert "| tiny | 2 | yes |" in r.stdout


def test_profile_layer_runs_on_cpu(capsys):
    """benchmarks/profile_layer.py (the gpu_check.sh module stages) at a small width: the
    step, the frozen linear and the router-outside composition timed, every part listed."""
    import profile_layer

    for extra in ([], ["--gating", "token", "--interpolation", "bilinear", "--rank", "8",
                       "--shapes", "global"]):
        rows = profile_layer.main(["--channels", "32", "--steps", "1", "--warmup", "0"] + extra)
        assert rows and all(r["step_ms"] > 0 and r["frozen_ms"] > 0 and
                            r["router_outside_ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "the same with the router outside the layer's op" in out and "stencil bwd" in out


def test_cost_model_runs_as_a_script(tmp_path):
    """benchmarks/cost_model.py (the gpu_check.sh model stage) as a user runs it: the
    kernel table, the totals against the budgets and every number in --json."""
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "cost_model.py"), "--json",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RESULT: modeled global token r8 stencil fwd" in r.stdout, r.stdout[-2000:]
    assert "| global token r8 | bwd | stencil_tile_kernel | 256 |" in r.stdout
    data = json.loads(out.read_text())
    assert data["assumptions"]["sms"] == 132
    kernels = {(row["case"], row["direction"], row["kernel"]) for row in data["rows"]}
    assert ("authors map r3 bicubic", "bwd", "fold_reduce_kernel") in kernels
    assert ("global token r8", "bwd", "reduce_dw_kernel") in kernels


_NCU_CSV = "\n".join([
    "==PROF== Connected to process 4242",
    '"ID","Process ID","Process Name","Kernel Name","Block Size",'
    '"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",'
    '"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum","smsp__inst_executed.sum"',
    '"","","","","","","","inst"',
    '"0","4242","python","stencil_tile_kernel","(128, 1, 1)","12,000","3,000","250,000"',
    "a line the profiled program printed",
    '"1","4242","python","stencil_tile_kernel","(128, 1, 1)","40,000","8,000","900,000"',
    "==PROF== Disconnected from process 4242"])


def test_smem_counters_reads_ncu_beside_the_model(capsys):
    """benchmarks/smem_counters.py (the gpu_check.sh counters stage): ncu's raw CSV read in
    launch order, set beside the model's counts of the same problem (warp-wide and by
    quarter warps, from the checked build) with their ratios; a launch that is not the
    model's kernel is an error, not a wrong row; without a GPU it skips (exit 4)."""
    import smem_counters as sc

    launches = sc.parse_ncu_csv(_NCU_CSV)
    assert [g["kernel"] for g in launches] == ["stencil_tile_kernel"] * 2
    ld, st, inst = sc.METRICS
    assert (launches[0][ld], launches[0][st], launches[1][inst]) == (12000, 3000, 900000)
    assert sc.parse_ncu_csv("==PROF== no kernels were profiled") == []
    model = sc.model_counts([sc.cm.CASES[0]])
    assert [(m["direction"], m["kernel"]) for m in model] == [
        ("fwd", "stencil_tile_kernel"), ("bwd", "stencil_tile_kernel")]
    for m in model:
        assert 0 < m["wavefronts"] <= m["quarter"] <= 4 * m["wavefronts"], m
    table = sc.compare(model, launches)
    fwd = model[0]
    assert (f"| global token r8 | fwd | stencil_tile_kernel | 15,000 | "
            f"{fwd['wavefronts']:,.0f} ({fwd['wavefronts'] / 15000:.2f}x) |") in table[2]
    with pytest.raises(RuntimeError, match="launch order: expected stencil_map_kernel"):
        sc.compare([dict(model[0], kernel="stencil_map_kernel")], launches)
    if not torch.cuda.is_available():
        assert sc.main([]) == 4
        assert "RESULT: SKIP no GPU" in capsys.readouterr().out


def test_main_job_follows_the_machine(monkeypatch, capsys):
    """run.py with no --device picks cuda when torch sees a GPU, cpu otherwise, and says
    which (the presets and dtype follow the device)."""
    from benchlib import common as c

    seen = {}

    def fake_fill(values, device):
        seen["device"] = device
        raise SystemExit(0)

    monkeypatch.setattr(c, "fill_defaults", fake_fill)
    for gpu, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        with pytest.raises(SystemExit):
            bench.main(["--preset", "smoke"])
        assert seen["device"] == want
        out = capsys.readouterr().out
        assert f"device: {want} (torch sees {'a GPU' if gpu else 'no GPU'}" in out, out


def test_kernel_profile_skips_without_a_gpu(capsys):
    """benchmarks/kernel_profile.py (the gpu_check.sh kernels stage) needs a GPU: without
    one it says so and exits 4, which gpu_check.sh records as SKIP."""
    import kernel_profile

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the stage runs for real in gpu_check.sh")
    assert kernel_profile.main([]) == 4
    assert "RESULT: SKIP no GPU" in capsys.readouterr().out

"""Options of the pytest-benchmark suite (benchmarks/test_microbench.py).

    python -m pytest benchmarks/ --benchmark-only                       # CPU subset, fp32
    python -m pytest benchmarks/ --benchmark-only --bench-device cuda   # SAM shapes, bf16
    python -m pytest benchmarks/ --benchmark-only --bench-only window-C768 --bench-compile

Shapes and providers come from benchmarks/benchlib/common.py, as for benchmarks/run.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from benchlib import common, floors



@dataclass(frozen=True)
class Settings:
    device: str
    dtype: str
    preset: str
    only: Optional[str]
    compile: bool
    warmup: int
    repeats: int
    rotate: int

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def pytest_addoption(parser):
    g = parser.getgroup("convlora", "Conv-LoRA microbenchmarks")
    g.addoption("--bench-device", default="cpu", help="cpu (default) or cuda")
    g.addoption("--bench-dtype", default=None, choices=sorted(common.DTYPES),
                help=common.default_help("dtype"))
    g.addoption("--bench-preset", default=None, choices=common.PRESETS,
                help=common.default_help("preset"))
    g.addoption("--bench-only", default=None,
                help="keep shapes whose name contains one of these comma-separated strings")
    g.addoption("--bench-compile", action="store_true", help="also torch.compile(reference)")
    g.addoption("--bench-warmup", type=int, default=None, help=common.default_help("warmup"))
    g.addoption("--bench-repeats", type=int, default=None, help=common.default_help("repeats"))
    g.addoption("--bench-rotate", type=int, default=None, help=common.default_help("rotate"))


def settings(config) -> Settings:
    o = config.getoption
    device = o("--bench-device")
    v = common.fill_defaults(dict(dtype=o("--bench-dtype"), preset=o("--bench-preset"),
                                  warmup=o("--bench-warmup"), repeats=o("--bench-repeats"),
                                  rotate=o("--bench-rotate")), device)
    return Settings(device=device, only=o("--bench-only"), compile=o("--bench-compile"), **v)


@functools.lru_cache(maxsize=None)
def providers_for(device: str, compile_reference: bool):
    """One providers dict per session, so torch.compile's cache is shared by the cases."""
    return common.providers(torch.device(device), compile_reference=compile_reference)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    s = settings(metafunc.config)
    if s.is_cuda and not torch.cuda.is_available():
        metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(
            reason="--bench-device cuda needs a CUDA device"))], ids=["no-cuda"])
        return
    shapes = common.preset_shapes(s.preset)
    if s.only:
        shapes = [sh for sh in shapes if any(o in sh.name for o in s.only.split(","))]
    names = list(providers_for(s.device, s.compile))
    cases = [(sh, mode, name) for sh in shapes for mode in ("fwd", "fwd+bwd") for name in names]
    metafunc.parametrize("case", cases, ids=[f"{sh.name}-{m}-{n}" for sh, m, n in cases])


@pytest.fixture(scope="session")
def bench_settings(request) -> Settings:
    return settings(request.config)


@pytest.fixture(scope="session")
def bench_providers(bench_settings):
    return providers_for(bench_settings.device, bench_settings.compile)


@pytest.fixture(scope="session")
def rates(bench_settings):
    """Bandwidth and matmul rate of the device, measured once for the floors."""
    return floors.measure_rates(torch.device(bench_settings.device),
                                common.DTYPES[bench_settings.dtype])


@pytest.fixture(scope="session")
def inputs_for(bench_settings):
    """shape -> the rotated input sets; only the latest shape's are kept alive."""
    cache = {}

    def get(shape):
        if shape not in cache:
            cache.clear()
            dtype = common.DTYPES[bench_settings.dtype]
            cache[shape] = [common.make_inputs(shape, bench_settings.device, dtype, seed=i)
                            for i in range(bench_settings.rotate)]
        return cache[shape]

    return get


def pytest_benchmark_update_machine_info(config, machine_info):
    """The card, driver, torch/triton/CUDA versions and commit go into --benchmark-json."""
    from benchlib import envinfo

    s = settings(config)
    if s.is_cuda and not torch.cuda.is_available():
        return
    command = "python -m pytest " + " ".join(config.invocation_params.args)
    machine_info["convlora"] = envinfo.environment(torch.device(s.device), command)

"""The environment of a benchmark run: everything needed to reproduce its numbers."""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import subprocess

import torch

from . import common


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=common.ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 over the package, kernel, build and benchmark sources: names the code that
    ran even where the checkout has no git metadata (a copied working tree)."""
    h = hashlib.sha256()
    patterns = ["setup.py", "csrc/*", "convlora_kernels/**/*.py", "benchmarks/**/*.py",
                "benchmarks/*.sh"]
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(common.ROOT, p),
                                                           recursive=True)})
    for f in files:
        h.update(os.path.relpath(f, common.ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: str) -> dict:
    """Everything needed to reproduce a report: versions, card, commit, command."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = dict(
        torch=torch.__version__, python=platform.python_version(),
        commit=os.environ.get("CONVLORA_BENCH_COMMIT") or _git("rev-parse", "HEAD"),
        dirty=bool(status) if status is not None else None, source_sha256=source_digest(),
        device=str(device), cpu=_cpu_name(), threads=torch.get_num_threads(),
        platform=platform.platform(), package=common.PACKAGE_DIR,
        command=command,
        env_vars={k: v for k, v in sorted(os.environ.items())
                  if k.startswith(("CONVLORA_", "TORCH_CUDA_ARCH", "TRITON_", "OMP_", "MKL_"))
                  or k in ("CUDA_VISIBLE_DEVICES", "CUDA_HOME")},
        backends=common.backend_status(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env

"""Build convlora_kernels._C: CUDA + C++ when nvcc and a CUDA build of torch are
present, C++ only otherwise. Never downloads anything.

Environment:
    CONVLORA_SKIP_CUDA_BUILD=1   build the C++ (CPU) backend only
    TORCH_CUDA_ARCH_LIST         default "8.0;9.0+PTX" (sm_80 and sm_90 machine code,
                                 PTX for the newest so later GPUs JIT it)
    CUDA_HOME                    default: found from nvcc, or /usr/local/cuda
    MAX_JOBS                     default: sized from CPU count and free memory
    CONVLORA_BUILD_TEMP          where the objects go, default build/temp-<python>-<torch>-
                                 <cuda|cpu> in the checkout: a repeated build recompiles
                                 only what changed
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"convlora-kernels: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """CUDA_HOME from the environment, the real nvcc behind a wrapper, or /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script's directory is not a toolkit; a real toolkit has include/cuda.h.
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda.h")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "FALSE")


def _cuda_decision():
    """(build_cuda, reason) without importing torch.utils.cpp_extension yet. The CUDA
    kernels (about 20 minutes on 2 cores for two architectures) are compiled when torch
    sees a GPU or FORCE_CUDA=1 asks for them (a wheel built on a machine without a GPU,
    CI); otherwise the C++ kernels alone (about a minute)."""
    if _flag("CONVLORA_SKIP_CUDA_BUILD"):
        return False, "CONVLORA_SKIP_CUDA_BUILD is set"
    import torch

    forced = _flag("FORCE_CUDA")
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(f"FORCE_CUDA=1, but torch {torch.__version__} is a CPU-only "
                               f"build: install a CUDA build of torch")
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not forced and not torch.cuda.is_available():
        return False, ("torch sees no GPU and FORCE_CUDA is not set (FORCE_CUDA=1 compiles "
                       "the CUDA kernels too, about 20 minutes on 2 cores)")
    home = _find_cuda_home()
    if home is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1, but no nvcc was found: set CUDA_HOME to a CUDA "
                               "toolkit")
        return False, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return False, f"{home}/bin/nvcc does not run ({e})"
    release = out.split("release ")[-1].split(",")[0].strip() if "release " in out else "?"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (f"nvcc {release} at {home} does not match torch's CUDA "
                       f"{torch.version.cuda}")
    return True, f"nvcc {release} at {home}, torch {torch.__version__}"


def _pip_cuda_includes():
    """Header folders of the nvidia-* wheels that a CUDA build of torch pulls in.

    Some toolkits (a minimal /usr/local/cuda) lack cuBLAS/cuSPARSE headers that
    torch's CUDA headers include; the wheels beside torch have them.
    """
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += glob.glob(os.path.join(root, "*", "include"))
    return sorted(d for d in found if os.path.isdir(d))


def _max_jobs():
    if os.environ.get("MAX_JOBS"):
        return
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        free_gb = info.get("MemAvailable", 0) / 1024 ** 2
        by_memory = max(1, int(free_gb // 4))  # an nvcc job peaks near 3-4 GB
    except OSError:
        by_memory = cpus
    os.environ["MAX_JOBS"] = str(max(1, min(cpus, by_memory)))


def _extensions():
    try:
        import torch
    except ImportError:
        _log("torch is not installed: building without the _C extension "
             "(install torch first, then pip install --no-build-isolation .)")
        return [], {}
    build_cuda, reason = _cuda_decision()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _max_jobs()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # C++20 (template lambdas), stated here: older torch versions add C++17. OpenMP: ATen's
    # at::parallel_for is a header template that runs serially unless the code including it
    # is compiled with -fopenmp (the library resolves to the libgomp torch already loaded).
    # -fno-wrapv undoes the -fwrapv Python's build flags add, which blocks loop optimisation.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-wrapv"]
    link_flags = ["-fopenmp"]
    if build_cuda:
        _log(f"building the CUDA + C++ extension ({reason}; arch list "
             f"{os.environ['TORCH_CUDA_ARCH_LIST']}; MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = CUDAExtension(
            "convlora_kernels._C", cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-std=c++20"]},
            extra_link_args=link_flags,
        )
    else:
        _log(f"building the C++ (CPU) extension only: {reason}")
        ext = CppExtension("convlora_kernels._C", cpp_sources,
                           include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    kind = "cuda" if build_cuda else "cpu"
    tag = f"{sys.implementation.cache_tag}-torch{torch.__version__}-{kind}"
    return [ext], {"build_ext": _persistent(BuildExtension.with_options(use_ninja=True), tag)}


def _persistent(base, tag):
    """build_ext compiling into build/temp-<python>-<torch>-<cuda|cpu> in the checkout
    instead of a fresh temporary folder per pip run, so a repeated
    ``pip install --no-build-isolation -e .`` recompiles only what changed: ninja keeps its
    log and each object's header dependencies there and rebuilds an object when its
    sources, headers or command line change (a clean clone has no build/ and builds all).
    CONVLORA_BUILD_TEMP overrides the folder."""

    class PersistentBuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("CONVLORA_BUILD_TEMP") or os.path.join(
                ROOT, "build", f"temp-{tag}")
            _log(f"objects in {self.build_temp} (reused by the next build)")

    return PersistentBuildExt


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["convlora_kernels", "convlora_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""The paper's original layer as a benchmark provider: autogluon.multimodal's ConvLoRALinear.

Its source is read from the autogluon.multimodal wheel at run time (never copied into this
repository), from the first of:
    1. CONVLORA_AUTOGLUON_WHEEL=/path/to/autogluon_multimodal-<version>-py3-none-any.whl
    2. an installed autogluon.multimodal (its adaptation_layers.py file alone is loaded, not
       the package, which would import autogluon's whole stack)
    3. `pip download autogluon.multimodal==1.6.3 --no-deps` into ~/.cache/convlora-kernels
       (skipped with a note when there is no network or pip fails)
The file needs only torch and numpy.

The provider computes exactly our compatibility-mode problem: the authors' module holding
the benchmark's weights (frozen W0, b0, lora_A, lora_B, one 3x3 conv + GELU expert per
scale 1..n, bicubic), with its router replaced by one that returns the benchmark's expert
of each map (their gates are one-hot per map; ours then route identically), so both sides
time the same math on the same inputs. Map routing and bicubic only: that is the only
thing the authors' layer computes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from typing import Optional, Tuple

import torch
import torch.nn as nn

VERSION = "1.6.3"
MEMBER = "autogluon/multimodal/models/adaptation_layers.py"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "convlora-kernels")


def _wheel_source(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        return z.read(MEMBER).decode()


def _find_source() -> Tuple[Optional[str], str]:
    """(source text, where it came from) or (None, why not)."""
    env = os.environ.get("CONVLORA_AUTOGLUON_WHEEL")
    if env:
        return _wheel_source(env), env
    spec = importlib.util.find_spec("autogluon")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(os.path.dirname(root), MEMBER)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read(), path
    os.makedirs(CACHE, exist_ok=True)
    wheel = os.path.join(CACHE, f"autogluon_multimodal-{VERSION}-py3-none-any.whl")
    if not os.path.exists(wheel):
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--retries", "0", "--timeout", "10", "-d", CACHE,
                            f"autogluon.multimodal=={VERSION}"], check=True,
                           capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError) as e:
            return None, (f"the autogluon.multimodal {VERSION} wheel could not be fetched "
                          f"({type(e).__name__}); set CONVLORA_AUTOGLUON_WHEEL to a local copy")
    return _wheel_source(wheel), wheel


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[types.ModuleType], str]:
    """(the authors' adaptation_layers module, where from) or (None, why not)."""
    try:
        src, where = _find_source()
    except Exception as e:  # a broken wheel or file: say so, do not stop the benchmark
        return None, f"autogluon's adaptation_layers.py could not be read: {e}"
    if src is None:
        return None, where
    mod = types.ModuleType("autogluon_adaptation_layers")
    exec(compile(src, f"{where}:{MEMBER}", "exec"), mod.__dict__)
    return mod, where


class _FixedGate(nn.Module):
    """Stands in for the authors' MoEGate: one-hot gates of the given expert per map."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.experts: Optional[torch.Tensor] = None

    def forward(self, feats):
        gates = torch.nn.functional.one_hot(self.experts, self.n).to(feats.dtype)
        return gates, feats.new_zeros(())


def make_fn(mod: types.ModuleType, alpha: float):
    """fn(inputs) -> y: the authors' forward with the inputs' tensors as its parameters."""
    cache = {}

    def fn(inp):
        n, r = inp["conv_weight"].shape[:2]
        c_out, c_in = inp["weight"].shape
        key = (c_in, c_out, r, n, inp["x"].device, inp["x"].dtype)
        if key not in cache:
            layer = mod.ConvLoRALinear(c_in, c_out, r=r, lora_alpha=alpha,
                                       conv_lora_expert_num=n)
            layer.lora_moe_gating = _FixedGate(n)
            cache[key] = layer.to(device=inp["x"].device, dtype=inp["x"].dtype).train()
        layer = cache[key]
        layer.lora_moe_gating.experts = inp["expert_index"][:, 0, 0]
        params = {"weight": inp["weight"], "bias": inp["bias"], "lora_A": inp["lora_A"],
                  "lora_B": inp["lora_B"]}
        for i in range(n):
            params[f"lora_moe_experts.{i}.0.weight"] = inp["conv_weight"][i]
            params[f"lora_moe_experts.{i}.0.bias"] = inp["conv_bias"][i]
        x = inp["x"]
        # In 16-bit, as the authors train (autocast): their combine step adds a float32 term,
        # which plain bf16/fp16 weights would refuse in the up-projection.
        amp = x.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=amp):
            y, _ = torch.func.functional_call(layer, params, (x,))
        return y.to(x.dtype)

    return fn

"""What the microbenchmarks measure: shapes, inputs and providers (one place for each).

A provider is a callable taking the inputs dict and returning the layer output, plus
the problem it solves ("conv-lora", "lora" or "linear", which sets its floor). Every
provider of one shape sees the same tensors, so they are timed side by side. Both
benchmarks/run.py and the pytest-benchmark suite (benchmarks/test_microbench.py) read
shapes and providers from here.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import convlora_kernels
from convlora_kernels import available_backends, conv_lora_linear, conv_lora_linear_ref
from convlora_kernels import lora_linear_ref

# The checkout the benchmarks belong to. They time the installed package (pip install -e .
# from this checkout); one installed from elsewhere is timed too, with a warning.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE_DIR = os.path.dirname(os.path.abspath(convlora_kernels.__file__))
if os.path.dirname(PACKAGE_DIR) != ROOT:
    warnings.warn(f"benchmarks: timing convlora_kernels installed at {PACKAGE_DIR}, not this "
                  f"checkout's ({ROOT}); run `pip install --no-build-isolation -e .` here "
                  f"to time this checkout", RuntimeWarning, stacklevel=2)

FUSED = ("cuda", "triton", "cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_DTYPE = torch.int64  # expert_index as the router returns it (topk indices)
ALPHA = 32.0


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: a (B, H, W, C) map through a C -> 3C qkv layer (or C ->
    out_channels: SAM 3's separate projections, Hiera's pooling blocks)."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    rank: int
    num_experts: int = 8
    gating: str = "token"
    interpolation: str = "bilinear"
    out_channels: Optional[int] = None

    @property
    def tokens(self) -> int:
        return self.batch * self.height * self.width

    @property
    def out_features(self) -> int:
        return self.out_channels or 3 * self.channels

    @property
    def scales(self) -> Sequence[int]:
        return tuple(range(1, self.num_experts + 1))

    def as_dict(self) -> dict:
        return dict(asdict(self), out_features=self.out_features, tokens=self.tokens,
                    scales=list(self.scales))


def _suffix(gating, interpolation):
    return ("-map" if gating == "map" else "") + \
        ("-bicubic" if interpolation == "bicubic" else "")


def _global(c, r, batch, gating="token", interpolation="bilinear"):
    return Shape(f"global-C{c}-r{r}{_suffix(gating, interpolation)}", batch, 64, 64, c, r,
                 gating=gating, interpolation=interpolation)


def _window(c, r, batch, gating="token", interpolation="bilinear"):
    return Shape(f"window-C{c}-r{r}{_suffix(gating, interpolation)}", batch * 25, 14, 14, c,
                 r, gating=gating, interpolation=interpolation)


def compat_shapes(batch: int) -> List[Shape]:
    """The paper's own setting (the authors' code): ViT-B's qkv at r = 3, 8 experts, one
    expert per map, bicubic; a global block's (B, 64, 64) and the windows (25·B, 14, 14)."""
    return [_global(768, 3, batch, "map", "bicubic"), _window(768, 3, batch, "map", "bicubic")]


def sam_shapes(batch: int = 4, channels=(768, 1024, 1280), ranks=(3, 8, 32),
               gatings=("token", "map")) -> List[Shape]:
    """SAM's image encoder: the qkv layer of a global block sees (B, 64, 64, C), of a
    windowed block (B*25, 14, 14, C); C = 768 / 1024 / 1280 for ViT-B / L / H."""
    return [make(c, r, batch, g) for g in gatings for c in channels for r in ranks
            for make in (_global, _window)]


def sam2_shapes(batch: int = 4, ranks=(3, 8)) -> List[Shape]:
    """SAM 2's Hiera-B+ at 1024x1024 (sam2.1 config: widths 112/224/448/896, windows 8, 4,
    14, 7, global blocks 12, 16, 20): the qkv inputs of each stage. Stage 0 sees 1024
    windows of 8x8 per image, stage 1 1024 of 4x4, stage 2 25 windows of 14x14 (a 64x64
    map padded to 70x70) and the whole map in its global blocks, stage 3 25 of 7x7."""
    out = []
    for r in ranks:
        for name, b, h, c in (("hiera-s0", 1024, 8, 112), ("hiera-s1", 1024, 4, 224),
                              ("hiera-s2-window", 25, 14, 448), ("hiera-s2-global", 1, 64, 448),
                              ("hiera-s3", 25, 7, 896)):
            out.append(Shape(f"{name}-C{c}-r{r}", batch * b, h, h, c, r))
    return out


def sam3_shapes(batch: int = 4, ranks=(3, 8)) -> List[Shape]:
    """SAM 3's ViT at 1008x1008 (72x72 patches of 14, width 1024): q_proj / v_proj
    (C -> C) of the windowed layers (9 windows of 24x24 per image) and of the global
    layers (the whole map)."""
    return [Shape(f"sam3-{name}-C1024-r{r}", batch * b, h, h, 1024, r, out_channels=1024)
            for r in ranks for name, b, h in (("window", 9, 24), ("global", 1, 72))]


# Each preset: (shapes, the default image batch it was sized for).
def preset_shapes(preset: str, batch: Optional[int] = None) -> List[Shape]:
    if preset == "cpu":
        # Sized for 2 CPU cores: the ViT-B layer on a 32x32 map (token and map routing)
        # and on the 25 windows of one image at the paper's r = 3.
        return [
            Shape("cpu-1x32x32-C768-r8", 1, 32, 32, 768, 8),
            Shape("cpu-1x32x32-C768-r8-map", 1, 32, 32, 768, 8, gating="map"),
            _window(768, 3, batch or 1),
        ]
    if preset == "gpu-check":
        # ViT-B, the paper's r = 3 and r = 8, token routing, one map-routing row, and the
        # authors' setting (map routing, bicubic, r = 3).
        b = batch or 4
        return [_global(768, 8, b), _window(768, 8, b), _global(768, 3, b), _window(768, 3, b),
                _global(768, 8, b, "map")] + compat_shapes(b)
    if preset == "compat":
        return compat_shapes(batch or 1)
    if preset == "sam":
        return sam_shapes(batch or 4)
    if preset == "sam2":
        return sam2_shapes(batch or 4)
    if preset == "sam3":
        return sam3_shapes(batch or 4)
    if preset == "smoke":
        # Tiny: exercises every code path in well under a second per provider.
        return [Shape("smoke-2x6x7-C32-r3", 2, 6, 7, 32, 3),
                Shape("smoke-2x6x7-C32-r3-map", 2, 6, 7, 32, 3, gating="map")]
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")


PRESETS = ("cpu", "gpu-check", "compat", "sam", "sam2", "sam3", "smoke")

# Run settings when not given: (on a GPU, on a CPU). A GPU run times many calls in
# bf16 over enough input sets to overflow its L2; the CPU subset must fit a few minutes.
DEFAULTS = dict(dtype=("bfloat16", "float32"), preset=("sam", "cpu"), warmup=(10, 1),
                repeats=(100, 7), rotate=(4, 2))


def default_help(name: str) -> str:
    gpu, cpu = DEFAULTS[name]
    return f"default: {cpu} on CPU, {gpu} on CUDA"


def fill_defaults(settings: dict, device: str) -> dict:
    """``settings`` with each None replaced by its default for ``device``."""
    gpu = str(device).startswith("cuda")
    return {k: (DEFAULTS[k][0 if gpu else 1] if k in DEFAULTS and v is None else v)
            for k, v in settings.items()}


def make_inputs(shape: Shape, device, dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every tensor of one problem, drawn from ``seed`` on the CPU (so any device gets
    the same values). lora_B is nonzero so every term of the layer is exercised."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c, r, n = shape.channels, shape.rank, shape.num_experts

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    bhw = (shape.batch, shape.height, shape.width)
    if shape.gating == "token":
        idx = torch.randint(0, n, bhw, generator=g).to(device=device, dtype=INDEX_DTYPE)
    else:  # one expert per map, expanded as the map router returns it (the map kernels)
        idx = torch.randint(0, n, (shape.batch, 1, 1), generator=g).to(
            device=device, dtype=INDEX_DTYPE).expand(bhw)
    return dict(
        x=rnd(shape.batch, shape.height, shape.width, c),
        weight=rnd(shape.out_features, c, std=1 / math.sqrt(c)),
        bias=rnd(shape.out_features, std=0.1),
        lora_A=rnd(r, c, std=1 / math.sqrt(c)),
        lora_B=rnd(shape.out_features, r, std=0.1),
        conv_weight=rnd(n, r, r, 3, 3, std=1 / math.sqrt(9 * r)),
        conv_bias=rnd(n, r, std=0.1),
        expert_index=idx,
        scaling=ALPHA / r,
        interpolation=shape.interpolation,
    )


# The tensors that get gradients in fwd+bwd: the frozen base weight and bias do not.
TRAINABLE = ("x", "lora_A", "lora_B", "conv_weight", "conv_bias")


class Provider(NamedTuple):
    fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]
    problem: str  # "conv-lora", "lora" or "linear": what it computes, for its floor
    applies: Optional[Callable[[Shape], bool]] = None  # None: every shape


def _conv_lora_args(inp):
    return (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
            inp["conv_weight"], inp["conv_bias"], inp["expert_index"], inp["scaling"])


def conv_lora_provider(backend: str) -> Provider:
    # As ConvLoRALinear calls it: its router's indices need no range check (on CUDA that
    # check would cost a host synchronisation per call).
    return Provider(lambda inp: conv_lora_linear(*_conv_lora_args(inp), backend=backend,
                                                 interpolation=inp["interpolation"],
                                                 check_expert_index=False), "conv-lora")


def compiled_reference_provider() -> Provider:
    compiled = torch.compile(conv_lora_linear_ref)
    return Provider(lambda inp: compiled(*_conv_lora_args(inp), check_expert_index=False,
                                         interpolation=inp["interpolation"]), "conv-lora")


def plain_lora(inp):
    return lora_linear_ref(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
                           inp["scaling"])


def frozen_linear(inp):
    return F.linear(inp["x"], inp["weight"], inp["bias"])


REFERENCE = "conv-lora[reference]"
COMPILED = "conv-lora[reference+compile]"
AUTHORS = "authors[autogluon]"
PLAIN_LORA = "plain-lora"
LINEAR = "frozen-linear"


def authors_applies(shape: Shape) -> bool:
    """The authors' layer computes map routing, bicubic, scales 1..n only."""
    return shape.gating == "map" and shape.interpolation == "bicubic" and \
        tuple(shape.scales) == tuple(range(1, shape.num_experts + 1))


def authors_provider() -> Tuple[Optional[Provider], str]:
    """(the authors' layer as a provider, where its source came from), or (None, why not):
    benchmarks/benchlib/authors.py."""
    from . import authors

    mod, where = authors.load()
    if mod is None:
        return None, where
    return Provider(authors.make_fn(mod, ALPHA), "conv-lora", authors_applies), where


def providers(device, compile_reference: bool = False,
              authors: bool = False) -> Dict[str, Provider]:
    """Fused backends available on ``device`` (whichever exist), the eager reference,
    optionally the reference under torch.compile and the authors' layer (map-routing
    bicubic shapes only; left out, with a note on stderr, when it cannot be loaded), plain
    LoRA and the frozen linear."""
    out = {}
    for b in fused_backends(device):
        out[f"conv-lora[{b}]"] = conv_lora_provider(b)
    out[REFERENCE] = conv_lora_provider("reference")
    if compile_reference:
        out[COMPILED] = compiled_reference_provider()
    if authors:
        prov, where = authors_provider()
        if prov is None:
            print(f"note: {AUTHORS} left out: {where}", file=sys.stderr)
        else:
            print(f"note: {AUTHORS} from {where}", file=sys.stderr)
            out[AUTHORS] = prov
    out[PLAIN_LORA] = Provider(plain_lora, "lora")
    out[LINEAR] = Provider(frozen_linear, "linear")
    return out


def _runs_or_raises(name: str, device: torch.device) -> bool:
    """A backend whose check raises is kept, so that its provider records the error
    where the table shows it."""
    from convlora_kernels.ops import backend_unavailable_reason

    try:
        return backend_unavailable_reason(name, device) is None
    except Exception:
        return True


def fused_backends(device) -> List[str]:
    """The fused backends to time on ``device``: convlora_kernels.available_backends,
    or, if that raises (a backend that fails to load), each backend checked alone."""
    device = torch.device(device)
    try:
        return [b for b in available_backends(device) if b != "reference"]
    except Exception:
        from convlora_kernels.ops import fused_backend_order

        return [b for b in fused_backend_order(device.type) if _runs_or_raises(b, device)]


def backend_status(device) -> Dict[str, Optional[str]]:
    """For each fused backend: None when it runs on ``device``, else why not."""
    from convlora_kernels.ops import backend_unavailable_reason

    device = torch.device(device)
    out = {}
    for name in FUSED:
        try:
            out[name] = backend_unavailable_reason(name, device)
        except Exception as e:  # a backend module that fails to import says so here
            out[name] = f"{type(e).__name__}: {e}"
    return out

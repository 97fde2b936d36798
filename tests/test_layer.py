"""The layer (convlora_kernels.layer) and its plan (convlora_kernels.plan): every candidate
of the forward and of the dy pass against the reference, forward and every gradient, on
each fused backend that runs here (cpu; triton under the interpreter); how ``plan.choose``
chooses; the modeled bytes."""

import os

import pytest
import torch

from convlora_kernels import conv_lora_linear, conv_lora_linear_ref, ops, plan
from convlora_kernels.backends import extension
from convlora_kernels._validate import Problem

from helpers import TRAINABLE, assert_close, make_case

# every forward and dy candidate with today's dx, and the two-source dx GEMM with its
# forward twin under both dy candidates
PLANS = [(f, d, "accumulate") for f in plan.FORWARD_CANDIDATES for d in plan.DY_CANDIDATES] + \
    [("two_source", d, "two_source") for d in plan.DY_CANDIDATES]


def _triton_here():
    return ops.backend_unavailable_reason("triton", torch.device("cpu")) is None


_TRITON_MARKS = [pytest.mark.triton, pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend runs on CPU only under TRITON_INTERPRET=1")]
# every (backend, candidates) that runs: the one-kernel forward and the two-source GEMMs
# are Triton's
CASES = [pytest.param(b, f, d, x, marks=_TRITON_MARKS if b == "triton" else [])
         for b in ("cpu", "triton") for f, d, x in PLANS
         if all(plan.unavailable(c, b) is None for c in (f, d, x)) or b == "triton"]


@pytest.fixture
def switches(switch):
    def use(forward_plan, dy_plan, dx_plan="accumulate"):
        switch(plan.FORWARD_ENV, forward_plan)
        switch(plan.DY_ENV, dy_plan)
        switch(plan.DX_ENV, dx_plan)
    return use


def _grads(case, fn, names, dy, z):
    y = fn(*case.args(), **case.kwargs(), z=z)
    wrt = [z if n == "z" else getattr(case, n) for n in names]
    return [y] + list(torch.autograd.grad(y, wrt, dy))


@pytest.mark.parametrize("backend,forward_plan,dy_plan,dx_plan", CASES)
@pytest.mark.parametrize("bias,given_z,det", [(True, False, False), (False, True, True),
                                              (True, False, True)])
def test_every_candidate_matches_reference(backend, forward_plan, dy_plan, dx_plan, bias,
                                           given_z, det, switches, monkeypatch):
    if backend == "triton" and not _triton_here():
        pytest.fail("the triton backend should run under the interpreter here")
    switches(forward_plan, dy_plan, dx_plan)
    monkeypatch.setattr(extension, "CPU_DY_ROWS", 7)  # several row blocks in the cpu one-pass
    dtype = torch.float64 if backend == "cpu" else torch.float32
    c = make_case(batch=2, height=5, width=6, rank=3, scales=(1, 2, 3), bias=bias,
                  seed=41 + given_z).to(dtype, True)
    names = [n for n in TRAINABLE + ("weight",) if getattr(c, n) is not None]
    z = None
    if given_z:  # z = x Aᵀ computed outside: its gradient carries lora_A's
        z = torch.nn.functional.linear(c.x, c.lora_A).detach().requires_grad_(True)
        names = [n for n in names if n != "lora_A"] + ["z"]
    dy = torch.randn(2, 5, 6, c.weight.shape[0], generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64).to(dtype)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        ours = _grads(c, lambda *a, **k: conv_lora_linear(*a, **k, backend=backend), names, dy, z)
    finally:
        torch.use_deterministic_algorithms(was)
    ref = _grads(c, conv_lora_linear_ref, names, dy, z)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for n, a, b in zip(["y"] + [f"d{n}" for n in names], ours, ref):
        assert a.dtype == b.dtype, n
        assert_close(a, b, tol, tol, f"{n} ({forward_plan}, {dy_plan}, {dx_plan})")


def test_plan_follows_switches_then_table_then_model(monkeypatch, switch):
    for env, _ in plan.SWITCHES:
        switch(env, None)
    monkeypatch.setattr(plan, "MEASURED", {})
    # fewest modeled bytes
    assert plan.choose("cpu", "cpu") == ("bias_first", "one_pass", "accumulate")
    monkeypatch.setattr(plan, "MEASURED", {("cpu", "cpu"): {
        plan.FORWARD_ENV: "post_add", plan.DY_ENV: "two_gemms"}})
    assert plan.choose("cpu", "cpu") == ("post_add", "two_gemms", "accumulate")
    assert plan.choose("cuda", "cuda")[0] == "bias_first"  # no entry for that pair
    switch(plan.FORWARD_ENV, "bias_first")
    assert plan.choose("cpu", "cpu") == ("bias_first", "two_gemms", "accumulate")
    switch(plan.DY_ENV, "three_gemms")
    with pytest.raises(ValueError, match="CONVLORA_LAYER_DY: expected one of"):
        plan.choose("cpu", "cpu")


def test_one_kernel_forward_only_where_it_runs(monkeypatch, switch):
    """The one-kernel forward is a Triton kernel whose speed only a GPU can tell: a measured
    entry selects it for the triton backend, the byte model never does, and forcing it
    where it cannot run says why not."""
    for env, _ in plan.SWITCHES:
        switch(env, None)
    monkeypatch.setattr(plan, "MEASURED", {})
    assert plan.choose("triton", "cuda")[0] == "bias_first"
    assert plan.by_model(["one_kernel", "post_add"]) == "post_add"
    one = {plan.FORWARD_ENV: "one_kernel"}
    monkeypatch.setattr(plan, "MEASURED", {("cuda", "triton"): one, ("cuda", "cuda"): one})
    assert plan.choose("triton", "cuda")[0] == "one_kernel"
    assert plan.choose("cuda", "cuda")[0] == "bias_first"  # a measured entry it cannot run
    switch(plan.FORWARD_ENV, "one_kernel")
    with pytest.raises(ValueError, match="CONVLORA_LAYER_FORWARD=one_kernel: the one-kernel "
                                         "forward is a Triton kernel"):
        plan.choose("cpu", "cpu")


def test_two_source_gemms_only_where_they_run(monkeypatch, switch):
    """The two-source GEMMs are Triton's: measured-only (the model never picks them), on
    the cuda and triton backends, refused by name on cpu."""
    for env, _ in plan.SWITCHES:
        switch(env, None)
    monkeypatch.setattr(plan, "MEASURED", {})
    assert plan.choose("cuda", "cuda") == ("bias_first", "one_pass", "accumulate")
    assert plan.by_model(["accumulate", "two_source"]) == "accumulate"
    both = {plan.FORWARD_ENV: "two_source", plan.DX_ENV: "two_source"}
    monkeypatch.setattr(plan, "MEASURED", {("cuda", "cuda"): both, ("cpu", "cpu"): both})
    assert plan.choose("cuda", "cuda") == ("two_source", "one_pass", "two_source")
    assert plan.choose("cpu", "cpu") == ("bias_first", "one_pass", "accumulate")
    switch(plan.DX_ENV, "two_source")
    with pytest.raises(ValueError, match="CONVLORA_LAYER_DX=two_source: the two-source GEMM "
                                         "is a Triton kernel"):
        plan.choose("cpu", "cpu")


def test_measured_table_names_known_candidates():
    for (device_type, backend), entry in plan.MEASURED.items():
        assert backend in ("cpu", "cuda", "triton") and device_type in ("cpu", "cuda")
        assert entry.get(plan.FORWARD_ENV, "post_add") in plan.FORWARD_CANDIDATES
        assert entry.get(plan.DY_ENV, "two_gemms") in plan.DY_CANDIDATES
        assert entry.get(plan.DX_ENV, "accumulate") in plan.DX_CANDIDATES


def test_modeled_bytes_at_the_target_shape():
    """(4, 64, 64, 768 -> 2304), r = 8, bf16: the rank-r up-projection onto y moves two
    passes over y (151 MB), written first as C only one; dy read once instead of twice."""
    p = Problem(4, 64, 64, 768, 2304, 8, 8, tuple(range(1, 9)), "bilinear")
    n = 4 * 64 * 64
    assert plan.modeled_bytes("post_add", p, 2) == n * 8 * 2 + 2 * n * 2304 * 2
    assert plan.modeled_bytes("bias_first", p, 2) == n * 8 * 2 + n * 2304 * 2
    assert plan.modeled_bytes("two_gemms", p, 2) - plan.modeled_bytes("one_pass", p, 2) \
        == n * 2304 * 2 + n * 8 * 6
    assert plan.modeled_bytes("one_kernel", p, 2) == n * 8 * 4
    # the two-source GEMMs leave only u (forward) and dz (dx) to memory-bound passes:
    # C's write (75 MB) and dz A's write of dx (25 MB) are gone
    assert plan.modeled_bytes("bias_first", p, 2) - plan.modeled_bytes("two_source", p, 2) \
        == n * 2304 * 2
    assert plan.modeled_bytes("accumulate", p, 2) - plan.modeled_bytes("two_source", p, 2) \
        == n * 768 * 2
    # with what the base GEMMs' epilogues read (C, dz A), the two-source plan moves ~201 MB
    # less per training step than bias_first + accumulate
    def traffic(*candidates):
        return sum(plan.modeled_bytes(c, p, 2) + plan.epilogue_bytes(c, p, 2)
                   for c in candidates)

    saved = traffic("bias_first", "one_pass", "accumulate") - \
        traffic("two_source", "one_pass", "two_source")
    assert saved == 2 * n * 2304 * 2 + 2 * n * 768 * 2 and saved >= 150e6
    for name in ("post_add", "one_kernel", "two_source", "one_pass", "two_gemms"):
        assert plan.epilogue_bytes(name, p, 2) == 0
    for fn in (plan.modeled_bytes, plan.epilogue_bytes):
        with pytest.raises(ValueError, match="candidate"):
            fn("fused", p, 2)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators a step dispatches, views aside (each would be a kernel launch
    on a GPU; what runs inside a custom op is its own business and not counted)."""

    def __init__(self):
        super().__init__()
        self.count = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            name = str(func.overloadpacket)
            self.count[name] = self.count.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_training_step_operator_count():
    """A ConvLoRALinear training step (forward, aux loss, backward) dispatches at most 20
    operators on the cpu backend: the layer's two ops (the z GEMM, the router and its aux
    loss inside them), the noise draw, the test's own loss and its backward, gradient
    accumulation. (With the router and its aux loss outside the op: 112, then 59, then 51.)"""
    import torch.utils._python_dispatch  # noqa: F401

    from convlora_kernels import ConvLoRALinear

    torch.manual_seed(0)
    m = ConvLoRALinear(16, 48, r=4, num_experts=4, backend="cpu").train()
    x = torch.randn(2, 6, 6, 16, requires_grad=True)

    def step():
        y = m(x)
        (y.square().mean() + m.aux_loss).backward()

    step()
    with _CountOps() as ops_seen:
        step()
    total = sum(ops_seen.count.values())
    print(f"\noperators per training step: {total}: {sorted(ops_seen.count.items())}")
    for op in ("convlora_layer.routed_forward", "convlora_layer.routed_backward"):
        assert ops_seen.count.get(op) == 1, (op, ops_seen.count)
    for op in ("convlora_layer.route", "convlora_layer.route_backward", "aten.mm",
               "aten.addmm", "aten.linear", "aten.var", "aten.zeros"):  # inside, or gone
        assert op not in ops_seen.count, (op, ops_seen.count)
    assert total <= 20, ops_seen.count


@pytest.mark.triton  # imports the Triton kernels: under the interpreter, as the others do
def test_launches_per_training_step_match_design():
    """The launches of a ConvLoRALinear training step on the GPU backends, counted on CPU
    (convlora_kernels.launch_count), are those of docs/design.md's generated table under
    the torch release it names, and never more under another; none synchronises."""
    import re

    from convlora_kernels import launch_count

    rows, totals = launch_count.table()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "design.md")) as f:
        text = f.read()
    section = text[text.index(launch_count.DESIGN_BEGIN):text.index(launch_count.DESIGN_END)]
    documented = [r for r in section.splitlines() if r.startswith("| ")]
    version = re.search(r"torch (\S+), commit", section).group(1)
    if version == torch.__version__:
        assert rows == documented, ("docs/design.md's launch table is stale: regenerate it "
                                    "with python -m convlora_kernels.launch_count --design "
                                    "docs/design.md\n" + "\n".join(rows))
    for row in documented[2:]:
        backend, router, plan, launches, syncs = [c.strip() for c in row.split("|")[1:6]]
        assert totals[(backend, router, plan)] <= int(launches), (backend, router, totals)
        assert syncs == "0"
    # the router's share of the step: its forward with the aux loss and the load term's
    # backward are a kernel each on CUDA (as ATen operators they took about 65 launches),
    # and the noise one draw
    assert totals[("cuda", "token", "default")] - totals[("cuda", "none", "default")] <= 3
    # a dozen launches per step with the two-source GEMMs
    assert totals[("cuda", "token", "two_source")] <= 12, totals


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("plan_name", ["default", "two_source"])
@pytest.mark.parametrize("det", [True, False], ids=["deterministic", "atomics"])
def test_a_training_step_is_captured_and_replayed(backend, plan_name, det, switch):
    """One ConvLoRALinear training step (token routing, bf16, the routed op pair: the router
    with its aux loss, the layer, the backward from dL/dy and dL/daux) captured in a CUDA
    graph and replayed gives the eager step's output, aux loss and every gradient: no host
    synchronisation, and the buffers the kernels keep (ticket counters, zeroed
    accumulators, tables) are where the graph reads them. The noise is a static input, as
    the module draws it outside the op. Deterministic mode: bit for bit; with atomics
    (another order of the float sums), to float32 rounding of the sums."""
    from convlora_kernels import ConvLoRALinear, layer
    from convlora_kernels._validate import as_map, check_inputs
    from convlora_kernels.launch_count import PLANS

    for name, value in PLANS[plan_name].items():
        switch(name, value)
    switch("CONVLORA_TRITON_AUTOTUNE", "0")  # the first candidates: no timing runs here
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        torch.manual_seed(0)
        m = ConvLoRALinear(64, 192, r=8, num_experts=8, backend=backend, device="cuda",
                           dtype=torch.bfloat16).train()
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        x = torch.randn(2, 16, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        noise = torch.randn(2 * 16 * 16, 8, device="cuda")
        dy = torch.randn(2 * 16 * 16, 192, device="cuda", dtype=torch.bfloat16)
        d_aux = torch.ones((), device="cuda")
        params = [p for p in m.parameters() if p.requires_grad]

        def step():
            p = check_inputs(x, m.weight, m.bias, m.lora_A, m.lora_B, m.conv_weight,
                             m.conv_bias, None, m.scaling, m.scales, m.interpolation, (16, 16))
            y, _, aux, _ = layer.routed_conv_lora_linear(
                backend, p, as_map(x, p), m.weight, m.bias, m.lora_A, m.lora_B,
                m.conv_weight, m.conv_bias, m.router.w_gate, m.router.w_noise, noise,
                m.router.noise_epsilon, m.router.loss_coef, "token", m.scaling)
            grads = torch.autograd.grad([y, aux], [x] + params, [dy, d_aux])
            return [y, aux] + list(grads)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles, autotunes and creates the kept buffers
                eager = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):  # a replay leaves the counters and accumulators at zero
            graph.replay()
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(was)
    names = ["y", "aux"] + ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, captured, eager):
        assert torch.isfinite(a.float()).all(), name
        if det:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(
                b.float().abs().max()), msg=name)


def _graph_nodes(t):
    """The names of every autograd node behind t."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("routed", [False, True], ids=["layer", "router inside"])
def test_eager_mode_runs_the_custom_op_pair_as_an_autograd_function(monkeypatch, routed):
    """In eager mode on real tensors the layer skips the custom ops' Python dispatch
    (layer._eager): the same functions as an autograd.Function. Its output and every
    gradient equal, bit for bit, what the custom-op pair gives (the path torch.compile,
    export and dispatch modes take), in training (the routed op's noise and aux loss too)."""
    from convlora_kernels import ConvLoRALinear, layer

    def run(eager):
        monkeypatch.setattr(layer, "_eager", lambda x: eager)
        if routed:
            torch.manual_seed(3)
            m = ConvLoRALinear(8, 12, r=3, num_experts=4, backend="cpu",
                               dtype=torch.float64).train()
            with torch.no_grad():
                for p in m.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.5)
            x = torch.randn(2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
            torch.manual_seed(4)  # the router's noise
            y = m(x)
            params = [x] + [p for p in m.parameters() if p.requires_grad]
            loss = y.square().sum() + m.aux_loss
        else:
            c = make_case(seed=21).to(torch.float64, True)
            y = conv_lora_linear(*c.args(), **c.kwargs(), backend="cpu")
            params = [getattr(c, n) for n in TRAINABLE if getattr(c, n) is not None]
            loss = y.square().sum()
        eager_nodes = [n for n in _graph_nodes(loss) if n.startswith("_Eager")]
        return [y.detach()] + list(torch.autograd.grad(loss, params)), eager_nodes

    got, nodes = run(True)
    want, none = run(False)
    assert len(nodes) == 1 and not none, (nodes, none)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs between the two paths"

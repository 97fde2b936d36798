"""The internal switches (convlora_kernels._switches): read from the environment once,
forced within a process by a context manager, and never steered by writing os.environ."""

import ast
import os
import subprocess
import sys

import pytest

from convlora_kernels import _switches, plan
from convlora_kernels.backends import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forced_nests_and_restores():
    name = "CONVLORA_LAYER_DY"
    before = _switches.get(name, "default")
    with _switches.forced({name: "one_pass"}):
        assert _switches.get(name) == "one_pass"
        with _switches.forced({name: "two_gemms", "CONVLORA_LAYER_FORWARD": "post_add"}):
            assert _switches.get(name) == "two_gemms"
            assert _switches.get("CONVLORA_LAYER_FORWARD") == "post_add"
        assert _switches.get(name) == "one_pass"
        assert _switches.get("CONVLORA_LAYER_FORWARD", "unset") != "post_add"
        with _switches.forced({name: None}):  # not forced, whatever the environment says
            assert _switches.get(name, "default") == "default"
    assert _switches.get(name, "default") == before


def test_forced_steers_the_plan_and_its_errors():
    with _switches.forced({plan.FORWARD_ENV: "post_add", plan.DY_ENV: "two_gemms"}):
        assert plan.choose("cpu", "cpu")[:2] == ("post_add", "two_gemms")
    with _switches.forced({plan.DY_ENV: "three_gemms"}):
        with pytest.raises(ValueError, match="CONVLORA_LAYER_DY: expected one of"):
            plan.choose("cpu", "cpu")


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="CONVLORA_LAYER_FORWRAD"):
        _switches.get("CONVLORA_LAYER_FORWRAD")
    with pytest.raises(KeyError, match="not switches"):
        with _switches.forced({"CONVLORA_LAYER_FORWRAD": "post_add"}):
            pass


def test_environment_is_read_once():
    """A variable set before the first question steers the plan; one set afterwards, in
    the same process, does not."""
    code = ("import os\n"
            "from convlora_kernels import plan\n"
            "first = plan.choose('cpu', 'cpu')[0]\n"
            "os.environ['CONVLORA_LAYER_FORWARD'] = 'bias_first'\n"
            "print(first, plan.choose('cpu', 'cpu')[0])\n")
    env = dict(os.environ, CONVLORA_LAYER_FORWARD="post_add")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["post_add", "post_add"]


@pytest.mark.triton  # imports the Triton kernels: under the interpreter, as the others do
def test_every_reader_names_a_declared_switch():
    """The constants the package reads its switches by are the declared ones."""
    from convlora_kernels.triton_kernels import launch

    assert {plan.FORWARD_ENV, plan.DY_ENV, plan.DX_ENV, extension.MAP_KERNELS_ENV,
            extension.SMEM_KB_ENV, extension.MMA_ENV, extension.PREP_STREAM_ENV,
            launch.AUTOTUNE_ENV, launch.BACKWARD_ENV,
            launch.Z_CELLS_ENV} == set(_switches.NAMES)


def test_the_package_never_writes_the_environment():
    """No module of the package or the benchmarks assigns, updates or deletes os.environ
    entries (a switch is forced with _switches.forced; the stencil's shared-memory budget
    is an argument of its ops)."""
    writes = []
    walked = [w for d in ("convlora_kernels", "benchmarks")
              for w in os.walk(os.path.join(ROOT, d))]
    for folder, _, files in walked:
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                target = None
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                    targets = node.targets if not isinstance(node, ast.AugAssign) else [
                        node.target]
                    target = next((t for t in targets if isinstance(t, ast.Subscript)
                                   and ast.unparse(t.value) == "os.environ"), None)
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    if ast.unparse(node.func.value) == "os.environ" and node.func.attr in (
                            "update", "pop", "setdefault", "clear", "popitem"):
                        target = node
                    if ast.unparse(node.func) == "os.putenv":
                        target = node
                if target is not None:
                    writes.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not writes, writes

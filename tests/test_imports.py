"""The package's imports run one way: no module imports, at its top or inside a function,
one that imports it back (directly or through others). Read from the source with ast, so
an import made lazily to dodge a circle counts too."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "convlora_kernels"


def _modules():
    """{dotted name: path} of every .py file of the package."""
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _targets(mods, name, node):
    """The package modules an import statement in module ``name`` imports. ``from . import
    _C`` (a compiled extension, no .py file) imports nothing of ours beyond the package that
    is already being imported."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    package = name if mods[name].endswith("__init__.py") else name.rsplit(".", 1)[0]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module
                                                                    else []))
    else:
        base = node.module or ""
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
    names_from_module = len(found) < len(node.names) and node.module is not None
    if base in mods and names_from_module:
        found.append(base)
    return found


def _graph():
    mods = _modules()
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(t for t in _targets(mods, name, node) if t != name)
    return edges


def _cycles(edges):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    edges = _graph()
    assert "convlora_kernels.layer" in edges and edges["convlora_kernels.ops"], "graph not read"
    cycles = _cycles(edges)
    report = "\n".join(f"{c}: " + "; ".join(f"{v} -> {sorted(w for w in edges[v] if w in c)}"
                                              for v in c) for c in cycles)
    assert not cycles, "import circles:\n" + report


def test_the_checker_finds_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []

"""The package's shape: no import cycles (function-level imports included), lower layers never
import higher ones, and no module grows past 450 lines."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "fastdpo"

# Layers, lowest first: a module may import its own layer or lower ones only.
LAYERS = [
    {"fastdpo.ops", "fastdpo.rows", "fastdpo._validate", "fastdpo.reference"},
    {"fastdpo.backends", "fastdpo.torch_backend", "fastdpo.triton", "fastdpo.native"},
    {"fastdpo.autograd", "fastdpo.distributed", "fastdpo.sequences"},
    {"fastdpo.logps", "fastdpo.linear", "fastdpo.losses"},
    {"fastdpo.integrations", "fastdpo"},
    {"fastdpo.bench", "fastdpo.cli"},
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """Every fastdpo module ``path`` imports, at any depth of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fastdpo")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fastdpo"):
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{mod}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    # importing a submodule runs its packages' __init__ first: a cycle through one is a cycle
    for mod in list(out):
        parts = mod.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts))}
    out -= {name, "fastdpo"}
    out = {m for m in out if not name.startswith(m + ".")}  # a module's own packages ran first
    return out


def _graph():
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _layer(mod: str) -> int:
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    return best


def test_no_import_cycles():
    graph = _graph()
    state = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, deps in _graph().items():
        lm = _layer(mod)
        assert lm is not None, f"{mod} is in no layer: add it to LAYERS"
        for d in deps:
            ld = _layer(d)
            if ld is not None and ld > lm and not mod.startswith(("fastdpo.bench", "fastdpo.cli")):
                bad.append(f"{mod} (layer {lm}) imports {d} (layer {ld})")
    assert not bad, "\n".join(bad)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long

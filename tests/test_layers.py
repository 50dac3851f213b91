"""The house: every module imports on its own, no import cycle, and no import crosses a layer
downward rule (the layers and their rules are documented in docs/contributing.md).

The graph holds every import of bergson's modules, lazy ones inside functions and
``TYPE_CHECKING`` blocks included; the package facade ``bergson/__init__.py`` (which imports
everything, lazily) is left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "bergson"

LAYERS = {
    "errors": 0,
    "core": 1,
    "config": 2,
    "data": 3, "transforms": 3, "store": 3,
    "distributed": 4,
    "models": 5,
    "collect": 6,
    "runs": 7,
    "search": 8,
    "scoring": 9, "preconditioning": 9, "querying": 9, "diagnostics": 9,
    "methods": 10,
    "integrations": 11, "reduction": 11, "validation": 11,
    "reports": 12,
    "cli": 13, "__main__": 13,
}  # fmt: skip
"""Each top-level module or package of bergson and its floor: a module imports only from floors
below its own and from its own package (``cli`` imports anything, lazily)."""

NEVER = {
    ("store", "models"): "the store knows nothing about models",
    ("store", "collect"): "the store knows nothing about the hooks",
    ("store", "transforms"): "the store holds vectors, whatever transform made them",
    ("collect", "store"): "the collector hands vectors to a sink; it never writes a store",
    ("transforms", "store"): "transforms are maths: tensors in, tensors out",
    ("transforms", "collect"): "transforms are maths: tensors in, tensors out",
    ("transforms", "models"): "transforms are maths: tensors in, tensors out",
    ("data", "collect"): "data loading knows nothing about gradients",
}
"""Imports between floors in the permitted direction that the design still forbids."""

EXCEPTIONS = {
    ("transforms", "distributed"): "a statistics sink sums its moments over the ranks",
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = ("bergson", *f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The bergson modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            targets = [prefix, *(f"{prefix}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "bergson":
                found.add(t)
    return found


def floor(module: str) -> str:
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items() if name != "bergson"}


def test_every_module_is_on_a_floor(graph):
    assert {floor(m) for m in graph} <= set(LAYERS), "a new top-level module needs a floor in LAYERS"


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_go_down_the_floors(graph):
    broken = []
    for m, targets in sorted(graph.items()):
        a = floor(m)
        for t in sorted(targets):
            b = floor(t)
            if a == b or a in ("cli", "__main__"):
                continue
            if (a, b) in NEVER:
                broken.append(f"{m} imports {t}: {NEVER[a, b]}")
            elif LAYERS[b] >= LAYERS[a] and (a, b) not in EXCEPTIONS:
                broken.append(f"{m} (floor {LAYERS[a]}) imports {t} (floor {LAYERS[b]})")
    assert not broken, "\n".join(broken)


# Each module's code runs afresh at every import below; only its compilation is kept, in memory
# (a third of the time went to compiling the same sources again where .pyc files are turned off).
KEEP_COMPILED = """\
import importlib.machinery as machinery
_compile, _codes = machinery.SourceFileLoader.source_to_code, {}
def _source_to_code(self, data, path, *, _optimize=-1):
    key = (path, bytes(data))
    if key not in _codes:
        _codes[key] = _compile(self, data, path, _optimize=_optimize)
    return _codes[key]
machinery.SourceFileLoader.source_to_code = _source_to_code
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of bergson modules (an import that only works
    after another module was imported would hide an order-dependent cycle)."""
    names = [m for m in modules() if m != "bergson"]
    script = KEEP_COMPILED + (
        "import importlib, sys\n"
        f"failed = []\nfor name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'bergson' or m.startswith('bergson.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_modules_fit_in_one_sitting():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"modules over 600 lines: {big}"


def test_one_backward_loop():
    """Only the pass engine and MAGIC's differentiable replay run a backward pass."""
    running = sorted(
        m for m, p in modules().items() if ".backward(" in p.read_text() or "autograd.grad(" in p.read_text()
    )
    assert all(m == "bergson.collect.engine" or m.startswith("bergson.methods.magic") for m in running), (
        running
    )

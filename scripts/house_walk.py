"""How the house reads, measured from the source alone; prints JSON.

    python scripts/house_walk.py [REPO_ROOT] [--start bergson.cli.build.run]

- ``largest``: the ten largest modules of ``bergson/`` (lines).
- ``edges``: imports between top-level packages (``collect -> store``), with the number of
  module pairs behind each, and how many of them go up a floor (the floors of
  ``tests/test_layers.py``; a module not on a floor counts as floor 9).
- ``walk``: following the calls from ``--start`` (default: the ``build`` command's ``run``)
  through bergson's own functions, as far as each call can be resolved statically (names
  imported with ``from ... import``, module attributes, methods of classes defined here):
  ``stops`` is the number of functions reached, ``modules`` the modules they live in, and
  ``climbs`` the calls that go from a module on a lower floor to one on a higher floor.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

FLOORS = {
    "errors": 0, "core": 1, "config": 2, "data": 3, "transforms": 3, "store": 3, "distributed": 4,
    "models": 5, "collect": 6, "runs": 7, "indexing": 7, "search": 8, "scoring": 9,
    "preconditioning": 9, "querying": 9, "diagnostics": 9, "methods": 10, "integrations": 11,
    "reduction": 11, "validation": 11, "reports": 12, "cli": 13, "__main__": 13, "timings": 7,
}  # fmt: skip


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted((root / "bergson").rglob("*.py")):
        parts = ("bergson", *f.relative_to(root / "bergson").with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], 9) if len(parts) > 1 else 13


def resolve(name: str, package: str, node: ast.ImportFrom) -> str:
    base = package.split(".")
    if node.level:
        base = base[: len(base) - node.level + 1]
        return ".".join([*base, node.module] if node.module else base)
    return node.module or ""


class Module:
    """A module's functions (``f`` and ``Class.f``) and the names its imports bind."""

    def __init__(self, name: str, path: Path, known: dict[str, Path]):
        self.name = name
        self.tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.functions: dict[str, ast.AST] = {}
        self.classes: set[str] = set()
        self.bound: dict[str, str] = {}  # local name -> "module" or "module:attr"
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom):
                src = resolve(name, package, node)
                for a in node.names:
                    full = f"{src}.{a.name}"
                    self.bound[a.asname or a.name] = full if full in known else f"{src}:{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known:
                        self.bound[a.asname or a.name.split(".")[0]] = a.name
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.functions[f"{node.name}.{item.name}"] = item


def walk(root: Path, start: str) -> dict[str, object]:
    known = modules(root)
    mods: dict[str, Module] = {}

    def module(name: str) -> Module | None:
        if name not in known:
            return None
        if name not in mods:
            mods[name] = Module(name, known[name], known)
        return mods[name]

    def target(mod: Module, ref: str, depth: int = 0) -> tuple[str, str] | None:
        """(module, function) that ``ref`` (``module:attr``) names, following re-exports."""
        if depth > 8 or ":" not in ref:
            return None
        m_name, attr = ref.split(":")
        m = module(m_name)
        if m is None:
            return None
        if attr in m.functions:
            return m_name, attr
        if attr in m.classes:
            return (m_name, f"{attr}.__init__") if f"{attr}.__init__" in m.functions else None
        if attr in m.bound:
            return target(m, m.bound[attr], depth + 1)
        return None

    def calls(mod: Module, fn: str) -> list[tuple[str, str]]:
        out = []
        cls = fn.split(".")[0] if "." in fn else None
        for node in ast.walk(mod.functions[fn]):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            hit = None
            if isinstance(f, ast.Name):
                if f.id in mod.functions:
                    hit = (mod.name, f.id)
                elif f.id in mod.classes:
                    hit = (mod.name, f"{f.id}.__init__") if f"{f.id}.__init__" in mod.functions else None
                elif f.id in mod.bound:
                    hit = target(mod, mod.bound[f.id] if ":" in mod.bound[f.id] else "")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                owner = f.value.id
                if owner == "self" and cls and f"{cls}.{f.attr}" in mod.functions:
                    hit = (mod.name, f"{cls}.{f.attr}")
                elif owner in mod.bound and ":" not in mod.bound[owner]:
                    hit = target(mod, f"{mod.bound[owner]}:{f.attr}")
            if hit is not None and module(hit[0]) is not None and hit[1] in module(hit[0]).functions:  # type: ignore[union-attr]
                out.append(hit)
        return out

    m_name, _, fn = start.rpartition(".")
    seen: set[tuple[str, str]] = set()
    climbs = 0
    todo = [(m_name, fn)]
    while todo:
        here = todo.pop()
        if here in seen:
            continue
        seen.add(here)
        for nxt in calls(module(here[0]), here[1]):  # type: ignore[arg-type]
            if floor(nxt[0]) > floor(here[0]):
                climbs += 1
            todo.append(nxt)
    return {"start": start, "stops": len(seen), "modules": len({m for m, _ in seen}), "climbs": climbs}


def edges(root: Path) -> dict[str, object]:
    known = modules(root)
    pairs: Counter[str] = Counter()
    up = 0
    for name, path in known.items():
        if name == "bergson":
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                src = resolve(name, package, node)
                for t in [src, *(f"{src}.{a.name}" for a in node.names)]:
                    while t and t not in known:
                        t = t.rpartition(".")[0]
                    if t and t not in (name, "bergson"):
                        targets.add(t)
        for t in targets:
            a, b = name.split(".")[1], t.split(".")[1]
            if a != b:
                pairs[f"{a} -> {b}"] += 1
                up += floor(t) > floor(name) and a not in ("cli", "__main__")
    return {"package_edges": len(pairs), "module_edges": sum(pairs.values()), "upward_module_edges": up}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default=".")
    parser.add_argument("--start", default="bergson.cli.build.run")
    args = parser.parse_args()
    root = Path(args.root)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in modules(root).items()), reverse=True)
    print(
        json.dumps(
            {
                "largest": [{"module": m, "lines": n} for n, m in sizes[:10]],
                "edges": edges(root),
                "walk": walk(root, args.start),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""The import graph of kvtier/, built from the source: no cycles, no import against the layer order.

The order and the imports by name string are written once, in docs/ARCHITECTURE.md ("Layers"):
this test reads them from there. Every import counts, module-level, inside functions and under
`TYPE_CHECKING` alike: a cycle through a lazy import is still a cycle of the design.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvtier"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
NAME_STRING = re.compile(r"kvtier(\.\w+)+(:\w+)?")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kvtier modules `name` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from kvtier.codec import spec` imports the submodule; `from kvtier import Config` the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # `import kvtier.x.y` of a submodule's attribute
                target = target.rpartition(".")[0]
            if target.startswith("kvtier") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def doc_block(kind: str) -> list[list[str]]:
    """The whitespace-split lines of the ```kind block of docs/ARCHITECTURE.md."""
    match = re.search(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/ARCHITECTURE.md has no ```{kind} block"
    return [line.split() for line in match.group(1).splitlines() if line.strip()]


@dataclass(frozen=True)
class Layer:
    number: int
    name: str
    entries: tuple[str, ...]


def layers() -> list[Layer]:
    return [Layer(int(row[0]), row[1], tuple(row[2:])) for row in doc_block("layers")]


def layer_of(module: str, order: list[Layer]) -> int:
    """The layer of the longest entry that names `module` or a package above it ("kvtier" only itself)."""
    best, number = "", 0
    for layer in order:
        for entry in layer.entries:
            names_it = module == entry or (entry != "kvtier" and module.startswith(entry + "."))
            if names_it and len(entry) > len(best):
                best, number = entry, layer.number
    if not best:
        raise AssertionError(f"{module} is in no layer of docs/ARCHITECTURE.md: add it to the ```layers block")
    return number


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_layer_table_is_well_formed():
    order = layers()
    assert [layer.number for layer in order] == list(range(1, len(order) + 1))
    entries = [entry for layer in order for entry in layer.entries]
    assert len(entries) == len(set(entries)), "a module is listed twice"
    known = modules()
    assert not [e for e in entries if e not in known], "the table names modules that do not exist"


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_import_follows_the_layer_order():
    order = layers()
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target, order) > layer_of(module, order):
                wrong.append(f"{module} (layer {layer_of(module, order)}) imports {target} "
                             f"(layer {layer_of(target, order)})")  # fmt: skip
    assert wrong == []


def name_strings() -> set[str]:
    """String constants in kvtier/ that name a kvtier module ("kvtier.x" or "kvtier.x:attr"), except
    logger names."""
    known = modules()
    found = set()
    for path in known.values():
        tree = ast.parse(path.read_text(), str(path))
        loggers = {
            id(arg)
            for call in ast.walk(tree)
            if isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", "")) == "getLogger"
            for arg in call.args
        }
        for node in ast.walk(tree):
            text = node.value if isinstance(node, ast.Constant) and id(node) not in loggers else None
            if isinstance(text, str) and NAME_STRING.fullmatch(text) and text.partition(":")[0] in known:
                found.add(text)
    return found


def test_imports_by_name_string_are_listed_and_resolve():
    listed = {row[0] for row in doc_block("imports-by-name")}
    assert name_strings() - listed == set(), "a module imported by name is missing from docs/ARCHITECTURE.md"
    known = modules()
    for entry in listed:
        module, _, attr = entry.partition(":")
        assert module in known, entry
        if attr:
            tree = ast.parse(known[module].read_text())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            assert attr in defined, f"{entry}: {module} defines no {attr}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(source, expected):
    assert cycles(source) == expected


def test_relative_and_lazy_imports_are_counted(tmp_path):
    pkg = tmp_path / "kvtier" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "kvtier" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kvtier.sub.b import X\n"
        "def f():\n    from . import c\n    import kvtier.sub.b\n"
    )
    known = {"kvtier": tmp_path / "kvtier/__init__.py", "kvtier.sub": pkg / "__init__.py", "kvtier.sub.a": pkg / "a.py",
             "kvtier.sub.b": pkg / "b.py", "kvtier.sub.c": pkg / "c.py"}  # fmt: skip
    assert imports_of("kvtier.sub.a", pkg / "a.py", known) == {"kvtier.sub.b", "kvtier.sub.c"}

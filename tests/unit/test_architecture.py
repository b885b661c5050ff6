"""docs/architecture.md's layers are the package's import graph: no module
imports one of a later layer, every module is placed, nothing imports
another module's private name, and the package has no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "prelora_hpc"


def layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    out = {}
    for i, line in enumerate(l for l in block.group(1).splitlines() if l.strip()):
        _, names = line.split(":", 1)
        for name in (n.strip() for n in names.split(",")):
            assert name not in out, f"{name} is listed twice"
            out[name] = i
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def runtime_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every package import outside
    ``if TYPE_CHECKING:`` blocks, relative to the package."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    me = module_name(path)
    pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    if me == "":
        pkg = []
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "prelora_hpc":
                target = node.module[len("prelora_hpc."):] if "." in node.module else ""
            else:
                continue
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: modules
                out += [(f"{target}.{n}".strip("."), [], node.lineno) for n in names]
            else:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("prelora_hpc."):
                    out.append((a.name[len("prelora_hpc."):], [], node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): runtime_imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_is_placed_in_a_layer():
    placed = layers()
    modules = {m for m in graph() if m}
    assert sorted(modules - set(placed)) == [], "modules missing from docs/architecture.md"
    assert sorted(set(placed) - modules) == [], "docs/architecture.md lists modules that do not exist"


def test_no_module_imports_a_later_layer():
    placed = layers()
    wrong = [f"prelora_hpc/{m or '__init__'} (layer {placed.get(m)}) line {line} imports {t} "
             f"(layer {placed[t]})"
             for m, deps in graph().items() if m
             for t, _, line in deps if t and t in placed and placed[t] > placed[m]]
    assert wrong == []


def test_no_private_name_is_imported_across_modules():
    wrong = [f"prelora_hpc/{m} line {line}: {t}.{n}"
             for m, deps in graph().items()
             for t, names, line in deps for n in names
             if n.startswith("_") and not n.startswith("__")]
    assert wrong == []


def test_the_package_has_no_import_cycle():
    edges = {m: {t for t, _, _ in deps if t and t != m} for m, deps in graph().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, t]))
            if state.get(t) is None:
                visit(t, path + [m])
        state[m] = 2

    for m in edges:
        if state.get(m) is None:
            visit(m, [])

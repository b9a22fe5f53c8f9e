"""The package's layering, read from the source (no import): kdfast's modules import each
other without a cycle (module-level and function-level imports alike), kernel and reference
files never import kdfast.ops, no file of kdfast/ or csrc/ exceeds 500 lines, and csrc/ uses
no C++20-only standard-library feature (older torch builds extensions as C++17)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdfast"
MAX_LINES = 500
#: compiled submodules (no .py source): leaves of the graph
EXTENSION_MODULES = ("kdfast._C",)
#: build outputs and caches, not sources
NOT_SOURCES = (".so", ".pyd", ".pyc", ".o")
CXX_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    modules: dict[str, Path | None] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return modules | dict.fromkeys(EXTENSION_MODULES)


def _resolve(name: str, modules) -> str | None:
    """The kdfast module ``name`` refers to: itself, or its nearest enclosing module (``from
    kdfast.x import f`` names kdfast.x.f, which is not a module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str, path: Path, modules) -> set[str]:
    """kdfast modules imported anywhere in ``path`` (including inside functions). Importing
    ``kdfast.a.b`` counts as an edge to kdfast.a.b only, not to its parent packages."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub when it is one
            targets = [f"{module}.{alias.name}" for alias in node.names] or [module]
            targets = [t if t in modules else module for t in targets]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules) if target.startswith("kdfast") else None
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: _imports(name, path, modules) if path is not None else set()
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_known_edges():
    """The parser resolves absolute, relative, from-package and function-level imports."""
    graph = import_graph()
    assert "kdfast._dispatch" in graph["kdfast.ops.kd_loss"]
    assert "kdfast.functional" in graph["kdfast.losses.kd"]  # from kdfast import functional
    assert "kdfast._validation" in graph["kdfast.distributed"]  # inside a function
    assert "kdfast.triton.kd_loss" in graph["kdfast.ops.kd_loss"]  # inside an if


def test_find_cycle_detects_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_and_references_do_not_import_ops():
    graph = import_graph()
    bad = {
        name: sorted(t for t in targets if t == "kdfast.ops" or t.startswith("kdfast.ops."))
        for name, targets in graph.items()
        if name.startswith(("kdfast.triton.", "kdfast.reference."))
        or name in ("kdfast.triton", "kdfast.reference")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_files_are_at_most_500_lines():
    files = [p for d in ("kdfast", "csrc") for p in sorted((ROOT / d).rglob("*")) if p.is_file()]
    sources = [
        p for p in files if "__pycache__" not in p.parts and not p.name.endswith(NOT_SOURCES)
    ]
    assert len(sources) > 50
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


#: C++20-only library headers and names; torch 2.11 builds extensions with -std=c++17 (its
#: build of kdfast failed on std::bit_cast on a GPU machine), torch 2.14 with -std=c++20
CXX20_ONLY = re.compile(
    r"#include\s*<(bit|span|numbers|concepts|ranges|format|compare|source_location)>"
    r"|std::(bit_cast|span|numbers|ssize|midpoint|lerp|popcount|countl_zero|countr_zero"
    r"|bit_width|has_single_bit|remove_cvref|is_constant_evaluated|erase_if|to_array)\b"
    r"|\bconsteval\b|\bconstinit\b|<=>|\.contains\(|\.starts_with\(|\.ends_with\("
)


def test_csrc_builds_as_cxx17():
    sources = [p for p in sorted((ROOT / "csrc").rglob("*")) if p.suffix in CXX_SUFFIXES]
    assert len(sources) > 20
    found = {
        f"{p.relative_to(ROOT)}:{i}": line.strip()
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if CXX20_ONLY.search(line.split("//")[0])
    }
    assert not found, f"C++20-only features (torch 2.11 compiles C++17): {found}"
    assert CXX20_ONLY.search("const int32_t b = std::bit_cast<int32_t>(x);")

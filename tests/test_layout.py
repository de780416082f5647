"""The house's shape: no import circle between any two modules of the project, and no room
too big to live in.

The dependency rules between packages (DESIGN.md) are import-linter contracts in
pyproject.toml, checked by `lint-imports` in scripts/test.sh. A circle inside a package is
what those contracts cannot see; it is also what pushes imports into function bodies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGES = ("fedscore", "crypto", "clients", "server", "simulations")


def import_circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(imports):
        if root in index:
            continue
        work = [(root, iter(sorted(imports[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(imports.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


@pytest.mark.parametrize(("imports", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_circles_are_found(imports, expected):
    assert sorted(import_circles(imports)) == expected


def test_no_module_imports_itself_back():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert import_circles(imports) == [], (
        "import circles (break them by moving what both sides need into a module of its own)")


# Issue 19's sizes: a module a newcomer can read in one sitting, a function that fits a screen.
MODULE_LINES = 500
FUNCTION_LINES = 80
ROOT = Path(__file__).resolve().parent.parent


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines from `def` to its last line) of every function over `limit`, wherever it
    is defined (in a class, a function, or under an `if`, `try` or `with`)."""
    return [(node.name, lines) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and (lines := (node.end_lineno or node.lineno) - node.lineno + 1) > limit]


def test_long_functions_are_found():
    source = "class A:\n    def f(self):\n" + "        x = 1\n" * 5 + "def g():\n    pass\n"
    assert long_functions(source, 5) == [("f", 6)]
    assert long_functions(source, 6) == []
    hidden = ("try:\n    async def h():\n" + "        x = 1\n" * 5
              + "except ImportError:\n    pass\n")
    assert long_functions(hidden, 5) == [("h", 6)]


def test_no_module_or_function_is_too_long():
    too_long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _sources()
                if (n := len(p.read_text().splitlines())) > MODULE_LINES]
    too_long += [f"{p.relative_to(ROOT)}: {name} has {n} lines" for p in _sources()
                 for name, n in long_functions(p.read_text(), FUNCTION_LINES)]
    assert too_long == [], f"split these by concern (issue 19's sizes): {too_long}"

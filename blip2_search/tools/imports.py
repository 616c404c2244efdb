"""The project's import graph and the dependency rule of docs/architecture.md, checked from source.

``python -m blip2_search.tools.imports`` prints the package graph (edges with how many imports make
them), module sizes, and every broken rule; it exits 1 if any rule is broken.
``tests/blip2_search/test_architecture.py`` runs the same check. Imports inside functions count like top-level
ones (they are still dependencies, only deferred), and so do ``if TYPE_CHECKING:`` imports (a type
is a dependency too).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("blip2_embed", "catalog", "indexer", "search_api", "migrations", "blip2_train", "blip2_search")

# Which first-party packages each layer may import (itself always). Read top to bottom: data flows up.
ALLOWED: dict[str, set[str]] = {
    "blip2_search.settings": set(),  # the one settings object: a leaf
    "blip2_embed": set(),  # models and tensors
    "catalog": {"migrations", "blip2_embed"},  # SQL, vector index; Alembic revisions in migrations/;
    # model inputs are written by blip2_embed's resizer
    "migrations": {"catalog"},  # Alembic revisions over catalog.models
    "blip2_train": {"blip2_embed"},
    "indexer": {"blip2_embed", "catalog", "blip2_search.settings"},
    "search_api": {"blip2_embed", "catalog", "blip2_search.settings"},
    "blip2_search": set(PACKAGES),  # the CLI assembly and the demo: everything
}
# Third-party modules a layer must not know.
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "blip2_search.settings": ("torch", "transformers", "fastapi", "starlette"),
    "blip2_embed": ("sqlalchemy", "alembic", "fastapi", "starlette", "httpx", "uvicorn"),
    "catalog": ("fastapi", "starlette", "transformers", "uvicorn"),
    "indexer": ("fastapi", "starlette", "uvicorn"),
    "blip2_train": ("sqlalchemy", "fastapi", "starlette"),
    "search_api.service": ("fastapi", "starlette", "uvicorn", "httpx"),  # the search service knows no HTTP
}
# Modules only the CLI assembly may import (nothing imports a command).
CLI_MODULES = ("blip2_search.cli", "blip2_search.commands", "blip2_search.demo")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (first-party: resolved to a module; else the top-level name)
    line: int
    deferred: bool  # inside a function


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    def first_party(self) -> list[Import]:
        return [i for i in self.imports if i.target in self.modules]


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path, root)] = path
    return found


def _resolve(name: str, modules: Mapping[str, Path]) -> str:
    """The longest first-party module that ``name`` starts with, else its top-level package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return parts[0]


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits inside a function body."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, deferred = stack.pop()
        yield node, deferred
        inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def imports_of(source: str, path: Path, modules: Mapping[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Import] = []
    for node, deferred in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(source, _resolve(alias.name, modules), node.lineno, deferred))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import submodule` depends on the submodule, `from mod import name` on mod.
                full = f"{base}.{alias.name}"
                target = full if full in modules else _resolve(base, modules)
                found.append(Import(source, target, node.lineno, deferred))
    return [i for i in found if i.target != source]


def build_graph(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> Graph:
    modules = discover(root, packages)
    graph = Graph(modules=modules)
    for name, path in modules.items():
        graph.imports.extend(imports_of(name, path, modules))
    return graph


def _layer(module: str, table: Mapping[str, object]) -> str | None:
    """The most specific key of ``table`` that ``module`` belongs to."""
    best = None
    for key in table:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in graph.first_party():
        edges[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return sorted(out)


def violations(graph: Graph) -> list[str]:
    """Every broken rule, one line each (empty: the architecture holds)."""
    problems: list[str] = []
    for imp in graph.imports:
        where = f"{imp.source}:{imp.line}"
        if imp.target.split(".")[0] == "tests":
            problems.append(f"{where} imports the test helper {imp.target}")
            continue
        if imp.target in graph.modules:
            if any(imp.target == c or imp.target.startswith(c + ".") for c in CLI_MODULES) and not (
                imp.source.startswith("blip2_search.cli") or imp.source.startswith("blip2_search.commands")
            ):
                problems.append(f"{where} imports the CLI module {imp.target}")
            source_layer = _layer(imp.source, ALLOWED)
            target_layer = _layer(imp.target, ALLOWED)
            if source_layer is None or target_layer is None or source_layer == target_layer:
                continue
            if source_layer.split(".")[0] == target_layer.split(".")[0] and source_layer != (
                "blip2_search.settings"
            ):
                continue  # inside one package
            if target_layer not in ALLOWED[source_layer]:
                problems.append(f"{where} ({source_layer}) may not import {imp.target} ({target_layer})")
        else:
            layer = _layer(imp.source, FORBIDDEN_THIRD_PARTY)
            if layer is not None and imp.target in FORBIDDEN_THIRD_PARTY[layer]:
                problems.append(f"{where} ({layer}) may not import {imp.target}")
    problems.extend(_service_reaches_http(graph))
    problems.extend(f"import cycle: {' <-> '.join(c)}" for c in cycles(graph))
    return list(dict.fromkeys(problems))  # one line per broken rule, however often it is imported


def _service_reaches_http(graph: Graph) -> list[str]:
    """The search service and every first-party module it reaches must not import HTTP libraries."""
    roots = [m for m in graph.modules if m == "search_api.service" or m.startswith("search_api.service.")]
    edges: dict[str, list[Import]] = defaultdict(list)
    for imp in graph.imports:
        edges[imp.source].append(imp)
    seen: set[str] = set()
    todo = list(roots)
    problems = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imp in edges[module]:
            if imp.target in graph.modules:
                todo.append(imp.target)
            elif imp.target in FORBIDDEN_THIRD_PARTY["search_api.service"] and not module.startswith(
                "search_api.service"
            ):
                problems.append(f"{module}:{imp.line} imports {imp.target}; the search service reaches it")
    return problems


def package_edges(graph: Graph) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for imp in graph.first_party():
        a, b = imp.source.split(".")[0], imp.target.split(".")[0]
        if a != b:
            counts[(a, b)] += 1
    return dict(sorted(counts.items()))


def module_sizes(graph: Graph) -> dict[str, int]:
    return {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in sorted(graph.modules.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", action="store_true", help="also list every module's size in lines")
    args = parser.parse_args(argv)
    graph = build_graph()
    print(f"{len(graph.modules)} modules, {len(graph.first_party())} first-party imports\n")
    print("package -> package (imports)")
    for (a, b), n in package_edges(graph).items():
        print(f"  {a:>14} -> {b:<14} {n}")
    if args.sizes:
        print("\nmodule sizes (lines)")
        for module, lines in module_sizes(graph).items():
            print(f"  {lines:5d}  {module}")
    problems = violations(graph)
    print()
    if problems:
        print(f"{len(problems)} rule(s) broken:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("OK: no import cycles; every package imports only what docs/architecture.md allows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

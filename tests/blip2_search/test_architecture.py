"""The dependency rule of docs/architecture.md, checked over the import graph of the source tree
(imports inside functions and under ``TYPE_CHECKING`` count too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from blip2_search.tools import imports

REPO = Path(__file__).resolve().parents[2]


def test_the_product_code_keeps_the_dependency_rule() -> None:
    graph = imports.build_graph(REPO)
    assert len(graph.modules) > 50  # the walk found the packages
    assert imports.violations(graph) == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in imports.PACKAGES:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_check_finds_each_kind_of_break(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            # a cycle, counted through an import inside a function
            "indexer/a.py": "def f():\n    import indexer.b\n",
            "indexer/b.py": "import indexer.a\n",
            # the model layer reaching SQL, and a layer reaching upwards
            "blip2_embed/m.py": "import sqlalchemy\nimport search_api.service.s\n",
            # the search service reaching HTTP through a module it imports
            "search_api/service/__init__.py": "",
            "search_api/service/s.py": "from search_api.web import thing\n",
            "search_api/web.py": "import fastapi\nthing = 1\n",
            # product code importing a CLI module and a test helper
            "catalog/c.py": "from blip2_search.cli import app\nimport tests.support.catalog\n",
            "blip2_search/cli.py": "",
        },
    )
    found = "\n".join(imports.violations(imports.build_graph(root)))
    assert "import cycle: indexer.a <-> indexer.b" in found
    assert "blip2_embed.m:1 (blip2_embed) may not import sqlalchemy" in found
    assert "blip2_embed.m:2 (blip2_embed) may not import search_api.service.s" in found
    assert "search_api.web:1 imports fastapi; the search service reaches it" in found
    assert "catalog.c:1 imports the CLI module blip2_search.cli" in found
    assert "catalog.c:2 imports the test helper tests" in found


def test_the_report_prints_the_graph_and_sizes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blip2_search.tools.imports", "--sizes"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:]
    assert "search_api -> catalog" in out.stdout
    assert "blip2_search.settings" in out.stdout  # in the sizes table
    assert "OK: no import cycles" in out.stdout

"""The wheel carries everything a user outside a clone needs: the demo model, the web page, migrations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and egg-info next to them)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        name = pattern.rstrip("*")
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            out,
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("blip2_search-*.whl")
    return built


def test_wheel_holds_the_demo_model_the_page_and_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    model = REPO / "blip2_search" / "demo_model"
    shipped = {
        p.relative_to(REPO).as_posix()
        for p in model.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {f"blip2_search/demo_model/{r}/config.json" for r in ("retrieval", "caption")} <= shipped
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert "search_api/static/index.html" in names
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    """The wheel's files, first on the path, from a folder far from the clone: the demo finds its model,
    indexes with it and exits 0 (--no-serve). The dependencies come from this environment."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "BLIP2_INDEX_WORKERS": "0", "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys, blip2_search.demo_model as m; from blip2_search.cli import app; "
        "print(m.DEMO_MODEL_DIR, flush=True); sys.argv = ['blip2-search', *sys.argv[1:]]; app()"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "demo",
            "--no-serve",
            "--photos",
            "3",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(site / "blip2_search" / "demo_model")
    assert "generation" in result.stdout and (tmp_path / "d" / "catalog.db").is_file()

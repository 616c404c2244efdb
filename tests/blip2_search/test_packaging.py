"""The wheel carries everything a user outside a clone needs: the demo model, the web page, migrations."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


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


def test_wheel_holds_the_demo_model_and_all_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    model = {
        f"blip2_search/demo_model/{r}/{f}"
        for r in ("retrieval", "caption")
        for f in ("config.json", "model.safetensors")
    }
    assert model <= names, f"missing from the wheel: {sorted(model - names)}"
    # Every file pyproject's package-data names (the web page, migrations, the model) is in the wheel.
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, globs in package_data.items():
        folder = REPO / package.replace(".", "/")
        wanted = {p.relative_to(REPO).as_posix() for g in globs for p in folder.glob(g) if p.is_file()}
        assert wanted, f"package-data {package} {globs} names no file"
        assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"
    assert "search_api/http/static/index.html" in names
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") for n in names)


@pytest.mark.slow
def test_installed_wheel_serves_the_compose_demo_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    """What the compose file's demo service runs, from the wheel's files (first on the path) in a folder
    far from the clone, offline: the demo finds the packaged model, indexes and serves searches."""
    from tests.blip2_search.test_deployment import compose

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    argv = compose()["services"]["demo"]["command"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "data")
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv += ["--photos", "12"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "DATABASE_URL"))}
    env |= {"PYTHONPATH": str(site), "BLIP2_INDEX_WORKERS": "0", "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys, blip2_search.demo_model as m; from blip2_search.cli import app; "
        "print(m.DEMO_MODEL_DIR, flush=True); sys.argv = sys.argv[1:]; app()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the demo never became ready"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        hits = httpx.get(url + "/api/search", params={"q": "a red circle", "k": 3}, timeout=30).json()["hits"]
        assert len(hits) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert out.splitlines()[0] == str(site / "blip2_search" / "demo_model")

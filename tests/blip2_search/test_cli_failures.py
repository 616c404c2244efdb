"""Every failure a user can cause from the command line is one actionable line and a non-zero exit.

Each case runs the real ``blip2-search`` in a subprocess (a traceback or a Rich error panel would only
show there). Python start-up dominates, so the cases run a few at a time and are then checked one by one.
"Fails fast" is checked by what is printed (no retry warnings: exactly one line), not by a clock.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from catalog.db import upgrade

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Case:
    args: list[str]
    env: dict[str, str]
    code: int
    says: list[str]


def _base_env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "DATABASE_URL", "HF_"))}
    env.update(
        BLIP2_DATA_DIR=str(data),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        # An address that refuses at once: the "hub is unreachable" case without touching a network.
        HF_ENDPOINT="http://127.0.0.1:9",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def _run_all(cases: dict[str, Case]) -> dict[str, subprocess.CompletedProcess]:
    def one(case: Case) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "blip2_search.cli", *case.args],
            cwd=REPO,
            env=case.env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(cases, pool.map(one, cases.values()), strict=True))


@pytest.fixture(scope="module")
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_each_failure_is_one_line_and_a_nonzero_exit(tmp_path: Path, tiny_checkpoints, busy_port) -> None:
    fresh = tmp_path / "fresh"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "catalog.db").write_bytes(b"this is not a database" * 100)
    empty = tmp_path / "empty"
    upgrade(f"sqlite:///{empty / 'catalog.db'}")
    photo = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (10, 200, 10)).save(photo)
    tiny = {"BLIP2_RETRIEVAL_MODEL": str(tiny_checkpoints.retrieval), "BLIP2_CAPTION_MODEL": ""}
    down = "postgres://postgres@127.0.0.1:9/none?connect_timeout=3"

    nowhere = {"BLIP2_RETRIEVAL_MODEL": str(tmp_path / "nowhere")}
    port = str(busy_port)
    cases = {
        "not a URL": Case(["db", "current"], _base_env(fresh, DATABASE_URL="notaurl"), 2, ["DATABASE_URL"]),
        "bad batch": Case(["db", "current"], _base_env(fresh, BLIP2_BATCH_SIZE="abc"), 2, ["BATCH_SIZE"]),
        "db current, damaged": Case(
            ["db", "current"], _base_env(damaged), 1, ["damaged", str(damaged / "catalog.db"), "backup"]
        ),
        "db check, fresh": Case(["db", "check"], _base_env(fresh), 1, ["blip2-search index"]),
        "db current, unreachable": Case(
            ["db", "current"], _base_env(fresh, DATABASE_URL=down), 1, ["cannot reach", "127.0.0.1:9"]
        ),
        "search, down": Case(["search", "red"], _base_env(fresh, DATABASE_URL=down), 1, ["cannot reach"]),
        "search, damaged": Case(["search", "red"], _base_env(damaged, **tiny), 1, ["damaged"]),
        "search, no catalog": Case(["search", "red"], _base_env(fresh, **tiny), 1, ["no catalog", "index"]),
        "search, empty catalog": Case(["search", "red"], _base_env(empty, **tiny), 1, ["no indexed images"]),
        # The default hub ids, not cached, hub unreachable: at once (no retry warnings), the whole message.
        "hub unreachable": Case(
            ["caption", str(photo)], _base_env(fresh), 3, ["Salesforce/blip2-opt-2.7b", "HF_HUB_OFFLINE=1."]
        ),
        "serve, missing model": Case(
            ["serve", "--port", "0"], _base_env(fresh, **nowhere), 3, ["nowhere", "does not exist"]
        ),
        # The port is checked before the (missing) model is even looked for.
        "serve, port taken": Case(
            ["serve", "--port", port], _base_env(fresh, **nowhere), 1, [f"127.0.0.1:{port}", "in use"]
        ),
        "demo, port taken": Case(
            ["demo", "--data-dir", str(tmp_path / "demo"), "--port", port], _base_env(fresh), 1, ["in use"]
        ),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = Case(
            ["caption", str(photo)],
            _base_env(fresh, BLIP2_DEVICE="cuda", BLIP2_CAPTION_MODEL=str(tiny_checkpoints.caption)),
            2,
            ["BLIP2_DEVICE", "CUDA"],
        )

    results = _run_all(cases)
    for name, case in cases.items():
        proc = results[name]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        where = f"{name}: exit {proc.returncode}, stderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
        assert proc.returncode == case.code, where
        assert "Traceback" not in proc.stderr + proc.stdout and "╭" not in proc.stderr, where
        assert len(lines) == 1, where
        for needle in case.says:
            assert needle in lines[0], f"{needle!r} missing: {where}"
    assert not (tmp_path / "demo").exists(), "the demo generated photos before finding the port taken"
    assert not (fresh / "catalog.db").exists(), "a read-only command created an empty catalog"


@pytest.mark.postgres
def test_postgres_scheme_is_accepted(pg_url: str, tmp_path: Path) -> None:
    # postgres:// is what most hosting panels and images print; SQLAlchemy alone would refuse it.
    from alembic.script import ScriptDirectory

    from catalog.db import alembic_config

    url = "postgres://" + pg_url.split("://", 1)[1]
    head = ScriptDirectory.from_config(alembic_config(pg_url)).get_current_head()
    env = _base_env(tmp_path, DATABASE_URL=url)
    for args, expect in ((["db", "upgrade"], "newest revision"), (["db", "current"], head)):
        cmd = [sys.executable, "-m", "blip2_search.cli", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stdout

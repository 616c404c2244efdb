"""``blip2-search index PATH --watch`` as a user runs it: a subprocess over a real folder, real file-system
events (watchfiles), a real SQLite catalog, stopped with SIGINT."""

from __future__ import annotations

import fcntl
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from indexer.watch import folders_to_rescan, skipped_by_scan
from tests.indexer.test_indexer_cli import REPO, _env
from tests.support.indexer import write_image


def _catalog(data: Path) -> tuple[int, dict[str, str]]:
    """(published generation, {relative path: status}) read straight from the SQLite file."""
    db = data / "catalog.db"
    if not db.exists():
        return 0, {}
    with sqlite3.connect(db) as conn:
        try:
            (generation,) = conn.execute("SELECT published_generation FROM index_state").fetchone()
            files = dict(conn.execute("SELECT relative_path, status FROM files").fetchall())
        except (sqlite3.OperationalError, TypeError):  # the schema is being created
            return 0, {}
    return int(generation), {k: str(v).lower() for k, v in files.items()}


def _wait_for(
    check: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(
                f"the watcher exited ({proc.returncode}) before {what}: {proc.stderr.read()}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_watch_indexes_added_and_removed_photos_then_stops_on_sigint(
    tiny_checkpoints, tmp_path: Path
) -> None:
    lib, data = tmp_path / "lib", tmp_path / "data"
    write_image(lib / "a/1.jpg", 1)
    write_image(lib / "a/2.jpg", 2)
    env = _env(tiny_checkpoints, data, BLIP2_INDEX_WORKERS="0")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blip2_search.cli",
            "index",
            str(lib),
            "--watch",
            "--json",
            "--debounce",
            "0.3",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _catalog(data)[0] == 1, proc, "the initial run's generation")
        assert _catalog(data)[1] == {"a/1.jpg": "indexed", "a/2.jpg": "indexed"}
        # Between batches too, the watcher is the data folder's one writer.
        with open(data / "indexer.lock", "a+") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

        # A new photo in a new folder: one batch, one generation.
        write_image(lib / "b/3.jpg", 3)
        _wait_for(lambda: _catalog(data)[0] == 2, proc, "the generation of the added photo")
        assert _catalog(data)[1].get("b/3.jpg") == "indexed"

        (lib / "a/1.jpg").unlink()
        _wait_for(lambda: _catalog(data)[0] == 3, proc, "the generation of the removal")
        assert _catalog(data)[1] == {"a/1.jpg": "deleted", "a/2.jpg": "indexed", "b/3.jpg": "indexed"}

        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines()]
    runs, final = lines[:-1], lines[-1]
    assert [r["generation"] for r in runs if r["published"]] == [1, 2, 3]
    assert final["watch"] and final["generations"] == [1, 2, 3]
    assert (final["new"], final["deleted"], final["embedded"]) == (3, 1, 3)
    assert "Traceback" not in err
    assert _catalog(data)[0] == 3  # nothing more was published while stopping


def test_folders_to_rescan_covers_each_change_with_the_fewest_folders(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    (root / "a/x").mkdir(parents=True)
    (root / "b").mkdir()
    changed = [root / "a/x/1.jpg", root / "a/2.jpg", root / "b/gone/deeper/3.jpg", root / "top.jpg"]
    assert folders_to_rescan([root], changed[:3]) == [root / "a", root / "b"]
    assert folders_to_rescan([root], changed) == [root]  # a file in the root: the whole root
    assert folders_to_rescan([root], changed[:3], max_folders=1) == [root]
    assert folders_to_rescan([root], [tmp_path / "elsewhere.jpg"]) == [root]


def test_changes_the_scan_would_skip_start_no_batch(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    assert not skipped_by_scan(root / "a/1.jpg", [root])
    assert skipped_by_scan(root / "a/.1.jpg.part", [root])  # a download or copy in progress
    assert skipped_by_scan(root / ".cache/x/1.jpg", [root])
    assert skipped_by_scan(root / "a/@eaDir/1.jpg", [root])
    assert not skipped_by_scan(root / ".cache/x/1.jpg", [root], include_hidden=True)
    assert not skipped_by_scan(tmp_path / ".lib/1.jpg", [tmp_path / ".lib"])  # a hidden root is asked for

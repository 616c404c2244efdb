"""``blip2-search index`` as a user runs it.

The crash tests run the CLI in subprocesses, stop each at a known point through a progress sink that
pauses at a stage (``tests.support.pause``), SIGKILL or SIGINT it, resume, and compare the end state with an
uninterrupted run. Python + torch start-up dominates a subprocess here, so all scenarios run in
parallel and the resumes and the reference run in-process (same code path, same settings).
"""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from catalog.db import make_engine
from indexer.run import IndexOptions, IndexTarget, RunSummary, run_index
from tests.support.indexer import cli_env, dump, write_image

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 7  # batches of 2: 2 + 2 + 2 + 1
BATCH = 2


def _env(tiny_checkpoints, data: Path, **extra: str) -> dict[str, str]:
    return cli_env(tiny_checkpoints, data, BATCH, **{"BLIP2_INDEX_WORKERS": "1", **extra})


def _library(root: Path) -> Path:
    for i in range(N_IMAGES):
        write_image(root / f"d{i % 2}/{i}.jpg", i)
    return root


def _index_in_process(encoder, lib: Path, data: Path) -> RunSummary:
    """What ``blip2-search index LIB`` does with the env of ``_env`` (settings defaults otherwise)."""
    opts = IndexOptions(
        roots=[lib], batch_size=BATCH, workers=0, thumbnail_dir=data / "thumbnails", thumbnail_size=32
    )
    target = IndexTarget(f"sqlite:///{data / 'catalog.db'}", data / "indexer.lock", data / "index")
    return run_index(target, encoder, opts)


def _state(data: Path, model_key: str):
    engine = make_engine(f"sqlite:///{data / 'catalog.db'}")
    try:
        return dump(engine, model_key, data / "index")
    finally:
        engine.dispose()


@pytest.fixture
def cli(tiny_checkpoints, tmp_path: Path, monkeypatch):
    """Typer's runner over the real app, with the settings pointed at tiny checkpoints and a data dir."""
    from blip2_search.cli import app
    from blip2_search.settings import get_settings

    def invoke(*args: str, **env: str):
        for k, v in _env(tiny_checkpoints, tmp_path / "data", **env).items():
            if k.startswith("BLIP2_"):
                monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(app, ["index", *args])
        finally:
            get_settings.cache_clear()

    return invoke


def test_cli_json_dry_run_and_exit_codes(cli, encoder, tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib")
    dry = cli(str(lib), "--json", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout.strip().splitlines()[-1])["to_embed"] == N_IMAGES

    out = cli(str(lib), "--json")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["new"], summary["embedded"], summary["failed"]) == (N_IMAGES, N_IMAGES, 0)
    state = _state(tmp_path / "data", encoder.retrieval_key)
    assert state.index == state.live == set(state.embedded) and len(state.embedded) == N_IMAGES
    assert len(list((tmp_path / "data/thumbnails").glob("*/*.jpg"))) == N_IMAGES

    human = cli(str(lib))  # the Rich summary
    assert human.exit_code == 0 and "unchanged" in human.output
    retry = cli(str(lib / "d0"), "--json", "--retry-failed")  # a folder inside the root: part of it
    assert retry.exit_code == 0, retry.output
    part = json.loads(retry.stdout.strip().splitlines()[-1])
    assert (part["unchanged"], part["deleted"], part["warnings"]) == ((N_IMAGES + 1) // 2, 0, [])
    assert part["notes"] == [
        f"{lib.resolve() / 'd0'}: inside library root {lib.resolve()}; indexed as part of it (d0/)"
    ]

    # One writer at a time: a second indexer on the same data folder refuses to start.
    with open(tmp_path / "data" / "indexer.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = cli(str(lib))
        assert busy.exit_code == 1 and "another indexer is running" in busy.output
        dry_busy = cli(str(lib), "--dry-run")
        assert dry_busy.exit_code == 0, dry_busy.output  # a dry run writes nothing: it needs no lock

    assert cli(str(lib), BLIP2_RETRIEVAL_MODEL=str(tmp_path / "nope")).exit_code == 3  # no model
    no_db = cli(str(lib), BLIP2_DATABASE_URL="postgresql+psycopg://x@127.0.0.1:1/none?connect_timeout=2")
    assert no_db.exit_code == 1  # no database
    assert cli(str(tmp_path / "missing")).exit_code == 2


# (stage, n, signal, images committed before the signal)
SCENARIOS = [
    ("planned", 1, signal.SIGKILL, 0),  # after the plan's commit, before any model work
    ("before-commit", 2, signal.SIGKILL, 2),  # inside batch 2's open transaction
    ("committed", 3, signal.SIGKILL, 6),  # right after batch 3 committed
    ("before-publish", 1, signal.SIGKILL, N_IMAGES),  # all committed, generation not yet published
    ("embedded", 1, signal.SIGINT, 2),  # Ctrl-C during batch 1: it is committed, then the run stops
]


@pytest.mark.slow
def test_killed_or_interrupted_runs_resume_to_the_exact_end_state(
    tiny_checkpoints, encoder, tmp_path: Path
) -> None:
    ref_data = tmp_path / "reference"
    _index_in_process(encoder, _library(tmp_path / "ref/lib"), ref_data)
    reference = _state(ref_data, encoder.retrieval_key)

    procs = []
    for i, (stage, n, sig, _) in enumerate(SCENARIOS):
        base = tmp_path / f"s{i}"
        lib = _library(base / "lib")
        marker = base / "paused"
        pause = f"{stage}:{n}:{2 if sig == signal.SIGINT else 600}:{marker}"
        # One scenario decodes in a worker process (which must not outlive its killed parent); the others
        # decode in-process, which starts faster.
        workers = "1" if stage == "before-commit" else "0"
        env = _env(tiny_checkpoints, base / "data", BLIP2_INDEX_WORKERS=workers)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.pause", pause, "index", str(lib), "--json"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((proc, marker, sig, base, lib))
    try:
        deadline = time.monotonic() + 300  # five cold interpreters at once on a loaded 2-core machine
        waiting = list(procs)
        while waiting:
            for item in list(waiting):
                proc, marker, sig, *_ = item
                if marker.exists():
                    proc.send_signal(sig)
                    waiting.remove(item)
                else:
                    assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "a run never reached its pause point"
            time.sleep(0.05)
        outputs = [proc.communicate(timeout=60) for proc, *_ in procs]
    finally:
        for proc, *_ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for (stage, _n, sig, committed), (proc, _, _, base, lib), (out, err) in zip(
        SCENARIOS, procs, outputs, strict=True
    ):
        data = base / "data"
        if sig == signal.SIGINT:
            assert proc.returncode == 130, err[-3000:]
            summary = json.loads(out.strip().splitlines()[-1])
            assert summary["interrupted"] and summary["embedded"] == committed
            partial = _state(data, encoder.retrieval_key)
            # A clean stop: what was committed is published and in the index; the rest is pending.
            assert partial.published_generation == partial.open_generation == partial.index_generation
            assert partial.index == partial.live == set(partial.embedded)
            statuses = sorted(s for s, _, _ in partial.files.values())
            assert statuses.count("indexed") == committed and set(statuses) == {"indexed", "pending"}
        else:
            assert proc.returncode == -signal.SIGKILL

        resumed = _index_in_process(encoder, lib, data)
        # Nothing lost, nothing embedded twice: the resume embeds exactly what was not committed.
        assert resumed.embedded == N_IMAGES - committed, stage
        state = _state(data, encoder.retrieval_key)
        assert state.files == reference.files, stage
        assert state.embedded == reference.embedded, stage  # the same vectors, bit for bit
        assert state.live == state.index == set(state.embedded), stage
        assert state.published_generation == state.open_generation == state.index_generation, stage

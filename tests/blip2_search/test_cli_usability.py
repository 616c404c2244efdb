"""What a person sees from ``blip2-search`` run in a shell or a script: ``--version``, ``-h`` at every
level, no log lines unless ``--verbose``, and plain progress lines when stdout is not a terminal.

Real subprocesses (a pipe is not a terminal, exactly what a cron job or ``| tee`` gives the command);
they run in parallel because Python start-up dominates.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blip2_search import __version__
from tests.support.indexer import write_image

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blip2_search.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_version_help_quiet_logs_and_plain_progress(tmp_path: Path, tiny_checkpoints) -> None:
    lib = tmp_path / "lib"
    for i in range(5):
        write_image(lib / f"{i}.jpg", i)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "DATABASE_URL"))}
    env.update(
        BLIP2_DATA_DIR=str(tmp_path / "data"),
        BLIP2_RETRIEVAL_MODEL=str(tiny_checkpoints.retrieval),
        BLIP2_CAPTION_MODEL="",
        BLIP2_DEVICE="cpu",
        BLIP2_BATCH_SIZE="2",
        BLIP2_INDEX_WORKERS="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        HF_HUB_OFFLINE="1",
    )
    runs = {
        "version": ["--version"],
        "help": ["-h"],
        "db help": ["db", "-h"],
        "eval help": ["eval", "retrieval", "-h"],
        "index": ["index", str(lib)],
        "verbose dry run": ["--verbose", "index", str(lib), "--dry-run"],
    }
    # The dry run gets its own data folder: two first runs on one fresh catalog would both create it.
    envs = {name: env for name in runs} | {"verbose dry run": env | {"BLIP2_DATA_DIR": str(tmp_path / "dry")}}
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(runs, pool.map(lambda n: _run(runs[n], envs[n]), runs), strict=True))

    assert done["version"].returncode == 0 and done["version"].stdout.strip() == f"blip2-search {__version__}"
    for name in ("help", "db help", "eval help"):
        assert done[name].returncode == 0 and "Usage:" in done[name].stdout, done[name].stderr
    assert "--version" in done["help"].stdout and "--verbose" in done["help"].stdout

    index = done["index"]
    assert index.returncode == 0, index.stderr[-3000:]
    # A pipe gets whole lines: no cursor movement or colour codes, a first and a last progress line.
    assert "\x1b" not in index.stderr
    lines = index.stderr.splitlines()
    assert lines[0].startswith("indexing 0/5 ") and "new 5" in lines[0], index.stderr
    assert re.match(r"indexed 5/5 \(\d+\.\d img/s, \d+ s\)", lines[-1]), index.stderr
    # No log lines without --verbose (neither ours nor the libraries'); with it, they are there.
    assert not re.search(r"\b(INFO|DEBUG)\b", index.stderr + index.stdout)
    verbose = done["verbose dry run"]
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert re.search(r"\bINFO\b", verbose.stderr)

"""``index --engine ray`` on a local Ray: the same catalog as the local indexer, through faults.

One Ray and one reference catalog serve all tests (tests/support/ray_fixtures.py). The fault test wraps the
engine's decode task and encoder actor so they pause at a known batch and report their pid, kills both,
and checks Ray's retry/restart leaves nothing lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.indexer import cli_env
from tests.support.ray_fixtures import RAY_BATCH, RAY_IMAGES, index_into, pausing_stages, ray_engine

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _wait_for(marker: Path, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    return int(marker.read_text())


def test_ray_catalog_equals_the_local_indexers(ray_local, ray_library, encoder, tiny_checkpoints, tmp_path):
    summary, state = index_into(tmp_path / "ray", ray_library.root, encoder, ray_engine(tiny_checkpoints))
    ref = ray_library.state
    assert summary.embedded == summary.captioned == RAY_IMAGES and summary.failed == 1
    assert state.files == ref.files  # statuses, hashes, failure reasons; the duplicate shares its image
    assert state.embedded == ref.embedded  # the same vectors, bit for bit (CPU)
    assert state.captions == ref.captions
    assert state.live == state.index == set(ref.embedded)
    assert state.published_generation == state.index_generation == ref.published_generation
    for sub in ("thumbnails", "model_inputs"):
        ours = sorted(p.relative_to(tmp_path / "ray" / sub) for p in (tmp_path / "ray" / sub).rglob("*.*"))
        theirs = sorted(
            p.relative_to(ray_library.reference / sub) for p in (ray_library.reference / sub).rglob("*.*")
        )
        assert ours == theirs and ours, sub


def test_a_killed_decode_worker_and_encoder_actor_lose_nothing(
    ray_local, ray_library, encoder, tiny_checkpoints, tmp_path
):
    """One run, two kills: the decode task of the second batch and the encoder actor at the third."""
    import threading

    markers = {"decode": tmp_path / "decode-paused", "encode": tmp_path / "encode-paused"}
    decode, _ = pausing_stages(5, 60, markers["decode"], tmp_path / "unused")
    _, encoder_actor = pausing_stages(9, 60, tmp_path / "unused", markers["encode"])
    killed: dict[str, int] = {}

    def killer(stage: str) -> None:
        pid = _wait_for(markers[stage])
        os.kill(pid, signal.SIGKILL)
        killed[stage] = pid

    threads = [threading.Thread(target=killer, args=(s,), daemon=True) for s in markers]
    for t in threads:
        t.start()
    engine = ray_engine(tiny_checkpoints, decode=decode, encoder_actor=encoder_actor)
    summary, state = index_into(tmp_path / "ray", ray_library.root, encoder, engine)
    for t in threads:
        t.join(5)
    assert set(killed) == {"decode", "encode"} and os.getpid() not in killed.values()
    ref = ray_library.state
    assert summary.embedded == RAY_IMAGES  # each image once: a retried batch is not committed twice
    assert (state.files, state.embedded, state.captions) == (ref.files, ref.embedded, ref.captions)


def test_a_killed_driver_resumes_like_the_local_indexer(
    ray_local, ray_library, encoder, tiny_checkpoints, tmp_path
):
    """The CLI joins the test's cluster (``--ray-address``), is SIGKILLed after its first commit, and the
    next run continues the open generation to the reference end state."""
    data = tmp_path / "data"
    marker = tmp_path / "paused"
    env = cli_env(tiny_checkpoints, data, RAY_BATCH, RAY_AUTH_MODE="disabled")
    address = ray_local.get_runtime_context().gcs_address
    # The real command, paused after its first commit by tests/support/pause.py's sink.
    pause = f"committed:1:600:{marker}"
    cmd = [
        sys.executable,
        "-m",
        "tests.support.pause",
        pause,
        "index",
        str(ray_library.root),
        "--caption",
        "--json",
    ]
    proc = subprocess.Popen(
        [*cmd, "--engine", "ray", "--ray-address", address, "--encoders", "1"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never committed its first batch"
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The resume runs in this process (same code path as the CLI, without another torch start-up).
    summary, state = index_into(data, ray_library.root, encoder, ray_engine(tiny_checkpoints))
    assert summary.embedded == RAY_IMAGES - RAY_BATCH  # only what the killed run had not committed
    ref = ray_library.state
    assert (state.files, state.embedded, state.captions) == (ref.files, ref.embedded, ref.captions)
    assert state.published_generation == state.open_generation == state.index_generation


@pytest.fixture
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), for this test only: yields its port."""
    import socket

    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()


def _s3(port: int):
    from pyarrow import fs

    return fs.S3FileSystem(
        access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}", scheme="http",
        region="us-east-1", allow_bucket_creation=True,
    )  # fmt: skip


def test_decode_tasks_read_s3_objects(ray_local, ray_library, encoder, s3_server) -> None:
    """A decode task reads ``s3://`` through pyarrow (moto's S3 server on 127.0.0.1, started here) and
    decodes exactly what the local path gives; a missing object is a recorded failure, not a crash."""
    import numpy as np

    from indexer.decode import DecodeConfig, Decoded, DecodeFailure, decode_file
    from indexer.ray_engine import decode_batch

    port = s3_server
    s3 = _s3(port)
    s3.create_dir("photos")
    local = sorted(ray_library.root.rglob("*.jpg"))[:3]
    for p in local:
        with s3.open_output_stream(f"photos/{p.name}") as out:
            out.write(p.read_bytes())
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    uris = [f"s3://test:test@photos/{p.name}{query}" for p in local] + [
        f"s3://test:test@photos/gone.jpg{query}"
    ]
    config = DecodeConfig(spec=encoder.spec, thumbnail_size=32, encode_model_input=True)
    batch = {"i": np.arange(len(uris)), "path": np.array(uris, dtype=object),
             "embed": np.ones(len(uris), bool), "caption": np.zeros(len(uris), bool)}  # fmt: skip
    out = ray_local.get(ray_local.remote(decode_batch).remote(batch, config))
    import pickle

    results = [pickle.loads(r) for r in out["result"]]
    for p, got in zip(local, results, strict=False):
        want = decode_file(str(p), config)
        assert isinstance(got, Decoded) and isinstance(want, Decoded)
        assert got.sha256 == want.sha256 and np.array_equal(got.model_input, want.model_input)
        assert got.thumbnail == want.thumbnail and got.model_input_file == want.model_input_file
    assert isinstance(results[-1], DecodeFailure) and results[-1].reason == "unreadable"


def test_an_s3_prefix_indexes_like_the_local_folder(
    ray_local, ray_library, encoder, tiny_checkpoints, tmp_path, s3_server, monkeypatch
) -> None:
    """``index s3://bucket/lib --engine ray``: the scan lists the prefix through pyarrow, the catalog's
    root is the URI, and the catalog equals the local run's over the same files; a re-run is a no-op."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from blip2_embed.errors import ConfigurationError
    from catalog import repository as repo
    from catalog.db import make_engine
    from catalog.models import LibraryRoot
    from catalog.paths import as_uri

    port = s3_server
    s3 = _s3(port)
    s3.create_dir("shelf")
    for p in sorted(ray_library.root.rglob("*")):
        if p.is_file():
            with s3.open_output_stream(f"shelf/lib/{p.relative_to(ray_library.root).as_posix()}") as out:
                out.write(p.read_bytes())
    # pyarrow's usual sources: the driver's scan reads them, the decode tasks get them (runtime_env).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    root = as_uri("s3://shelf/lib")
    summary, state = index_into(tmp_path / "s3", root, encoder, ray_engine(tiny_checkpoints))
    ref = ray_library.state
    assert summary.roots == ["s3://shelf/lib"]
    assert summary.embedded == summary.captioned == RAY_IMAGES and summary.failed == 1
    assert (state.files, state.embedded, state.captions) == (ref.files, ref.embedded, ref.captions)
    assert state.live == state.index == set(ref.embedded)
    sql = make_engine(f"sqlite:///{tmp_path / 's3' / 'catalog.db'}")
    with Session(sql) as session:
        assert list(repo.list_roots(session).values()) == [root]
        assert session.scalars(select(LibraryRoot.path)).all() == ["s3://shelf/lib"]  # the URI, as given
    sql.dispose()

    again, state2 = index_into(tmp_path / "s3", root, encoder, ray_engine(tiny_checkpoints))
    assert (again.new, again.changed, again.deleted, again.embedded) == (0, 0, 0, 0)
    assert state2 == state
    with pytest.raises(ConfigurationError, match="--engine ray"):  # the local engine opens local files only
        index_into(tmp_path / "local", root, encoder)

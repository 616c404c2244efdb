"""No file stops an indexing run, and a quiet library stays quiet: odd names, known failures, NUL in
captions, dangling links, unreadable folders, nested roots, rebuilds during a run. The catalog cases run
on SQLite and Postgres."""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy.orm import Session

from blip2_embed.encoder import clean_text
from catalog import repository as repo
from catalog.index_store import VectorIndexOptions, build_from_catalog, index_path
from catalog.vector_index import MultiVectorIndex
from indexer.report import render_summary
from indexer.roots import RootScope, plan_roots
from indexer.run import RunSummary
from tests.support.indexer import Env, NulCaptions, image_bytes, write_image
from tests.support.pause import PauseAt


@pytest.fixture
def env(tmp_path: Path, encoder, catalog_url: str) -> Env:
    """The in-process indexer over a SQLite file or a Postgres schema."""
    e = Env(tmp_path, encoder, catalog_url)
    yield e
    e.engine.dispose()


def _state(env: Env) -> repo.GenerationState:
    with Session(env.engine) as s:
        return repo.generation_state(s)


def _reasons(summary: RunSummary) -> dict[str, tuple[str, bool]]:
    return {Path(f.path).name: (f.reason, f.known) for f in summary.failures}


# ------------------------------------------------------------------------------------------ names


def test_names_that_are_not_utf8_are_indexed_found_and_deleted(env: Env) -> None:
    latin1 = write_image(env.lib / os.fsdecode(b"caf\xe9.jpg"), 1)  # Latin-1, from an old share
    lookalike = write_image(env.lib / "caf\\xe9.jpg", 2)  # a real name spelled like the escape
    backslash = write_image(env.lib / "a\\b.jpg", 3)
    deep = write_image(env.lib / os.fsdecode(b"dossier \xff\xfe") / "x.jpg", 4)
    first = env.index()
    assert (first.new, first.failed, first.embedded) == (4, 0, 4)

    with Session(env.engine) as s:
        ((root_id, root),) = repo.list_roots(s).items()
        assert root == env.lib.resolve()
        rows = repo.files_under_root(s, root_id)
        assert set(rows) == {p.relative_to(env.lib).as_posix() for p in (latin1, lookalike, backslash, deep)}
        paths = repo.image_paths(s, {r.image_id for r in rows.values()})
    served = sorted(p for ps in paths.values() for p in ps)
    assert served == sorted(p.resolve() for p in (latin1, lookalike, backslash, deep))
    for p in served:  # each row leads back to the exact bytes on disk
        assert p.read_bytes() == (env.lib / p.relative_to(env.lib.resolve())).read_bytes()
    stored = env.dump().files  # the text form, as stored: valid UTF-8, one row per real name
    assert {
        "lib/caf\\xe9.jpg",
        "lib/caf\\\\xe9.jpg",
        "lib/a\\\\b.jpg",
        "lib/dossier \\xff\\xfe/x.jpg",
    } == set(stored)

    again = env.index()
    assert (again.unchanged, again.generation) == (4, first.generation)
    latin1.unlink()
    gone = env.index()
    assert gone.deleted == 1 and env.dump().files["lib/caf\\xe9.jpg"][0] == "deleted"
    assert env.dump().files["lib/caf\\\\xe9.jpg"][0] == "indexed"


# ------------------------------------------------------------------------------------------ failures


def test_unchanged_bad_files_are_reported_but_publish_nothing(env: Env) -> None:
    write_image(env.lib / "good.jpg", 1)
    (env.lib / "empty.jpg").write_bytes(b"")
    (env.lib / "truncated.jpg").write_bytes(image_bytes(2)[:300])
    (env.lib / "not-an-image.jpg").write_text("hello, I am text")
    write_image(env.lib / "bomb.png", 3, "PNG", size=(400, 300))
    first = env.index(max_pixels=100_000)
    expected = {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "not-an-image.jpg": "not_an_image",
        "bomb.png": "decompression_bomb",
    }
    assert _reasons(first) == {name: (reason, False) for name, reason in expected.items()}
    before = _state(env)

    again = env.index(max_pixels=100_000)
    # Still reported, marked as known; nothing decoded, written or published.
    assert _reasons(again) == {name: (reason, True) for name, reason in expected.items()}
    assert again.failed == 4 and env.encoder.model_calls == 0
    assert again.generation == first.generation and _state(env) == before
    assert all(f.message.startswith(str(env.lib.resolve())) for f in again.failures)
    console = Console(record=True, width=200)
    render_summary(console, again)
    assert "4 known from earlier runs" in console.export_text()

    # A repaired file is retried (its stat changed); --retry-failed retries unchanged ones too.
    (env.lib / "truncated.jpg").write_bytes(image_bytes(2))
    fixed = env.index(max_pixels=100_000)
    assert fixed.generation == first.generation + 1 and fixed.embedded == 1
    assert _reasons(fixed) == {n: (r, True) for n, r in expected.items() if n != "truncated.jpg"}
    retried = env.index(max_pixels=10**9, retry_failed=True)  # e.g. after raising the pixel limit
    assert retried.embedded == 1 and env.dump().files["lib/bomb.png"][0] == "indexed"
    assert _reasons(retried) == {
        "empty.jpg": ("empty", False),
        "not-an-image.jpg": ("not_an_image", False),
    }


def test_generated_nul_is_cleaned_before_any_store(env: Env, encoder) -> None:
    nul = NulCaptions(encoder)
    pixels = np.random.default_rng(0).random((2, 3, encoder.spec.size, encoder.spec.size), np.float32)
    ids = encoder.caption_token_ids(pixels, logits_processor=nul.processors, max_new_tokens=8)
    raw = encoder.caption_tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert all("\x00" in r for r in raw)  # the model really emits NUL
    got = encoder.caption(pixels, logits_processor=nul.processors, max_new_tokens=8)
    assert got == [clean_text(r) for r in raw] and all(got) and not any("\x00" in c for c in got)

    for i in range(3):
        write_image(env.lib / f"{i}.jpg", i)
    env.encoder = nul
    s = env.index(caption=True)  # Postgres refuses NUL in text: this run would fail
    assert (s.captioned, s.failed) == (3, 0)
    captions = env.dump().captions
    assert len(captions) == 3
    assert all(c and c == clean_text(c) and " " in c for c in captions.values())


# ------------------------------------------------------------------------------------------ scan problems


def test_dangling_symlinks_are_reported(env: Env, tmp_path: Path) -> None:
    write_image(env.lib / "a.jpg", 1)
    (env.lib / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (env.lib / "loop1").symlink_to(env.lib / "loop2")
    (env.lib / "loop2").symlink_to(env.lib / "loop1")
    (env.lib / ".hidden-dangling").symlink_to(tmp_path / "nowhere")  # hidden: skipped silently
    s = env.index()
    warned = {Path(w.path).name: w.reason for w in s.warnings}
    assert warned == {
        "dangling.jpg": "dangling_symlink",
        "loop1": "dangling_symlink",
        "loop2": "dangling_symlink",
    }
    as_json = json.loads(json.dumps(s.as_dict()))
    assert {Path(w["path"]).name for w in as_json["warnings"]} == set(warned)
    assert "nowhere.jpg" in next(
        w["message"] for w in as_json["warnings"] if w["path"].endswith("dangling.jpg")
    )
    console = Console(record=True, width=200)
    render_summary(console, s)
    text = console.export_text()
    assert "dangling.jpg" in text and "dangling_symlink" in text
    again = env.index()  # reported every run, and nothing to publish
    assert len(again.warnings) == 3 and again.generation == s.generation


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _in_thread_held_to_permissions(fn):
    """Run ``fn`` in a thread that file permissions apply to, and return its result.

    Tests run as root here, and root reads a chmod 000 folder. Capabilities are per thread on Linux:
    the thread drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its effective set (the threads it
    starts inherit that), so the kernel refuses it what it would refuse any user; the test process
    keeps its own.
    """
    out: list = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            if os.geteuid() == 0:
                libc = ctypes.CDLL(None, use_errno=True)
                header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
                if libc.capget(ctypes.byref(header), data) != 0:
                    raise OSError(ctypes.get_errno(), "capget")
                data[0].effective &= ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # DAC_OVERRIDE, DAC_READ_SEARCH
                if libc.capset(ctypes.byref(header), data) != 0:
                    raise OSError(ctypes.get_errno(), "capset")
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def test_unreadable_folder_is_reported_and_its_files_are_kept(env: Env) -> None:
    write_image(env.lib / "a.jpg", 1)
    write_image(env.lib / "locked/b.jpg", 2)
    first = env.index()
    locked = env.lib / "locked"
    locked.chmod(0)
    try:
        try:
            _in_thread_held_to_permissions(lambda: os.listdir(locked))
            pytest.skip("this thread still reads a chmod 000 folder (capabilities cannot be dropped here)")
        except PermissionError:
            pass
        s = _in_thread_held_to_permissions(env.index)
    finally:
        locked.chmod(0o755)
    assert [(w.path, w.reason) for w in s.warnings] == [(str(locked.resolve()), "unreadable_folder")]
    assert "Permission denied" in s.warnings[0].message
    # What the folder holds may still be there: not deleted, so nothing changed and nothing is published.
    assert (s.deleted, s.unchanged, s.generation) == (0, 1, first.generation)
    assert env.dump().files["lib/locked/b.jpg"][0] == "indexed"
    assert env.index().warnings == []  # readable again: nothing to report


# ------------------------------------------------------------------------------------------ nested roots


def test_a_subfolder_of_a_root_is_indexed_as_part_of_it(env: Env) -> None:
    write_image(env.lib / "a/1.jpg", 1)
    write_image(env.lib / "sub/2.jpg", 2)
    write_image(env.lib / "sub/deeper/3.jpg", 3)
    env.index()
    write_image(env.lib / "sub/4.jpg", 4)
    (env.lib / "sub/2.jpg").unlink()
    (env.lib / "a/1.jpg").unlink()  # outside the subfolder: not looked at by its run
    s = env.index(env.lib / "sub")
    assert (s.new, s.deleted, s.unchanged) == (1, 1, 1)
    assert s.notes == [
        f"{env.lib.resolve() / 'sub'}: inside library root {env.lib.resolve()}; indexed as part of it (sub/)"
    ]
    with Session(env.engine) as session:
        assert list(repo.list_roots(session).values()) == [env.lib.resolve()]  # no second root
    files = env.dump().files
    assert {k: v[0] for k, v in files.items()} == {
        "lib/a/1.jpg": "indexed",
        "lib/sub/2.jpg": "deleted",
        "lib/sub/deeper/3.jpg": "indexed",
        "lib/sub/4.jpg": "indexed",
    }
    assert env.index().deleted == 1  # the whole root's run sees a/1.jpg gone


def test_a_parent_of_a_root_keeps_that_root_and_duplicates_nothing(env: Env) -> None:
    photos = env.lib / "photos"
    write_image(env.lib / "top.jpg", 1)
    write_image(photos / "p.jpg", 2)
    write_image(photos / "q.jpg", 3)
    env.index(photos)
    s = env.index(env.lib)
    assert (s.new, s.unchanged, s.embedded) == (1, 2, 1)
    assert s.notes == [
        f"{photos.resolve()}: a library root of its own inside {env.lib.resolve()}; "
        "its files stay under it and are indexed as that root"
    ]
    with Session(env.engine) as session:
        assert sorted(repo.list_roots(session).values()) == [env.lib.resolve(), photos.resolve()]
    assert set(env.dump().files) == {"lib/top.jpg", "photos/p.jpg", "photos/q.jpg"}
    write_image(photos / "r.jpg", 4)  # the nested root is refreshed by its parent's run
    assert env.index(env.lib).new == 1 and "photos/r.jpg" in env.dump().files


def test_plan_roots() -> None:
    a, b = Path("/lib"), Path("/lib/b")
    # Asked for together, neither known: the parent is the root and holds the child.
    assert plan_roots([b, a], {}) == (
        [RootScope(a, None)],
        ["/lib/b: inside library root /lib; indexed as part of it (b/)"],
    )
    # Two subfolders of a known root, one inside the other: one scan of the outer one.
    scopes, notes = plan_roots([a / "x/y", a / "x", a / "z"], {7: a})
    assert scopes == [RootScope(a, 7, ["x", "z"])] and len(notes) == 3
    # A known root nested two deep: skipped by both of the roots above it, indexed as itself.
    scopes, _ = plan_roots([Path("/")], {1: a, 2: b})
    assert scopes == [
        RootScope(Path("/"), None, [""], ["lib"]),
        RootScope(a, 1, [""], ["b"]),
        RootScope(b, 2),
    ]


# ------------------------------------------------------------------------------------------ rebuilds


def test_a_rebuild_while_a_run_is_unpublished_equals_the_published_index(env: Env, monkeypatch) -> None:
    for i in range(4):
        write_image(env.lib / f"{i}.jpg", i)
    write_image(env.lib / "gone.jpg", 10)
    first = env.index()
    key = env.encoder.retrieval_key
    published, generation = MultiVectorIndex.load(index_path(env.index_dir, key))
    assert generation == first.generation and len(published) == 5

    (env.lib / "moved").mkdir()
    (env.lib / "0.jpg").rename(env.lib / "moved/0.jpg")
    (env.lib / "gone.jpg").unlink()
    write_image(env.lib / "new.jpg", 20)
    marker = env.tmp / "paused"
    pause = PauseAt("before-publish", 1, 2.5, marker)
    results: list[RunSummary] = []
    run = threading.Thread(target=lambda: results.append(env.index(progress=pause)))
    run.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert run.is_alive() and time.monotonic() < deadline, "the run never reached before-publish"
            time.sleep(0.02)
        rebuilt = build_from_catalog(env.engine, key, VectorIndexOptions(kind="flat", device="cpu"))
        state = _state(env)
        assert state.open_generation == state.published_generation + 1 == first.generation + 1  # still open
    finally:
        run.join()
    assert rebuilt.generation == first.generation
    ids = published.ids()
    assert rebuilt.ids().tolist() == ids.tolist()
    np.testing.assert_array_equal(rebuilt.get_vectors(ids), published.get_vectors(ids))
    assert results[0].moved == 1 and results[0].deleted == 1 and results[0].new == 1

"""The indexer in-process: real SQLite catalog files, real image files, tiny real checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from catalog.thumbnails import thumbnail_path
from indexer.decode import DecodeConfig, DecodeFailure, decode_file
from indexer.scan import scan_root
from tests.support.indexer import Env, image_bytes, write_image


@pytest.fixture
def env(tmp_path: Path, encoder) -> Env:
    e = Env(tmp_path, encoder)
    yield e
    e.engine.dispose()


def _consistent(d) -> None:
    """The invariants every run (finished or killed) must leave."""
    indexed = {sha for status, sha, _ in d.files.values() if status == "indexed"}
    assert indexed <= set(d.embedded), "an indexed file without its embedding"
    assert d.live == indexed
    if d.open_generation == d.published_generation and d.index_generation is not None:
        assert d.index == d.live


def test_first_index_then_rerun_does_no_model_work(env: Env) -> None:
    for i in range(4):
        write_image(env.lib / f"a/{i}.jpg", i)
    write_image(env.lib / "b/p.png", 10, "PNG")
    write_image(env.lib / "b/w.webp", 11, "WEBP")
    write_image(env.lib / "b/no_extension", 12, "PNG")  # recognised by content
    (env.lib / "b/notes.txt").write_text("not a photo, and not named like one: ignored")

    first = env.index(workers=2)  # the real process pool once; the other tests decode in-process
    assert (first.new, first.changed, first.unchanged, first.failed, first.deleted) == (7, 0, 0, 0, 0)
    assert first.embedded == 7 and env.encoder.calls["embed_images"] == 7
    d = env.dump()
    assert sorted(d.files) == sorted(
        [
            "lib/a/0.jpg",
            "lib/a/1.jpg",
            "lib/a/2.jpg",
            "lib/a/3.jpg",
            "lib/b/p.png",
            "lib/b/w.webp",
            "lib/b/no_extension",
        ]
    )
    assert {s for s, _, _ in d.files.values()} == {"indexed"}
    assert len(d.embedded) == 7 and d.index == d.live == set(d.embedded)
    assert d.published_generation == d.open_generation == d.index_generation == first.generation
    for sha in d.embedded:
        assert thumbnail_path(env.thumbs, sha).stat().st_size > 0
    _consistent(d)

    again = env.index()
    assert env.encoder.model_calls == 0 and again.embedded == 0
    assert (again.new, again.changed, again.unchanged, again.failed) == (0, 0, 7, 0)
    after = env.dump()
    assert after.embedded == d.embedded
    # Nothing changed, so nothing is published: servers have no new generation to catch up to.
    assert again.generation == first.generation
    assert after.published_generation == after.open_generation == first.generation


def test_changed_added_deleted_moved_duplicated(env: Env) -> None:
    for i in range(5):
        write_image(env.lib / f"{i}.jpg", i)
    env.index()
    before = env.dump()

    write_image(env.lib / "0.jpg", 100)  # changed content (size differs too)
    write_image(env.lib / "new.jpg", 101)  # added
    (env.lib / "1.jpg").unlink()  # deleted
    (env.lib / "moved").mkdir()
    (env.lib / "2.jpg").rename(env.lib / "moved/2.jpg")  # moved
    shutil.copy2(env.lib / "3.jpg", env.lib / "copy-of-3.jpg")  # duplicated
    st = os.stat(env.lib / "4.jpg")  # touched: new mtime, same content
    os.utime(env.lib / "4.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    s = env.index()
    assert (s.new, s.changed, s.moved, s.deleted, s.unchanged, s.failed) == (2, 1, 1, 1, 2, 0)
    assert s.embedded == 2 and env.encoder.calls["embed_images"] == 2  # only new content
    d = env.dump()
    sha = {k: v[1] for k, v in before.files.items()}
    assert d.files["lib/1.jpg"][0] == "deleted" and d.files["lib/2.jpg"][0] == "deleted"
    assert d.files["lib/moved/2.jpg"] == ("indexed", sha["lib/2.jpg"], None)
    assert d.files["lib/copy-of-3.jpg"] == ("indexed", sha["lib/3.jpg"], None)
    assert d.files["lib/4.jpg"] == ("indexed", sha["lib/4.jpg"], None)
    assert d.files["lib/0.jpg"][1] != sha["lib/0.jpg"]
    # Moved content kept its embedding bytes; gone content left the index but keeps its embedding.
    assert d.embedded[sha["lib/2.jpg"]] == before.embedded[sha["lib/2.jpg"]]
    assert sha["lib/1.jpg"] not in d.index and sha["lib/0.jpg"] not in d.index
    assert sha["lib/1.jpg"] in d.embedded
    assert len(d.index) == 5
    _consistent(d)

    # The deleted photo comes back: no model work, back in the index.
    write_image(env.lib / "back.jpg", 1)
    s = env.index()
    assert s.embedded == 0 and env.encoder.model_calls == 0 and s.new == 1
    assert sha["lib/1.jpg"] in env.dump().index


def test_bad_files_are_recorded_and_do_not_stop_the_run(env: Env) -> None:
    write_image(env.lib / "good.jpg", 1)
    (env.lib / "empty.jpg").write_bytes(b"")
    (env.lib / "truncated.jpg").write_bytes(image_bytes(2)[:300])
    (env.lib / "not-an-image.jpg").write_text("hello, I am text")
    write_image(env.lib / "bomb.png", 3, "PNG", size=(400, 300))  # over the pixel limit below
    good = image_bytes(4)
    # A JPEG whose EXIF segment is garbage: the pixels are fine, so it is indexed, not failed.
    (env.lib / "bad-exif.jpg").write_bytes(good[:2] + b"\xff\xe1\x00\x10Exif\x00\x00garbage!" + good[2:])

    s = env.index(max_pixels=100_000)
    reasons = {Path(f.path).name: f.reason for f in s.failures}
    assert reasons == {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "not-an-image.jpg": "not_an_image",
        "bomb.png": "decompression_bomb",
    }
    assert s.failed == 4 and s.embedded == 2
    d = env.dump()
    assert d.files["lib/truncated.jpg"][0::2] == ("failed", "truncated")
    assert d.files["lib/bad-exif.jpg"][0] == "indexed"
    _consistent(d)

    # Failed files are retried; a repaired one is indexed.
    (env.lib / "truncated.jpg").write_bytes(image_bytes(2))
    s = env.index(max_pixels=100_000)
    assert s.failed == 3 and s.embedded == 1
    assert env.dump().files["lib/truncated.jpg"][0] == "indexed"


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path: Path, encoder) -> None:
    # A file that vanished (or lost its permissions) between the scan and the decode.
    config = DecodeConfig(spec=encoder.spec)
    out = decode_file(str(tmp_path / "gone.jpg"), config)
    assert isinstance(out, DecodeFailure) and out.reason == "unreadable"
    if os.geteuid() != 0:  # root reads anything
        path = write_image(tmp_path / "locked.jpg", 1)
        path.chmod(0)
        out = decode_file(str(path), config)
        assert isinstance(out, DecodeFailure) and out.reason == "unreadable"


def test_scan_skips_hidden_and_system_folders_and_survives_symlink_loops(tmp_path: Path) -> None:
    from blip2_embed.images import sniff_format

    root = tmp_path / "lib"
    write_image(root / "a/x.jpg", 1)
    write_image(root / ".hidden/h.jpg", 2)
    write_image(root / "@eaDir/thumb.jpg", 3)
    write_image(root / "a/.dotfile.jpg", 4)
    (root / "a/loop").symlink_to(root)  # a cycle
    (root / "b").symlink_to(root / "a")  # a second way into a/
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere")

    found = [f.rel for f in scan_root(root, sniff=sniff_format)]
    assert found == ["a/x.jpg"]
    everything = sorted(f.rel for f in scan_root(root, sniff=sniff_format, include_hidden=True))
    assert everything == [".hidden/h.jpg", "@eaDir/thumb.jpg", "a/.dotfile.jpg", "a/x.jpg"]


def test_dry_run_writes_nothing(env: Env) -> None:
    for i in range(3):
        write_image(env.lib / f"{i}.jpg", i)
    env.index()
    before = env.dump()
    write_image(env.lib / "new.jpg", 50)
    (env.lib / "0.jpg").unlink()
    s = env.index(dry_run=True)
    assert s.dry_run and (s.new, s.deleted, s.unchanged, s.to_embed) == (1, 1, 2, 1)
    assert env.encoder.model_calls == 0 and s.embedded == 0
    assert env.dump() == before


def test_caption_shares_the_vit_pass_and_is_incremental(env: Env) -> None:
    for i in range(4):
        write_image(env.lib / f"{i}.jpg", i)
    env.index(caption=True)
    calls = dict(env.encoder.calls)
    assert calls["vision_features"] == 4  # one ViT pass per image, for both outputs
    assert calls["embed_images"] == 4 and calls["caption"] == 4
    d = env.dump()
    assert set(d.captions) == set(d.embedded) and all(isinstance(t, str) for t in d.captions.values())

    assert env.index(caption=True).embedded == 0 and env.encoder.model_calls == 0

    # Captions added later to an embedded library: caption work only, embeddings untouched.
    write_image(env.lib / "later.jpg", 9)
    env.index()  # no captions for the new one
    s = env.index(caption=True)
    assert s.embedded == 0 and s.captioned == 1 and env.encoder.calls["embed_images"] == 0
    assert len(env.dump().captions) == 5

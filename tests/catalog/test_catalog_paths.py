"""Paths in the catalog: any byte name Linux allows round-trips exactly, on SQLite and Postgres, and the
API serves such a file by id."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from blip2_search.settings import Settings
from catalog import db
from catalog import repository as repo
from catalog.models import FileStatus
from catalog.paths import decode_path, encode_path, safe_text
from search_api.app import create_app
from tests.support.catalog import index_folder, jpeg_bytes

NAMES = [
    b"plain.jpg",
    "caf\u00e9.jpg".encode(),  # UTF-8
    b"caf\xe9.jpg",  # Latin-1
    b"caf\\xe9.jpg",  # a real name spelled like the escape of the Latin-1 one
    b"caf\\\\xe9.jpg",
    b"a\\b.jpg",
    b"trailing\\",
    b"100%.jpg",
    b"\xff\xfe\x80",
    b"\xed\xa0\x80.jpg",  # UTF-8 of a surrogate: not valid UTF-8
    "\U0001f600 emoji".encode(),
    b"dir/sub\xe9/x.jpg",
]


def test_text_form_is_valid_utf8_reversible_and_injective() -> None:
    texts = {}
    for raw in NAMES:
        path = os.fsdecode(raw)
        text = encode_path(path)
        text.encode("utf-8")  # valid UTF-8: both backends take it
        assert "\x00" not in text
        assert decode_path(text) == path and os.fsencode(decode_path(text)) == raw
        texts[raw] = text
    assert len(set(texts.values())) == len(NAMES)  # no two real names share a text
    assert texts[b"caf\xe9.jpg"] == "caf\\xe9.jpg" and texts[b"caf\\xe9.jpg"] == "caf\\\\xe9.jpg"
    assert encode_path(Path("/photos") / os.fsdecode(b"\xe9t\xe9")) == "/photos/\\xe9t\\xe9"
    # Joining at "/" commutes with the form, so a folder's text is a prefix of its files' texts.
    for a, b in itertools.product(NAMES, repeat=2):
        assert encode_path(os.fsdecode(a + b"/" + b)) == texts[a] + "/" + texts[b]
    for bad in ("stray\\", "stray\\q", "short\\x4"):
        with pytest.raises(ValueError):
            decode_path(bad)
    assert safe_text(os.fsdecode(b"caf\xe9") + ": nul\x00") == "caf\\xe9: nul\\x00"


def test_repository_round_trips_byte_names(catalog_engine, tmp_path: Path) -> None:
    root_path = tmp_path / os.fsdecode(b"biblioth\xe8que")
    root_path.mkdir()
    rels = [os.fsdecode(n) for n in NAMES]
    with Session(catalog_engine) as s:
        root = repo.get_or_create_root(s, root_path)
        assert repo.get_or_create_root(s, root_path) == root
        gen = repo.open_generation(s)
        image = repo.get_or_create_image(s, hashlib.sha256(b"x").hexdigest(), 1)
        updates = [repo.FileUpdate(r, 1, 2, image, FileStatus.INDEXED) for r in rels]
        repo.upsert_files(s, root, updates, gen)
        s.commit()
        assert repo.list_roots(s) == {root: root_path.resolve()}
        assert set(repo.files_under_root(s, root)) == set(rels)
        assert sorted(repo.image_paths(s, [image])[image]) == sorted(root_path.resolve() / r for r in rels)
        assert repo.mark_deleted(s, root, [os.fsdecode(b"caf\xe9.jpg")], gen) == 1
        s.commit()
        states = repo.files_under_root(s, root)
        assert states[os.fsdecode(b"caf\xe9.jpg")].status == FileStatus.DELETED
        assert states[os.fsdecode(b"caf\\xe9.jpg")].status == FileStatus.INDEXED
        # Filters take the text form that users are shown.
        assert repo.filter_image_ids(s, path_prefix="dir/sub\\xe9/").tolist() == [image]
        assert repo.filter_image_ids(s, path_prefix="dir/sub\u00e9").tolist() == []


def test_rows_written_before_0002_keep_their_names(catalog_url: str) -> None:
    """Revision 0002 rewrites old rows into the text form (their backslashes doubled), so an old row
    named like an escape never collides with a new name that the escape stands for."""
    from sqlalchemy import text

    db.upgrade(catalog_url, "0001")
    engine = db.make_engine(catalog_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO library_roots (id, path, created_at) VALUES (1, :p, '2026-01-01')"),
                {"p": "/lib\\old"},
            )
            conn.execute(
                text(
                    "INSERT INTO files (root_id, relative_path, size, mtime_ns, status, first_seen_at,"
                    " updated_at) VALUES (1, :r, 1, 1, 'pending', '2026-01-01', '2026-01-01')"
                ),
                [{"r": "a\\b.jpg"}, {"r": "plain.jpg"}, {"r": "c\\xe9.jpg"}],
            )
        db.upgrade(catalog_url)
        db.check(catalog_url)
        latin1 = os.fsdecode(b"c\xe9.jpg")
        with Session(engine) as s:
            assert repo.list_roots(s) == {1: Path("/lib\\old")}
            repo.upsert_file(
                s, 1, latin1, size=2, mtime_ns=2, image_id=None, status=FileStatus.PENDING, generation=1
            )
            s.commit()
            names = repo.files_under_root(s, 1)
        assert set(names) == {"a\\b.jpg", "plain.jpg", "c\\xe9.jpg", latin1}
        assert names["c\\xe9.jpg"].size == 1 and names[latin1].size == 2
    finally:
        engine.dispose()


def test_the_api_serves_a_file_whose_name_is_not_utf8(
    catalog_url: str, tmp_path: Path, tiny_checkpoints, encoder
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    latin1 = photos / os.fsdecode(b"caf\xe9.jpg")
    latin1.write_bytes(jpeg_bytes(1))
    (photos / "caf\\xe9.jpg").write_bytes(jpeg_bytes(2))
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=catalog_url,
        retrieval_model=str(tiny_checkpoints.retrieval),
        caption_model="",
        device="cpu",
    )
    summary = index_folder(settings, encoder, photos)
    assert (summary.new, summary.failed) == (2, 0)
    engine = db.make_engine(catalog_url)
    try:
        with Session(engine) as s:
            image_id = repo.find_image(s, hashlib.sha256(latin1.read_bytes()).hexdigest())
    finally:
        engine.dispose()
    assert image_id is not None

    with TestClient(create_app(settings, encoder=encoder)) as client:
        original = client.get(f"/api/images/{image_id}/original")
        assert original.status_code == 200, original.text
        assert original.content == latin1.read_bytes()
        detail = client.get(f"/api/images/{image_id}")
        assert detail.status_code == 200, detail.text
        assert [f["relative_path"] for f in detail.json()["files"]] == ["caf\\xe9.jpg"]
        hits = client.get("/api/search", params={"q": "a photo", "k": 5, "rerank": 0})
        assert hits.status_code == 200, hits.text
        assert sorted(h["path"] for h in hits.json()["hits"]) == sorted(
            encode_path(p.resolve()) for p in photos.iterdir()
        )


def test_object_store_roots_keep_their_uri() -> None:
    """An ``s3://`` root joins and relativises like a path and its text form is the URI again, also when
    it arrives as a ``Path`` (which folds ``//``), so the catalog stores ``s3://bucket/prefix``."""
    from catalog.paths import ObjectURI, as_uri, is_uri, root_path

    root = as_uri("s3://bucket/photos")
    child = root / "2024/a.jpg"
    assert str(child) == "s3://bucket/photos/2024/a.jpg" and isinstance(child, ObjectURI)
    assert child.relative_to(root).as_posix() == "2024/a.jpg" and child.is_relative_to(root)
    assert encode_path(root) == "s3://bucket/photos" and as_uri(Path("s3://bucket/photos")) == root
    assert is_uri(Path("s3://bucket/photos")) and not is_uri("/photos") and not is_uri("photos/a:b")
    assert root_path("s3://bucket/photos") == root and root_path("/photos") == Path("/photos")
    assert not Path("/photos").is_relative_to(root)

"""The catalog's repository API on a real SQLite file and a real Postgres schema."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog import repository as repo
from catalog.models import FileStatus

MODEL = "test/retrieval@1"
V, D = 4, 8


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def vecs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, V, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def add_indexed_file(
    s: Session, root_id: int, path: str, content: str, gen: int, *, embed: bool = True, seed: int = 0
) -> int:
    """What the indexer does for one new file: image row, embedding (unless already there), file row."""
    image_id = repo.get_or_create_image(s, sha(content), 100)
    if embed and repo.images_missing_embedding(s, [image_id], MODEL):
        repo.store_embeddings(s, [image_id], MODEL, vecs(1, seed), gen)
    repo.upsert_file(
        s, root_id, path, size=100, mtime_ns=1, image_id=image_id, status=FileStatus.INDEXED, generation=gen
    )
    return image_id


@pytest.fixture
def session(catalog_engine: Engine):
    with Session(catalog_engine) as s:
        yield s


def test_roots_and_images_are_get_or_create(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    assert repo.get_or_create_root(session, str(tmp_path)) == root
    assert repo.list_roots(session) == {root: tmp_path.resolve()}
    a = repo.get_or_create_image(session, sha("a"), 10)
    assert repo.get_or_create_image(session, sha("a").upper(), 10) == a
    many = repo.get_or_create_images(session, [(sha("a"), 10), (sha("b"), 20)])
    assert many[sha("a")] == a and many[sha("b")] != a
    assert repo.find_image(session, sha("b")) == many[sha("b")]
    assert repo.find_image(session, sha("nope")) is None


def test_same_content_at_two_paths_is_one_image_found_under_both(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    gen = repo.open_generation(session)
    first = add_indexed_file(session, root, "a/one.jpg", "same bytes", gen)
    second = add_indexed_file(session, root, "b/two.jpg", "same bytes", gen)
    session.commit()
    assert first == second
    assert repo.images_missing_embedding(session, [first], MODEL) == set()
    assert repo.count_index_members(session, MODEL) == 1
    assert repo.image_paths(session, [first]) == {first: [tmp_path / "a/one.jpg", tmp_path / "b/two.jpg"]}
    info = repo.image_details(session, [first])[first]
    assert info.sha256 == sha("same bytes") and len(info.paths) == 2


def test_files_round_trip_for_diffing(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    gen = repo.open_generation(session)
    image = repo.get_or_create_image(session, sha("x"), 5)
    repo.upsert_files(
        session,
        root,
        [
            repo.FileUpdate("x.jpg", 5, 111, image, FileStatus.INDEXED),
            repo.FileUpdate("bad.jpg", 7, 222, None, FileStatus.FAILED, "not_an_image: no decoder"),
            repo.FileUpdate("new.jpg", 9, 333, None, FileStatus.PENDING),
        ],
        gen,
    )
    session.commit()
    state = repo.files_under_root(session, root)
    assert state == {
        "x.jpg": repo.FileState(5, 111, FileStatus.INDEXED, image),
        "bad.jpg": repo.FileState(7, 222, FileStatus.FAILED, None, "not_an_image: no decoder"),
        "new.jpg": repo.FileState(9, 333, FileStatus.PENDING, None),
    }
    # An upsert overwrites the row of the same path (a changed file).
    repo.upsert_file(
        session,
        root,
        "x.jpg",
        size=6,
        mtime_ns=112,
        image_id=image,
        status=FileStatus.INDEXED,
        generation=gen,
    )
    assert repo.files_under_root(session, root)["x.jpg"].mtime_ns == 112
    assert repo.catalog_counts(session)["files_failed"] == 1


def test_liveness_follows_files_and_is_stamped_with_the_generation(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    g1 = repo.open_generation(session)
    image = add_indexed_file(session, root, "a.jpg", "A", g1)
    add_indexed_file(session, root, "copy.jpg", "A", g1)
    repo.publish_generation(session, g1)
    session.commit()

    g2 = repo.open_generation(session)
    assert g2 == g1 + 1
    assert repo.mark_deleted(session, root, ["a.jpg"], g2) == 1
    assert repo.mark_deleted(session, root, ["a.jpg"], g2) == 0  # already deleted
    session.commit()
    # One copy left: still live, and nothing changed for the index.
    assert repo.image_paths(session, [image]) == {image: [tmp_path / "copy.jpg"]}
    assert list(repo.embeddings_changed_since(session, MODEL, g1, g2)) == []

    repo.mark_deleted(session, root, ["copy.jpg"], g2)
    repo.publish_generation(session, g2)
    session.commit()
    assert repo.image_paths(session, [image]) == {}
    assert repo.count_index_members(session, MODEL) == 0
    (batch,) = repo.embeddings_changed_since(session, MODEL, g1, g2)
    assert batch.removed_ids.tolist() == [image] and len(batch.upsert_ids) == 0

    # The same content reappears elsewhere: found again, embedding reused, comes back to the index.
    g3 = repo.open_generation(session)
    again = add_indexed_file(session, root, "moved/a.jpg", "A", g3, embed=False)
    repo.publish_generation(session, g3)
    session.commit()
    assert again == image
    (batch,) = repo.embeddings_changed_since(session, MODEL, g2, g3)
    assert batch.upsert_ids.tolist() == [image] and batch.upsert_vectors.shape == (1, V, D)


def test_changed_content_at_a_path_retires_the_old_image(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    g = repo.open_generation(session)
    old = add_indexed_file(session, root, "p.jpg", "v1", g, seed=1)
    new = add_indexed_file(session, root, "p.jpg", "v2", g, seed=2)
    session.commit()
    assert old != new
    assert repo.image_paths(session, [old, new]) == {new: [tmp_path / "p.jpg"]}
    assert repo.count_index_members(session, MODEL) == 1


def test_embeddings_round_trip_as_float16_and_replace(session: Session, tmp_path: Path) -> None:
    ids = list(repo.get_or_create_images(session, [(sha(str(i)), 1) for i in range(3)]).values())
    v = vecs(3)
    repo.store_embeddings(session, ids, MODEL, v, 1)
    got = repo.load_embeddings(session, [*ids, 999_999], MODEL)
    assert sorted(got) == sorted(ids)
    for i, image_id in enumerate(ids):
        np.testing.assert_array_equal(got[image_id], v[i].astype(np.float16).astype(np.float32))
    assert repo.embedding_shape(session, MODEL) == (V, D)
    assert repo.embedding_shape(session, "other") is None
    assert repo.image_has_embedding(session, ids[0], MODEL)
    assert not repo.image_has_embedding(session, ids[0], "other")
    repo.store_embeddings(session, ids[:1], MODEL, vecs(1, seed=9), 2)  # replaced, not duplicated
    np.testing.assert_allclose(
        repo.load_embeddings(session, ids[:1], MODEL)[ids[0]], vecs(1, seed=9)[0], atol=1e-3
    )
    with pytest.raises(ValueError):
        repo.store_embeddings(session, ids[:1], MODEL, np.full((1, V, D), 1e6, np.float32), 2)
    with pytest.raises(ValueError):
        repo.store_embeddings(session, ids, MODEL, vecs(2), 2)


def test_changes_since_respects_the_generation_window(session: Session, tmp_path: Path) -> None:
    root = repo.get_or_create_root(session, tmp_path)
    g1 = repo.open_generation(session)
    a = add_indexed_file(session, root, "a.jpg", "A", g1, seed=1)
    repo.publish_generation(session, g1)
    session.commit()
    g2 = repo.open_generation(session)
    b = add_indexed_file(session, root, "b.jpg", "B", g2, seed=2)
    session.commit()  # committed but not published

    assert repo.published_generation(session) == g1
    full = list(repo.embeddings_changed_since(session, MODEL, 0))
    assert np.concatenate([c.upsert_ids for c in full]).tolist() == [a]  # as of the published generation
    assert list(repo.embeddings_changed_since(session, MODEL, g1)) == []  # until defaults to published
    repo.publish_generation(session, g2)
    session.commit()
    (batch,) = repo.embeddings_changed_since(session, MODEL, g1)
    assert batch.upsert_ids.tolist() == [b]
    sampled = list(repo.embeddings_changed_since(session, MODEL, 0, sample_every=2, batch_size=1))
    assert [c.upsert_ids.tolist() for c in sampled] == [[a]]


def test_generations_resume_after_a_crash_and_publish_monotonically(session: Session) -> None:
    state = repo.generation_state(session)
    assert (state.open_generation, state.published_generation) == (0, 0)
    g = repo.open_generation(session)
    session.commit()
    assert g == 1
    assert repo.open_generation(session) == g  # not published yet: a restarted writer resumes it
    repo.publish_generation(session, g)
    repo.publish_generation(session, g)  # idempotent
    session.commit()
    assert repo.open_generation(session) == g + 1
    with pytest.raises(ValueError):
        repo.publish_generation(session, g + 5)
    after = repo.generation_state(session)
    assert after.catalog_uid == state.catalog_uid and len(after.catalog_uid) == 32
    assert after.published_generation == g
    assert after.published_at is not None and after.published_at.tzinfo is dt.UTC


def test_captions_cache(session: Session) -> None:
    image = repo.get_or_create_image(session, sha("c"), 1)
    assert repo.get_caption(session, image, MODEL) is None
    repo.store_caption(session, image, MODEL, "a dog")
    repo.store_caption(session, image, MODEL, "brown", prompt="Question: what colour? Answer:")
    repo.store_caption(session, image, MODEL, "a dog on a beach")  # replaces
    session.commit()
    assert repo.get_caption(session, image, MODEL) == "a dog on a beach"
    assert repo.get_captions(session, [image, 12345], MODEL, "Question: what colour? Answer:") == {
        image: "brown"
    }


def test_filters(session: Session, tmp_path: Path) -> None:
    r1 = repo.get_or_create_root(session, tmp_path / "r1")
    r2 = repo.get_or_create_root(session, tmp_path / "r2")
    g = repo.open_generation(session)
    a = add_indexed_file(session, r1, "2023/trip/a.jpg", "A", g)
    b = add_indexed_file(session, r1, "2023_x/b.jpg", "B", g)
    c = add_indexed_file(session, r2, "2023/c.jpg", "C", g)
    d = add_indexed_file(session, r1, "100%/d.jpg", "D", g)
    gone = add_indexed_file(session, r1, "2023/gone.jpg", "E", g)
    repo.mark_deleted(session, r1, ["2023/gone.jpg"], g)
    repo.set_image_metadata(
        session, a, width=4, height=3, captured_at=dt.datetime(2023, 5, 1, 12), camera_make="Canon"
    )
    repo.set_image_metadata(session, c, width=4, height=3, captured_at=dt.datetime(2023, 7, 1))
    session.commit()

    def ids(**kw: object) -> list[int]:
        return repo.filter_image_ids(session, **kw).tolist()  # type: ignore[arg-type]

    assert ids() == sorted([a, b, c, d])  # deleted files don't count
    assert gone not in ids(path_prefix="2023")
    assert ids(root_id=r1) == sorted([a, b, d])
    assert ids(root_id=r1, path_prefix="2023/") == [a]  # the '/' keeps 2023_x out
    assert ids(path_prefix="100%") == [d]  # LIKE wildcards are literal
    assert ids(path_prefix="1_0") == []
    assert ids(path_prefix="2023/TRIP") == []  # case-sensitive on both backends
    assert ids(captured_after=dt.datetime(2023, 6, 1)) == [c]
    assert ids(captured_after=dt.datetime(2023, 1, 1), captured_before=dt.datetime(2023, 5, 1, 12)) == [a]
    info = repo.image_details(session, [a])[a]
    assert (info.width, info.height, info.captured_at, info.camera_make) == (
        4,
        3,
        dt.datetime(2023, 5, 1, 12),
        "Canon",
    )


def test_camera_filter_and_library_facets(session: Session, tmp_path: Path) -> None:
    r1 = repo.get_or_create_root(session, tmp_path / "r1")
    g = repo.open_generation(session)
    a = add_indexed_file(session, r1, "2023/trip/day1/a.jpg", "A", g)
    b = add_indexed_file(session, r1, "2024/b.jpg", "B", g)
    c = add_indexed_file(session, r1, "c.jpg", "C", g)
    gone = add_indexed_file(session, r1, "2022/gone.jpg", "E", g)
    repo.mark_deleted(session, r1, ["2022/gone.jpg"], g)
    meta = {"width": 4, "height": 3}
    repo.set_image_metadata(session, a, **meta, captured_at=dt.datetime(2023, 5, 1), camera_make="Canon",
                            camera_model="EOS R6")  # fmt: skip
    repo.set_image_metadata(session, b, **meta, captured_at=dt.datetime(2024, 1, 2), camera_model="Pixel 8")
    repo.set_image_metadata(session, gone, **meta, camera_make="Nikon", captured_at=dt.datetime(2001, 1, 1))
    session.commit()

    def ids(camera: str) -> list[int]:
        return repo.filter_image_ids(session, camera=camera).tolist()

    assert ids("Canon") == ids("EOS R6") == ids("Canon EOS R6") == [a]
    assert ids("Pixel 8") == [b] and ids("canon") == [] and ids("Nikon") == []  # exact; live files only
    f = repo.library_facets(session)
    assert f.images == 3 and f.roots == [tmp_path / "r1"] and c not in (a, b)
    assert f.folders == ["2023", "2023/trip", "2024"]  # two levels deep, the deleted 2022 left out
    assert f.cameras == [("Canon EOS R6", 1), ("Pixel 8", 1)]
    assert (f.captured_min, f.captured_max) == (dt.datetime(2023, 5, 1), dt.datetime(2024, 1, 2))


def test_timestamps_come_back_as_utc(session: Session, tmp_path: Path) -> None:
    from sqlalchemy import select

    from catalog.models import LibraryRoot

    repo.get_or_create_root(session, tmp_path)
    session.commit()
    created = session.execute(select(LibraryRoot.created_at)).scalar_one()
    assert created.tzinfo is dt.UTC
    assert abs(created - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)


def test_a_second_session_sees_only_committed_batches(catalog_engine: Engine, tmp_path: Path) -> None:
    """Per-batch commits: what was committed survives the writer going away mid-batch."""
    with Session(catalog_engine) as writer:
        root = repo.get_or_create_root(writer, tmp_path)
        g = repo.open_generation(writer)
        add_indexed_file(writer, root, "kept.jpg", "K", g)
        writer.commit()
        add_indexed_file(writer, root, "lost.jpg", "L", g)
        # the writer dies here: no commit
    with Session(catalog_engine) as reader:
        assert set(repo.files_under_root(reader, root)) == {"kept.jpg"}
        assert repo.open_generation(reader) == g  # the crashed run's generation is resumed

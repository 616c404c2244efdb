"""The index file kept in step with the catalog: build, stamp, catch up, rebuild; on SQLite and Postgres."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog import repository as repo
from catalog.index_store import (
    LiveIndex,
    StaleIndexError,
    VectorIndexOptions,
    build_from_catalog,
    catch_up,
    choose_kind,
    index_path,
    open_vector_index,
)
from catalog.models import FileStatus
from catalog.vector_index import MultiVectorIndex

MODEL = "test/retrieval@1"
V, D = 32, 8
FLAT = VectorIndexOptions(kind="flat", device="cpu")


def unit(seed: int, n: int = 1) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, V, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class Library:
    """Drives the catalog the way the indexer does: one generation per run, commit, publish."""

    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        with Session(engine) as s:
            self.root = repo.get_or_create_root(s, root)
            s.commit()

    def run(
        self, *, add: dict[str, int] | None = None, delete: list[str] | None = None, publish: bool = True
    ) -> int:
        """add: path -> content seed (the seed is also the content, so equal seeds are equal bytes)."""
        with Session(self.engine) as s:
            gen = repo.open_generation(s)
            for path, seed in (add or {}).items():
                image = repo.get_or_create_image(s, hashlib.sha256(str(seed).encode()).hexdigest(), 1)
                if repo.images_missing_embedding(s, [image], MODEL):
                    repo.store_embeddings(s, [image], MODEL, unit(seed), gen)
                repo.upsert_file(
                    s,
                    self.root,
                    path,
                    size=1,
                    mtime_ns=1,
                    image_id=image,
                    status=FileStatus.INDEXED,
                    generation=gen,
                )
            repo.mark_deleted(s, self.root, delete or [], gen)
            s.commit()
            if publish:
                repo.publish_generation(s, gen)
                s.commit()
            return gen

    def reembed(self, seed: int, new_seed: int) -> None:
        with Session(self.engine) as s:
            gen = repo.open_generation(s)
            image = repo.find_image(s, hashlib.sha256(str(seed).encode()).hexdigest())
            assert image is not None
            repo.store_embeddings(s, [image], MODEL, unit(new_seed), gen)
            s.commit()
            repo.publish_generation(s, gen)
            s.commit()

    def live_ids(self) -> list[int]:
        with Session(self.engine) as s:
            return repo.filter_image_ids(s).tolist()


def assert_same(a: MultiVectorIndex, b: MultiVectorIndex) -> None:
    assert a.ids().tolist() == b.ids().tolist()
    if len(a):
        np.testing.assert_array_equal(a.get_vectors(a.ids()), b.get_vectors(a.ids()))
        q = unit(999)[0, :3]
        for x, y in zip(a.search(q, 5), b.search(q, 5), strict=True):
            np.testing.assert_array_equal(x, y)


def test_open_builds_saves_and_reuses(catalog_engine: Engine, tmp_path: Path) -> None:
    lib = Library(catalog_engine, tmp_path / "photos")
    gen = lib.run(add={f"{i}.jpg": i for i in range(20)})
    path = index_path(tmp_path / "index", MODEL)
    index = open_vector_index(catalog_engine, MODEL, path, FLAT)
    assert path.exists() and index.generation == gen and len(index) == 20
    assert index.ids().tolist() == lib.live_ids()
    stamp = path.stat().st_mtime_ns
    again = open_vector_index(catalog_engine, MODEL, path, FLAT)
    assert_same(index, again)
    assert path.stat().st_mtime_ns == stamp  # current: not rewritten


def test_stale_index_is_caught_up_and_equals_a_fresh_build(catalog_engine: Engine, tmp_path: Path) -> None:
    lib = Library(catalog_engine, tmp_path / "photos")
    lib.run(add={f"{i}.jpg": i for i in range(30)})
    path = tmp_path / "m.mvidx"
    old = open_vector_index(catalog_engine, MODEL, path, FLAT)

    lib.run(add={f"new{i}.jpg": 100 + i for i in range(10)}, delete=["0.jpg", "1.jpg", "2.jpg"])
    lib.run(add={"copy-of-3.jpg": 3, "back.jpg": 0}, delete=["3.jpg"])  # 3 stays live; 0 returns
    lib.reembed(5, 555)  # a new model version of one image, say
    lib.run(add={"unpublished.jpg": 777}, publish=False)  # not visible yet

    fresh = build_from_catalog(catalog_engine, MODEL, FLAT)
    caught_up = open_vector_index(catalog_engine, MODEL, path, FLAT)
    assert caught_up.generation == fresh.generation > old.generation
    assert_same(caught_up, fresh)
    live = set(lib.live_ids())
    assert set(caught_up.ids().tolist()) == live - {max(live)}  # all live but the unpublished one
    assert_same(MultiVectorIndex.load(path)[0], fresh)  # and the caught-up file was saved


def test_build_and_catch_up_while_a_run_is_open_equal_the_published_generation(
    catalog_engine: Engine, tmp_path: Path
) -> None:
    """Only one generation is open at a time; images it changed are read as they were at the
    published one, so a build (or a catch-up) then is exactly the index of the published generation."""
    lib = Library(catalog_engine, tmp_path / "photos")
    lib.run(add={"a.jpg": 1, "b.jpg": 2, "c.jpg": 3, "d.jpg": 4})
    path = tmp_path / "m.mvidx"
    older = open_vector_index(catalog_engine, MODEL, path, FLAT)
    published = lib.run(add={"e.jpg": 5, "c2.jpg": 3}, delete=["d.jpg", "c.jpg"])
    reference = build_from_catalog(catalog_engine, MODEL, FLAT)  # nothing open: the plain case
    assert reference.generation == published and sorted(reference.ids().tolist()) == sorted(lib.live_ids())

    # The next run, committed but not published, in the indexer's order (deletions first): a.jpg moves
    # (leaves and comes back live), b.jpg and e.jpg go, d.jpg comes back, f.jpg is new.
    lib.run(delete=["a.jpg", "b.jpg", "e.jpg"], publish=False)
    lib.run(add={"moved/a.jpg": 1, "d-again.jpg": 4, "f.jpg": 6}, publish=False)
    with Session(catalog_engine) as s:
        state = repo.generation_state(s)
    assert state.open_generation == published + 1 and state.published_generation == published

    rebuilt = build_from_catalog(catalog_engine, MODEL, FLAT)
    assert rebuilt.generation == published
    assert_same(rebuilt, reference)
    assert catch_up(older, catalog_engine, MODEL) > 0
    assert older.generation == published
    assert_same(older, reference)


def test_unusable_files_are_rebuilt(catalog_engine: Engine, tmp_path: Path) -> None:
    lib = Library(catalog_engine, tmp_path / "photos")
    lib.run(add={f"{i}.jpg": i for i in range(5)})
    path = tmp_path / "m.mvidx"
    path.write_bytes(b"garbage")
    assert len(open_vector_index(catalog_engine, MODEL, path, FLAT)) == 5

    foreign = MultiVectorIndex.build(np.array([12345]), unit(1))
    foreign.info = {"catalog_uid": "0" * 32, "model_key": MODEL}
    foreign.save(path, 1)
    rebuilt = open_vector_index(catalog_engine, MODEL, path, FLAT)
    assert 12345 not in rebuilt.ids().tolist() and len(rebuilt) == 5
    with pytest.raises(StaleIndexError):
        catch_up(foreign, catalog_engine, MODEL)

    ahead = build_from_catalog(catalog_engine, MODEL, FLAT)
    ahead.generation += 10  # e.g. the catalog was restored from an older backup
    with pytest.raises(StaleIndexError):
        catch_up(ahead, catalog_engine, MODEL)


def test_live_index_refreshes_and_switches_kind_by_size(catalog_engine: Engine, tmp_path: Path) -> None:
    lib = Library(catalog_engine, tmp_path / "photos")
    lib.run(add={f"{i}.jpg": i for i in range(60)})
    auto = VectorIndexOptions(kind="auto", ivf_threshold=50, device="cpu", nprobe=64)
    live = LiveIndex(catalog_engine, MODEL, tmp_path / "m.mvidx", auto)
    assert live.index.kind == "ivf" and len(live.index) == 60
    first = live.index

    assert live.refresh() is False  # nothing published since
    lib.run(add={"x.jpg": 1000})
    assert live.refresh() is True and live.index is first and len(first) == 61
    assert live.unsaved_changes == 1
    live.save()
    assert live.unsaved_changes == 0 and MultiVectorIndex.load(live.path)[1] == live.generation

    # Shrinks below half the threshold: rebuilt flat beside the old one, then swapped in.
    lib.run(delete=[f"{i}.jpg" for i in range(40)])
    assert live.refresh() is True
    assert live.index is not first and live.index.kind == "flat" and len(live.index) == 21
    assert len(first) == 61  # a search still holding the old index is unaffected


def test_choose_kind() -> None:
    opts = VectorIndexOptions(kind="auto", ivf_threshold=100, ivf_threshold_cuda=1000)
    assert choose_kind(100, opts, "cpu") == "flat"
    assert choose_kind(101, opts, "cpu") == "ivf"
    assert choose_kind(101, opts, "cuda") == "flat"
    assert choose_kind(60, opts, "cpu", current="ivf") == "ivf"  # hysteresis
    assert choose_kind(50, opts, "cpu", current="ivf") == "flat"
    assert choose_kind(10**9, VectorIndexOptions(kind="flat"), "cpu") == "flat"
    assert choose_kind(0, VectorIndexOptions(kind="ivf"), "cpu") == "ivf"


def test_index_path_is_safe_and_distinct(tmp_path: Path) -> None:
    a = index_path(tmp_path, "Salesforce/blip2-itm-vit-g")
    b = index_path(tmp_path, "Salesforce/blip2-itm-vit-g@other")
    assert a.parent == tmp_path and a.name.startswith("Salesforce_blip2-itm-vit-g-") and a != b
    assert index_path(tmp_path, "../../etc").parent == tmp_path


def test_options_from_settings() -> None:
    from blip2_search.settings import Settings

    settings = Settings(vector_index_kind="ivf", vector_index_nprobe=7)
    opts = VectorIndexOptions(**settings.vector_index_options())
    assert (opts.kind, opts.nprobe) == ("ivf", 7)

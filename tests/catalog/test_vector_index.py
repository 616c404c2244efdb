"""MultiVectorIndex: exactness against numpy brute force, IVF recall, the torch scan, persistence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.vector_index import IndexFileError, MultiVectorIndex, auto_nlist
from catalog.vector_index.flat import FlatBackend
from catalog.vector_index.gpu_scan import TorchScan

ROOT = Path(__file__).resolve().parents[2]


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def as_stored(v: np.ndarray) -> np.ndarray:
    """What the flat index (and the catalog) keep: float16."""
    return v.astype(np.float16).astype(np.float32)


def brute_maxsim(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(M, n) max over each image's vectors of the inner product."""
    return np.einsum("md,njd->mnj", q, as_stored(vectors)).max(axis=2)


def brute_chamfer(q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.einsum("id,njd->nij", q, as_stored(vectors)).max(axis=2).mean(axis=1)


def assert_exact_topk(
    ids: np.ndarray, scores: np.ndarray, truth: np.ndarray, image_ids: np.ndarray, k: int
) -> None:
    """Returned ids are distinct and carry their true scores, which are the true top-k (ties allowed)."""
    n = truth.shape[-1]
    kk = min(k, n)
    assert ids.shape == scores.shape == (k,)
    assert (ids[kk:] == -1).all() and np.isneginf(scores[kk:]).all()
    got = ids[:kk]
    assert len(set(got.tolist())) == kk
    pos = {int(i): p for p, i in enumerate(image_ids)}
    true_of_got = truth[[pos[int(i)] for i in got]]
    np.testing.assert_allclose(scores[:kk], true_of_got, atol=2e-5)
    np.testing.assert_allclose(scores[:kk], np.sort(truth)[::-1][:kk], atol=2e-5)


@st.composite
def collections(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, int]:
    n = draw(st.integers(0, 25))
    v = draw(st.sampled_from([1, 2, 3, 32]))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        # Coarse grid values: many exactly equal scores (duplicates within and across images).
        vectors = rng.integers(-2, 3, (n, v, d)).astype(np.float32) / 2
        queries = rng.integers(-2, 3, (3, d)).astype(np.float32) / 2
    else:
        vectors = unit(rng, n, v, d)
        queries = unit(rng, 3, d)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    removed = ids[rng.random(n) < draw(st.sampled_from([0.0, 0.3]))]
    k = draw(st.integers(1, 40))
    return ids, vectors, queries, k, removed, v


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(collections())
def test_flat_search_is_exact_max_sim(case: tuple) -> None:
    ids, vectors, queries, k, removed, v = case
    index = MultiVectorIndex(vectors.shape[2], vectors_per_image=v)
    index.add(ids, vectors)
    assert index.remove(removed) == len(removed)
    keep = ~np.isin(ids, removed)
    ids, vectors = ids[keep], vectors[keep]
    assert len(index) == len(ids) and index.ids().tolist() == sorted(ids.tolist())
    got_ids, got_scores = index.search(queries, k)
    assert got_ids.shape == got_scores.shape == (len(queries), k)
    truth = brute_maxsim(queries, vectors) if len(ids) else np.zeros((len(queries), 0), np.float32)
    for m in range(len(queries)):
        assert_exact_topk(got_ids[m], got_scores[m], truth[m], ids, k)


def test_search_pads_an_empty_index_and_rejects_bad_shapes() -> None:
    index = MultiVectorIndex(4)
    ids, scores = index.search(np.ones(4, np.float32), 3)
    assert ids.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()
    assert MultiVectorIndex().search(np.ones((2, 4), np.float32), 2)[0].shape == (2, 2)  # no dim yet
    with pytest.raises(ValueError):
        index.search(np.ones((1, 5), np.float32), 3)
    with pytest.raises(ValueError):
        index.add(np.array([1]), np.ones((1, 32, 5), np.float32))
    with pytest.raises(ValueError):
        index.add(np.array([1, 1]), np.ones((2, 32, 4), np.float32))
    with pytest.raises(ValueError):
        index.add(np.array([-1]), np.ones((1, 32, 4), np.float32))


def test_add_replaces_an_existing_image() -> None:
    rng = np.random.default_rng(1)
    index = MultiVectorIndex.build(np.arange(10), unit(rng, 10, 32, 8))
    new = unit(rng, 1, 32, 8)
    index.add(np.array([3]), new)
    assert len(index) == 10
    np.testing.assert_array_equal(index.get_vectors(np.array([3])), as_stored(new))
    with pytest.raises(KeyError):
        index.get_vectors(np.array([77]))


def test_allowed_ids_filter_is_exact() -> None:
    rng = np.random.default_rng(2)
    ids = np.arange(100, 300, dtype=np.int64)
    vectors = unit(rng, 200, 32, 16)
    index = MultiVectorIndex.build(ids, vectors)
    q = unit(rng, 2, 16)
    allowed = ids[rng.random(200) < 0.1]
    got, scores = index.search(q, 50, allowed_ids=allowed)  # k larger than the allowed set
    truth = brute_maxsim(q, vectors[np.isin(ids, allowed)])
    for m in range(2):
        assert_exact_topk(got[m], scores[m], truth[m], allowed, 50)


def test_search_by_image_is_exact_chamfer() -> None:
    rng = np.random.default_rng(3)
    n, v, d = 300, 32, 16
    # Clustered data (like photos): a few near-duplicates of the query, the rest unrelated.
    vectors = unit(rng, n, v, d)
    query = vectors[7]
    for i in (11, 42, 99):
        vectors[i] = query + 0.3 * unit(rng, v, d)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 2
    index = MultiVectorIndex.build(ids, vectors)
    got, scores = index.search_by_image(query, 5, exclude_id=int(ids[7]))
    truth = brute_chamfer(query, vectors)
    truth_wo_self = np.delete(truth, 7)
    assert_exact_topk(got, scores, truth_wo_self, np.delete(ids, 7), 5)
    assert set(got[:3].tolist()) == {22, 84, 198}
    # Random data: no structure, near-ties everywhere.
    rand = unit(rng, 2000, v, d)
    index = MultiVectorIndex.build(np.arange(2000), rand)
    q = unit(rng, v, d)
    truth = brute_chamfer(q, rand)
    got, scores = index.search_by_image(q, 3)
    assert_exact_topk(got, scores, truth, np.arange(2000), 3)
    allowed = np.arange(0, 2000, 3)
    got, scores = index.search_by_image(q, 4, allowed_ids=allowed)
    assert_exact_topk(got, scores, truth[allowed], allowed, 4)
    small = MultiVectorIndex.build(np.arange(10), rand[:10])
    got, scores = small.search_by_image(q, 12)  # k > n pads
    assert_exact_topk(got, scores, truth[:10], np.arange(10), 12)


@pytest.mark.parametrize("codec", ["sq8", "fp16"])
def test_ivf_recall_removal_and_filters(codec: str) -> None:
    rng = np.random.default_rng(4)
    n, v, d = 600, 32, 32
    # Clustered, like real embeddings (on uniformly random vectors IVF needs most lists probed).
    centres = unit(rng, 40, d)
    vectors = centres[rng.integers(0, 40, (n, v))] + 0.35 * unit(rng, n, v, d)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) + 1000
    queries = vectors[rng.choice(n, 20), rng.integers(0, v, 20)] + 0.1 * unit(rng, 20, d)
    ivf = MultiVectorIndex.build(ids, vectors, kind="ivf", ivf_codec=codec, nprobe=8)
    assert ivf.nlist == auto_nlist(n * v) and ivf.is_trained
    exact = brute_maxsim(queries, vectors)
    got, _ = ivf.search(queries, 10)
    truth = ids[np.argsort(-exact, axis=1)[:, :10]]
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.9
    ivf.nprobe = ivf.nlist  # every list probed: only the quantisation error is left
    got, _ = ivf.search(queries, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.95
    removed = ids[:300]
    assert ivf.remove(removed) == 300 and len(ivf) == 300
    got, _ = ivf.search(queries, 10)
    assert not np.isin(got, removed).any()
    allowed = ids[300::7]
    got, _ = ivf.search(queries, 10, allowed_ids=allowed)
    assert np.isin(got[got >= 0], allowed).all()
    np.testing.assert_allclose(ivf.get_vectors(ids[300:302]), vectors[300:302], atol=0.05)
    sim_ids, _ = ivf.search_by_image(vectors[400], 3, exclude_id=int(ids[400]))
    assert int(ids[400]) not in sim_ids.tolist()


def test_untrained_ivf_trains_on_its_first_batch() -> None:
    rng = np.random.default_rng(5)
    ivf = MultiVectorIndex(kind="ivf")
    ivf.add(np.arange(50), unit(rng, 50, 32, 8))
    assert ivf.is_trained and ivf.trained_images == 50 and len(ivf) == 50
    with pytest.raises(RuntimeError):
        ivf.train(unit(rng, 10, 32, 8))


@pytest.mark.parametrize("half", [False, True])
def test_torch_scan_matches_faiss(half: bool) -> None:
    """The GPU code path (matmul + amax + topk + exact re-scoring), run on the CPU, against faiss.

    ``half`` runs the scan in float16 as on a GPU: its rounding must not change the answer.
    """
    import torch

    rng = np.random.default_rng(6)
    n, v, d = 500, 32, 16
    vectors = unit(rng, n, v, d)
    ids = rng.choice(100_000, n, replace=False).astype(np.int64)
    plain = MultiVectorIndex.build(ids[:400], vectors[:400])
    scanned = MultiVectorIndex.build(ids[:400], vectors[:400])
    backend = scanned._backend
    assert isinstance(backend, FlatBackend)
    backend.scan = TorchScan("cpu", d, v, dtype=torch.float16 if half else torch.float32)
    backend.scan.CHUNK_IMAGES = 64  # several chunks
    backend.scan.add(scanned.get_vectors(scanned._ids))
    for index in (plain, scanned):  # mutations keep the device copy in step
        index.add(ids[400:], vectors[400:])
        index.remove(ids[::5])
    q = unit(rng, 3, d)
    allowed = ids[rng.random(n) < 0.5]
    for kwargs in ({}, {"allowed_ids": allowed}):
        want_ids, want_scores = plain.search(q, 12, **kwargs)
        got_ids, got_scores = scanned.search(q, 12, **kwargs)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        np.testing.assert_array_equal(got_ids, want_ids)
    got_ids, got_scores = scanned.search(q, 1000)  # k > n pads
    assert (got_ids[:, len(scanned) :] == -1).all()
    image = vectors[450]
    for kwargs in ({"exclude_id": int(ids[450])}, {"allowed_ids": allowed}):
        want_ids, want_scores = plain.search_by_image(image, 8, **kwargs)
        got_ids, got_scores = scanned.search_by_image(image, 8, **kwargs)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        np.testing.assert_array_equal(got_ids, want_ids)


def test_a_loaded_flat_index_copies_its_rows_to_the_scan(tmp_path: Path) -> None:
    """The CUDA load path (the file's rows copied to the torch scan in steps of whole images), on the CPU."""
    rng = np.random.default_rng(10)
    ids = rng.choice(1000, 50, replace=False).astype(np.int64)
    vectors = unit(rng, 50, 3, 8)
    MultiVectorIndex.build(ids, vectors).save(tmp_path / "s.mvidx", 1)
    loaded, _ = MultiVectorIndex.load(tmp_path / "s.mvidx")
    q = unit(rng, 2, 8)
    want_ids, want_scores = loaded.search(q, 7)
    backend = loaded._backend
    assert isinstance(backend, FlatBackend)
    scan = TorchScan("cpu", 8, 3)
    backend._copy_rows_to(scan, step_rows=10)  # 3 images a step: several steps, the last one short
    np.testing.assert_array_equal(scan.vectors.numpy(), as_stored(vectors))
    backend.scan = scan
    got_ids, got_scores = loaded.search(q, 7)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


# --- persistence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(7)
    ids = rng.choice(50_000, 120, replace=False).astype(np.int64)
    vectors = unit(rng, 120, 32, 16)
    index = MultiVectorIndex.build(ids, vectors, kind=kind, nprobe=4)  # type: ignore[arg-type]
    index.remove(ids[:20])
    index.info = {"catalog_uid": "abc", "model_key": "m"}
    path = tmp_path / "sub" / "m.mvidx"
    index.save(path, generation=42)
    loaded, generation = MultiVectorIndex.load(path)
    assert generation == loaded.generation == 42
    assert (loaded.kind, loaded.dim, loaded.nprobe, loaded.info) == (kind, 16, 4, index.info)
    assert loaded.ids().tolist() == index.ids().tolist()
    q = unit(rng, 4, 16)
    for a, b in zip(index.search(q, 7), loaded.search(q, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.get_vectors(ids[20:25]), index.get_vectors(ids[20:25]))
    loaded.add(ids[:20], vectors[:20])  # still mutable after loading
    assert len(loaded) == 120
    assert list(path.parent.iterdir()) == [path] or all(
        p.name.startswith(".") for p in path.parent.iterdir() if p != path
    )


def test_empty_index_round_trip(tmp_path: Path) -> None:
    MultiVectorIndex().save(tmp_path / "e.mvidx", 3)
    loaded, generation = MultiVectorIndex.load(tmp_path / "e.mvidx")
    assert generation == 3 and len(loaded) == 0 and loaded.dim is None
    loaded.add(np.array([5]), np.ones((1, 32, 4), np.float32))
    assert loaded.search(np.ones(4, np.float32), 1)[0].tolist() == [[5]]


# Files written by the single-module vector_index.py (format 1, faiss 1.15), before it became a package.
# Recipe: unit vectors from ``fixture_vectors(seed, n, 4, 8)``, ids ``arange(n) * step + offset``; flat:
# 12 images (seed 0, ids 7i+3) less the 3rd and 6th, generation 17; IVF (sq8, nprobe 2): 40 images (seed
# 1, ids 3i+1) less the first 4, generation 23; empty: generation 2. Both carry FIXTURE_INFO.
DATA = Path(__file__).parents[1] / "data"
FIXTURE_INFO = {"catalog_uid": "fixture-uid", "model_key": "fixture-model"}


def fixture_vectors(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 4, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_files_of_the_first_format_still_load_and_are_written_identically(tmp_path: Path) -> None:
    flat_ids = np.arange(12, dtype=np.int64) * 7 + 3
    flat_vectors = fixture_vectors(0, 12)
    flat, generation = MultiVectorIndex.load(DATA / "flat-v1.mvidx")
    keep = np.ones(12, bool)
    keep[[2, 5]] = False
    assert (generation, flat.kind, flat.dim, flat.vectors_per_image, flat.info) == (
        17,
        "flat",
        8,
        4,
        FIXTURE_INFO,
    )
    assert flat.ids().tolist() == flat_ids[keep].tolist()
    np.testing.assert_array_equal(flat.get_vectors(flat_ids[keep]), as_stored(flat_vectors[keep]))
    q = fixture_vectors(2, 1)[0]
    truth = brute_maxsim(q, flat_vectors[keep])
    got, scores = flat.search(q, 3)
    for m in range(len(q)):
        assert_exact_topk(got[m], scores[m], truth[m], flat_ids[keep], 3)
    # The writer is unchanged: the same index built and saved today is the same bytes.
    rebuilt = MultiVectorIndex.build(flat_ids, flat_vectors)
    rebuilt.remove(flat_ids[[2, 5]])
    rebuilt.info = FIXTURE_INFO
    rebuilt.save(tmp_path / "flat.mvidx", 17)
    assert (tmp_path / "flat.mvidx").read_bytes() == (DATA / "flat-v1.mvidx").read_bytes()
    MultiVectorIndex().save(tmp_path / "empty.mvidx", 2)
    assert (tmp_path / "empty.mvidx").read_bytes() == (DATA / "empty-v1.mvidx").read_bytes()
    empty, generation = MultiVectorIndex.load(DATA / "empty-v1.mvidx")
    assert generation == 2 and len(empty) == 0 and empty.dim is None

    ivf_ids = np.arange(4, 40, dtype=np.int64) * 3 + 1
    ivf_vectors = fixture_vectors(1, 40)[4:]
    ivf, generation = MultiVectorIndex.load(DATA / "ivf-v1.mvidx")
    assert (generation, ivf.kind, ivf.ivf_codec, ivf.nprobe, ivf.info) == (23, "ivf", "sq8", 2, FIXTURE_INFO)
    assert (ivf.nlist, ivf.trained_images, ivf.is_trained) == (4, 40, True)
    assert ivf.ids().tolist() == ivf_ids.tolist()
    stored = ivf.get_vectors(ivf_ids)
    np.testing.assert_allclose(stored, ivf_vectors, atol=0.05)
    ivf.nprobe = 4  # every list: exact over the stored (SQ8-decoded) vectors
    got, scores = ivf.search(q, 3)
    truth = np.einsum("md,njd->mnj", q, stored).max(axis=2)
    for m in range(len(q)):
        assert_exact_topk(got[m], scores[m], truth[m], ivf_ids, 3)
    ivf.add(ivf_ids[:2] - 1, ivf_vectors[:2])  # still mutable
    assert len(ivf) == 38


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    path = tmp_path / "x.mvidx"
    MultiVectorIndex.build(np.arange(30), unit(rng, 30, 32, 8)).save(path, 1)
    good = path.read_bytes()
    with pytest.raises(FileNotFoundError):
        MultiVectorIndex.load(tmp_path / "missing.mvidx")
    for damaged in (
        good[: len(good) // 2],  # truncated
        good[:-1],
        good + b"x",  # trailing garbage
        good[:100] + bytes([good[100] ^ 1]) + good[101:],  # one flipped bit
        b"not an index at all",
        b"",
    ):
        path.write_bytes(damaged)
        with pytest.raises(IndexFileError):
            MultiVectorIndex.load(path)


_SLOW_SAVER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from catalog import vector_index as vi
    from catalog.vector_index import file_format

    path = sys.argv[1]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 32, 64)).astype(np.float32)
    index = vi.MultiVectorIndex.build(np.arange(400), vectors)
    index.save(path, 1)
    print("saved", flush=True)

    write = file_format.CrcWriter.write
    def slow_write(self, data):
        time.sleep(0.05)  # a slow disk, so the parent can kill us mid-save
        return write(self, data)
    file_format.CrcWriter.write = slow_write
    index.add(np.arange(400, 800), vectors)
    index.save(path, 2)
    print("saved again", flush=True)
    """
)


def test_a_save_killed_midway_leaves_the_previous_index(tmp_path: Path) -> None:
    path = tmp_path / "idx.mvidx"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVER, str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 30
        tmp_files: list[Path] = []
        while time.monotonic() < deadline:
            tmp_files = [p for p in tmp_path.glob(".idx.mvidx.*.tmp") if p.stat().st_size > 1_000_000]
            if tmp_files:
                break
            time.sleep(0.01)
        assert tmp_files, "the second save never got going"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    loaded, generation = MultiVectorIndex.load(path)
    assert generation == 1 and len(loaded) == 400
    # The next save sweeps the dead saver's temp file.
    loaded.save(path, 3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert MultiVectorIndex.load(path)[1] == 3


def test_searches_run_while_another_thread_mutates() -> None:
    """The read/write lock: concurrent searches and adds/removes neither crash nor see torn state."""
    rng = np.random.default_rng(9)
    base = unit(rng, 200, 32, 16)
    index = MultiVectorIndex.build(np.arange(200), base)
    q = unit(rng, 1, 16)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                ids, scores = index.search(q, 10)
                assert len(set(ids[0].tolist())) == 10 and (np.diff(scores[0]) <= 1e-6).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(30):
        new = np.arange(1000 + 10 * i, 1010 + 10 * i)
        index.add(new, unit(rng, 10, 32, 16))
        index.remove(new[:5])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 200 + 30 * 5

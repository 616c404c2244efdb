"""The CUDA paths of MultiVectorIndex (torch scan for flat; IVF on the CPU without faiss-gpu).

Skipped where torch sees no CUDA device (the CPU dev box and CI); run on a GPU machine with
``python -m pytest --noconftest tests/catalog/test_vector_index_gpu.py``. The same torch code runs on the CPU
in tests/catalog/test_vector_index.py::test_torch_scan_matches_faiss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from catalog.vector_index import MultiVectorIndex, index_device  # noqa: E402
from catalog.vector_index.flat import FlatBackend  # noqa: E402
from catalog.vector_index.gpu_scan import TorchScan  # noqa: E402

# GPU scores are float16 matmul outputs: about 5e-4 absolute on unit vectors.
TOL = 2e-3


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def check_topk(ids: np.ndarray, scores: np.ndarray, truth: np.ndarray, image_ids: np.ndarray) -> None:
    """Distinct ids whose true scores match the returned ones and the true top-k, within TOL."""
    k = len(ids)
    assert len(set(ids.tolist())) == k
    pos = {int(i): p for p, i in enumerate(image_ids)}
    np.testing.assert_allclose(truth[[pos[int(i)] for i in ids]], scores, atol=TOL)
    np.testing.assert_allclose(np.sort(truth)[::-1][:k], scores, atol=TOL)


def scan_of(index: MultiVectorIndex) -> TorchScan | None:
    """The flat index's GPU copy."""
    assert isinstance(index._backend, FlatBackend)
    return index._backend.scan


def test_auto_device_is_cuda() -> None:
    assert index_device("auto") == "cuda"
    assert scan_of(MultiVectorIndex(8, device="auto")) is not None


def test_flat_cuda_search_is_exact_within_float16(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, v, d = 3000, 32, 64
    vectors = unit(rng, n, v, d)
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    gpu = MultiVectorIndex.build(ids, vectors, device="cuda")
    gpu.remove(ids[:500])
    gpu.add(ids[:100], vectors[:100])
    live_ids = np.concatenate([ids[500:], ids[:100]])
    live_vecs = np.concatenate([vectors[500:], vectors[:100]]).astype(np.float16).astype(np.float32)
    assert len(live_ids) == len(gpu) == scan_of(gpu).vectors.shape[0]
    q = unit(rng, 4, d)
    got, scores = gpu.search(q, 25)
    truth = np.einsum("md,njd->mnj", q, live_vecs).max(axis=2)
    for m in range(len(q)):
        check_topk(got[m], scores[m], truth[m], live_ids)
    allowed = live_ids[::9]
    got, scores = gpu.search(q, 500, allowed_ids=allowed)
    assert (got[:, len(allowed) :] == -1).all()
    sub = truth[:, ::9]
    for m in range(len(q)):
        check_topk(got[m, : len(allowed)], scores[m, : len(allowed)], sub[m], allowed)
    image = live_vecs[7]
    got, scores = gpu.search_by_image(image, 10, exclude_id=int(live_ids[7]))
    chamfer = np.einsum("id,njd->nij", image, live_vecs).max(axis=2).mean(axis=1)
    chamfer[7] = -np.inf
    check_topk(got, scores, chamfer, live_ids)
    # Loading on the GPU rebuilds the device copy from the file.
    gpu.save(tmp_path / "g.mvidx", 5)
    loaded, generation = MultiVectorIndex.load(tmp_path / "g.mvidx", device="cuda")
    assert (
        generation == 5 and scan_of(loaded) is not None and scan_of(loaded).vectors.shape == (len(gpu), v, d)
    )
    _again, again_scores = loaded.search(q, 25)
    np.testing.assert_allclose(again_scores, gpu.search(q, 25)[1], atol=1e-6)


def test_ivf_on_a_cuda_machine_still_answers() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng, 400, 32, 32)
    ivf = MultiVectorIndex.build(np.arange(400), vectors, kind="ivf", device="cuda")
    ivf.nprobe = ivf.nlist or 1
    got, _ = ivf.search(vectors[3, 0], 5)
    assert got[0, 0] == 3

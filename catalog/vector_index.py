"""The multi-vector image index: every image is ``vectors_per_image`` (32) unit vectors of dimension D.

Scores
    * text -> image: ``score(image) = max_j <query, v_j>`` (max-sim over the image's vectors).
    * image -> image: Chamfer, ``score(c) = mean_i max_j <q_i, c_j>`` over the query image's vectors q_i.

Kinds
    * ``"flat"``: exact. The vectors are kept as float16 (``IndexScalarQuantizer`` QT_fp16, inner
      product), which is the precision the catalog stores them at, so the index is exact for the
      catalog's vectors; scores are computed in float32. It is half the memory of float32 and, on the
      CPUs measured here, faster than ``IndexFlatIP`` for single queries (the scan is memory-bound).
    * ``"ivf"``: approximate, for large collections. IVF with 8-bit scalar-quantised residuals
      (``IndexIVFScalarQuantizer`` QT_8bit; or QT_fp16 with ``ivf_codec="fp16"``), a quarter of the
      float32 memory; recall against the flat index is measured in bench/ and docs/catalog.md.

Exact top-k by max-sim (flat)
    For one query vector, the ranking of images by max-sim is the ranking of each image's best vector.
    Each image owns at most ``V`` rows, so the best ``V * k`` rows hold at least ``k`` distinct images,
    and the first ``k`` distinct images among them, in score order, are the exact top-k. The search
    over-fetches ``V * k`` rows and groups them.

Image -> image (Chamfer)
    A flat index scores every image exactly, chunk by chunk (decode float16, one BLAS matmul against the
    32 query vectors, max over the image's vectors, mean over the query's); on the GPU the same in torch.
    Gathering candidates by a per-vector search first would cost as much on a flat index, since that
    search also reads every vector for each query vector. An IVF index gathers candidates with a
    per-vector search (top ``max(k, 16)`` images per query vector), then scores them exactly from their
    stored vectors: approximate overall, like the IVF search itself.

Threads
    Searches, ``get_vectors`` and ``save`` take a shared lock; ``add`` and ``remove`` an exclusive one, and
    a waiting writer holds back new readers. FAISS releases the GIL while it searches, so searches run
    in parallel and a catch-up applies its batches in between. A full rebuild builds a new index beside
    the old one and swaps the reference (see ``catalog.index_store.LiveIndex``).

GPU
    With ``device="cuda"`` (or ``"auto"`` on a CUDA machine) a flat index keeps a float16 copy of its
    vectors in GPU memory and searches it with one matmul + amax + topk scan per chunk (torch), then
    re-scores the few images near the k-th score in float32, so the result stays exact. An IVF index
    is cloned to the GPU when faiss has GPU support, and otherwise searched on the CPU. The CPU path is
    the default everywhere else.

Ids are the catalog's image ids (non-negative int64). Row ids inside FAISS are ``image_id * V + j`` for
IVF and row positions for flat (which keeps a slot -> image id array, image-major).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf"]
IvfCodec = Literal["sq8", "fp16"]
Device = Literal["auto", "cpu", "cuda"]

_MAGIC = b"B2MVIDX\x01"
_END_MAGIC = b"B2MVEND\x01"
_FORMAT_VERSION = 1
_TRAILER = struct.Struct("<QI8s")  # faiss section length, crc32 of everything before the trailer, magic
_CHUNK_BYTES = 1 << 20


class IndexFileError(RuntimeError):
    """The index file is missing, truncated, corrupt or of another format; rebuild it from the catalog."""


# --- locking -----------------------------------------------------------------------------------------


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers so catch-up isn't starved.

    Not re-entrant: public methods take it once and call unlocked helpers.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --- devices -----------------------------------------------------------------------------------------


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a CUDA device, else "cpu"; "cuda" without one is an error."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if available:
        return "cuda"
    if device == "cuda":
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    return "cpu"


class _TorchScan:
    """A flat index's vectors on a torch device, image-major (n_images, V, D), searched by brute force.

    Per chunk of images: one matmul of the queries against all their vectors, amax over each image's V
    vectors (the max-sim), then one topk over all images; no over-fetch is needed. On a GPU the matmul
    runs in float16, whose rounding (query and product, about 2**-10 of |q| |v|) could swap near-ties;
    so the scan keeps every image within twice that error of the k-th score, and those candidates are
    re-scored in float32. The answer is then exact for the stored vectors, as on the CPU.
    """

    CHUNK_IMAGES = 65_536
    # Bound on |float16 score - float32 score| per unit of |q| * max |v| (4x the rounding analysis).
    REL_ERROR = 2.0**-8

    def __init__(self, device: str, dim: int, vectors_per_image: int, dtype: Any = None) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.vectors = torch.empty((0, vectors_per_image, dim), dtype=self.dtype, device=self.device)
        self.max_norm = 0.0

    def add(self, vectors: np.ndarray) -> None:
        # Through float16 whatever the dtype, so the copy holds exactly what the faiss index stores.
        half = np.ascontiguousarray(vectors, dtype=np.float16)
        new = self.torch.from_numpy(half).to(self.device).to(self.dtype)
        self.vectors = self.torch.cat([self.vectors, new])
        if len(half):
            self.max_norm = max(self.max_norm, float(np.linalg.norm(half.astype(np.float32), axis=-1).max()))

    def keep(self, mask: np.ndarray) -> None:
        self.vectors = self.vectors[self.torch.from_numpy(mask).to(self.device)]

    def _scan(self, q: Any, reduce: Any) -> Any:
        """Per image, ``reduce(sims (c, V, M))`` -> (c, ...) float32, over all chunks."""
        n, v, d = self.vectors.shape
        parts = []
        for start in range(0, n, self.CHUNK_IMAGES):
            block = self.vectors[start : start + self.CHUNK_IMAGES]
            sims = (block.reshape(-1, d) @ q.T).reshape(block.shape[0], v, -1)
            parts.append(reduce(sims))
        return self.torch.cat(parts)

    def _top_exact(self, approx: Any, k: int, margin: Any, exact: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of ``approx`` (M, n) re-scored by ``exact(slots (M, c)) -> (M, c)``.

        Candidates: the top c by ``approx``, with c grown until the c-th is more than ``margin`` (M,)
        below the k-th, so no image outside them can reach the exact top-k.
        """
        torch = self.torch
        n = approx.shape[1]
        c = min(n, k + 16)
        while True:
            top = approx.topk(c, dim=1)
            if c == n or bool((top.values[:, -1] < top.values[:, k - 1] - margin).all()):
                break
            c = min(n, c * 4)
        scores = torch.where(torch.isinf(top.values), top.values, exact(top.indices))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        slots = top.indices.gather(1, order)
        return slots.cpu().numpy().astype(np.int64), scores.gather(1, order).cpu().numpy()

    def _mask(self, scores: Any, allowed: np.ndarray | None) -> Any:
        if allowed is not None:
            scores[..., ~self.torch.from_numpy(allowed).to(self.device)] = -math.inf
        return scores

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (slots (M, k) int64, scores (M, k) float32); k <= number of allowed images."""
        torch = self.torch
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        approx = self._mask(self._scan(q32.to(self.dtype), lambda s: s.amax(1).float()).T, allowed)
        margin = 2 * self.REL_ERROR * self.max_norm * q32.norm(dim=1)

        def exact(slots: Any) -> Any:  # (M, c) -> max-sim in float32
            vecs = self.vectors[slots].float()  # (M, c, V, D)
            return torch.einsum("mcvd,md->mcv", vecs, q32).amax(-1)

        return self._top_exact(approx.contiguous(), k, margin, exact)

    def chamfer_topk(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact Chamfer over every image: -> (slots (k,) int64, scores (k,) float32)."""
        torch = self.torch
        q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)
        approx = self._mask(self._scan(q32.to(self.dtype), lambda s: s.amax(1).float().mean(1)), allowed)
        margin = 2 * self.REL_ERROR * self.max_norm * q32.norm(dim=1).max()

        def exact(slots: Any) -> Any:  # (1, c) -> Chamfer in float32
            vecs = self.vectors[slots[0]].float()  # (c, V, D)
            return torch.einsum("cvd,qd->cvq", vecs, q32).amax(1).mean(1)[None]

        slots, scores = self._top_exact(approx[None], k, margin.reshape(1), exact)
        return slots[0], scores[0]


# --- file format helpers -----------------------------------------------------------------------------


class _CrcWriter:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.crc = 0
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self.raw.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return len(data)


class _CrcReader:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.crc = 0
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise IndexFileError("index file is truncated")
        return data

    def read_into(self, array: np.ndarray) -> None:
        view = memoryview(array).cast("B")
        got = 0
        while got < len(view):
            n = self.raw.readinto(view[got : got + _CHUNK_BYTES])  # type: ignore[attr-defined]
            if not n:
                raise IndexFileError("index file is truncated")
            self.crc = zlib.crc32(view[got : got + n], self.crc)
            got += n
        self.count += got


@contextlib.contextmanager
def _save_lock(path: Path) -> Iterator[None]:
    """Serialise savers of one path (processes too): a dead saver's temp file can then be swept safely."""
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_queries(queries: np.ndarray, dim: int | None) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or (dim is not None and q.shape[1] != dim):
        raise ValueError(f"queries must have shape (M, {dim}), got {np.shape(queries)}")
    return np.ascontiguousarray(q)


def _bitmap_selector(mask: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS selector for the rows where ``mask`` is true; keep the returned array alive while it's used."""
    bits = np.packbits(mask, bitorder="little")
    # The size is in bytes; ids beyond it are not members.
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


def auto_nlist(n_rows: int) -> int:
    """IVF lists for ``n_rows`` vectors: about sqrt(n), a power of two, with at least 39 rows per list.

    (A modest nlist keeps k-means training and assignment affordable on a few CPU cores.)
    """
    if n_rows <= 0:
        return 1
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n_rows))))
    return int(max(1, min(nlist, n_rows // 39)))


# --- the index ---------------------------------------------------------------------------------------


class MultiVectorIndex:
    """An index of images, each with ``vectors_per_image`` vectors of dimension ``dim``.

    ``generation`` is the catalog generation the contents reflect (see ``catalog.index_store``); ``info``
    is free-form text metadata saved with the index (the catalog uid and model key live there).
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        kind: IndexKind = "flat",
        vectors_per_image: int = 32,
        nlist: int | None = None,
        nprobe: int = 32,
        ivf_codec: IvfCodec = "sq8",
        device: str = "cpu",
    ) -> None:
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be flat or ivf, not {kind!r}")
        if ivf_codec not in ("sq8", "fp16"):
            raise ValueError(f"ivf_codec must be sq8 or fp16, not {ivf_codec!r}")
        self.kind: IndexKind = kind
        self.dim = dim
        self.vectors_per_image = vectors_per_image
        self.nlist = nlist
        self.nprobe = nprobe
        self.ivf_codec: IvfCodec = ivf_codec
        self.device = resolve_device(device)
        self.generation = 0
        self.info: dict[str, str] = {}
        self.trained_images = 0  # IVF: how many images the coarse quantiser was trained for
        self._lock = _ReadWriteLock()
        self._index: Any = None
        # Image id of each slot (flat: in row order, image-major; ivf: any order).
        self._ids = np.zeros(0, dtype=np.int64)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their slots), lazily
        self._torch: _TorchScan | None = None
        self._gpu_ivf: Any = None
        self._gpu_resources: Any = None
        self._gpu_lock = threading.Lock()
        if dim is not None:
            self._create(dim)

    # -- construction ----------------------------------------------------------------------------------

    def _create(self, dim: int) -> None:
        self.dim = dim
        if self.kind == "flat":
            self._index = faiss.IndexScalarQuantizer(
                dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            if self.device == "cuda":
                self._torch = _TorchScan("cuda", dim, self.vectors_per_image)
        else:
            self._index = None  # made by train(), which knows nlist

    def _make_ivf(self, nlist: int) -> Any:
        assert self.dim is not None
        qtype = faiss.ScalarQuantizer.QT_8bit if self.ivf_codec == "sq8" else faiss.ScalarQuantizer.QT_fp16
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index now owns (and frees) its quantiser
        index.cp.spherical = True  # unit vectors: keep the centroids on the sphere
        return index

    @classmethod
    def build(
        cls, image_ids: np.ndarray, vectors: np.ndarray, *, kind: IndexKind = "flat", **options: Any
    ) -> MultiVectorIndex:
        """A new index holding these images (an IVF index is trained on them first)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        index = cls(vectors.shape[2], kind=kind, vectors_per_image=vectors.shape[1], **options)
        if kind == "ivf":
            index.train(vectors)
        index.add(image_ids, vectors)
        return index

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def train(self, vectors: np.ndarray, expected_images: int | None = None) -> None:
        """Train an IVF index's coarse quantiser and scalar quantiser on a sample (n, V, D) or (rows, D).

        ``nlist`` (unless given) follows ``expected_images`` (default: the sample's image count).
        No-op for flat. Training an index that holds images is refused: rebuild instead.
        """
        if self.kind != "ivf":
            return
        with self._lock.write():
            self._train_unlocked(np.asarray(vectors, dtype=np.float32), expected_images)

    def _train_unlocked(self, vectors: np.ndarray, expected_images: int | None) -> None:
        if len(self._ids):
            raise RuntimeError("cannot retrain an IVF index that holds images; build a new one")
        rows = vectors.reshape(-1, vectors.shape[-1])
        if self.dim is None:
            self._create(rows.shape[1])
        if rows.shape[1] != self.dim:
            raise ValueError(f"training vectors have dimension {rows.shape[1]}, the index {self.dim}")
        n_images = vectors.shape[0] if vectors.ndim == 3 else max(1, rows.shape[0] // self.vectors_per_image)
        expected = max(expected_images or n_images, n_images)
        nlist = self.nlist or auto_nlist(expected * self.vectors_per_image)
        nlist = max(1, min(nlist, rows.shape[0]))
        # k-means needs no more than a few dozen points per list; more only costs time.
        max_rows = 64 * nlist
        if rows.shape[0] > max_rows:
            pick = np.random.default_rng(0).choice(rows.shape[0], max_rows, replace=False)
            rows = rows[np.sort(pick)]
        index = self._make_ivf(nlist)
        index.train(np.ascontiguousarray(rows))
        # Reconstructing rows by id (for Chamfer scoring) needs a direct map; a hashtable one, since our
        # row ids are not sequential.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._index = index
        self.nlist = nlist
        self.trained_images = expected

    # -- mutation ------------------------------------------------------------------------------------

    def add(self, image_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add images; an id already present is replaced. ``vectors``: float32 (n, V, D), row i for id i."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float32)
        if len(ids) == 0:
            return
        if vecs.ndim != 3 or vecs.shape[0] != len(ids) or vecs.shape[1] != self.vectors_per_image:
            raise ValueError(
                f"expected vectors of shape ({len(ids)}, {self.vectors_per_image}, D), got {vecs.shape}"
            )
        if self.dim is not None and vecs.shape[2] != self.dim:
            raise ValueError(f"vectors have dimension {vecs.shape[2]}, the index {self.dim}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("image ids must be distinct")
        if ids.min() < 0 or ids.max() >= (2**62) // self.vectors_per_image:
            raise ValueError("image ids must be non-negative and below 2**62 / vectors_per_image")
        with self._lock.write():
            if self.dim is None:
                self._create(vecs.shape[2])
            if self.kind == "ivf" and not self.is_trained:
                self._train_unlocked(vecs, None)
            self._remove_unlocked(ids)
            rows = np.ascontiguousarray(vecs.reshape(-1, vecs.shape[2]))
            if self.kind == "flat":
                self._index.add(rows)
                if self._torch is not None:
                    self._torch.add(vecs)
            else:
                self._index.add_with_ids(rows, self._row_ids(ids))
                self._gpu_ivf = None
            self._ids = np.concatenate([self._ids, ids])
            self._sorted = None

    def remove(self, image_ids: np.ndarray) -> int:
        """Remove these images (absent ids are ignored); returns how many were removed."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        with self._lock.write():
            return self._remove_unlocked(ids)

    def _remove_unlocked(self, ids: np.ndarray) -> int:
        if len(self._ids) == 0 or len(ids) == 0:
            return 0
        present = np.isin(self._ids, ids)
        count = int(present.sum())
        if count == 0:
            return 0
        if self.kind == "flat":
            # Compacts the rows in order, so slots stay image-major and in step with self._ids.
            selector, _bits = _bitmap_selector(np.repeat(present, self.vectors_per_image))
            self._index.remove_ids(selector)
            if self._torch is not None:
                self._torch.keep(~present)
        else:
            rows = self._row_ids(self._ids[present])
            self._index.remove_ids(faiss.IDSelectorArray(len(rows), faiss.swig_ptr(rows)))
            self._gpu_ivf = None
        self._ids = self._ids[~present]
        self._sorted = None
        return count

    def _row_ids(self, ids: np.ndarray) -> np.ndarray:
        v = self.vectors_per_image
        return np.ascontiguousarray((ids[:, None] * v + np.arange(v, dtype=np.int64)).reshape(-1))

    # -- queries ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return bool(np.any(self._ids == image_id))

    def ids(self) -> np.ndarray:
        """The image ids held, sorted."""
        with self._lock.read():
            return np.sort(self._ids)

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id in ``self._ids``, -1 where absent."""
        if len(self._ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._sorted is None:
            order = np.argsort(self._ids, kind="stable")
            self._sorted = (self._ids[order], order)
        sorted_ids, order = self._sorted
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -1)

    def get_vectors(self, image_ids: np.ndarray) -> np.ndarray:
        """float32 (n, V, D) of these images as stored (float16 precision, or SQ8-decoded for IVF)."""
        with self._lock.read():
            return self._get_vectors_unlocked(np.asarray(image_ids, dtype=np.int64).reshape(-1))

    def _get_vectors_unlocked(self, ids: np.ndarray) -> np.ndarray:
        v = self.vectors_per_image
        slots = self._slots(ids)
        if (slots < 0).any():
            raise KeyError(f"images not in the index: {ids[slots < 0][:10].tolist()}")
        if len(ids) == 0:
            return np.zeros((0, v, self.dim or 0), dtype=np.float32)
        rows = (slots[:, None] * v + np.arange(v)).reshape(-1) if self.kind == "flat" else self._row_ids(ids)
        return self._index.reconstruct_batch(np.ascontiguousarray(rows)).reshape(len(ids), v, -1)

    def _allowed_mask(self, allowed_ids: np.ndarray | None) -> np.ndarray | None:
        """Per slot: is the image allowed. None means no filter."""
        if allowed_ids is None:
            return None
        return np.isin(self._ids, np.asarray(allowed_ids, dtype=np.int64))

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k distinct images by max-sim for each query vector.

        queries: float32 (M, D) (or (D,)); returns ids int64 (M, k) and scores float32 (M, k), best
        first, padded with -1 / -inf where fewer than k images (that are in ``allowed_ids``, when given)
        exist. Exact for "flat"; "ivf" may also pad when its probed lists hold fewer than k images.
        """
        with self._lock.read():
            return self._search_unlocked(_as_queries(queries, self.dim), k, self._allowed_mask(allowed_ids))

    def _search_unlocked(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        m = q.shape[0]
        out_ids = np.full((m, max(k, 0)), -1, dtype=np.int64)
        out_scores = np.full((m, max(k, 0)), -np.inf, dtype=np.float32)
        n_allowed = len(self._ids) if allowed is None else int(allowed.sum())
        kk = min(k, n_allowed)
        if kk <= 0 or m == 0:
            return out_ids, out_scores
        if self._torch is not None:
            slots, scores = self._torch.search(q, kk, allowed)
            out_ids[:, :kk] = self._ids[slots]
            out_scores[:, :kk] = scores
            return out_ids, out_scores

        v = self.vectors_per_image
        fetch = v * kk
        keep_alive: Any = None
        if self.kind == "flat":
            params = None
            if allowed is not None:
                selector, keep_alive = _bitmap_selector(np.repeat(allowed, v))
                params = faiss.SearchParameters(sel=selector)
            dist, rows = self._index.search(q, fetch, params=params)
            images = np.where(rows >= 0, self._ids[np.maximum(rows, 0) // v], -1)
        else:
            params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist or 1))
            if allowed is not None:
                # Bitmap over row ids (image_id * V + j): 4 bytes per image id up to the largest one.
                ok_ids = self._ids[allowed]
                mask = np.zeros((int(ok_ids.max()) + 1) * v, dtype=bool)
                mask[self._row_ids(ok_ids)] = True
                selector, keep_alive = _bitmap_selector(mask)
                params.sel = selector
            # faiss-gpu caps k at 2048; a bigger over-fetch runs on the CPU copy.
            index = (self._gpu_ivf_index() if fetch <= 2048 else None) or self._index
            dist, rows = index.search(q, fetch, params=params)
            images = np.where(rows >= 0, rows // v, -1)
        del keep_alive  # the selector's bits were needed only during the search
        for i in range(m):
            valid = images[i] >= 0
            row_images, row_scores = images[i][valid], dist[i][valid]
            _, first = np.unique(row_images, return_index=True)
            first = np.sort(first)[:kk]
            out_ids[i, : len(first)] = row_images[first]
            out_scores[i, : len(first)] = row_scores[first]
        return out_ids, out_scores

    def search_by_image(
        self,
        vectors: np.ndarray,
        k: int,
        exclude_id: int | None = None,
        allowed_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k images by Chamfer similarity to an image given as its vectors (Vq, D).

        Returns ids int64 (k,) and scores float32 (k,), padded with -1 / -inf. ``exclude_id`` (usually the
        query image itself) is never returned. Exact for "flat" (see the module docstring).
        """
        q = _as_queries(vectors, self.dim)
        with self._lock.read():
            allowed = self._allowed_mask(allowed_ids)
            if exclude_id is not None:
                excluded = self._ids == exclude_id
                allowed = ~excluded if allowed is None else allowed & ~excluded
            return self._search_by_image_unlocked(q, k, allowed)

    def _search_by_image_unlocked(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        out_ids = np.full(max(k, 0), -1, dtype=np.int64)
        out_scores = np.full(max(k, 0), -np.inf, dtype=np.float32)
        n_allowed = len(self._ids) if allowed is None else int(allowed.sum())
        kk = min(k, n_allowed)
        if kk <= 0:
            return out_ids, out_scores
        if self._torch is not None:
            slots, scores = self._torch.chamfer_topk(q, kk, allowed)
            out_ids[:kk], out_scores[:kk] = self._ids[slots], scores
            return out_ids, out_scores

        if self.kind == "flat":
            # Exact: score every image in one pass. On a flat index this costs no more than the
            # per-vector search that gathering candidates would take (both read every vector once for
            # each of the 32 query vectors), and the matmul runs on BLAS.
            candidates = self._ids
            chamfer = self._chamfer_all(q)
            if allowed is not None:
                chamfer[~allowed] = -np.inf
            top = np.argpartition(-chamfer, kk - 1)[:kk]
            order = top[np.argsort(-chamfer[top], kind="stable")]
        else:
            # IVF: candidates from a per-vector search (sublinear), scored exactly; approximate overall.
            ids, _ = self._search_unlocked(q, min(max(kk, 16), n_allowed), allowed)
            candidates = np.unique(ids[ids >= 0])
            chamfer = self._chamfer(q, candidates)
            order = np.argsort(-chamfer, kind="stable")[:kk]
        out_ids[: len(order)] = candidates[order]
        out_scores[: len(order)] = chamfer[order]
        return out_ids, out_scores

    def _chamfer(self, q: np.ndarray, candidates: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Chamfer score of each candidate image against the query vectors q (Vq, D)."""
        out = np.empty(len(candidates), dtype=np.float32)
        for start in range(0, len(candidates), chunk):
            vecs = self._get_vectors_unlocked(candidates[start : start + chunk])  # (c, V, D)
            sims = vecs.reshape(-1, vecs.shape[-1]) @ q.T
            out[start : start + chunk] = sims.reshape(len(vecs), vecs.shape[1], -1).max(axis=1).mean(axis=1)
        return out

    def _chamfer_all(self, q: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Chamfer score of every slot of a flat index, decoding its rows chunk by chunk."""
        v, n = self.vectors_per_image, len(self._ids)
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            rows = self._index.reconstruct_n(start * v, count * v)  # (count * V, D) float32
            out[start : start + count] = (rows @ q.T).reshape(count, v, -1).max(axis=1).mean(axis=1)
        return out

    def _gpu_ivf_index(self) -> Any:
        """The IVF index cloned to the GPU when faiss has GPU support (rebuilt after a change)."""
        if self.device != "cuda" or not faiss_has_gpu():
            return None
        with self._gpu_lock:
            if self._gpu_ivf is None:
                if self._gpu_resources is None:
                    self._gpu_resources = faiss.StandardGpuResources()
                self._gpu_ivf = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            return self._gpu_ivf

    # -- persistence -----------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Approximate resident size of the index (vectors, ids, IVF centroids and direct map)."""
        if self._index is None:
            return 0
        rows = int(self._index.ntotal)
        if self.kind == "flat":
            return rows * self._index.code_size + self._ids.nbytes
        code = self._index.code_size
        # Per row: code + stored id (8) + direct-map hashtable entry (~40 bytes in libstdc++).
        return rows * (code + 8 + 40) + int(self.nlist or 0) * int(self.dim or 0) * 4 + self._ids.nbytes

    def save(self, path: str | Path, generation: int | None = None) -> None:
        """Write the index to ``path`` atomically, stamped with ``generation`` (default: ``self.generation``).

        Temp file in the same folder, fsync, rename over ``path``, fsync the folder: a crash at any point
        leaves either the previous file or the new one, both complete. Searches may go on meanwhile.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = self.generation if generation is None else int(generation)
        with self._lock.read(), _save_lock(path):
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                # Left by a saver that died; we hold the save lock, so nobody is writing it.
                stale.unlink(missing_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as raw:
                    self._write(raw, stamp)
                    raw.flush()
                    os.fsync(raw.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)

    def _header(self, generation: int) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "vectors_per_image": self.vectors_per_image,
            "n_images": len(self._ids),
            "generation": generation,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "ivf_codec": self.ivf_codec,
            "trained_images": self.trained_images,
            "has_faiss": self._index is not None,
            "info": self.info,
        }

    def _write(self, raw: BinaryIO, generation: int) -> None:
        out = _CrcWriter(raw)
        header = json.dumps(self._header(generation)).encode()
        out.write(_MAGIC)
        out.write(struct.pack("<I", len(header)))
        out.write(header)
        start = out.count
        if self._index is not None:
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(out.write, _CHUNK_BYTES))
        faiss_len = out.count - start
        ids = np.ascontiguousarray(self._ids, dtype="<i8")
        for offset in range(0, ids.nbytes, _CHUNK_BYTES):
            out.write(memoryview(ids).cast("B")[offset : offset + _CHUNK_BYTES])
        raw.write(_TRAILER.pack(faiss_len, out.crc, _END_MAGIC))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> tuple[MultiVectorIndex, int]:
        """Read an index written by :meth:`save`; returns it and the generation it is stamped with.

        Raises ``FileNotFoundError`` if there is no file and :class:`IndexFileError` if it is damaged or of
        another format (a checksum covers the whole file).
        """
        path = Path(path)
        with open(path, "rb") as raw:
            src = _CrcReader(raw)
            try:
                if src.read_exact(len(_MAGIC)) != _MAGIC:
                    raise IndexFileError(f"{path} is not a multi-vector index file")
                (header_len,) = struct.unpack("<I", src.read_exact(4))
                header = json.loads(src.read_exact(header_len))
                if header.get("format") != _FORMAT_VERSION:
                    raise IndexFileError(
                        f"{path} has format {header.get('format')}, expected {_FORMAT_VERSION}"
                    )
                index = cls(
                    None,
                    kind=header["kind"],
                    vectors_per_image=header["vectors_per_image"],
                    nlist=header["nlist"],
                    nprobe=header["nprobe"],
                    ivf_codec=header["ivf_codec"],
                    device=device,
                )
                start = src.count
                if header["has_faiss"]:
                    faiss_index = faiss.read_index(faiss.PyCallbackIOReader(src.read, _CHUNK_BYTES))
                else:
                    faiss_index = None
                faiss_len = src.count - start
                ids = np.empty(header["n_images"], dtype="<i8")
                src.read_into(ids)
                trailer = raw.read(_TRAILER.size)
            except (ValueError, KeyError, struct.error, RuntimeError) as exc:
                if isinstance(exc, IndexFileError):
                    raise
                raise IndexFileError(f"{path} is damaged: {exc}") from exc
            if len(trailer) != _TRAILER.size or raw.read(1):
                raise IndexFileError(f"{path} is truncated or has trailing bytes")
            want_len, want_crc, end = _TRAILER.unpack(trailer)
            if end != _END_MAGIC or want_len != faiss_len or want_crc != src.crc:
                raise IndexFileError(f"{path} failed its checksum")
        index.generation = int(header["generation"])
        index.info = dict(header["info"])
        index.trained_images = int(header["trained_images"])
        index.dim = header["dim"]
        index._ids = ids.astype(np.int64)
        if faiss_index is not None:
            index._index = faiss_index
            if index.kind == "ivf":
                faiss_index.nprobe = index.nprobe
        elif index.dim is not None:
            index._create(index.dim)
        if index.kind == "flat" and index.device == "cuda" and faiss_index is not None:
            index._torch = _TorchScan("cuda", index.dim, index.vectors_per_image)
            n = int(faiss_index.ntotal)
            step = 1 << 20  # rows per transfer, so the host never holds a float32 copy of everything
            for start in range(0, n, step):
                rows = faiss_index.reconstruct_n(start, min(step, n - start))
                index._torch.add(rows.reshape(-1, index.vectors_per_image, index.dim))
        return index, index.generation

"""The IVF index: approximate, for large collections.

IVF with 8-bit scalar-quantised residuals (``IndexIVFScalarQuantizer`` QT_8bit; or QT_fp16 with codec
"fp16"), a quarter of the float32 memory; recall against the flat index is measured in bench/ and
docs/catalog.md. Spherical k-means (unit vectors) on a sample of at most 64 rows per list. Row ids are
``image_id * V + j``; a hashtable direct map (row ids are not sequential) reads an image's rows back.

Image -> image (Chamfer) gathers candidates with a per-vector search (top ``max(k, 16)`` images per
query vector) and scores them exactly from their stored rows: approximate overall, like the search.

With device "cuda" and a faiss build with GPU support, searches run on a GPU clone of the index, made
on the first search after a change; otherwise on the CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

from catalog.vector_index.base import Backend, Floats, Ids, Mask, Slots, bitmap_selector, chamfer_scores
from catalog.vector_index.devices import IndexDevice, faiss_has_gpu

IvfCodec = Literal["sq8", "fp16"]

# faiss-gpu caps k at 2048; a bigger over-fetch runs on the CPU index.
GPU_MAX_K = 2048


def auto_nlist(n_rows: int) -> int:
    """IVF lists for ``n_rows`` vectors: about sqrt(n), a power of two, with at least 39 rows per list.

    (A modest nlist keeps k-means training and assignment affordable on a few CPU cores.)
    """
    if n_rows <= 0:
        return 1
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n_rows))))
    return int(max(1, min(nlist, n_rows // 39)))


@dataclass(slots=True)
class IvfParams:
    """IVF settings and training state. The facade owns it (its public attributes and the file header
    read it); the IVF backend reads it at search time and records its training in it."""

    nlist: int | None = None  # None until trained, unless given
    nprobe: int = 32
    codec: IvfCodec = "sq8"
    trained_images: int = 0  # how many images the coarse quantiser was trained for


def row_ids(ids: Ids, vectors_per_image: int) -> Ids:
    """The faiss row ids of these images' rows: ``image_id * V + j``."""
    v = vectors_per_image
    rows: Ids = np.ascontiguousarray((ids[:, None] * v + np.arange(v, dtype=np.int64)).reshape(-1))
    return rows


class IvfBackend(Backend):
    """Approximate max-sim over an IVF index; untrained (no faiss index) until :meth:`train`."""

    CHAMFER_CHUNK_IMAGES = 1024

    def __init__(
        self,
        dim: int,
        vectors_per_image: int,
        params: IvfParams,
        device: IndexDevice,
        faiss_index: Any = None,
    ) -> None:
        super().__init__(dim, vectors_per_image)
        self.params = params
        self._device = device
        self._index = faiss_index
        if faiss_index is not None:
            faiss_index.nprobe = params.nprobe
        self._gpu_index: Any = None
        self._gpu_resources: Any = None
        self._gpu_lock = threading.Lock()

    @property
    def faiss_index(self) -> Any:
        return self._index

    def train(self, vectors: Floats, expected_images: int | None) -> None:
        """Train the coarse and scalar quantisers; ``nlist`` (unless set) follows ``expected_images``
        (default: the sample's image count)."""
        v = self.vectors_per_image
        rows = vectors.reshape(-1, self.dim)
        n_images = vectors.shape[0] if vectors.ndim == 3 else max(1, rows.shape[0] // v)
        expected = max(expected_images or n_images, n_images)
        nlist = self.params.nlist or auto_nlist(expected * v)
        nlist = max(1, min(nlist, rows.shape[0]))
        # k-means needs no more than a few dozen points per list; more only costs time.
        max_rows = 64 * nlist
        if rows.shape[0] > max_rows:
            pick = np.random.default_rng(0).choice(rows.shape[0], max_rows, replace=False)
            rows = rows[np.sort(pick)]
        qtype = faiss.ScalarQuantizer.QT_8bit if self.params.codec == "sq8" else faiss.ScalarQuantizer.QT_fp16
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index now owns (and frees) its quantiser
        index.cp.spherical = True  # unit vectors: keep the centroids on the sphere
        index.train(np.ascontiguousarray(rows))
        # Reading rows back by id (for Chamfer scoring) needs a direct map; a hashtable one, since our
        # row ids are not sequential.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._index = index
        self.params.nlist = nlist
        self.params.trained_images = expected

    def add(self, ids: Ids, vectors: Floats) -> None:
        rows = np.ascontiguousarray(vectors.reshape(-1, self.dim))
        self._index.add_with_ids(rows, row_ids(ids, self.vectors_per_image))
        self._gpu_index = None

    def remove(self, present: Mask, ids: Ids) -> None:
        rows = row_ids(ids, self.vectors_per_image)
        self._index.remove_ids(faiss.IDSelectorArray(len(rows), faiss.swig_ptr(rows)))
        self._gpu_index = None

    def _rows_of(self, ids: Ids) -> Floats:
        rows: Floats = self._index.reconstruct_batch(row_ids(ids, self.vectors_per_image))
        return rows

    def vectors(self, ids: Ids, slots: Ids) -> Floats:
        return self._rows_of(ids).reshape(len(ids), self.vectors_per_image, -1)

    def memory_bytes(self) -> int:
        if self._index is None:
            return 0
        code = int(self._index.code_size)
        # Per row: code + stored id (8) + direct-map hashtable entry (~40 bytes in libstdc++).
        return int(self._index.ntotal) * (code + 8 + 40) + int(self.params.nlist or 0) * self.dim * 4

    def _search_rows(self, q: Floats, fetch: int, slots: Slots) -> tuple[Floats, Ids]:
        v = self.vectors_per_image
        params = faiss.SearchParametersIVF(nprobe=min(self.params.nprobe, self.params.nlist or 1))
        if slots.allowed is not None:
            # Bitmap over row ids (image_id * V + j): 4 bytes per image id up to the largest one.
            ok_ids = slots.ids[slots.allowed]
            mask = np.zeros((int(ok_ids.max()) + 1) * v, dtype=bool)
            mask[row_ids(ok_ids, v)] = True
            # _bits backs the selector; it stays alive until the search below has returned.
            selector, _bits = bitmap_selector(mask)
            params.sel = selector
        index = self._gpu_clone() if fetch <= GPU_MAX_K else None
        scores, rows = (index or self._index).search(q, fetch, params=params)
        images: Ids = np.where(rows >= 0, rows // v, -1)
        return scores, images

    def _gpu_clone(self) -> Any:
        """The index cloned to the GPU when faiss has GPU support (made again after a change), else None."""
        if self._device != "cuda" or not faiss_has_gpu():
            return None
        with self._gpu_lock:
            if self._gpu_index is None:
                if self._gpu_resources is None:
                    self._gpu_resources = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            return self._gpu_index

    def chamfer_topk(self, q: Floats, k: int, slots: Slots) -> tuple[Ids, Floats]:
        ids, _ = self.top_images(q, min(max(k, 16), slots.count), slots)
        candidates = np.unique(ids[ids >= 0])
        chamfer = np.empty(len(candidates), dtype=np.float32)
        chunk = self.CHAMFER_CHUNK_IMAGES
        for start in range(0, len(candidates), chunk):
            rows = self._rows_of(candidates[start : start + chunk])
            chamfer[start : start + chunk] = chamfer_scores(rows, q, self.vectors_per_image)
        order = np.argsort(-chamfer, kind="stable")[:k]
        return candidates[order], chamfer[order]

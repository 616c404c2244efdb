"""The flat index: exact, every row scanned.

Rows are kept as float16 (``IndexScalarQuantizer`` QT_fp16, inner product), the precision the catalog
stores them at, so the index is exact for the catalog's vectors; scores are computed in float32. It is
half the memory of float32 and, on the CPUs measured here, faster than ``IndexFlatIP`` for single
queries (the scan is memory-bound). Rows are in slot order, image-major: row ``slot * V + j``.

Image -> image (Chamfer) scores every image exactly, chunk by chunk (decode float16, one BLAS matmul
against the query's vectors, max over the image's vectors, mean over the query's). Gathering
candidates by a per-vector search first would cost as much, since that search also reads every row
for each query vector.

On CUDA a float16 copy of the rows lives on the GPU and both searches run there
(:class:`catalog.vector_index.gpu_scan.TorchScan`, exact too); faiss-gpu is not used for flat, since
``IndexScalarQuantizer`` does not clone to the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from catalog.vector_index.base import Backend, Floats, Ids, Mask, Slots, bitmap_selector, chamfer_scores
from catalog.vector_index.devices import IndexDevice

if TYPE_CHECKING:
    from catalog.vector_index.gpu_scan import TorchScan


class FlatBackend(Backend):
    """Exact max-sim and Chamfer over float16 rows; ``scan`` is the GPU copy on CUDA, else None."""

    CHAMFER_CHUNK_IMAGES = 2048

    def __init__(
        self, dim: int, vectors_per_image: int, device: IndexDevice, faiss_index: Any = None
    ) -> None:
        super().__init__(dim, vectors_per_image)
        if faiss_index is None:
            faiss_index = faiss.IndexScalarQuantizer(
                dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
        self._index = faiss_index
        self.scan: TorchScan | None = None
        if device == "cuda":
            from catalog.vector_index.gpu_scan import TorchScan

            self.scan = TorchScan("cuda", dim, vectors_per_image)
            self._copy_rows_to(self.scan)

    def _copy_rows_to(self, scan: TorchScan, step_rows: int = 1 << 20) -> None:
        """Copy the rows already held (a loaded file's) in steps, so the host never holds a float32 copy
        of everything."""
        v = self.vectors_per_image
        n = int(self._index.ntotal)
        step = max(1, step_rows // v) * v  # whole images per transfer
        for start in range(0, n, step):
            rows = self._index.reconstruct_n(start, min(step, n - start))
            scan.add(rows.reshape(-1, v, self.dim))

    @property
    def faiss_index(self) -> Any:
        return self._index

    def add(self, ids: Ids, vectors: Floats) -> None:
        self._index.add(np.ascontiguousarray(vectors.reshape(-1, self.dim)))
        if self.scan is not None:
            self.scan.add(vectors)

    def remove(self, present: Mask, ids: Ids) -> None:
        # Compacts the rows in order, so they stay image-major and in step with the facade's slots.
        selector, _bits = bitmap_selector(np.repeat(present, self.vectors_per_image))
        self._index.remove_ids(selector)
        if self.scan is not None:
            self.scan.keep(~present)

    def vectors(self, ids: Ids, slots: Ids) -> Floats:
        v = self.vectors_per_image
        rows = (slots[:, None] * v + np.arange(v)).reshape(-1)
        vecs: Floats = self._index.reconstruct_batch(np.ascontiguousarray(rows)).reshape(len(slots), v, -1)
        return vecs

    def memory_bytes(self) -> int:
        return int(self._index.ntotal) * int(self._index.code_size)

    def top_images(self, q: Floats, k: int, slots: Slots) -> tuple[Ids, Floats]:
        if self.scan is None:
            return super().top_images(q, k, slots)
        found, scores = self.scan.search(q, k, slots.allowed)
        return slots.ids[found], scores

    def _search_rows(self, q: Floats, fetch: int, slots: Slots) -> tuple[Floats, Ids]:
        v = self.vectors_per_image
        params = None
        if slots.allowed is not None:
            # _bits backs the selector; it stays alive until the search below has returned.
            selector, _bits = bitmap_selector(np.repeat(slots.allowed, v))
            params = faiss.SearchParameters(sel=selector)
        scores, rows = self._index.search(q, fetch, params=params)
        images: Ids = np.where(rows >= 0, slots.ids[np.maximum(rows, 0) // v], -1)
        return scores, images

    def chamfer_topk(self, q: Floats, k: int, slots: Slots) -> tuple[Ids, Floats]:
        if self.scan is not None:
            found, scores = self.scan.chamfer_topk(q, k, slots.allowed)
            return slots.ids[found], scores
        chamfer = self._chamfer_all(q, len(slots.ids))
        if slots.allowed is not None:
            chamfer[~slots.allowed] = -np.inf
        top = np.argpartition(-chamfer, k - 1)[:k]
        order = top[np.argsort(-chamfer[top], kind="stable")]
        return slots.ids[order], chamfer[order]

    def _chamfer_all(self, q: Floats, n: int) -> Floats:
        """Chamfer score of every one of the ``n`` slots, decoding the rows chunk by chunk."""
        v, chunk = self.vectors_per_image, self.CHAMFER_CHUNK_IMAGES
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            rows = self._index.reconstruct_n(start * v, count * v)  # (count * V, D) float32
            out[start : start + count] = chamfer_scores(rows, q, v)
        return out

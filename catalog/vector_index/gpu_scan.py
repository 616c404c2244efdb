"""A flat index's vectors on a torch device, searched by brute force (the GPU path of the flat index).

Per chunk of images: one matmul of the queries against all their vectors, amax over each image's V
vectors (the max-sim), then one topk over all images; no over-fetch is needed. On a GPU the matmul
runs in float16, whose rounding (query and product, about 2**-10 of |q| |v|) could swap near-ties; so
the scan keeps every image within twice that error of the k-th score, and those candidates are
re-scored in float32. The answer is then exact for the stored vectors, as on the CPU.

Imported only where it is used (a flat index on CUDA, the tests), so the index needs torch only there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from catalog.vector_index.base import Floats, Ids, Mask


class TorchScan:
    """The vectors image-major, (n_images, V, D), in ``dtype`` (float16 on CUDA, float32 elsewhere)."""

    CHUNK_IMAGES = 65_536
    # Bound on |float16 score - float32 score| per unit of |q| * max |v| (4x the rounding analysis).
    REL_ERROR = 2.0**-8

    def __init__(
        self, device: str, dim: int, vectors_per_image: int, dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.vectors = torch.empty((0, vectors_per_image, dim), dtype=self.dtype, device=self.device)
        self.max_norm = 0.0

    def add(self, vectors: Floats) -> None:
        # Through float16 whatever the dtype, so the copy holds exactly what the faiss index stores.
        half = np.ascontiguousarray(vectors, dtype=np.float16)
        new = torch.from_numpy(half).to(self.device).to(self.dtype)
        self.vectors = torch.cat([self.vectors, new])
        if len(half):
            self.max_norm = max(self.max_norm, float(np.linalg.norm(half.astype(np.float32), axis=-1).max()))

    def keep(self, mask: Mask) -> None:
        self.vectors = self.vectors[torch.from_numpy(mask).to(self.device)]

    def _scan(self, q: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Per image, ``reduce(sims (c, V, M))`` -> (c, ...) float32, over all chunks."""
        n, v, d = self.vectors.shape
        parts = []
        for start in range(0, n, self.CHUNK_IMAGES):
            block = self.vectors[start : start + self.CHUNK_IMAGES]
            sims = (block.reshape(-1, d) @ q.T).reshape(block.shape[0], v, -1)
            parts.append(reduce(sims))
        return torch.cat(parts)

    @staticmethod
    def _top_exact(
        approx: torch.Tensor,
        k: int,
        margin: torch.Tensor,
        exact: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[Ids, Floats]:
        """Top-k of ``approx`` (M, n) re-scored by ``exact(slots (M, c)) -> (M, c)``.

        Candidates: the top c by ``approx``, with c grown until the c-th is more than ``margin`` (M,)
        below the k-th, so no image outside them can reach the exact top-k.
        """
        n = approx.shape[1]
        c = min(n, k + 16)
        while True:
            top = approx.topk(c, dim=1)
            if c == n or bool((top.values[:, -1] < top.values[:, k - 1] - margin).all()):
                break
            c = min(n, c * 4)
        scores = torch.where(torch.isinf(top.values), top.values, exact(top.indices))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        slots: Ids = top.indices.gather(1, order).cpu().numpy().astype(np.int64)
        best: Floats = scores.gather(1, order).cpu().numpy()
        return slots, best

    def _mask(self, scores: torch.Tensor, allowed: Mask | None) -> torch.Tensor:
        if allowed is not None:
            scores[..., ~torch.from_numpy(allowed).to(self.device)] = -math.inf
        return scores

    def search(self, queries: Floats, k: int, allowed: Mask | None) -> tuple[Ids, Floats]:
        """-> (slots (M, k) int64, scores (M, k) float32); k <= number of allowed images."""
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        approx = self._mask(self._scan(q32.to(self.dtype), lambda s: s.amax(1).float()).T, allowed)
        margin = 2 * self.REL_ERROR * self.max_norm * q32.norm(dim=1)

        def exact(slots: torch.Tensor) -> torch.Tensor:  # (M, c) -> max-sim in float32
            vecs = self.vectors[slots].float()  # (M, c, V, D)
            return torch.einsum("mcvd,md->mcv", vecs, q32).amax(-1)

        return self._top_exact(approx.contiguous(), k, margin, exact)

    def chamfer_topk(self, q: Floats, k: int, allowed: Mask | None) -> tuple[Ids, Floats]:
        """Exact Chamfer over every image: -> (slots (k,) int64, scores (k,) float32)."""
        q32 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)
        approx = self._mask(self._scan(q32.to(self.dtype), lambda s: s.amax(1).float().mean(1)), allowed)
        margin = 2 * self.REL_ERROR * self.max_norm * q32.norm(dim=1).max()

        def exact(slots: torch.Tensor) -> torch.Tensor:  # (1, c) -> Chamfer in float32
            vecs = self.vectors[slots[0]].float()  # (c, V, D)
            return torch.einsum("cvd,qd->cvq", vecs, q32).amax(1).mean(1)[None]

        slots, scores = self._top_exact(approx[None], k, margin.reshape(1), exact)
        return slots[0], scores[0]

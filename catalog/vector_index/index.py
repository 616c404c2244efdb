"""``MultiVectorIndex``: the index users call. Every image is ``vectors_per_image`` (V, usually 32)
unit vectors of dimension D, kept by a backend (``flat``: exact, ``ivf``: approximate; see their modules).

Scores
    * text -> image: ``score(image) = max_j <query, v_j>`` (max-sim over the image's vectors).
    * image -> image: Chamfer, ``score(c) = mean_i max_j <q_i, c_j>`` over the query image's vectors q_i.

Exact top-k by max-sim
    For one query vector, the ranking of images by max-sim is the ranking of each image's best vector.
    Each image owns at most V rows, so the best ``V * k`` rows hold at least k distinct images, and
    the first k distinct images among them, in score order, are the exact top-k. A faiss search
    over-fetches ``V * k`` rows and groups them (``base.first_distinct``); on a flat index that is exact.

Slots
    This class keeps the image id of each slot (``_ids``): for flat, slot i owns rows ``i * V + j``
    (image-major, compacted in order on removal); IVF ignores slots (its row ids are ``image_id * V + j``).
    Ids are the catalog's image ids (non-negative int64).

Threads
    Searches, ``get_vectors``, ``ids`` and ``save`` take a shared lock; ``add``, ``remove`` and
    ``train`` an exclusive one, and a waiting writer holds back new readers. FAISS releases the GIL
    while it searches, so searches run in parallel and a catch-up applies its batches in between. A full
    rebuild builds a new index beside the old one and swaps the reference
    (``catalog.index_store.LiveIndex``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from catalog.vector_index.base import Backend, Floats, Ids, Mask, Slots
from catalog.vector_index.devices import index_device
from catalog.vector_index.file_format import Header, IndexFileError, read_index_file, write_index_file
from catalog.vector_index.flat import FlatBackend
from catalog.vector_index.ivf import IvfBackend, IvfCodec, IvfParams
from catalog.vector_index.locking import ReadWriteLock

IndexKind = Literal["flat", "ivf"]


def _as_queries(queries: np.ndarray[Any, Any], dim: int | None) -> Floats:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or (dim is not None and q.shape[1] != dim):
        raise ValueError(f"queries must have shape (M, {dim}), got {np.shape(queries)}")
    return np.ascontiguousarray(q)


def _padded(shape: tuple[int, ...]) -> tuple[Ids, Floats]:
    """Result arrays of ``shape`` holding only padding: ids -1, scores -inf."""
    return np.full(shape, -1, dtype=np.int64), np.full(shape, -np.inf, dtype=np.float32)


class MultiVectorIndex:
    """An index of images, each with ``vectors_per_image`` vectors of dimension ``dim``.

    ``generation`` is the catalog generation the contents reflect (see ``catalog.index_store``); ``info``
    is free-form text metadata saved with the index (the catalog uid and model key live there).
    ``device`` "cuda" (or "auto" on a CUDA machine) searches a flat index on the GPU and an IVF index on
    a GPU clone where faiss has GPU support.
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
        self.device = index_device(device)
        self.generation = 0
        self.info: dict[str, str] = {}
        self._ivf = IvfParams(nlist=nlist, nprobe=nprobe, codec=ivf_codec)
        self._lock = ReadWriteLock()
        self._backend: Backend | None = None  # made once the dimension is known
        self._ids: Ids = np.zeros(0, dtype=np.int64)  # image id of each slot
        self._sorted: tuple[Ids, Ids] | None = None  # (sorted ids, their slots), lazily
        if dim is not None:
            self._create(dim)

    # -- IVF parameters (kept for a flat index too: the file header records them) --------------------

    @property
    def nlist(self) -> int | None:
        return self._ivf.nlist

    @property
    def nprobe(self) -> int:
        return self._ivf.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._ivf.nprobe = value

    @property
    def ivf_codec(self) -> IvfCodec:
        return self._ivf.codec

    @property
    def trained_images(self) -> int:
        """IVF: how many images the coarse quantiser was trained for."""
        return self._ivf.trained_images

    # -- construction ----------------------------------------------------------------------------------

    def _create(self, dim: int, faiss_index: Any = None) -> Backend:
        self.dim = dim
        if self.kind == "flat":
            self._backend = FlatBackend(dim, self.vectors_per_image, self.device, faiss_index)
        else:
            self._backend = IvfBackend(dim, self.vectors_per_image, self._ivf, self.device, faiss_index)
        return self._backend

    def _backend_for(self, dim: int) -> Backend:
        """The backend, made for ``dim`` if there is none yet."""
        return self._backend if self._backend is not None else self._create(dim)

    def _held(self) -> Backend:
        """The backend of an index known to hold images (adding them made it)."""
        if self._backend is None:
            raise RuntimeError("the index holds no vectors yet")
        return self._backend

    @classmethod
    def build(
        cls,
        image_ids: np.ndarray[Any, Any],
        vectors: np.ndarray[Any, Any],
        *,
        kind: IndexKind = "flat",
        **options: Any,
    ) -> MultiVectorIndex:
        """A new index holding these images (an IVF index is trained on them first)."""
        vecs = np.asarray(vectors, dtype=np.float32)
        index = cls(vecs.shape[2], kind=kind, vectors_per_image=vecs.shape[1], **options)
        if kind == "ivf":
            index.train(vecs)
        index.add(image_ids, vecs)
        return index

    @property
    def is_trained(self) -> bool:
        return self._backend is not None and self._backend.is_trained

    def train(self, vectors: np.ndarray[Any, Any], expected_images: int | None = None) -> None:
        """Train an IVF index's coarse quantiser and scalar quantiser on a sample (n, V, D) or (rows, D).

        ``nlist`` (unless given) follows ``expected_images`` (default: the sample's image count).
        No-op for flat. Training an index that holds images is refused: rebuild instead.
        """
        if self.kind != "ivf":
            return
        with self._lock.write():
            self._train_unlocked(np.asarray(vectors, dtype=np.float32), expected_images)

    def _train_unlocked(self, vectors: Floats, expected_images: int | None) -> None:
        if len(self._ids):
            raise RuntimeError("cannot retrain an IVF index that holds images; build a new one")
        dim = vectors.shape[-1]
        backend = self._backend_for(dim)
        if dim != self.dim:
            raise ValueError(f"training vectors have dimension {dim}, the index {self.dim}")
        backend.train(vectors, expected_images)

    # -- mutation ------------------------------------------------------------------------------------

    def add(self, image_ids: np.ndarray[Any, Any], vectors: np.ndarray[Any, Any]) -> None:
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
            backend = self._backend_for(vecs.shape[2])
            if not backend.is_trained:
                self._train_unlocked(vecs, None)
            self._remove_unlocked(ids)
            backend.add(ids, vecs)
            self._ids = np.concatenate([self._ids, ids])
            self._sorted = None

    def remove(self, image_ids: np.ndarray[Any, Any]) -> int:
        """Remove these images (absent ids are ignored); returns how many were removed."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return 0
        with self._lock.write():
            return self._remove_unlocked(ids)

    def _remove_unlocked(self, ids: Ids) -> int:
        if len(self._ids) == 0 or len(ids) == 0:
            return 0
        present = np.isin(self._ids, ids)
        count = int(present.sum())
        if count == 0:
            return 0
        self._held().remove(present, self._ids[present])
        self._ids = self._ids[~present]
        self._sorted = None
        return count

    # -- queries ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return bool(np.any(self._ids == image_id))

    def ids(self) -> Ids:
        """The image ids held, sorted."""
        with self._lock.read():
            return np.sort(self._ids)

    def _slots(self, ids: Ids) -> Ids:
        """Slot of each id in ``self._ids``, -1 where absent."""
        if len(self._ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._sorted is None:
            order = np.argsort(self._ids, kind="stable")
            self._sorted = (self._ids[order], order)
        sorted_ids, order = self._sorted
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        slots: Ids = np.where(sorted_ids[pos] == ids, order[pos], -1)
        return slots

    def get_vectors(self, image_ids: np.ndarray[Any, Any]) -> Floats:
        """float32 (n, V, D) of these images as stored (float16 precision, or SQ8-decoded for IVF)."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        with self._lock.read():
            slots = self._slots(ids)
            if (slots < 0).any():
                raise KeyError(f"images not in the index: {ids[slots < 0][:10].tolist()}")
            if len(ids) == 0:
                return np.zeros((0, self.vectors_per_image, self.dim or 0), dtype=np.float32)
            return self._held().vectors(ids, slots)

    def _slots_for(self, allowed_ids: np.ndarray[Any, Any] | None, exclude_id: int | None = None) -> Slots:
        """The slots a search may return: those of ``allowed_ids`` (None: all) less ``exclude_id``."""
        allowed: Mask | None = None
        if allowed_ids is not None:
            allowed = np.isin(self._ids, np.asarray(allowed_ids, dtype=np.int64))
        if exclude_id is not None:
            kept = self._ids != exclude_id
            allowed = kept if allowed is None else allowed & kept
        return Slots(self._ids, allowed)

    def search(
        self, queries: np.ndarray[Any, Any], k: int, allowed_ids: np.ndarray[Any, Any] | None = None
    ) -> tuple[Ids, Floats]:
        """Top-k distinct images by max-sim for each query vector.

        queries: float32 (M, D) (or (D,)); returns ids int64 (M, k) and scores float32 (M, k), best
        first, padded with -1 / -inf where fewer than k images (that are in ``allowed_ids``, when given)
        exist. Exact for "flat"; "ivf" may also pad when its probed lists hold fewer than k images.
        """
        q = _as_queries(queries, self.dim)
        with self._lock.read():
            slots = self._slots_for(allowed_ids)
            out_ids, out_scores = _padded((q.shape[0], max(k, 0)))
            kk = min(k, slots.count)
            if kk > 0 and len(q):
                out_ids[:, :kk], out_scores[:, :kk] = self._held().top_images(q, kk, slots)
            return out_ids, out_scores

    def search_by_image(
        self,
        vectors: np.ndarray[Any, Any],
        k: int,
        exclude_id: int | None = None,
        allowed_ids: np.ndarray[Any, Any] | None = None,
    ) -> tuple[Ids, Floats]:
        """Top-k images by Chamfer similarity to an image given as its vectors (Vq, D).

        Returns ids int64 (k,) and scores float32 (k,), padded with -1 / -inf. ``exclude_id`` (usually the
        query image itself) is never returned. Exact for "flat"; approximate for "ivf".
        """
        q = _as_queries(vectors, self.dim)
        with self._lock.read():
            slots = self._slots_for(allowed_ids, exclude_id)
            out_ids, out_scores = _padded((max(k, 0),))
            kk = min(k, slots.count)
            if kk > 0:
                ids, scores = self._held().chamfer_topk(q, kk, slots)
                out_ids[: len(ids)], out_scores[: len(ids)] = ids, scores
            return out_ids, out_scores

    def memory_bytes(self) -> int:
        """Approximate resident size of the index (vectors, ids, IVF centroids and direct map)."""
        if self._backend is None or self._backend.faiss_index is None:
            return 0
        return self._backend.memory_bytes() + self._ids.nbytes

    # -- persistence -----------------------------------------------------------------------------------

    def _header(self, generation: int) -> Header:
        return Header(
            kind=self.kind,
            dim=self.dim,
            vectors_per_image=self.vectors_per_image,
            n_images=len(self._ids),
            generation=generation,
            nlist=self.nlist,
            nprobe=self.nprobe,
            ivf_codec=self.ivf_codec,
            trained_images=self.trained_images,
            has_faiss=self._faiss_index() is not None,
            info=self.info,
        )

    def _faiss_index(self) -> Any:
        return None if self._backend is None else self._backend.faiss_index

    def save(self, path: str | Path, generation: int | None = None) -> None:
        """Write the index to ``path`` atomically, stamped with ``generation`` (default: ``self.generation``).

        A crash at any point leaves either the previous file or the new one, both complete
        (``file_format``). Searches may go on meanwhile.
        """
        stamp = self.generation if generation is None else int(generation)
        with self._lock.read():
            write_index_file(Path(path), self._header(stamp), self._faiss_index(), self._ids)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> tuple[MultiVectorIndex, int]:
        """Read an index written by :meth:`save`; returns it and the generation it is stamped with.

        Raises ``FileNotFoundError`` if there is no file and :class:`IndexFileError` if it is damaged or of
        another format (a checksum covers the whole file).
        """
        path = Path(path)
        resolved = index_device(device)  # a device error is not the file's fault
        file = read_index_file(path)
        header = file.header
        try:
            index = cls(
                None,
                kind=cast(IndexKind, header.kind),  # checked by __init__
                vectors_per_image=header.vectors_per_image,
                nlist=header.nlist,
                nprobe=header.nprobe,
                ivf_codec=cast(IvfCodec, header.ivf_codec),  # checked by __init__
                device=resolved,
            )
        except ValueError as exc:
            raise IndexFileError(f"{path} is damaged: {exc}") from exc
        index.generation = header.generation
        index.info = header.info
        index._ivf.trained_images = header.trained_images
        index._ids = file.ids
        if header.dim is not None:
            index._create(header.dim, file.faiss_index)
        return index, index.generation

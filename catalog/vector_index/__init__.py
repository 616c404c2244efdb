"""The multi-vector image index: 32 unit vectors per image, max-sim (text) and Chamfer (image) search.

One job per module:

- ``index``: :class:`MultiVectorIndex`, the facade callers use (validation, slot -> image id, the
  read/write lock, build/save/load); it delegates row storage and search to a backend.
- ``base``: the backend interface and what flat and IVF share (grouping rows into images, Chamfer).
- ``flat``: exact, float16 rows in faiss; searched by ``gpu_scan`` (torch) on CUDA.
- ``ivf``: approximate, IVF with SQ8 or float16 residuals; a GPU clone where faiss has GPU support.
- ``gpu_scan``: :class:`~catalog.vector_index.gpu_scan.TorchScan`, the exact brute-force scan in torch.
- ``file_format``: the file's layout and checksum, the atomic write.
- ``locking``: the read/write lock. ``devices``: "auto" / "cpu" / "cuda" -> where the index searches.

Importing the package needs numpy and faiss only; torch is imported for a flat index on CUDA.
"""

from catalog.vector_index.devices import index_device
from catalog.vector_index.file_format import IndexFileError
from catalog.vector_index.index import IndexKind, MultiVectorIndex
from catalog.vector_index.ivf import IvfCodec, auto_nlist

__all__ = ["IndexFileError", "IndexKind", "IvfCodec", "MultiVectorIndex", "auto_nlist", "index_device"]

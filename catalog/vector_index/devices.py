"""Where a vector index searches: "cpu" or "cuda".

Not ``blip2_embed``'s ``resolve_torch_device``, which returns a ``torch.device`` for the encoder; this one
returns the name the index records (torch is imported only to ask whether CUDA is there).
"""

from __future__ import annotations

from typing import Literal

import faiss

IndexDevice = Literal["cpu", "cuda"]


def faiss_has_gpu() -> bool:
    """Whether this faiss build has GPU support and sees a GPU (faiss-gpu; faiss-cpu never does)."""
    return hasattr(faiss, "StandardGpuResources") and bool(faiss.get_num_gpus() > 0)


def index_device(device: str) -> IndexDevice:
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

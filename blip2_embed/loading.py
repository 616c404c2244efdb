"""Loading checkpoints: hub id or local folder, device and dtype, and errors a person can act on."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from blip2_embed.errors import ModelNotFoundError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=PreTrainedModel)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 weights on CUDA (BLIP-2 was trained in fp16; the Q-Former stays fp32 as transformers keeps
    it), fp32 on the CPU where half precision is slow and inexact."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def _not_found(name: str, role: str, cause: BaseException) -> ModelNotFoundError:
    return ModelNotFoundError(
        name,
        f"The {role} model {name!r} could not be loaded: it is not a folder with a checkpoint, not in the "
        f"Hugging Face cache, and could not be downloaded ({type(cause).__name__}: {str(cause)[:200]}). "
        f"Download it once where the hub is reachable (`hf download {name}`) and copy the cache or the "
        f"folder here, then point the setting at it (e.g. BLIP2_RETRIEVAL_MODEL=/models/blip2-itm-vit-g).",
    )


def load_pretrained(cls: type[M], name: str, role: str, **kwargs: object) -> M:
    """``cls.from_pretrained(name)`` that prefers local files and fails with one clear error.

    A local folder is loaded directly; a hub id is tried from the local cache first so an offline
    machine never waits on the network, then (unless HF_HUB_OFFLINE is set) from the hub.
    """
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(name, f"The {role} model folder {name!r} has no config.json.")
        try:
            return cls.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as exc:
            raise _not_found(name, role, exc) from exc
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as local_exc:
        if _hub_offline():
            raise _not_found(name, role, local_exc) from local_exc
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        raise _not_found(name, role, exc) from exc


def load_tokenizer(name: str, role: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with the same local-first policy as the weights."""
    return load_pretrained(AutoTokenizer, name, role)  # type: ignore[arg-type]


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short digest of some weights: a model key that changes when a checkpoint is fine-tuned."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def model_key(name: str, *tensors: torch.Tensor) -> str:
    """Stable catalog key: the checkpoint's short name and a fingerprint of its projection weights."""
    short = Path(name.rstrip("/")).name or name
    return f"{short}@{fingerprint(*tensors)}"

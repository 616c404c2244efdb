"""Loading checkpoints: hub id or local folder, device and dtype, and errors a person can act on."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from blip2_embed.errors import ConfigurationError, ModelNotFoundError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=PreTrainedModel)
T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_torch_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU.

    A device this machine lacks is refused here, in one line, rather than deep inside the first
    ``.to(device)`` (where torch reports a missing CUDA with pages of traceback).
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"unknown device {device!r} (BLIP2_DEVICE): use cpu, cuda or cuda:N ({exc})"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigurationError(
                f"device {device!r} was asked for (BLIP2_DEVICE), but {build} (torch {torch.__version__}); "
                "unset BLIP2_DEVICE to run on the CPU, or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device {device!r} was asked for, but MPS is not available here")
    return dev


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
        raise ConfigurationError(
            f"unknown dtype {dtype!r} (BLIP2_DTYPE); use one of {sorted(set(_DTYPES))}"
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


_SETTING = {"retrieval": "BLIP2_RETRIEVAL_MODEL", "caption": "BLIP2_CAPTION_MODEL"}


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    cut = text.find(". ")
    return (text[: cut + 1] if 0 < cut < 300 else text[:300]) or type(exc).__name__


_DEFAULT_HUB_ID = {"retrieval": "Salesforce/blip2-itm-vit-g", "caption": "Salesforce/blip2-opt-2.7b"}


def _how_to_provide(name: str, role: str) -> str:
    setting = _SETTING.get(role, "the model setting")
    if _looks_like_path(name) or Path(name).expanduser().is_dir():
        # A folder was asked for: say what belongs in it, and where it usually comes from.
        hub_id = _DEFAULT_HUB_ID.get(role, "<hub id>")
        return (
            f"Put the checkpoint there (config.json, the weights, tokenizer and preprocessor files: "
            f"`hf download {hub_id} --local-dir {name}` where the hub is reachable, then copy the folder), "
            f"or set {setting} to the folder that holds it."
        )
    folder = f"/models/{Path(name.rstrip('/')).name or name}"
    return (
        f"Download it once where the hub is reachable (`hf download {name} --local-dir {folder}`), copy "
        f"the folder here and set {setting}={folder}; on an offline machine also set HF_HUB_OFFLINE=1."
    )


def _not_found(name: str, role: str, cause: BaseException) -> ModelNotFoundError:
    return ModelNotFoundError(
        name,
        f"The {role} model {name!r} could not be loaded: it is not a folder with a checkpoint, not in the "
        f"Hugging Face cache, and could not be downloaded "
        f"({type(cause).__name__}: {_first_sentence(cause)}). " + _how_to_provide(name, role),
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "owner/name"; anything absolute, relative-dotted or home-based is meant as a folder.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


@lru_cache(maxsize=4)
def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when a TCP connection works.

    The hub client retries an unreachable host for ~30 s with a warning per try; one quick connection
    attempt first lets an offline machine fail at once with the whole story.
    """
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def load_pretrained(cls: type[M], name: str, role: str, **kwargs: object) -> M:
    """``cls.from_pretrained(name)`` that prefers local files and fails with one clear error."""
    return _local_first(cls.from_pretrained, name, role, **kwargs)


def _local_first(from_pretrained: Callable[..., T], name: str, role: str, **kwargs: object) -> T:
    """``from_pretrained(name)`` (weights or a tokenizer) that prefers local files and fails with one
    clear error.

    A local folder is loaded directly; a hub id is tried from the local cache first so an offline
    machine never waits on the network, then (unless HF_HUB_OFFLINE is set) from the hub.
    """
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelNotFoundError(
            name, f"The {role} model folder {name!r} does not exist. " + _how_to_provide(name, role)
        )
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(name, f"The {role} model folder {name!r} has no config.json.")
        try:
            return from_pretrained(name, **kwargs)
        except (OSError, ValueError) as exc:
            raise _not_found(name, role, exc) from exc
    try:
        return from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as local_exc:
        if _hub_offline():
            raise ModelNotFoundError(
                name,
                f"The {role} model {name!r} is not a folder with a checkpoint and not in the Hugging Face "
                f"cache (HF_HUB_OFFLINE is set, so the hub was not asked). " + _how_to_provide(name, role),
            ) from local_exc
    if (why := _hub_unreachable()) is not None:
        raise ModelNotFoundError(
            name,
            f"The {role} model {name!r} is not a folder with a checkpoint and not in the Hugging Face cache, "
            f"and the hub cannot be reached ({why}). " + _how_to_provide(name, role),
        )
    try:
        return from_pretrained(name, **kwargs)
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        raise _not_found(name, role, exc) from exc


# What makes a folder a loadable checkpoint: its config and its weights (one file or an index of shards).
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _checkpoint_problem(folder: Path) -> str | None:
    if not (folder / "config.json").is_file():
        return "has no config.json"
    if not any((folder / w).is_file() for w in _WEIGHTS):
        return f"has no weights ({' or '.join(_WEIGHTS[::2])})"
    return None


def locate_checkpoint(name: str, role: str) -> Path:
    """The local folder ``load_pretrained(name)`` would load, found without loading or downloading it:
    ``name`` itself when it is a folder, else the Hugging Face cache's snapshot of that hub id
    (HF_HOME / HF_HUB_CACHE). A deployment checks with this before starting (``blip2-search check``),
    so a missing model is one message instead of a service that fails again on every restart."""
    folder = Path(name).expanduser()
    if _looks_like_path(name) or folder.is_dir():
        if not folder.is_dir():
            raise ModelNotFoundError(
                name, f"The {role} model folder {name!r} does not exist. " + _how_to_provide(name, role)
            )
        if (problem := _checkpoint_problem(folder)) is not None:
            raise ModelNotFoundError(
                name, f"The {role} model folder {name!r} {problem}. " + _how_to_provide(name, role)
            )
        return folder
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        if _checkpoint_problem(snapshot) is None:
            return snapshot
    raise ModelNotFoundError(
        name,
        f"The {role} model {name!r} is not a folder with a checkpoint and not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). " + _how_to_provide(name, role),
    )


def load_tokenizer(name: str, role: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with the same local-first policy as the weights."""
    tokenizer: PreTrainedTokenizerBase = _local_first(AutoTokenizer.from_pretrained, name, role)
    return tokenizer


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

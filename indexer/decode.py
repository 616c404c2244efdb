"""What a decode worker process does with one file: read, hash, decode, resize, thumbnail.

Workers return the uint8 model input (S x S RGB, before normalisation): 4x less to copy between
processes than float pixels, and exactly what ``catalog.model_inputs`` stores. The main process
normalises it (``blip2_embed.images.normalise``) right before the model.

This module is imported by worker processes (spawned, not forked, so the parent's torch threads and
CUDA context never leak into them); it imports only numpy/PIL through ``blip2_embed.images`` and
``catalog.model_inputs``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2_embed.errors import ImageError, UnreadableImageError
from blip2_embed.images import (
    ImageMetadata,
    ImageSpec,
    draft_size_for,
    load_image_with_metadata,
    make_thumbnail,
    resize_for_model,
)
from catalog.model_inputs import encode_model_input
from catalog.paths import ObjectURI


@dataclass(frozen=True)
class DecodeConfig:
    spec: ImageSpec
    fast_jpeg: bool = True
    max_pixels: int = 178_956_970
    thumbnail_size: int = 256  # 0: no thumbnails
    encode_model_input: bool = False  # also return the model input encoded for catalog.model_inputs


@dataclass
class Decoded:
    """A file turned into model input; ``sha256`` is of the bytes actually decoded."""

    sha256: str
    byte_size: int
    model_input: np.ndarray  # uint8 (S, S, 3) RGB, before normalisation
    metadata: ImageMetadata
    thumbnail: bytes | None
    model_input_file: bytes | None = None  # model_input, losslessly encoded (catalog.model_inputs)


@dataclass
class DecodeFailure:
    sha256: str | None
    reason: str
    message: str


_config: DecodeConfig | None = None


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    # A SIGKILLed indexer runs no cleanup, and pool workers blocked on their task queue never see EOF
    # (each holds both ends of it), so they would linger forever. Reparenting gives the death away.
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(0)


def init_worker(config: DecodeConfig) -> None:
    """Pool initializer: keep the config, leave Ctrl-C to the parent (which stops after a batch), and
    exit when the parent dies."""
    global _config
    _config = config
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def sha256_file(path: Path | ObjectURI, chunk: int = 1 << 20) -> str:
    if isinstance(path, ObjectURI):  # an object-store root's file (indexer.object_store)
        from indexer.object_store import sha256_object

        return sha256_object(path, chunk)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def decode_file(path: str, config: DecodeConfig | None = None) -> Decoded | DecodeFailure:
    """Decode one file; never raises for a bad file (the failure is data, recorded in the catalog).

    The bytes are read once and hashed here, so the hash stored with the embedding is the hash of the
    pixels that were embedded even if the file changes between the scan and the decode.
    """
    config = config or _config
    if config is None:
        raise RuntimeError("decode_file called in a worker without init_worker")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return read_failure(path, exc)
    return decode_bytes(data, path, config)


def read_failure(path: str, exc: OSError) -> DecodeFailure:
    err = UnreadableImageError(exc.strerror or str(exc), path)
    return DecodeFailure(None, err.reason, str(err))


def decode_bytes(data: bytes, path: str, config: DecodeConfig) -> Decoded | DecodeFailure:
    """``decode_file`` after the read: the same for a local file and an object-store one."""
    sha = hashlib.sha256(data).hexdigest()
    spec = config.spec
    # JPEG DCT scaling must keep enough resolution for both the model input and the thumbnail.
    draft = draft_size_for(spec, fast_jpeg=config.fast_jpeg, thumbnail_size=config.thumbnail_size)
    try:
        image, meta = load_image_with_metadata(data, max_pixels=config.max_pixels, draft_size=draft)
        model_input = resize_for_model(image, spec)
        thumb = make_thumbnail(image, config.thumbnail_size) if config.thumbnail_size > 0 else None
        stored = encode_model_input(model_input) if config.encode_model_input else None
    except ImageError as exc:
        exc.path = path
        return DecodeFailure(sha, exc.reason, f"{path}: {exc.detail or exc.summary}")
    except Exception as exc:  # a decoder bug on one hostile file must not end the run
        return DecodeFailure(sha, "corrupt", f"{path}: {type(exc).__name__}: {exc}")
    return Decoded(sha, len(data), model_input, meta, thumb, stored)

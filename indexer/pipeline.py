"""The decode -> model -> write pipeline.

Three stages run at once:
- decode worker processes read, hash, decode and resize files to uint8 model inputs (and encode the
  thumbnail and the stored copy of the input), up to ``max_in_flight`` ahead;
- the main thread stacks the inputs into batches, normalises them and runs the model (the encoder pins
  host memory and copies without blocking on CUDA);
- a writer thread writes thumbnails and model inputs, then commits each batch's catalog rows, while the
  next batch runs.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch

from indexer.decode import DecodeConfig, Decoded, DecodeFailure, decode_file, init_worker

if TYPE_CHECKING:
    from blip2_embed.encoder import Blip2Encoder

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Timings:
    """Seconds spent per stage. ``decode_wait`` is the main thread blocked on decoders (0 when decoding
    keeps up); ``model`` the model forward; ``write`` the writer thread busy; ``write_wait`` the main
    thread blocked on a full write queue (0 when writes keep up)."""

    decode_wait: float = 0.0
    model: float = 0.0
    write: float = 0.0
    write_wait: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


class DecodePool(Generic[T]):
    """Decode files in worker processes with bounded look-ahead, yielding results in input order.

    ``workers=0`` decodes in the calling thread (debugging, tiny runs). Workers are spawned rather
    than forked: the parent holds torch thread pools and maybe a CUDA context, which a fork would copy
    in an unusable state.
    """

    def __init__(self, config: DecodeConfig, workers: int, max_in_flight: int | None = None) -> None:
        self.config = config
        self.workers = workers
        self.max_in_flight = max_in_flight or max(4, 4 * workers)
        self._executor: ProcessPoolExecutor | None = None
        if workers > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(config,),
            )

    def imap(
        self, items: Iterable[T], path_of: Callable[[T], str]
    ) -> Iterator[tuple[T, Decoded | DecodeFailure]]:
        if self._executor is None:
            for item in items:
                yield item, decode_file(path_of(item), self.config)
            return
        pending: deque[tuple[T, Future[Decoded | DecodeFailure]]] = deque()
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.max_in_flight:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((item, self._executor.submit(decode_file, path_of(item))))
            if not pending:
                return
            item, fut = pending.popleft()
            yield item, fut.result()

    def close(self) -> None:
        if self._executor is not None:
            # cancel_futures: on SIGINT the look-ahead is dropped, not decoded for nothing.
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DecodePool[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ModelOutput:
    """Per batch row: the embedding (or None when not needed) and the caption (or None)."""

    embeddings: list[np.ndarray | None]
    captions: list[str | None]


def run_model(
    encoder: Blip2Encoder,
    pixels: np.ndarray,
    want_embed: list[bool],
    want_caption: list[bool],
    caption_prompt: str | None,
) -> ModelOutput:
    """ViT once per image; ITC embeddings and OPT captions from the same features."""
    n = len(pixels)
    feats = encoder.vision_features(pixels)
    embeddings: list[np.ndarray | None] = [None] * n
    captions: list[str | None] = [None] * n
    idx = [i for i in range(n) if want_embed[i]]
    if idx:
        sub = feats if len(idx) == n else feats[torch.tensor(idx, device=feats.hidden.device)]
        for i, vec in zip(idx, encoder.embed_images(sub), strict=True):
            embeddings[i] = vec
    idx = [i for i in range(n) if want_caption[i]]
    if idx:
        sub = feats if len(idx) == n else feats[torch.tensor(idx, device=feats.hidden.device)]
        for i, text in zip(idx, encoder.caption(sub, caption_prompt), strict=True):
            captions[i] = text
    return ModelOutput(embeddings, captions)


@dataclass
class WriterThread(Generic[T]):
    """Runs ``write(job)`` for each queued job in order on its own thread (and its own DB session).

    The queue is short so the model never runs far ahead of what is committed: a crash loses at most
    the batches in the queue. The first exception stops the thread and is re-raised in the main thread
    at the next ``put`` or at ``close``.
    """

    write: Callable[[T], None]
    timings: Timings
    depth: int = 2
    _queue: queue.Queue[T | None] = field(init=False)
    _thread: threading.Thread = field(init=False)
    _error: BaseException | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._loop, name="indexer-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            start = time.perf_counter()
            try:
                self.write(job)
            except BaseException as exc:
                log.exception("catalog write failed")
                self._error = exc
            self.timings.write += time.perf_counter() - start

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job: T) -> None:
        self._raise()
        start = time.perf_counter()
        self._queue.put(job)
        self.timings.write_wait += time.perf_counter() - start

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

"""The one thread that runs the models, fed by a queue that batches concurrent requests fairly.

Why a single worker thread: the model device is one shared resource, torch already parallelises each
call across cores (or the GPU), and two threads calling into the same model would only interleave
their kernels and fight over memory. Requests therefore enqueue jobs and ``await`` futures, so the
event loop never blocks on inference.

Batching and fairness: each time the worker wakes it takes *every* job waiting at that moment (a
"round"), groups them by kind and runs each group as one batched model call, in order of the group's
first arrival. A job that arrives during a round waits at most one round, so no request can starve
another, and ten concurrent searches cost one text-encoder call instead of ten.

Isolation: one job never fails another. Before a batch runs, each job's own input is checked on this
thread (its texts tokenize; a prompt plus the tokens to generate fit the caption model's positions); a
job that fails the check gets ``InvalidInput`` (a 4xx for its caller) and stays out of the batch. If a
batch still fails, its jobs run again one by one, so only a job that fails on its own gets the error.

Only model work runs here. A search that re-ranks and then captions its top hits asks for ITM with
``keep_features=True``, ranks on the event loop, and sends a ``caption_kept`` job for the rows it chose:
the ViT features stay on this side in between, so there is still one ViT pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from blip2_embed.encoder import Blip2Encoder, VisionFeatures
from search_api.service.errors import InvalidInput

__all__ = ["InferenceWorker", "InvalidInput", "KeptFeatures", "ScoreResult"]

log = logging.getLogger(__name__)


Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class KeptFeatures:
    """ViT features of a ``score`` job's N images, kept on the worker for a later ``caption_kept``."""

    token: int
    size: int


@dataclass
class ScoreResult:
    """ITM of one text against N images, and captions of some of those images."""

    probs: Floats  # (N,)
    logits: Floats  # (N, 2)
    captions: dict[int, str]  # position in the batch -> caption
    kept: KeptFeatures | None = None


@dataclass
class _Job:
    kind: str
    payload: dict[str, Any]
    future: Future[Any]
    size: int
    enqueued: float = field(default_factory=time.perf_counter)
    truncated: list[bool] | None = None  # the token-limit flags of a text job, found by its input check


_STOP = object()


class InferenceWorker:
    """Runs ``Blip2Encoder`` calls on one thread; every public method is a coroutine."""

    def __init__(
        self,
        encoder: Blip2Encoder,
        *,
        max_batch: int = 64,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="blip2-inference", daemon=True)
        self._started = False
        # Features kept between a score job and its caption job (token -> features); the lock because
        # ``release`` may run on the event loop.
        self._kept: dict[int, VisionFeatures] = {}
        self._kept_lock = threading.Lock()
        self._next_token = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._started:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._started = False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ public API (coroutines)
    async def _submit(self, kind: str, size: int, **payload: Any) -> Any:
        if not self._started:
            raise RuntimeError("the inference worker is not running")
        fut: Future[Any] = Future()
        self._queue.put(_Job(kind, payload, fut, size))
        return await asyncio.wrap_future(fut)

    async def embed_texts(self, texts: list[str]) -> tuple[Floats, list[bool]]:
        """(M, D) ITC text embeddings, and which texts were cut to the encoder's token limit.

        The truncation check runs here too: a fast tokenizer keeps its padding/truncation mode as
        mutable state, so calling it from the event loop while this thread encodes is a data race.
        """
        result: tuple[Floats, list[bool]] = await self._submit("text", len(texts), texts=texts)
        return result

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        """Which texts exceed the token limit (on the model thread; see ``embed_texts``)."""
        result: list[bool] = await self._submit("truncation", len(texts), texts=texts)
        return result

    async def embed_images(self, pixels: Floats) -> Floats:
        """(N, 32, D) ITC image embeddings of preprocessed pixels (N, 3, S, S)."""
        result: Floats = await self._submit("image", len(pixels), pixels=pixels)
        return result

    async def score(
        self,
        pixels: Floats,
        text: str | None,
        *,
        itm_rows: list[int] | None = None,
        caption_rows: list[int] | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        keep_features: bool = False,
    ) -> ScoreResult:
        """ITM and captions over one shared ViT pass of ``pixels`` (N, 3, S, S).

        ITM scores ``text`` against ``itm_rows`` (default: every row; none without text); captions are
        made for ``caption_rows``. Rows without ITM get probability 0. With ``keep_features`` the ViT
        features stay on the worker (``result.kept``) for ``caption_kept``; ``release`` them after.
        """
        rows = list(range(len(pixels))) if itm_rows is None else list(itm_rows)
        result: ScoreResult = await self._submit(
            "vision",
            len(pixels),
            pixels=pixels,
            text=text,
            itm_rows=rows if text is not None else [],
            caption_rows=list(caption_rows or []),
            prompt=prompt or None,
            max_new_tokens=max_new_tokens,
            keep=keep_features,
        )
        return result

    async def caption_kept(
        self, kept: KeptFeatures, rows: list[int], *, prompt: str | None = None, max_new_tokens: int = 30
    ) -> dict[int, str]:
        """Captions of ``rows`` of a ``score(keep_features=True)`` job, from its kept ViT features
        (released once they succeed)."""
        result: dict[int, str] = await self._submit(
            "caption", len(rows), kept=kept, rows=list(rows), prompt=prompt or None,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        return result

    def release(self, kept: KeptFeatures | None) -> None:
        """Drop kept features (a no-op once ``caption_kept`` used them)."""
        if kept is not None:
            with self._kept_lock:
                self._kept.pop(kept.token, None)

    def take_kept(self, kept: KeptFeatures) -> VisionFeatures:
        """Hand kept features out of this worker (a stateless model replica returns them to its caller)."""
        with self._kept_lock:
            return self._kept.pop(kept.token)

    def adopt_kept(self, features: VisionFeatures) -> KeptFeatures:
        """Keep features made elsewhere (``take_kept``) for a ``caption_kept`` here."""
        with self._kept_lock:
            self._next_token += 1
            self._kept[self._next_token] = features
            return KeptFeatures(self._next_token, len(features))

    @property
    def kept_features(self) -> int:
        with self._kept_lock:
            return len(self._kept)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            round_jobs = [first]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                round_jobs.append(nxt)
            for kind in dict.fromkeys(j.kind for j in round_jobs):
                jobs = [j for j in round_jobs if j.kind == kind]
                for batch in self._split(jobs):
                    self._run_batch(kind, batch)
            if stop:
                return

    def _split(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Cut a group into batches of at most ``max_batch`` items (a bigger single job runs alone)."""
        batches: list[list[_Job]] = []
        current: list[_Job] = []
        size = 0
        for job in jobs:
            if current and size + job.size > self.max_batch:
                batches.append(current)
                current, size = [], 0
            current.append(job)
            size += job.size
        if current:
            batches.append(current)
        return batches

    def _run_batch(self, kind: str, jobs: list[_Job]) -> None:
        valid = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                self._check_input(kind, job)
            except Exception as exc:  # InvalidInput, or a tokenizer failure no single text explains
                job.future.set_exception(exc)
            else:
                valid.append(job)
        if valid:
            self._run_jobs(kind, valid)

    def _run_jobs(self, kind: str, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = getattr(self, f"_batch_{kind}")(jobs)
        except Exception as exc:  # never kills the worker; only the job that fails alone gets the error
            if len(jobs) > 1:
                log.warning("inference batch of kind %s failed (%r); running its %d jobs one by one",
                            kind, exc, len(jobs))  # fmt: skip
                for job in jobs:
                    self._run_jobs(kind, [job])
            else:
                log.exception("inference job of kind %s failed", kind)
                jobs[0].future.set_exception(exc)
            return
        for job, res in zip(jobs, results, strict=True):
            job.future.set_result(res)
        if self._on_batch is not None:
            self._on_batch(kind, sum(j.size for j in jobs), time.perf_counter() - start)

    # ------------------------------------------------------------------ input checks (worker thread)
    def _check_input(self, kind: str, job: _Job) -> None:
        """Raise ``InvalidInput`` if this job's own input cannot run (tokenizing is cheap next to a batch)."""
        p = job.payload
        if kind in ("text", "truncation"):
            job.truncated = self._truncation(p["texts"])
        elif kind == "vision":
            if p["itm_rows"]:
                self._truncation([p["text"]])
            if p["caption_rows"]:
                self._check_prompt(p["prompt"], p["max_new_tokens"])
        elif kind == "caption":
            with self._kept_lock:
                known = p["kept"].token in self._kept
            if not known:
                raise RuntimeError("caption_kept: those features were released")
            self._check_prompt(p["prompt"], p["max_new_tokens"])

    def _truncation(self, texts: list[str]) -> list[bool]:
        try:
            return self.encoder.text_truncation(texts)
        except Exception:  # the tokenizer refuses something: find which text, for the message
            for i, text in enumerate(texts):
                try:
                    self.encoder.text_truncation([text])
                except Exception as exc:
                    raise InvalidInput(f"text {i} cannot be tokenized ({type(exc).__name__})") from None
            raise

    def _check_prompt(self, prompt: str | None, max_new_tokens: int) -> None:
        model = self.encoder.caption_model
        if model is None:  # the service refuses captions first (NotConfigured)
            return
        tokenizer = self.encoder.caption_tokenizer
        try:
            prompt_tokens = len(tokenizer(prompt)["input_ids"]) if prompt and tokenizer is not None else 1
        except Exception as exc:
            raise InvalidInput(f"the prompt cannot be tokenized ({type(exc).__name__})") from None
        # The language model sees the query tokens, the prompt and every generated token but the last;
        # past its learned positions it indexes out of range (on a GPU: a device assert for every job).
        positions = getattr(model.config.text_config, "max_position_embeddings", None)
        used = model.config.num_query_tokens + prompt_tokens + max_new_tokens - 1
        if positions is not None and used > positions:
            raise InvalidInput(
                f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) need {used} "
                f"positions; the caption model has {positions} (including {model.config.num_query_tokens} "
                "for the image)"
            )

    def _batch_text(self, jobs: list[_Job]) -> list[tuple[Floats, list[bool]]]:
        texts = [t for j in jobs for t in j.payload["texts"]]
        vecs = self.encoder.embed_texts(texts)
        return [
            (v, list(j.truncated or []))
            for v, j in zip(_split_rows(vecs, [j.size for j in jobs]), jobs, strict=True)
        ]

    def _batch_truncation(self, jobs: list[_Job]) -> list[list[bool]]:
        return [list(j.truncated or []) for j in jobs]

    def _batch_image(self, jobs: list[_Job]) -> list[Floats]:
        pixels = np.concatenate([j.payload["pixels"] for j in jobs])
        vecs = self.encoder.embed_images(pixels)
        return _split_rows(vecs, [j.size for j in jobs])

    def _batch_vision(self, jobs: list[_Job]) -> list[ScoreResult]:
        """One ViT pass over every job's images, then ITM and captions on those shared features."""
        pixels = np.concatenate([j.payload["pixels"] for j in jobs])
        feats = self.encoder.vision_features(pixels)
        offsets = [int(o) for o in np.cumsum([0] + [j.size for j in jobs])]
        # ITM: one (image, text) pair per row, so jobs with different texts share one batch.
        itm_rows: list[int] = []
        itm_texts: list[str] = []
        for job, off in zip(jobs, offsets, strict=False):
            itm_rows.extend(off + r for r in job.payload["itm_rows"])
            itm_texts.extend([job.payload["text"]] * len(job.payload["itm_rows"]))
        probs = np.zeros(len(pixels), np.float32)
        logits = np.zeros((len(pixels), 2), np.float32)
        if itm_rows:
            itm = self.encoder.itm(_take(feats, itm_rows), itm_texts)
            probs[itm_rows] = itm.probs
            logits[itm_rows] = itm.logits
        results = [
            ScoreResult(
                probs=probs[off : off + j.size].copy(), logits=logits[off : off + j.size].copy(), captions={}
            )
            for j, off in zip(jobs, offsets, strict=False)
        ]
        # Captions: one generate call per distinct (prompt, length) over the rows that want one.
        wanted = [
            [off + r for r in j.payload["caption_rows"] if 0 <= r < j.size]
            for j, off in zip(jobs, offsets, strict=False)
        ]
        captions = self._caption_groups(feats, jobs, wanted)
        for res, off, job in zip(results, offsets, jobs, strict=False):
            res.captions = {r - off: captions[r] for r in range(off, off + job.size) if r in captions}
        for res, job, off in zip(results, jobs, offsets, strict=False):
            if not job.payload["keep"]:
                continue
            with self._kept_lock:
                self._next_token += 1
                token = self._next_token
                self._kept[token] = _take(feats, list(range(off, off + job.size)))
            res.kept = KeptFeatures(token, job.size)
        return results

    def _batch_caption(self, jobs: list[_Job]) -> list[dict[int, str]]:
        """Captions from kept features: every job's rows in one generate call per (prompt, length)."""
        with self._kept_lock:
            parts = [_take(self._kept[j.payload["kept"].token], j.payload["rows"]) for j in jobs]
        feats = _concat(parts)
        offsets = [int(o) for o in np.cumsum([0] + [len(j.payload["rows"]) for j in jobs])]
        rows = [list(range(off, off + len(j.payload["rows"]))) for j, off in zip(jobs, offsets, strict=False)]
        captions = self._caption_groups(feats, jobs, rows)
        with self._kept_lock:  # used: dropped only now, so a failed batch can rerun job by job
            for job in jobs:
                self._kept.pop(job.payload["kept"].token, None)
        return [
            {orig: captions[off + n] for n, orig in enumerate(j.payload["rows"])}
            for j, off in zip(jobs, offsets, strict=False)
        ]

    def _caption_groups(
        self, feats: VisionFeatures, jobs: list[_Job], rows_per_job: list[list[int]]
    ) -> dict[int, str]:
        """Caption ``rows_per_job`` (rows of ``feats``), grouping jobs by (prompt, max_new_tokens)."""
        groups: dict[tuple[str | None, int], list[int]] = {}
        for job, rows in zip(jobs, rows_per_job, strict=True):
            key = (job.payload["prompt"], job.payload["max_new_tokens"])
            groups.setdefault(key, []).extend(rows)
        captions: dict[int, str] = {}
        for (prompt, max_new), rows in groups.items():
            if rows:
                texts = self.encoder.caption(_take(feats, rows), prompt, max_new_tokens=max_new)
                captions.update(zip(rows, texts, strict=True))
        return captions


def _take(feats: VisionFeatures, rows: list[int]) -> VisionFeatures:
    index = torch.as_tensor(rows, dtype=torch.long, device=feats.hidden.device)
    return VisionFeatures(
        hidden=feats.hidden.index_select(0, index),
        pixels=None if feats.pixels is None else feats.pixels.index_select(0, index),
    )


def _concat(parts: list[VisionFeatures]) -> VisionFeatures:
    pixels = [p.pixels for p in parts]
    return VisionFeatures(
        hidden=torch.cat([p.hidden for p in parts]),
        pixels=None if any(p is None for p in pixels) else torch.cat([p for p in pixels if p is not None]),
    )


def _split_rows(arr: Floats, sizes: list[int]) -> list[Floats]:
    return list(np.split(arr, np.cumsum(sizes)[:-1])) if sizes else []

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
import torch

from blip2_embed.encoder import Blip2Encoder, VisionFeatures

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """ITM of one text against N images, and captions of some of those images."""

    probs: np.ndarray  # (N,)
    logits: np.ndarray  # (N, 2)
    captions: dict[int, str]  # position in the batch -> caption


class InvalidInput(ValueError):
    """A job's own input cannot go through the model (the caller's fault: the routes answer 422)."""


@dataclass
class _Job:
    kind: str
    payload: dict[str, Any]
    future: Future
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
        fut: Future = Future()
        self._queue.put(_Job(kind, payload, fut, size))
        return await asyncio.wrap_future(fut)

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """(M, D) ITC text embeddings, and which texts were cut to the encoder's token limit.

        The truncation check runs here too: a fast tokenizer keeps its padding/truncation mode as
        mutable state, so calling it from the event loop while this thread encodes is a data race.
        """
        return await self._submit("text", len(texts), texts=texts)

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        """Which texts exceed the token limit (on the model thread; see ``embed_texts``)."""
        return await self._submit("truncation", len(texts), texts=texts)

    async def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 32, D) ITC image embeddings of preprocessed pixels (N, 3, S, S)."""
        return await self._submit("image", len(pixels), pixels=pixels)

    async def score(
        self,
        pixels: np.ndarray,
        text: str | None,
        *,
        itm_rows: list[int] | None = None,
        caption_rows: list[int] | Callable[[ScoreResult], list[int]] | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 30,
    ) -> ScoreResult:
        """ITM and captions over one shared ViT pass of ``pixels`` (N, 3, S, S).

        ITM scores ``text`` against ``itm_rows`` (default: every row; none without text). Captions are
        made for ``caption_rows``: a list, or a function of the ITM result (so a search can caption its
        top hits *after* re-ranking without a second ViT pass). Rows without ITM get probability 0.
        """
        rows = list(range(len(pixels))) if itm_rows is None else list(itm_rows)
        return await self._submit(
            "vision",
            len(pixels),
            pixels=pixels,
            text=text,
            itm_rows=rows if text is not None else [],
            caption_rows=caption_rows if callable(caption_rows) else list(caption_rows or []),
            prompt=prompt or None,
            max_new_tokens=max_new_tokens,
        )

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
            if callable(p["caption_rows"]) or p["caption_rows"]:
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
        if model is None:  # the route refuses captions first; the batch reports it otherwise
            return
        try:
            prompt_tokens = len(self.encoder.caption_tokenizer(prompt)["input_ids"]) if prompt else 1
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

    def _batch_text(self, jobs: list[_Job]) -> list[tuple[np.ndarray, list[bool]]]:
        texts = [t for j in jobs for t in j.payload["texts"]]
        vecs = self.encoder.embed_texts(texts)
        return [
            (v, list(j.truncated or []))
            for v, j in zip(_split_rows(vecs, [j.size for j in jobs]), jobs, strict=True)
        ]

    def _batch_truncation(self, jobs: list[_Job]) -> list[list[bool]]:
        return [list(j.truncated or []) for j in jobs]

    def _batch_image(self, jobs: list[_Job]) -> list[np.ndarray]:
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
            res = self.encoder.itm(_take(feats, itm_rows), itm_texts)
            probs[itm_rows] = res.probs
            logits[itm_rows] = res.logits
        results = [
            ScoreResult(
                probs=probs[off : off + j.size].copy(), logits=logits[off : off + j.size].copy(), captions={}
            )
            for j, off in zip(jobs, offsets, strict=False)
        ]
        # Captions: one generate call per distinct (prompt, length) over the rows that want one.
        groups: dict[tuple[str | None, int], list[int]] = {}
        for job, off, res in zip(jobs, offsets, results, strict=False):
            want = job.payload["caption_rows"]
            rows = want(res) if callable(want) else want
            key = (job.payload["prompt"], job.payload["max_new_tokens"])
            groups.setdefault(key, []).extend(off + r for r in rows if 0 <= r < job.size)
        captions: dict[int, str] = {}
        for (prompt, max_new), rows in groups.items():
            if rows:
                texts = self.encoder.caption(_take(feats, rows), prompt, max_new_tokens=max_new)
                captions.update(zip(rows, texts, strict=True))
        for res, off, job in zip(results, offsets, jobs, strict=False):
            res.captions = {r - off: captions[r] for r in range(off, off + job.size) if r in captions}
        return results


def _take(feats: VisionFeatures, rows: list[int]) -> VisionFeatures:
    index = torch.as_tensor(rows, dtype=torch.long, device=feats.hidden.device)
    return VisionFeatures(
        hidden=feats.hidden.index_select(0, index),
        pixels=None if feats.pixels is None else feats.pixels.index_select(0, index),
    )


def _split_rows(arr: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(arr, np.cumsum(sizes)[:-1]) if sizes else []

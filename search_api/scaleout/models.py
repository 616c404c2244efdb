"""Model replicas: Ray actors, each holding a ``Blip2Encoder`` behind the single-process server's own
``InferenceWorker`` (same batching of concurrent requests, input checks and error isolation), and
``RayModels``, the ``InferenceWorker`` the ingress's ``SearchService`` uses instead: the same
coroutines, answered by the replicas (round-robin; kept ViT features stay with the replica that made
them)."""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from blip2_embed.encoder import Blip2Encoder
from search_api.service.inference import InferenceWorker, KeptFeatures, ScoreResult

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelRecipe:
    """What ``Blip2Encoder.from_pretrained`` takes (``Settings.encoder_options``) and the batch cap."""

    encoder_options: dict[str, Any]
    max_batch: int


class ModelReplica:
    """Runs as an async Ray actor: requests from many ingress calls batch on its worker thread."""

    def __init__(self, recipe: ModelRecipe) -> None:
        options = dict(recipe.encoder_options)
        if options.get("device") in (None, "", "auto"):
            import ray

            options["device"] = "cuda" if ray.get_gpu_ids() else "cpu"
        encoder = Blip2Encoder.from_pretrained(**options)
        self.worker = InferenceWorker(encoder, max_batch=recipe.max_batch)
        self.worker.start()

    async def embed_texts(self, texts: list[str]) -> tuple[Floats, list[bool]]:
        return await self.worker.embed_texts(texts)

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        return await self.worker.text_truncation(texts)

    async def embed_images(self, pixels: Floats) -> Floats:
        return await self.worker.embed_images(pixels)

    async def score(self, pixels: Floats, text: str | None, kwargs: dict[str, Any]) -> ScoreResult:
        return await self.worker.score(pixels, text, **kwargs)

    async def caption_kept(
        self, kept: KeptFeatures, rows: list[int], kwargs: dict[str, Any]
    ) -> dict[int, str]:
        return await self.worker.caption_kept(kept, rows, **kwargs)

    def release(self, kept: KeptFeatures) -> None:
        self.worker.release(kept)


class RayModels(InferenceWorker):
    """An ``InferenceWorker`` whose model runs in replica actors (restarted by Ray if they die)."""

    def __init__(
        self, encoder: Blip2Encoder, recipe: ModelRecipe, *, replicas: int = 1, num_gpus: float = 0.0
    ):
        super().__init__(encoder, max_batch=recipe.max_batch)  # its thread is never started
        import ray

        actor = ray.remote(ModelReplica).options(
            max_restarts=-1, max_task_retries=-1, num_cpus=0, num_gpus=num_gpus, max_concurrency=64
        )
        self.replicas: list[Any] = [actor.remote(recipe) for _ in range(replicas)]
        self._next = itertools.cycle(self.replicas)
        self._where: dict[int, tuple[Any, KeptFeatures]] = {}  # our token -> (replica, its KeptFeatures)
        self._tokens = itertools.count(1)
        self._where_lock = threading.Lock()
        self._up = False

    def start(self) -> None:
        import ray

        ray.get([r.text_truncation.remote([""]) for r in self.replicas])  # loaded before the first request
        self._up = True

    def stop(self, timeout: float = 10.0) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r)
        self._up = False

    @property
    def pending(self) -> int:
        return 0  # each replica batches its own queue

    @property
    def alive(self) -> bool:
        return self._up

    @staticmethod
    async def _call(replica: Any, method: str, *args: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return await getattr(replica, method).remote(*args)
        except RayTaskError as exc:  # the replica's own error (InvalidInput...): raise it as that type
            raise exc.as_instanceof_cause() from None

    async def embed_texts(self, texts: list[str]) -> tuple[Floats, list[bool]]:
        vecs, cut = await self._call(next(self._next), "embed_texts", texts)
        return vecs, cut

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        cut: list[bool] = await self._call(next(self._next), "text_truncation", texts)
        return cut

    async def embed_images(self, pixels: Floats) -> Floats:
        vecs: Floats = await self._call(next(self._next), "embed_images", pixels)
        return vecs

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
        replica = next(self._next)
        kwargs = {"itm_rows": itm_rows, "caption_rows": caption_rows, "prompt": prompt,
                  "max_new_tokens": max_new_tokens, "keep_features": keep_features}  # fmt: skip
        result: ScoreResult = await self._call(replica, "score", pixels, text, kwargs)
        if result.kept is not None:
            with self._where_lock:
                token = next(self._tokens)
                self._where[token] = (replica, result.kept)
            result.kept = KeptFeatures(token, result.kept.size)
        return result

    async def caption_kept(
        self, kept: KeptFeatures, rows: list[int], *, prompt: str | None = None, max_new_tokens: int = 30
    ) -> dict[int, str]:
        with self._where_lock:
            replica, theirs = self._where[kept.token]
        texts: dict[int, str] = await self._call(
            replica, "caption_kept", theirs, rows, {"prompt": prompt, "max_new_tokens": max_new_tokens}
        )
        return texts

    def release(self, kept: KeptFeatures | None) -> None:
        if kept is None:
            return
        with self._where_lock:
            where = self._where.pop(kept.token, None)
        if where is not None:
            replica, theirs = where
            replica.release.remote(theirs)  # fire and forget: a dead replica has nothing to release

    @property
    def kept_features(self) -> int:
        with self._where_lock:
            return len(self._where)

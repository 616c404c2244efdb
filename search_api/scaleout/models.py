"""Model replicas: Ray actors, each holding a ``Blip2Encoder`` behind the single-process server's own
``InferenceWorker`` (same batching of concurrent requests, input checks and error isolation), and
``RayModels``, which the ingress uses in place of its ``InferenceWorker`` (same coroutines)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from search_api.inference import InferenceWorker, ScoreResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRecipe:
    retrieval: str | None
    caption: str | None
    device: str | None
    dtype: str | None
    batch_size: int
    max_batch: int


class ModelReplica:
    """Runs as an async Ray actor: requests from many ingress calls batch on its worker thread."""

    def __init__(self, recipe: ModelRecipe) -> None:
        from blip2_embed.encoder import Blip2Encoder

        device = recipe.device
        if device is None:
            import ray

            device = "cuda" if ray.get_gpu_ids() else "cpu"
        encoder = Blip2Encoder.from_pretrained(
            retrieval=recipe.retrieval, caption=recipe.caption, device=device, dtype=recipe.dtype,
            batch_size=recipe.batch_size,
        )  # fmt: skip
        self.worker = InferenceWorker(encoder, max_batch=recipe.max_batch)
        self.worker.start()

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        return await self.worker.embed_texts(texts)

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        return await self.worker.text_truncation(texts)

    async def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return await self.worker.embed_images(pixels)

    async def score(self, pixels: np.ndarray, text: str | None, kwargs: dict[str, Any]) -> ScoreResult:
        return await self.worker.score(pixels, text, **kwargs)


class RayModels:
    """The ingress's model client: round-robin over replica actors (restarted by Ray if they die)."""

    def __init__(self, recipe: ModelRecipe, *, replicas: int = 1, num_gpus: float = 0.0) -> None:
        import ray

        actor = ray.remote(ModelReplica).options(
            max_restarts=-1, max_task_retries=-1, num_cpus=0, num_gpus=num_gpus, max_concurrency=64
        )
        self.replicas: list[Any] = [actor.remote(recipe) for _ in range(replicas)]
        self._next = itertools.cycle(self.replicas)
        self._started = False

    def start(self) -> None:
        import ray

        ray.get([r.embed_texts.remote([""]) for r in self.replicas])  # loaded before the first request
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r)
        self._started = False

    @property
    def pending(self) -> int:
        return 0

    @property
    def alive(self) -> bool:
        return self._started

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return await getattr(next(self._next), method).remote(*args)
        except RayTaskError as exc:  # the replica's own error (an InvalidInput): raise it as such
            raise exc.as_instanceof_cause() from None

    async def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        vecs, cut = await self._call("embed_texts", texts)
        return vecs, cut

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        cut: list[bool] = await self._call("text_truncation", texts)
        return cut

    async def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        vecs: np.ndarray = await self._call("embed_images", pixels)
        return vecs

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
        kwargs = {
            "itm_rows": itm_rows,
            "caption_rows": caption_rows,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
        }
        result: ScoreResult = await self._call("score", pixels, text, kwargs)
        return result

"""Model replicas as a Ray Serve deployment (``blip2-models``): each replica holds a ``Blip2Encoder``
behind the single-process server's own ``InferenceWorker`` (same batching of concurrent requests, input
checks and error isolation), with ``num_gpus`` per replica and autoscaling bounds. ``ServeModels`` is
the ``InferenceWorker`` the ingress's ``SearchService`` uses instead: the same coroutines, answered
through a ``DeploymentHandle`` (Serve routes each call to the least busy replica and restarts dead ones).

Replicas keep no per-request state: autoscaling may remove a replica between a re-rank and the
captions of its top hits, and Serve routes the two calls independently. So ``score(keep_features=True)``
returns the ViT features to the ingress, and ``caption_kept`` sends the chosen rows back; still one
ViT pass (the cost: the features of the re-ranked images travel twice, T x W floats per image).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from blip2_embed.encoder import Blip2Encoder, VisionFeatures
from search_api.service.inference import InferenceWorker, KeptFeatures, ScoreResult

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]

APP_NAME = "blip2-models"


@dataclass(frozen=True)
class ModelRecipe:
    """What ``Blip2Encoder.from_pretrained`` takes (``Settings.encoder_options``) and the batch cap."""

    encoder_options: dict[str, Any]
    max_batch: int


@dataclass(frozen=True)
class ModelScaling:
    """The deployment's replica bounds (Serve autoscales between them on ongoing requests per replica)
    and resources per replica. ``num_gpus=None``: 1 when the cluster has a GPU, else 0."""

    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus: float | None = None
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 64  # a replica's queue; its worker batches what waits there

    def resolved_gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        import ray

        return 1.0 if float(ray.cluster_resources().get("GPU", 0)) >= 1 else 0.0


class ModelReplica:
    """One Serve replica: requests from many ingress calls batch on its worker thread."""

    def __init__(self, recipe: ModelRecipe) -> None:
        options = dict(recipe.encoder_options)
        if options.get("device") in (None, "", "auto"):
            import ray

            options["device"] = "cuda" if ray.get_gpu_ids() else "cpu"
        encoder = Blip2Encoder.from_pretrained(**options)
        self.device = encoder.device
        self.worker = InferenceWorker(encoder, max_batch=recipe.max_batch)
        self.worker.start()

    async def embed_texts(self, texts: list[str]) -> tuple[Floats, list[bool]]:
        return await self.worker.embed_texts(texts)

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        return await self.worker.text_truncation(texts)

    async def embed_images(self, pixels: Floats) -> Floats:
        return await self.worker.embed_images(pixels)

    async def score(
        self, pixels: Floats, text: str | None, kwargs: dict[str, Any]
    ) -> tuple[ScoreResult, VisionFeatures | None]:
        result = await self.worker.score(pixels, text, **kwargs)
        feats = None
        if result.kept is not None:  # leaves with the answer (see the module docstring)
            feats = _moved(self.worker.take_kept(result.kept), "cpu")
            result.kept = None
        return result, feats

    async def caption_kept(
        self, feats: VisionFeatures, rows: list[int], kwargs: dict[str, Any]
    ) -> dict[int, str]:
        kept = self.worker.adopt_kept(_moved(feats, self.device))
        try:
            return await self.worker.caption_kept(kept, rows, **kwargs)
        finally:
            self.worker.release(kept)

    def check_health(self) -> None:  # Serve's health check: a dead worker thread restarts the replica
        if not self.worker.alive:
            raise RuntimeError("the model worker thread stopped")


def _moved(feats: VisionFeatures, device: Any) -> VisionFeatures:
    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    hidden = feats.hidden.to(device)
    return VisionFeatures(hidden, to(feats.pixels), to(feats._caption_hidden))


def deploy(recipe: ModelRecipe, scaling: ModelScaling) -> Any:
    """Start (or update) the ``blip2-models`` Serve application; returns its ``DeploymentHandle`` once
    ``min_replicas`` replicas have loaded. Serve runs without its HTTP proxy: the FastAPI app is the
    ingress."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(
        ModelReplica,
        name="models",
        ray_actor_options={"num_cpus": 0, "num_gpus": scaling.resolved_gpus()},
        max_ongoing_requests=scaling.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "max_replicas": max(scaling.min_replicas, scaling.max_replicas),
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
    )
    return serve.run(deployment.bind(recipe), name=APP_NAME, route_prefix=None)


class ServeModels(InferenceWorker):
    """An ``InferenceWorker`` whose model runs in the ``blip2-models`` Serve deployment."""

    def __init__(self, encoder: Blip2Encoder, recipe: ModelRecipe, scaling: ModelScaling) -> None:
        super().__init__(encoder, max_batch=recipe.max_batch)  # its thread is never started
        self.recipe, self.scaling = recipe, scaling
        self.handle: Any = None
        self._features: dict[int, VisionFeatures] = {}  # our token -> features sent back by a replica
        self._tokens = itertools.count(1)
        self._features_lock = threading.Lock()

    def start(self) -> None:
        self.handle = deploy(self.recipe, self.scaling)  # waits for the replicas' model loads

    def stop(self, timeout: float = 10.0) -> None:
        from ray import serve

        if self.handle is not None:
            self.handle = None
            serve.delete(APP_NAME)

    @property
    def pending(self) -> int:
        return 0  # each replica batches its own queue

    @property
    def alive(self) -> bool:
        return self.handle is not None

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as exc:  # the replica's own error (InvalidInput...): raise it as that type
            raise exc.as_instanceof_cause() from None

    async def embed_texts(self, texts: list[str]) -> tuple[Floats, list[bool]]:
        vecs, cut = await self._call("embed_texts", texts)
        return vecs, cut

    async def text_truncation(self, texts: list[str]) -> list[bool]:
        cut: list[bool] = await self._call("text_truncation", texts)
        return cut

    async def embed_images(self, pixels: Floats) -> Floats:
        vecs: Floats = await self._call("embed_images", pixels)
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
        kwargs = {"itm_rows": itm_rows, "caption_rows": caption_rows, "prompt": prompt,
                  "max_new_tokens": max_new_tokens, "keep_features": keep_features}  # fmt: skip
        result: ScoreResult
        result, feats = await self._call("score", pixels, text, kwargs)
        if feats is not None:
            with self._features_lock:
                token = next(self._tokens)
                self._features[token] = feats
            result.kept = KeptFeatures(token, len(feats))
        return result

    async def caption_kept(
        self, kept: KeptFeatures, rows: list[int], *, prompt: str | None = None, max_new_tokens: int = 30
    ) -> dict[int, str]:
        with self._features_lock:
            feats = self._features[kept.token]
        texts: dict[int, str] = await self._call(
            "caption_kept", feats[torch.as_tensor(rows, dtype=torch.long)], list(range(len(rows))),
            {"prompt": prompt, "max_new_tokens": max_new_tokens},
        )  # fmt: skip
        self.release(kept)  # used, like the single-process worker's
        return {orig: texts[n] for n, orig in enumerate(rows)}

    def release(self, kept: KeptFeatures | None) -> None:
        if kept is not None:
            with self._features_lock:
                self._features.pop(kept.token, None)

    @property
    def kept_features(self) -> int:
        with self._features_lock:
            return len(self._features)

"""The decode + model phase of an indexing run on a Ray cluster (``blip2-search index --engine ray``).

The driver (this process) scans, plans and owns the catalog exactly as in a local run; only the work
items travel. Ray Data runs two stages over them:

- CPU tasks read each file (a local/shared path, or ``s3://`` through pyarrow) and run the indexer's
  own decode (``indexer.decode.decode_bytes``): sha256, decode, resize, thumbnail, the stored copy of
  the model input. What leaves a task is the uint8 model input, never the full decoded image.
- an actor pool of encoders (``num_gpus=1`` each on GPU nodes, CPU actors otherwise) normalises the
  batch and runs ``indexer.pipeline.run_model`` (ViT once, ITC embeddings and captions), then drops the
  pixels so only vectors, captions and the small files come back.

Rows stream back in input order (``preserve_order``) and ``Indexer.commit_stream`` commits them with
the local indexer's transactions, so a run killed anywhere resumes like a local one. Ray Data retries
a task whose worker died and restarts a dead actor, re-running its batch (its defaults: unlimited
retries for system failures); a row is committed only once it reached the driver, so nothing is lost
or written twice.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.decode import DecodeConfig, Decoded, DecodeFailure, decode_bytes, read_failure
from indexer.phases import EngineRow

if TYPE_CHECKING:
    from indexer.diff import WorkItem
    from indexer.phases import Indexer
    from indexer.summary import RunSummary

log = logging.getLogger(__name__)


class RayEngineError(RuntimeError):
    """A cluster problem the CLI reports in one line (exit 1)."""


@dataclass(frozen=True)
class EncoderRecipe:
    """How an encoder actor loads its models: what ``Blip2Encoder.from_pretrained`` takes."""

    retrieval: str | None
    caption: str | None
    device: str | None = None  # None: the actor's GPU when it has one, else the CPU
    dtype: str | None = None
    batch_size: int = 32


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray (or use the one this process already has)
    encoders: int | None = None  # actor pool size; None: one per GPU, else from the CPUs
    gpus_per_encoder: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_encoder: float = 1.0
    decode_cpus: float = 1.0  # CPUs per decode task


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one); token auth problems become one line."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            ignore_reinit_error=True,
        )
    except Exception as exc:
        from ray.exceptions import AuthenticationError

        text = str(exc)
        if isinstance(exc, AuthenticationError) or "auth_token" in text or "authentication" in text.lower():
            raise RayEngineError(
                f"the Ray cluster at {address} refused this driver's token: copy the cluster's "
                "~/.ray/auth_token to this machine or set RAY_AUTH_TOKEN (docs/scale-out.md)"
            ) from exc
        raise RayEngineError(f"cannot join the Ray cluster at {address or 'local'}: {text[:300]}") from exc


def driver_is_alone() -> bool:
    """True when every alive node of the cluster is the driver's machine."""
    import ray

    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))


def check_catalog_shareable(database_url: str) -> None:
    """A SQLite catalog is a file on the driver's disk: fine for a one-machine Ray, refused for a cluster
    (the search servers and a resumed driver on another node would not see it)."""
    if database_url.startswith("sqlite") and not driver_is_alone():
        raise RayEngineError(
            "a SQLite catalog cannot serve a multi-node Ray cluster: set BLIP2_DATABASE_URL to a Postgres "
            "database every node reaches (postgresql+psycopg://...)"
        )


# ---------------------------------------------------------------------------------- cluster side
def read_bytes(path: str) -> bytes:
    """A file's bytes: ``s3://`` (and other URIs pyarrow knows) through pyarrow, else the local path."""
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as fh:
            return bytes(fh.read())
    with open(path, "rb") as fh:
        return fh.read()


def decode_batch(batch: dict[str, np.ndarray], config: DecodeConfig) -> dict[str, np.ndarray]:
    """Ray Data CPU task: the indexer's decode of each path; results pickled (dataclasses with numpy)."""
    out = []
    for path in batch["path"]:
        try:
            data = read_bytes(str(path))
        except OSError as exc:
            result: Decoded | DecodeFailure = read_failure(str(path), exc)
        else:
            result = decode_bytes(data, str(path), config)
        out.append(pickle.dumps(result, protocol=5))
    return {"i": batch["i"], "embed": batch["embed"], "caption": batch["caption"], "result": _objects(out)}


def _objects(items: list[Any]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


class EncoderActor:
    """Ray Data actor: one encoder, loaded once; normalise + ``run_model`` per batch of decoded rows."""

    def __init__(
        self,
        recipe: EncoderRecipe,
        model_key: str,
        caption_key: str | None,
        prompt: str | None,
    ) -> None:
        from blip2_embed.encoder import Blip2Encoder

        device = recipe.device
        if device is None:
            import ray

            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.encoder = Blip2Encoder.from_pretrained(
            retrieval=recipe.retrieval,
            caption=recipe.caption,
            device=device,
            dtype=recipe.dtype,
            batch_size=recipe.batch_size,
        )
        if self.encoder.retrieval_key != model_key or (
            caption_key and self.encoder.caption_key != caption_key
        ):
            # Another checkpoint on this node would mix two models' vectors in one catalog.
            raise RayEngineError(
                f"the encoder on node {os.uname().nodename} loaded other weights than the driver "
                f"({self.encoder.retrieval_key} != {model_key}): give every node the same checkpoints"
            )
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from blip2_embed.images import normalise
        from indexer.pipeline import run_model

        results = [pickle.loads(r) for r in batch["result"]]
        rows = [n for n, r in enumerate(results) if isinstance(r, Decoded)]
        embeddings: list[np.ndarray | None] = [None] * len(results)
        captions: list[str | None] = [None] * len(results)
        if rows:
            pixels = normalise(np.stack([results[n].model_input for n in rows]), self.encoder.spec)
            out = run_model(
                self.encoder,
                pixels,
                [bool(batch["embed"][n]) for n in rows],
                [bool(batch["caption"][n]) for n in rows],
                self.prompt,
            )
            for n, emb, cap in zip(rows, out.embeddings, out.captions, strict=True):
                embeddings[n], captions[n] = emb, cap
        # One pickled (result, embedding, caption) per row: Arrow would turn a missing caption into NaN.
        # The pixels stay here: the driver needs only what it writes (vectors, files, metadata).
        shipped = [
            pickle.dumps(
                (replace(r, model_input=np.empty((0,), np.uint8)) if isinstance(r, Decoded) else r, e, c),
                protocol=5,
            )
            for r, e, c in zip(results, embeddings, captions, strict=True)
        ]
        return {"i": batch["i"], "out": _objects(shipped)}


# ---------------------------------------------------------------------------------- driver side
class RayEngine:
    """``indexer.run.ModelEngine`` on Ray Data; see the module docstring."""

    def __init__(
        self,
        recipe: EncoderRecipe,
        options: RayOptions | None = None,
        *,
        decode: Callable[[dict[str, np.ndarray], DecodeConfig], dict[str, np.ndarray]] = decode_batch,
        encoder_actor: type[EncoderActor] = EncoderActor,
    ) -> None:
        """``decode`` and ``encoder_actor`` are the two stages (a caller may wrap them, e.g. to observe
        or fault-inject; the tests kill them mid-run this way)."""
        self.recipe = recipe
        self.options = options or RayOptions()
        self.decode = decode
        self.encoder_actor = encoder_actor

    def pool(self) -> tuple[int, float]:
        """(encoders, GPUs per encoder) from the flags or the cluster's resources."""
        import ray

        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0))
        per = self.options.gpus_per_encoder
        if per is None:
            per = 1.0 if gpus >= 1 else 0.0
        n = self.options.encoders
        if n is None:
            if per > 0:
                n = max(1, int(gpus // per))
            else:
                # Leave about half the CPUs to the decode tasks that feed the encoders.
                n = max(1, int(float(res.get("CPU", 2)) // (2 * self.options.cpus_per_encoder)))
        return n, per

    def embed(self, indexer: Indexer, work: list[WorkItem], summary: RunSummary) -> Iterator[EngineRow]:
        import ray
        import ray.data

        connect(self.options.address)
        config = indexer.decode_config()
        batch = indexer.options.batch_size
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the local indexer's order, batch for batch
        ctx.enable_progress_bars = False  # the CLI draws one progress display
        ctx.print_on_execution_start = False
        rows = [
            {"i": n, "path": str(w.path), "embed": w.embed, "caption": w.caption} for n, w in enumerate(work)
        ]
        encoders, gpus = self.pool()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch)))
        extra: dict[str, Any] = {}
        store_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        if store_env and any("://" in str(r["path"]) for r in rows):
            # Object-store reads in the tasks use the driver's endpoint and credentials.
            extra["runtime_env"] = {"env_vars": store_env}
        ds = ds.map_batches(
            self.decode,
            fn_kwargs={"config": config},
            batch_size=batch,
            num_cpus=self.options.decode_cpus,
            batch_format="numpy",
            **extra,
        )
        ds = ds.map_batches(
            self.encoder_actor,
            fn_constructor_kwargs={
                "recipe": self.recipe,
                "model_key": indexer.model_key,
                "caption_key": indexer.caption_key,
                "prompt": indexer.options.caption_prompt,
            },
            batch_size=batch,
            compute=ray.data.ActorPoolStrategy(size=encoders),
            num_gpus=gpus,
            num_cpus=self.options.cpus_per_encoder if gpus == 0 else 1,
            # Spread the encoders over the nodes. It also keeps Ray Data from fusing the decode tasks
            # into the CPU encoder actors (equal resources fuse), which would decode serially in them.
            scheduling_strategy="SPREAD",
            batch_format="numpy",
        )
        log.info("ray: %d encoder actor(s), %s GPU each, %d items", encoders, gpus, len(rows))
        for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for i, row in zip(out["i"], out["out"], strict=True):
                result, embedding, caption = pickle.loads(row)
                yield EngineRow(work[int(i)], result, embedding, caption)


def engine_from_settings(
    settings: Any, *, caption: bool, address: str | None, encoders: int | None
) -> RayEngine:
    """The engine for the CLI's settings: joins (or starts) Ray and checks the catalog can be shared."""
    connect(address)
    check_catalog_shareable(settings.resolved_database_url)
    recipe = EncoderRecipe(
        retrieval=settings.retrieval_model,
        caption=(settings.caption_model or None) if caption else None,
        device=None if settings.device in (None, "", "auto") else settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
    )
    return RayEngine(recipe, RayOptions(address=address, encoders=encoders))

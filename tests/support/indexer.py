"""Helpers shared by the indexer tests: tiny photo libraries and a readable dump of catalog + index."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.db import make_engine, session_factory, upgrade
from catalog.index_store import index_path
from catalog.models import Caption, Embedding, File, IndexState, LibraryRoot
from catalog.models import Image as ImageRow
from catalog.vector_index import MultiVectorIndex
from indexer.run import IndexOptions, IndexTarget, RunSummary, run_index

REPO = Path(__file__).resolve().parents[2]


def cli_env(tiny_checkpoints, data: Path, batch_size: int, **extra: str) -> dict[str, str]:
    """The environment of a ``blip2-search`` subprocess on the tiny checkpoints: this process's without
    its BLIP2_* settings, offline, importing this checkout; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2_")}
    env.update(
        BLIP2_DATA_DIR=str(data),
        BLIP2_RETRIEVAL_MODEL=str(tiny_checkpoints.retrieval),
        BLIP2_CAPTION_MODEL=str(tiny_checkpoints.caption),
        BLIP2_DEVICE="cpu",
        BLIP2_BATCH_SIZE=str(batch_size),
        BLIP2_THUMBNAIL_SIZE="32",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 48), **params) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth blocks rather than noise, so JPEG files stay small and decode identically everywhere.
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG", **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt, **params))
    return path


@dataclass
class CatalogDump:
    """Everything a run leaves behind, keyed by content rather than by row id (ids differ across runs)."""

    files: dict[str, tuple[str, str | None, str | None]]  # "root-name/rel" -> (status, sha, error slug)
    embedded: dict[str, bytes]  # sha -> vectors blob
    captions: dict[str, str]
    live: set[str]
    index: set[str]  # shas of the ids in the saved vector index
    open_generation: int
    published_generation: int
    index_generation: int | None


def dump(engine, model_key: str, index_dir: Path) -> CatalogDump:
    with Session(engine) as s:
        sha_of = dict(s.execute(select(ImageRow.id, ImageRow.sha256)).all())
        roots = dict(s.execute(select(LibraryRoot.id, LibraryRoot.path)).all())
        files = {}
        for root_id, rel, status, image_id, error in s.execute(
            select(File.root_id, File.relative_path, File.status, File.image_id, File.error)
        ):
            slug = error.split(":", 1)[0] if error else None
            files[f"{Path(roots[root_id]).name}/{rel}"] = (str(status.value), sha_of.get(image_id), slug)
        embedded = {
            sha_of[i]: blob
            for i, blob in s.execute(
                select(Embedding.image_id, Embedding.vectors).where(Embedding.model_key == model_key)
            )
        }
        captions = {sha_of[i]: text for i, text in s.execute(select(Caption.image_id, Caption.text))}
        live = {sha for sha, is_live in s.execute(select(ImageRow.sha256, ImageRow.is_live)) if is_live}
        state = s.execute(select(IndexState.open_generation, IndexState.published_generation)).one()
    path = index_path(index_dir, model_key)
    index_ids: set[str] = set()
    index_gen = None
    if path.exists():
        idx, index_gen = MultiVectorIndex.load(path)
        index_ids = {sha_of[int(i)] for i in idx.ids()}
    return CatalogDump(files, embedded, captions, live, index_ids, state[0], state[1], index_gen)


class CountingEncoder:
    """Wraps an encoder and counts the images each model entry point sees."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder
        self.calls: dict[str, int] = {"vision_features": 0, "embed_images": 0, "caption": 0}

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def vision_features(self, images):
        self.calls["vision_features"] += len(images)
        return self._encoder.vision_features(images)

    def embed_images(self, images):
        self.calls["embed_images"] += len(images)
        return self._encoder.embed_images(images)

    def caption(self, images, *args, **kwargs):
        self.calls["caption"] += len(images)
        return self._encoder.caption(images, *args, **kwargs)

    @property
    def model_calls(self) -> int:
        return sum(self.calls.values())


class Env:
    """One data dir: catalog, index folder, thumbnails; ``index()`` runs the indexer like the CLI does."""

    def __init__(self, tmp: Path, encoder, url: str | None = None) -> None:
        self.tmp = tmp
        self.lib = tmp / "lib"
        self.lib.mkdir()
        url = url or f"sqlite:///{tmp / 'catalog.db'}"
        upgrade(url)
        self.url = url
        self.engine = make_engine(url)
        self.sessions = session_factory(self.engine)
        self.index_dir = tmp / "index"
        self.thumbs = tmp / "thumbs"
        self.encoder = CountingEncoder(encoder)

    @property
    def target(self) -> IndexTarget:
        return IndexTarget(self.url, self.tmp / "indexer.lock", self.index_dir)

    def index(self, *roots: Path, progress=None, **options) -> RunSummary:
        self.encoder.calls = dict.fromkeys(self.encoder.calls, 0)
        opts = IndexOptions(
            roots=list(roots) or [self.lib],
            batch_size=options.pop("batch_size", 3),
            workers=options.pop("workers", 0),
            thumbnail_dir=self.thumbs,
            thumbnail_size=32,
            **options,
        )
        return run_index(self.target, self.encoder, opts, progress=progress)

    def dump(self):
        return dump(self.engine, self.encoder.retrieval_key, self.index_dir)


class NulCaptions(CountingEncoder):
    """The real encoder, with its caption model made to emit NUL every other token (through a
    ``generate`` logits processor), as a real caption model can."""

    def __init__(self, encoder) -> None:
        super().__init__(encoder)
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        tok = encoder.caption_tokenizer
        (nul,) = tok("\x00", add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id

        class EveryOtherNul(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                scores = scores.clone()
                if input_ids.shape[1] % 2 == 0:
                    scores[:] = -1e9
                    scores[:, nul] = 0.0
                else:
                    scores[:, eos] = -1e9  # keep going, so the caption has words between the NULs
                return scores

        self.processors = LogitsProcessorList([EveryOtherNul()])

    def caption(self, images, *args, **kwargs):
        return super().caption(images, *args, logits_processor=self.processors, **kwargs)

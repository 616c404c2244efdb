"""Retrieval and caption evaluation through the project's own inference code (``Blip2Encoder``).

Retrieval follows the BLIP-2 / LAVIS protocol: ITC similarities rank everything; in each direction
the top ``k`` candidates are re-scored with ``ITM match logit + ITC similarity`` (LAVIS adds the raw
logit of the "match" class, averaged over the queries, to the cosine similarity) and re-sorted, the
rest keep their ITC order below them. Recall@K counts a text -> image query as a hit when its image is
in the top K, and an image -> text query when any of the image's captions is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip2_embed.encoder import Blip2Encoder, VisionFeatures, max_sim
from blip2_train.data import CaptionedImage, load_pixels, normalize
from blip2_train.progress import ProgressCallback
from blip2_train.scenes import SceneRecord, colour_and_shape_named

log = logging.getLogger(__name__)


@dataclass
class Recall:
    r1: float
    r5: float
    r10: float

    @property
    def mean(self) -> float:
        return (self.r1 + self.r5 + self.r10) / 3


@dataclass
class RetrievalReport:
    """Recall@1/5/10 for both directions, ITC alone and ITC top-k re-ranked with ITM."""

    images: int
    texts: int
    k: int
    itc_t2i: Recall
    itc_i2t: Recall
    itm_t2i: Recall
    itm_i2t: Recall

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [
            f"{self.images} images, {self.texts} texts, ITM re-ranks the ITC top {self.k}",
            f"{'':12s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}",
        ]
        for name, rec in (
            ("ITC  t2i", self.itc_t2i),
            ("ITC  i2t", self.itc_i2t),
            ("+ITM t2i", self.itm_t2i),
            ("+ITM i2t", self.itm_i2t),
        ):
            rows.append(f"{name:12s} {rec.r1:6.3f} {rec.r5:6.3f} {rec.r10:6.3f}")
        return "\n".join(rows)


def recall(ranks: np.ndarray) -> Recall:
    """Recall@1/5/10 from the 0-based rank of each query's best correct answer."""
    return Recall(*(float(np.mean(ranks < k)) for k in (1, 5, 10)))


def _ranks(scores: np.ndarray, correct: Sequence[set[int]]) -> np.ndarray:
    """0-based rank of the first correct column in each row of ``scores`` (higher = better)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    out = np.empty(len(order), dtype=np.int64)
    for i, row in enumerate(order):
        out[i] = next(r for r, j in enumerate(row) if j in correct[i])
    return out


def _rerank(itc: np.ndarray, k: int, itm_logit: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Scores where each row's ITC top-k become ``ITM logit + ITC sim`` and sit above the rest.

    ``itm_logit(rows, cols)`` returns the match logits of those pairs (one batched call).
    """
    k = min(k, itc.shape[1])
    top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(len(itc)), k)
    cols = top.reshape(-1)
    logits = itm_logit(rows, cols)
    # Outside the top k: ITC order, shifted below every re-ranked score.
    out = itc - (np.abs(itc).max() + np.abs(logits).max() + itc.max() + 10.0)
    out[rows, cols] = logits + itc[rows, cols]
    return out


def pixels_of(items: Sequence[CaptionedImage], encoder: Blip2Encoder) -> torch.Tensor:
    return normalize(load_pixels([i.image for i in items], encoder.spec), encoder.spec)


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def evaluate_retrieval(
    encoder: Blip2Encoder,
    items: Sequence[CaptionedImage],
    k: int = 16,
    itm_batch: int = 512,
    progress: ProgressCallback | None = None,
    chunk: int = 256,
) -> RetrievalReport:
    """Image-text retrieval on ``items`` (each image with its captions), both directions.

    ``progress(phase, done, total)`` hears about each chunk of images and texts and each ITM batch.
    """
    report = progress or _no_progress
    texts = [c for item in items for c in item.captions]
    text_image = np.array([i for i, item in enumerate(items) for _ in item.captions])
    hidden, image_vecs = [], []
    for s in range(0, len(items), chunk):
        part = encoder.vision_features(pixels_of(items[s : s + chunk], encoder))
        hidden.append(part.hidden)
        image_vecs.append(encoder.embed_images(part))
        report("images", min(s + chunk, len(items)), len(items))
    feats = VisionFeatures(hidden=torch.cat(hidden))
    text_parts = []
    for s in range(0, len(texts), 4 * chunk):
        text_parts.append(encoder.embed_texts(texts[s : s + 4 * chunk]))
        report("texts", min(s + 4 * chunk, len(texts)), len(texts))
    itc = max_sim(np.concatenate(image_vecs), np.concatenate(text_parts))  # (N images, M texts)

    def itm_logit(image_idx: np.ndarray, text_idx: np.ndarray, phase: str) -> np.ndarray:
        out = []
        for s in range(0, len(image_idx), itm_batch):
            ii, tt = image_idx[s : s + itm_batch], text_idx[s : s + itm_batch]
            sub = VisionFeatures(hidden=feats.hidden[torch.as_tensor(ii)])
            out.append(encoder.itm(sub, [texts[t] for t in tt]).logits[:, 1])
            report(phase, min(s + itm_batch, len(image_idx)), len(image_idx))
        return np.concatenate(out)

    t2i_correct = [{int(i)} for i in text_image]
    i2t_correct = [set(np.flatnonzero(text_image == i).tolist()) for i in range(len(items))]
    itc_t2i = recall(_ranks(itc.T, t2i_correct))
    itc_i2t = recall(_ranks(itc, i2t_correct))
    t2i_scores = _rerank(itc.T, k, lambda t, i: itm_logit(i, t, "ITM re-rank, text -> image"))
    itm_t2i = recall(_ranks(t2i_scores, t2i_correct))
    itm_i2t = recall(
        _ranks(_rerank(itc, k, lambda i, t: itm_logit(i, t, "ITM re-rank, image -> text")), i2t_correct)
    )
    return RetrievalReport(len(items), len(texts), k, itc_t2i, itc_i2t, itm_t2i, itm_i2t)


@dataclass
class ShortQueryReport:
    """Top-1 of short colour + shape queries ("the red circle") over a gallery of scenes."""

    queries: int
    itc: float  # share whose ITC top hit has the query's colour and shape
    itm: float  # the same after ITM re-ranks the ITC top k (the search API's re-rank)
    colour_itc: float  # share whose ITC top hit has the right colour (any shape)
    k: int


SHORT_TEMPLATES: tuple[str, ...] = ("the {colour} {shape}", "a {colour} {shape}")


def short_query_accuracy(
    encoder: Blip2Encoder,
    records: Sequence[SceneRecord],
    root: str,
    k: int = 16,
    templates: Sequence[str] = SHORT_TEMPLATES,
) -> ShortQueryReport:
    """Each (colour, shape) of the single-object gallery, in each template, as a text query: does the
    top image have that colour and that shape? ITC alone and ITC top-k re-ranked by ``ITM + ITC``."""
    items = [CaptionedImage(Path(root) / r.image, tuple(r.captions)) for r in records]
    attrs = [(r.objects[0]["colour"], r.objects[0]["shape"]) for r in records]
    combos = sorted(set(attrs))
    texts = [t.format(colour=c, shape=s) for c, s in combos for t in templates]
    wanted = [(c, s) for c, s in combos for _ in templates]
    feats = encoder.vision_features(pixels_of(items, encoder))
    itc = max_sim(encoder.embed_images(feats), encoder.embed_texts(texts)).T  # (texts, images)
    depth = min(k, len(items))
    top = np.argsort(-itc, axis=1, kind="stable")[:, :depth]
    rows = np.repeat(np.arange(len(texts)), depth)
    cols = top.reshape(-1)
    logits = encoder.itm(
        VisionFeatures(hidden=feats.hidden[torch.as_tensor(cols)]), [texts[r] for r in rows]
    ).logits[:, 1]
    fused = (logits + itc[rows, cols]).reshape(len(texts), depth)
    best_itc = top[:, 0]
    best_itm = top[np.arange(len(texts)), np.argmax(fused, axis=1)]
    hit_itc = [attrs[j] == w for j, w in zip(best_itc, wanted, strict=True)]
    hit_itm = [attrs[j] == w for j, w in zip(best_itm, wanted, strict=True)]
    colour = [attrs[j][0] == w[0] for j, w in zip(best_itc, wanted, strict=True)]
    return ShortQueryReport(
        len(texts), float(np.mean(hit_itc)), float(np.mean(hit_itm)), float(np.mean(colour)), depth
    )


@dataclass
class CaptionReport:
    accuracy: float  # share naming every object's colour and shape ("red circle")
    colour_accuracy: float  # share naming every object's colour
    shape_accuracy: float  # share naming every object's shape
    n: int
    examples: list[tuple[str, str]]  # (reference caption, generated caption)


def caption_accuracy(
    encoder: Blip2Encoder, records: Sequence[SceneRecord], root: str, max_new_tokens: int = 24
) -> CaptionReport:
    """Share of generated scene captions that name each object's colour and shape (greedy decoding)."""
    items = [CaptionedImage(Path(root) / r.image, tuple(r.captions)) for r in records]
    captions = encoder.caption(pixels_of(items, encoder), max_new_tokens=max_new_tokens)
    pairs = list(zip(captions, records, strict=True))
    hits = [colour_and_shape_named(c, r.objects) for c, r in pairs]
    colours = [all(o["colour"] in c.split() for o in r.objects) for c, r in pairs]
    shapes = [all(o["shape"] in c.split() for o in r.objects) for c, r in pairs]
    examples = [(r.captions[0], c) for c, r in pairs]
    return CaptionReport(
        float(np.mean(hits)), float(np.mean(colours)), float(np.mean(shapes)), len(hits), examples
    )


def blind_recall(records: Sequence[SceneRecord], attribute: str = "position") -> float:
    """Expected text -> image R@1 of a model that reads every attribute of a single-object scene except
    ``attribute`` ("position", "size", ...): each caption's image ties with every image that differs
    from it only there, and one of the tied images is drawn at random.

    This is the ceiling of a model blind to that attribute; on 300 scenes it is 0.80-0.85 for position.
    """

    def key(r: SceneRecord) -> tuple[object, ...]:
        obj = {k: v for k, v in r.objects[0].items() if k != attribute}
        return (r.background if attribute != "background" else None, *sorted(obj.items()))

    counts: dict[tuple[object, ...], int] = {}
    for r in records:
        counts[key(r)] = counts.get(key(r), 0) + 1
    return float(np.mean([1 / counts[key(r)] for r in records]))

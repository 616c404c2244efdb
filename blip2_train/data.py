"""Image-caption datasets: readers for the common layouts, preprocessing and batching.

Readers return :class:`CaptionedImage` rows (absolute image path, captions, split). Supported inputs:

- JSONL, one object per line: ``{"image": "rel/or/abs.jpg", "caption": "..."}`` or ``"captions": [...]``
  (``"file_name"``, ``"filepath"`` and ``"path"`` are accepted for the image key);
- the Karpathy split JSON of COCO / Flickr30K (``{"images": [{"filepath", "filename", "split",
  "sentences": [{"raw"}]}]}``);
- COCO ``captions_*.json`` (``images`` + ``annotations`` with ``image_id`` / ``caption``);
- a JSON list of LAVIS-style objects (``[{"image": ..., "caption": ... | [...]}]``);
- a folder of images with a ``.txt`` file of captions (one a line) beside each image.

Relative image paths resolve against ``image_root`` (default: the caption file's folder).
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from blip2_embed.encoder import lm_text_ids
from blip2_embed.images import ImageSpec, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class CaptionedImage:
    image: Path
    captions: tuple[str, ...]
    split: str = "train"
    # Partial descriptions (search-style queries, a JSONL line's "queries"): retrieval training mixes
    # them into its texts; captioning never trains on them.
    queries: tuple[str, ...] = ()
    # Hard negatives (a JSONL line's "negatives"): texts that nearly describe this image but not quite
    # (one attribute changed); retrieval training may contrast the image with them.
    negatives: tuple[str, ...] = ()
    # Look-alikes (a JSONL line's "near"): other images of the dataset that nearly match this one's
    # texts; hard-negative batches put them beside it.
    near: tuple[Path, ...] = ()

    def texts(self) -> frozenset[str]:
        """Every text that describes this image: a text of the batch is a positive when it is one."""
        return frozenset(self.captions) | frozenset(self.queries)


# ---------------------------------------------------------------------------------------------- readers
def _image_key(obj: dict[str, Any]) -> str:
    for key in ("image", "file_name", "filepath", "path", "img"):
        if key in obj and isinstance(obj[key], str):
            return obj[key]
    raise ValueError(f"no image path in {sorted(obj)} (expected one of image, file_name, filepath, path)")


def _caption_list(obj: dict[str, Any]) -> list[str]:
    value = obj.get("captions", obj.get("caption", obj.get("text")))
    if value is None and "sentences" in obj:
        value = [s["raw"] if isinstance(s, dict) else s for s in obj["sentences"]]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        return [str(v) for v in value]
    raise ValueError(f"no caption in {sorted(obj)} (expected caption, captions, text or sentences)")


def _merge(rows: list[tuple[str, list[str], str]], root: Path) -> list[CaptionedImage]:
    """Rows of (path, captions, split) -> one CaptionedImage per image, captions of repeats joined."""
    by_path: dict[str, list[str]] = defaultdict(list)
    split_of: dict[str, str] = {}
    for path, caps, split in rows:
        by_path[path].extend(caps)
        split_of.setdefault(path, split)
    return [
        CaptionedImage(
            image=(root / p) if not Path(p).is_absolute() else Path(p),
            captions=tuple(caps),
            split=split_of[p],
        )
        for p, caps in by_path.items()
    ]


def _from_json(data: object, root: Path) -> list[CaptionedImage]:
    if isinstance(data, dict) and "images" in data and "annotations" in data:  # COCO captions_*.json
        names = {img["id"]: img["file_name"] for img in data["images"]}
        rows = [(names[a["image_id"]], [a["caption"]], "train") for a in data["annotations"]]
        return _merge(rows, root)
    if isinstance(data, dict) and "images" in data:  # Karpathy split
        rows = []
        for img in data["images"]:
            rel = (
                str(Path(img.get("filepath", "")) / img["filename"]) if "filename" in img else _image_key(img)
            )
            split = img.get("split", "train")
            rows.append((rel, _caption_list(img), "train" if split == "restval" else split))
        return _merge(rows, root)
    if isinstance(data, list):  # LAVIS-style list
        return _merge([(_image_key(o), _caption_list(o), o.get("split", "train")) for o in data], root)
    raise ValueError("unrecognised caption JSON: expected Karpathy, COCO captions or a list of objects")


def _from_folder(folder: Path) -> list[CaptionedImage]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
            caps = [c.strip() for c in path.with_suffix(".txt").read_text().splitlines() if c.strip()]
            if caps:
                out.append(CaptionedImage(image=path, captions=tuple(caps)))
    return out


def _texts_by_image(objs: list[dict[str, Any]], key: str, root: Path) -> dict[Path, tuple[str, ...]]:
    """A JSONL key's string lists ("queries", "negatives", "near") per image path, repeats dropped."""
    out: dict[Path, list[str]] = {}
    for o in objs:
        if o.get(key):
            rel = Path(_image_key(o))
            out.setdefault(rel if rel.is_absolute() else root / rel, []).extend(o[key])
    return {path: tuple(dict.fromkeys(texts)) for path, texts in out.items()}


def load_captions(
    source: str | Path, image_root: str | Path | None = None, split: str | None = None
) -> list[CaptionedImage]:
    """Read a caption file (JSONL / JSON, layout detected) or a folder; keep one ``split`` if given.

    A folder with a ``captions.jsonl`` (what ``blip2-search scenes`` writes) reads that file.
    """
    source = Path(source)
    if source.is_dir():
        if (source / "captions.jsonl").is_file():
            source = source / "captions.jsonl"
        else:
            items = _from_folder(source)
            return [i for i in items if split is None or i.split == split]
    root = Path(image_root) if image_root is not None else source.parent
    text = source.read_text()
    if source.suffix == ".jsonl":
        objs = [json.loads(line) for line in text.splitlines() if line.strip()]
        items = _merge([(_image_key(o), _caption_list(o), o.get("split", "train")) for o in objs], root)
        queries, negatives = _texts_by_image(objs, "queries", root), _texts_by_image(objs, "negatives", root)
        near = {
            path: tuple(p if p.is_absolute() else root / p for p in map(Path, rels))
            for path, rels in _texts_by_image(objs, "near", root).items()
        }
        if queries or negatives or near:
            items = [
                replace(
                    i,
                    queries=queries.get(i.image, ()),
                    negatives=negatives.get(i.image, ()),
                    near=near.get(i.image, ()),
                )
                for i in items
            ]
    else:
        items = _from_json(json.loads(text), root)
    if split is not None:
        items = [i for i in items if i.split == split]
    if not items:
        raise ValueError(f"no captioned images in {source}" + (f" for split {split!r}" if split else ""))
    return items


# ---------------------------------------------------------------------------------------------- pixels
def resize_uint8(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> uint8 (3, S, S), resized exactly as ``blip2_embed.images.preprocess`` resizes."""
    resized = image.convert("RGB").resize((spec.size, spec.size), resample=spec.resample)
    return np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalisation_table(spec: ImageSpec) -> torch.Tensor:
    """(3, 256) float32: the model input value of every uint8 level per channel.

    Same arithmetic as ``blip2_embed.images.preprocess`` (rescale in float64, cast to float32, then
    (x - mean) / std in float32), so training sees bit-identical inputs to indexing and search.
    """
    levels = (np.arange(256, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None]
    return torch.from_numpy((levels[None, :] - mean) / std)


def normalize(pixels: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 model input (N, 3, S, S) by table lookup."""
    table = normalisation_table(spec)
    idx = pixels.long()
    return torch.stack([table[c][idx[:, c]] for c in range(3)], dim=1)


def load_pixels(paths: Sequence[Path], spec: ImageSpec) -> torch.Tensor:
    """Decode (``blip2_embed.images.load_image``: EXIF orientation, first frame, RGB) and resize:
    uint8 (N, 3, S, S), kept as uint8 so a cache of them is 4x smaller than float pixels."""
    out = np.empty((len(paths), 3, spec.size, spec.size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = resize_uint8(load_image(path), spec)
    return torch.from_numpy(out)


class CaptionDataset:
    """Images with captions, sampled as (image index, one random caption).

    Small datasets (the default limit is 1 GiB of resized uint8 pixels) are decoded once and kept in
    memory, which on a CPU is most of the speed of training on synthetic scenes; bigger ones are
    decoded per batch.
    """

    def __init__(self, items: Sequence[CaptionedImage], spec: ImageSpec, cache_bytes: int = 1 << 30) -> None:
        if not items:
            raise ValueError("empty dataset")
        self.items = list(items)
        self.spec = spec
        self.cached: torch.Tensor | None = None
        if len(self.items) * 3 * spec.size * spec.size <= cache_bytes:
            self.cached = load_pixels([i.image for i in self.items], spec)

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        """Normalised float32 pixels (B, 3, S, S) of these images."""
        if self.cached is not None:
            raw = self.cached[torch.as_tensor(list(indices), dtype=torch.long)]
        else:
            raw = load_pixels([self.items[i].image for i in indices], self.spec)
        return normalize(raw, self.spec)

    def sample_captions(
        self, indices: Sequence[int], rng: random.Random, query_ratio: float = 0.0
    ) -> list[str]:
        """One text per image: a caption, or with probability ``query_ratio`` one of its queries
        (images without queries always give a caption)."""
        out = []
        for i in indices:
            item = self.items[i]
            if query_ratio and item.queries and rng.random() < query_ratio:
                out.append(rng.choice(item.queries))
            else:
                out.append(rng.choice(item.captions))
        return out

    def sample_negatives(self, indices: Sequence[int], rng: random.Random) -> list[str] | None:
        """One hard negative per image (``CaptionedImage.negatives``), or None when an image has none."""
        if not all(self.items[i].negatives for i in indices):
            return None
        return [rng.choice(self.items[i].negatives) for i in indices]

    def near_indices(self) -> list[list[int]]:
        """Per image, the dataset indices of its look-alikes (``CaptionedImage.near``) that are here."""
        index = {item.image: i for i, item in enumerate(self.items)}
        return [[index[p] for p in item.near if p in index] for item in self.items]

    def described(self, indices: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        """(B, T) bool: ``texts[j]`` is one of the texts of image ``indices[i]``."""
        sets = [self.items[i].texts() for i in indices]
        return torch.tensor([[t in s for t in texts] for s in sets], dtype=torch.bool).reshape(
            len(indices), len(texts)
        )

    def positives(self, indices: Sequence[int], texts: Sequence[str]) -> torch.Tensor:
        """(B, B) bool: image ``indices[i]`` matches ``texts[j]`` -- its own text, the same image
        repeated, or another image that the text also describes ("a red circle" for every red circle)."""
        same = torch.as_tensor(indices)[:, None] == torch.as_tensor(indices)[None, :]
        return same | self.described(indices, texts)


class BatchSampler:
    """Epochs of shuffled image indices cut into batches, reproducible from (seed, step).

    Each batch holds distinct images, so in-batch ITC targets are the diagonal. The state is just the
    step number: resuming at step k gives exactly the batches an uninterrupted run would have seen.

    With ``near`` (per image, the indices of its look-alikes) a share ``near_ratio`` of each batch is
    look-alikes of the batch's other images (hard negatives for ITC in both directions), drawn from
    (seed, step) too; an epoch then counts only the other images.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        near: Sequence[Sequence[int]] | None = None,
        near_ratio: float = 0.0,
    ) -> None:
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.near = near if near is not None and near_ratio > 0 else None
        anchors = batch_size - round(batch_size * near_ratio) if self.near is not None else batch_size
        self.anchors = max(1, anchors)
        self.per_epoch = n // self.anchors
        self._order: tuple[int, list[int]] | None = None

    def batch(self, step: int) -> tuple[list[int], random.Random]:
        """Indices of batch ``step`` and an RNG for its caption choice."""
        epoch, k = divmod(step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = list(range(self.n))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self._order = (epoch, order)
        order = self._order[1]
        indices = order[k * self.anchors : (k + 1) * self.anchors]
        if self.near is not None:
            indices = self._with_look_alikes(indices, random.Random(f"{self.seed}:near:{step}"))
        return indices, random.Random(f"{self.seed}:step:{step}")

    def _with_look_alikes(self, anchors: list[int], rng: random.Random) -> list[int]:
        """The anchors, then one look-alike per anchor in turn until the batch is full (a random other
        image where an anchor has none left); every image at most once."""
        assert self.near is not None
        batch, seen = list(anchors), set(anchors)
        turn = 0
        while len(batch) < self.batch_size:
            options = [j for j in self.near[anchors[turn % len(anchors)]] if j not in seen]
            pick = rng.choice(options) if options else rng.randrange(self.n)
            if pick not in seen:
                batch.append(pick)
                seen.add(pick)
            turn += 1
        return batch


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tokenize_lm(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, bos_token_id: int
) -> dict[str, torch.Tensor]:
    """Caption-model targets ``[BOS] caption [EOS]``, right-padded: BOS through the same helper
    inference uses (``blip2_embed.encoder.lm_text_ids``), whether or not the tokenizer adds one."""
    rows = [[*lm_text_ids(tokenizer, t, bos_token_id), tokenizer.eos_token_id][:max_length] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}

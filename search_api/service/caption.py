"""Captions and instructed generation (OPT); catalog images' default-length results are cached."""

from __future__ import annotations

import asyncio

from search_api.service.components import Components, Floats
from search_api.service.errors import NotFound
from search_api.service.timing import Timer
from search_api.service.types import CaptionResult


def _tokens(c: Components, max_new_tokens: int | None) -> int:
    return max_new_tokens or c.settings.caption_max_new_tokens


async def _generate(
    c: Components, pixels: Floats, prompt: str | None, max_new_tokens: int | None, timer: Timer
) -> str:
    """One image's caption (or answer to ``prompt``), generated on the model thread."""
    tokens = _tokens(c, max_new_tokens)
    with timer.stage("captions"):
        res = await c.worker.score(pixels, None, caption_rows=[0], prompt=prompt, max_new_tokens=tokens)
    return res.captions.get(0, "")


async def caption_image(
    c: Components, image_id: int, *, prompt: str | None = None, max_new_tokens: int | None = None
) -> CaptionResult:
    """Caption a catalog image, or answer ``prompt`` about it."""
    key = c.caption_key()
    timer = c.timer()
    # The cache key is (image, model, prompt); only default-length generations are stored under it.
    cacheable = _tokens(c, max_new_tokens) == c.settings.caption_max_new_tokens
    if cacheable:
        with timer.stage("captions_cached"):
            hit = (await asyncio.to_thread(c.catalog.captions, [image_id], key, prompt)).get(image_id)
        if hit is not None:
            c.metrics.captions.labels("cache").inc()
            return CaptionResult(image_id, prompt, hit, cached=True, model_key=key, timings_ms=timer.done())
    with timer.stage("load_candidates"):
        infos = await asyncio.to_thread(c.catalog.image_infos, [image_id])
        pixels = await asyncio.to_thread(c.images.pixels_of, infos)
    if image_id not in pixels:
        raise NotFound(f"no readable image with id {image_id}", code="unknown-image")
    text = await _generate(c, pixels[image_id][None], prompt, max_new_tokens, timer)
    c.metrics.captions.labels("generated").inc()
    if cacheable:
        await asyncio.to_thread(c.catalog.store_captions, {image_id: text}, key, prompt)
    return CaptionResult(image_id, prompt, text, cached=False, model_key=key, timings_ms=timer.done())


async def caption_upload(
    c: Components, data: bytes, *, prompt: str | None = None, max_new_tokens: int | None = None
) -> CaptionResult:
    """Caption an uploaded image, or answer ``prompt`` about it (never cached)."""
    key = c.caption_key()
    timer = c.timer()
    with timer.stage("decode_upload"):
        pixels = await c.upload_pixels(data)
    text = await _generate(c, pixels, prompt, max_new_tokens, timer)
    return CaptionResult(None, prompt, text, cached=False, model_key=key, timings_ms=timer.done())

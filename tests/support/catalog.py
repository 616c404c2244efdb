"""Test and benchmark helpers: generated photo folders and a real catalog filled by the real indexer."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from blip2_search.settings import Settings


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 36), date: str | None = None) -> bytes:
    """A small JPEG with a few coloured blocks (distinct content per seed), optionally EXIF-dated."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
    image = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    if date:
        exif[0x8769] = {0x9003: date}  # ExifIFD -> DateTimeOriginal "YYYY:MM:DD HH:MM:SS"
    image.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def make_photos(folder: Path, count: int, *, start: int = 0) -> list[Path]:
    """``count`` distinct photos in two year folders (2023/, 2024/) with EXIF dates in that year."""
    paths = []
    for i in range(start, start + count):
        year = 2023 if i % 2 == 0 else 2024
        path = folder / str(year) / f"img_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (40 + (i % 5) * 8, 30 + (i % 3) * 10)
        path.write_bytes(jpeg_bytes(i, size, f"{year}:0{1 + i % 9}:1{i % 10} 12:00:00"))
        paths.append(path)
    return paths


def tiny_catalog(
    base: Path,
    checkpoints,
    encoder,
    photos: int,
    *,
    before_index: Callable[[Path], None] | None = None,
    **overrides: object,
) -> Settings:
    """Settings for a catalog under ``base`` over the tiny checkpoints on CPU, filled by the real indexer
    with ``make_photos(base / "photos", photos)`` (``before_index(photos_dir)`` may add files first).
    The one catalog builder of the API, server and service tests."""
    make_photos(base / "photos", photos)
    if before_index is not None:
        before_index(base / "photos")
    settings = Settings(
        data_dir=base / "data",
        retrieval_model=str(checkpoints.retrieval),
        caption_model=str(checkpoints.caption),
        device="cpu",
        **overrides,  # type: ignore[arg-type]
    )
    index_folder(settings, encoder, base / "photos")
    return settings


def index_folder(settings: Settings, encoder, folder: Path) -> object:
    """Run the real indexer over ``folder`` into ``settings``' catalog (in process, no worker pool)."""
    from indexer.run import IndexOptions, IndexTarget, run_index

    options = IndexOptions.from_settings(settings, [folder], batch_size=8, workers=0)
    # No index catch-up here: the server builds its index from the catalog on start, as in production.
    target = IndexTarget(settings.resolved_database_url, settings.resolved_indexer_lock)
    return run_index(target, encoder, options)

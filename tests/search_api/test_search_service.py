"""The search service without HTTP: from Python (``SearchService``) and from the terminal
(``blip2-search search`` in a subprocess, with its limit and the API's filters)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from blip2_search.settings import Settings
from search_api.app import create_app
from search_api.service import BadInput, NotFound, SearchFilters, SearchOptions, SearchService
from tests.support.catalog import tiny_catalog
from tests.support.server import REPO_ROOT, settings_env

N_PHOTOS = 10


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints, encoder) -> Settings:
    # Even photos in 2023/ (EXIF 2023), odd ones in 2024/.
    base = tmp_path_factory.mktemp("search-service")
    return tiny_catalog(base, tiny_checkpoints, encoder, N_PHOTOS, caption_max_new_tokens=4)


def test_service_from_python_equals_the_api(catalog: Settings, encoder) -> None:
    options = SearchOptions(k=4, offset=1, rerank=6, captions=2)

    async def run() -> tuple[object, int, list[type[Exception]]]:
        async with SearchService.running(catalog, encoder, poll=False) as service:
            page = await service.search_text("a red circle", options)
            errors = []
            when = page.hits[0].captured_at
            backwards = SearchFilters(captured_after=when, captured_before=when.replace(year=2000))
            for bad in (
                service.search_similar(10**9, options),
                service.search_text("x", SearchOptions(k=0)),
                service.search_text("x", SearchOptions(filters=backwards)),
            ):
                try:
                    await bad
                except Exception as exc:
                    errors.append(type(exc))
            # Kept ViT features are released after every search (nothing piles up on the model side).
            return page, service.worker.kept_features, errors

    page, kept, errors = asyncio.run(run())
    assert kept == 0
    assert errors == [NotFound, BadInput, BadInput]
    assert len(page.hits) == 4 and [h.rank for h in page.hits] == [2, 3, 4, 5]
    assert all(h.caption is not None for h in page.hits[:2])
    params = {"q": "a red circle", "k": 4, "offset": 1, "rerank": 6, "captions": 2}
    with TestClient(create_app(catalog, encoder=encoder)) as client:
        body = client.get("/api/search", params=params).json()
    assert [h["image_id"] for h in body["hits"]] == [h.image_id for h in page.hits]
    for got, want in zip(page.hits, body["hits"], strict=True):
        assert got.score == pytest.approx(want["score"], abs=1e-5)
        assert (got.caption or None) == want["caption"]  # from the cache the service filled


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "DATABASE_URL"))}
    env.update(settings_env(settings), OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "blip2_search.cli", "search", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_cli_search_limit_and_filters(catalog: Settings) -> None:
    runs = [
        ("red", "-k", "3", "--captured-after", "2024-01-01", "--rerank", "4", "--sort", "date", "--json"),
        ("red", "--limit", "2", "--path-prefix", "2023"),
        ("red", "--captured-after", "2024-02-01", "--captured-before", "2024-01-01"),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:  # Python and torch start-up dominate
        dated, folder, reversed_range = pool.map(lambda args: _cli(catalog, *args), runs)
    assert dated.returncode == 0, dated.stderr
    page = json.loads(dated.stdout)
    assert len(page["hits"]) == 3 and page["k"] == 3
    assert all("/2024/" in h["path"] and h["captured_at"].startswith("2024") for h in page["hits"])
    assert all(h["reranked"] for h in page["hits"])
    stamps = [h["captured_at"] for h in page["hits"]]
    assert stamps == sorted(stamps, reverse=True)  # --sort date: newest first

    assert folder.returncode == 0, folder.stderr
    lines = folder.stdout.splitlines()
    assert len(lines) == 3 and all("/2023/" in line for line in lines[:2]), folder.stdout
    assert f"({N_PHOTOS} images" in lines[2]

    reversed_range = _cli(catalog, "red", "--captured-after", "2024-02-01", "--captured-before", "2024-01-01")
    assert reversed_range.returncode == 1
    assert "captured_after is later than captured_before" in reversed_range.stderr
    assert "Traceback" not in reversed_range.stderr + reversed_range.stdout


def test_the_service_imports_no_http() -> None:
    code = "import sys, search_api.service; print([m for m in ('fastapi', 'starlette') if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_search_needs_no_test_client() -> None:
    source = (Path(REPO_ROOT) / "blip2_search" / "commands" / "search.py").read_text()
    assert "testclient" not in source.lower() and "httpx" not in source

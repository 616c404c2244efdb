"""The web page in a real browser: Playwright driving Debian's Chromium against a real uvicorn process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blip2_search.settings import Settings
from tests.support.catalog import index_folder, jpeg_bytes, make_photos
from tests.support.server import ServerProcess

CHROMIUM = "/usr/bin/chromium"
N_PHOTOS = 12

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None, reason="no Chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints, encoder):
    base = tmp_path_factory.mktemp("web")
    make_photos(base / "photos", N_PHOTOS)
    settings = Settings(
        data_dir=base / "data",
        retrieval_model=str(tiny_checkpoints.retrieval),
        caption_model=str(tiny_checkpoints.caption),
        device="cpu",
        caption_max_new_tokens=4,
    )
    index_folder(settings, encoder, base / "photos")
    with ServerProcess(settings) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )  # fmt: skip
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    external: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server.url) else external.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    yield page
    assert not external, f"the page fetched outside its origin: {external}"
    assert not errors, errors
    context.close()


def _loaded_thumbnails(page) -> int:
    return page.evaluate(
        "() => [...document.querySelectorAll('#results img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def test_search_from_the_keyboard(page) -> None:
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("a red dog on the beach")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li.hit")
    assert page.locator("#results li.hit").count() == N_PHOTOS
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete)")
    page.locator("#results li.hit").nth(0).scroll_into_view_if_needed()
    assert _loaded_thumbnails(page) >= 1
    first = page.locator("#results li.hit").nth(0)
    assert "ITM" in first.locator(".scores").inner_text()  # re-ranked by default
    # Captions were asked for the top 4 hits (random tiny weights may generate blank text).
    flags = page.eval_on_selector_all("#results li.hit", "els => els.map(e => e.dataset.captioned)")
    assert flags == ["true"] * 4 + ["false"] * (N_PHOTOS - 4)
    assert "results of 12 images" in page.locator("#status").inner_text()

    # Keyboard into the first result: Tab from the search button reaches its "open" button.
    page.locator("#results li.hit .open").first.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#detail-meta').children.length > 0")
    assert "Files" in page.locator("#detail-meta").inner_text()
    assert page.evaluate("document.activeElement.id") == "detail-similar"
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def test_more_like_this_and_detail(page) -> None:
    page.fill("#q", "blue sky")
    page.click("#search-button")
    page.wait_for_selector("#results li.hit")
    first_id = page.locator("#results li.hit").first.get_attribute("data-image-id")
    page.locator("#results li.hit .similar").first.click()
    page.wait_for_function(
        "(id) => document.querySelectorAll('#results li.hit').length === 11 && "
        "![...document.querySelectorAll('#results li.hit')].some(li => li.dataset.imageId === id)",
        arg=first_id,
    )
    # From the detail view too.
    page.locator("#results li.hit .open").nth(2).click()
    page.locator("#detail").wait_for(state="visible")
    page.click("#detail-similar")
    page.locator("#detail").wait_for(state="hidden")
    page.wait_for_selector("#results li.hit")


def test_search_by_uploading_an_image(page, tmp_path: Path) -> None:
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg_bytes(3, (48, 36)))
    page.set_input_files("#upload", str(query))
    page.wait_for_function("() => document.querySelectorAll('#results li.hit').length > 0")
    assert "results of" in page.locator("#status").inner_text()


def test_errors_are_shown(page, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#upload", str(bad))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "unsupported image type" in page.locator("#status").inner_text()


def test_shared_link_runs_the_query(browser, server) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/?q=red")
    page.wait_for_selector("#results li.hit")
    assert page.input_value("#q") == "red"
    context.close()

"""The web page in a real browser: Playwright driving Debian's Chromium against a real uvicorn process.

One library and one server serve every test here (plus one small server for the key prompt and the
empty library); what the page shows is checked against what the API answers for the same request.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from blip2_search.demo_model import DEMO_MODEL_DIR
from blip2_search.settings import Settings
from tests.support.catalog import index_folder, jpeg_bytes, make_photos
from tests.support.server import ServerProcess

CHROMIUM = "/usr/bin/chromium"
DEMO = DEMO_MODEL_DIR
N_IMAGES = 19
PAGE_SIZE = 5  # the server's page size: small, so infinite scroll has pages to load
API_KEY = "page-test-key"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None, reason="no Chromium"),
]


def _photo(path: Path, seed: int, fmt: str, date: str | None = None, make: str = "", model: str = "") -> None:
    rng = np.random.default_rng(seed)
    arr = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    exif = Image.Exif()
    if make:
        exif[0x010F], exif[0x0110] = make, model
    if date:
        exif[0x8769] = {0x9003: date}
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, fmt, exif=exif.tobytes())


def make_library(folder: Path, scratch: Path) -> tuple[dict[str, Path], str]:
    """Nested folders, EXIF dates and cameras, a near-duplicate, a HEIC, a TIFF, and two of the demo
    model's scenes (19 images); also a caption of the first scene, a query with a strong match."""
    from blip2_train.scenes import generate_dataset

    make_photos(folder, 12)  # 2023/ and 2024/, dated in their year
    scenes = generate_dataset(scratch, 2, 20261201, max_objects=1)
    for n, rec in enumerate(scenes):
        shutil.copy(scratch / rec.image, folder / "2024" / f"scene_{n}.png")
    lib = {
        "canon_a": folder / "2024" / "party" / "cam_100.jpg",
        "canon_b": folder / "2024" / "party" / "cam_101.jpg",
        "heic": folder / "2023" / "trip" / "phone_102.heic",
        "tiff": folder / "2023" / "trip" / "scan_103.tif",
        "original": folder / "2023" / "img_000.jpg",
        "near_dup": folder / "2023" / "img_000_small.jpg",
    }
    _photo(lib["canon_a"], 100, "JPEG", "2024:12:24 20:00:00", "Canon", "EOS R6")
    _photo(lib["canon_b"], 101, "JPEG", "2024:12:25 09:30:00", "Canon", "EOS R6")
    _photo(lib["heic"], 102, "HEIF", "2023:07:01 10:00:00", "Apple", "iPhone 13")
    _photo(lib["tiff"], 103, "TIFF")
    # The same picture saved again at another JPEG quality: other bytes (another image id), nearly the
    # same content. (These pictures are 40 x 30 px, so resizing them would change much of the content.)
    with Image.open(lib["original"]) as im:
        im.save(lib["near_dup"], "JPEG", quality=90)
    return lib, scenes[0].captions[0]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    """The library indexed with the shipped demo model (5 MB): unlike random tiny weights it tells the
    near-duplicate pair (similarity 0.9995) from the other pairs (at most 0.984) of these pictures."""
    from blip2_embed.encoder import Blip2Encoder

    if not (DEMO / "retrieval" / "config.json").is_file():
        pytest.skip("the demo model is not in blip2_search/demo_model")
    base = tmp_path_factory.mktemp("web")
    paths, query = make_library(base / "photos", base / "scenes")
    settings = Settings(
        data_dir=base / "data",
        retrieval_model=str(DEMO / "retrieval"),
        caption_model=str(DEMO / "caption"),
        device="cpu",
        caption_max_new_tokens=6,
        page_size=PAGE_SIZE,
        duplicate_similarity=0.99,
    )
    encoder = Blip2Encoder.from_pretrained(retrieval=settings.retrieval_model, caption=None, device="cpu")
    index_folder(settings, encoder, base / "photos")
    return settings, paths, query


@pytest.fixture(scope="module")
def server(library):
    with ServerProcess(library[0]) as proc:
        yield proc


@pytest.fixture(scope="module")
def ids(server, library) -> dict[str, int]:
    """Image id of each special file of the library, by its key."""
    hits = httpx.get(server.url + "/api/search", params={"q": "x", "k": 100, "rerank": 0}).json()["hits"]
    by_path = {h["path"]: h["image_id"] for h in hits}
    return {name: by_path[str(p)] for name, p in library[1].items()}


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


def _open(browser, url: str, **context_args):
    """A page in a fresh context that records requests leaving the origin and script errors."""
    context = browser.new_context(**context_args)
    page = context.new_page()
    origin = "/".join(url.split("/", 3)[:3])
    page.external, page.errors = [], []  # type: ignore[attr-defined]
    # blob: URLs of the origin are the page's own (object URLs of fetched or dropped images).
    local = (origin + "/", f"blob:{origin}/")
    page.on("request", lambda r: None if r.url.startswith(local) else page.external.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    return context, page


@pytest.fixture
def page(browser, server):
    context, page = _open(browser, server.url + "/")
    page.wait_for_function("() => document.querySelector('#folder').options.length > 1")
    yield page
    assert not page.external, f"the page fetched outside its origin: {page.external}"
    assert not page.errors, page.errors
    context.close()


def api(server, path: str, **params) -> dict:
    resp = httpx.get(server.url + path, params=params, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def shown_ids(page) -> list[int]:
    return page.eval_on_selector_all(
        "#results li.hit",
        "els => els.filter(e => e.offsetParent !== null).map(e => Number(e.dataset.imageId))",
    )


def url_params(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def wait_results(page) -> None:
    """Until the search shows its results and no page is loading (infinite scroll has settled)."""
    page.wait_for_function(
        "() => /matches|No results/.test(document.querySelector('#status').textContent)"
        " && document.body.dataset.loading === undefined"
    )


def wait_count(page, n: int, op: str = "===") -> None:
    page.wait_for_function(f"(n) => document.querySelectorAll('#results li.hit').length {op} n", arg=n)


def wait_viewing(page, image_id: int) -> None:
    page.wait_for_function(
        "(i) => document.querySelector('#detail').dataset.imageId === String(i)", arg=image_id
    )


def wait_text(page, selector: str, *not_: str) -> None:
    """Until ``selector``'s text is none of ``not_`` (placeholders while a request runs)."""
    page.wait_for_function(
        "([sel, not_]) => !not_.includes(document.querySelector(sel).textContent)", arg=[selector, list(not_)]
    )


def search(page, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")
    wait_results(page)


# ------------------------------------------------------------------ the API the page uses
def test_config_library_filters_and_date_order(server, library, ids) -> None:
    settings = library[0]
    config = api(server, "/api/config")
    assert config["page_size"] == PAGE_SIZE and config["max_k"] == settings.max_k
    assert config["max_rerank_depth"] == settings.max_rerank_depth and config["requires_key"] is False
    assert config["ask_prompt"] == "Question: {question} Answer:" and config["caption_model"] is True

    lib = api(server, "/api/library")
    assert lib["indexed_images"] == N_IMAGES
    assert lib["folders"] == ["2023", "2023/trip", "2024", "2024/party"]
    assert lib["cameras"] == [{"name": "Canon EOS R6", "images": 2}, {"name": "Apple iPhone 13", "images": 1}]
    assert lib["captured_max"] == "2024-12-25T09:30:00"
    assert lib["index_command"].startswith("blip2-search index ")

    for camera, expected in [("Canon EOS R6", {ids["canon_a"], ids["canon_b"]}), ("Apple", {ids["heic"]})]:
        hits = api(server, "/api/search", q="party", camera=camera, k=100)["hits"]
        assert {h["image_id"] for h in hits} == expected
    # The upload form takes the same filters.
    form = {"camera": "iPhone 13", "k": "10"}
    resp = httpx.post(server.url + "/api/search/image", data=form, files={"file": ("q.jpg", jpeg_bytes(5))})
    assert [h["image_id"] for h in resp.json()["hits"]] == [ids["heic"]]

    # sort=date: the same best hits, newest first, scores and relevance ranks unchanged.
    relevance = api(server, "/api/search", q="sunset", k=100, rerank=8)["hits"]
    by_date = api(server, "/api/search", q="sunset", k=6, rerank=8, sort="date", captions=2)
    rest = api(server, "/api/search", q="sunset", k=6, offset=6, rerank=8, sort="date")
    dated = by_date["hits"] + rest["hits"]
    stamps = [h["captured_at"] for h in dated if h["captured_at"]]
    assert stamps == sorted(stamps, reverse=True) and dated[0]["image_id"] == ids["canon_b"]
    assert by_date["next_offset"] == 6 and rest["next_offset"] == 12
    scores = {h["image_id"]: (h["rank"], h["score"]) for h in relevance}
    assert all(scores[h["image_id"]] == (h["rank"], h["score"]) for h in dated)
    assert [h["caption"] is not None for h in by_date["hits"]] == [True, True, False, False, False, False]


def test_display_images_and_duplicate_groups(server, ids) -> None:
    for name in ("heic", "tiff", "original"):
        resp = httpx.get(f"{server.url}/api/images/{ids[name]}/display")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(resp.content)) as im:
            assert im.format == "JPEG"
            if name != "original":
                assert im.size == (64, 48)
    assert httpx.get(f"{server.url}/api/images/999999/display").status_code == 404

    every = [h["image_id"] for h in api(server, "/api/search", q="x", k=100, rerank=0)["hits"]]
    groups = httpx.post(server.url + "/api/duplicates", json={"image_ids": every}).json()
    assert groups["threshold"] == 0.99
    pair = {ids["original"], ids["near_dup"]}
    assert [set(g) for g in groups["groups"]] == [pair]
    assert groups["groups"][0][0] == min(pair, key=every.index)  # the better-ranked hit leads
    wide = httpx.post(server.url + "/api/duplicates", json={"image_ids": every, "threshold": -1}).json()
    assert wide["groups"] == [every]
    bad = httpx.post(server.url + "/api/duplicates", json={"image_ids": every, "limit": 3})
    assert bad.status_code == 422


def test_docs_work_offline(browser, server) -> None:
    html = httpx.get(server.url + "/docs").text
    assets = [
        a for a in ("/docs/assets/swagger-ui.css", "/docs/assets/swagger-ui-bundle.js", "/static/docs.js")
    ]
    assert all(a in html for a in assets)
    for a in assets:
        assert httpx.get(server.url + a).status_code == 200
    # No network: every request leaving the origin is aborted, and none may be made.
    context = browser.new_context()
    context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(server.url) else r.abort())
    page = context.new_page()
    external, errors = [], []
    page.on("request", lambda r: None if r.url.startswith(server.url) else external.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "blip2-search" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector("#operations-search-search_text_api_search_get")
    assert not external and not errors
    context.close()


# ------------------------------------------------------------------ the page
def test_search_scores_and_the_cut_off(page, server, library) -> None:
    query = library[2]  # a caption of one scene: a strong match for the demo model, the rest weaker
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.fill("#rerank", "4")
    search(page, query)
    ranking = api(server, "/api/search", q=query, k=100, rerank=4, captions=4)["hits"]
    config = api(server, "/api/config")
    # Weaker: re-ranked below the cut-off, or past the re-rank depth (not checked by the ITM head).
    weak = [h for h in ranking if not h["reranked"] or h["itm_prob"] < config["weak_match_prob"]]
    strong = [h for h in ranking if h not in weak]
    assert 1 <= len(strong) < 4
    wait_count(page, PAGE_SIZE, ">=")
    assert shown_ids(page) == [h["image_id"] for h in strong]
    for li, hit in zip(page.locator("#results li.hit:visible").all(), strong, strict=True):
        assert li.locator(".scores").inner_text() == f"{round(hit['itm_prob'] * 100)}% match"
        title = li.locator(".scores").get_attribute("title")
        assert f"ITC {hit['itc_score']:.3f}" in title and f"ITM logit {hit['itm_logit']:.3f}" in title
    # Infinite scroll stops after the first page of weaker matches only (page 2: all past the depth).
    page.mouse.wheel(0, 5000)
    page.wait_for_timeout(300)
    wait_results(page)
    assert page.locator("#results li.hit").count() == 2 * PAGE_SIZE
    assert page.locator("#weaker").inner_text() == f"Show {2 * PAGE_SIZE - len(strong)}+ weaker matches"
    assert f"{len(strong)} matches (" in page.inner_text("#status")
    page.click("#weaker")
    assert url_params(page)["weak"] == "1"
    # Now infinite scroll goes on to the end of the ranking.
    for _ in range(6):
        page.mouse.wheel(0, 5000)
        if page.locator("#results li.hit").count() == len(ranking):
            break
        page.wait_for_timeout(300)
    page.wait_for_function(
        "(n) => document.querySelectorAll('#results li.hit').length === n", arg=len(ranking)
    )
    assert shown_ids(page) == [h["image_id"] for h in ranking]
    assert page.locator("#results li.weak").last.locator(".scores").inner_text().startswith("similarity ")
    assert int(url_params(page)["page"]) == -(-len(ranking) // PAGE_SIZE)
    # Each page captions its first 4 hits (the Captions field).
    captioned = page.eval_on_selector_all("#results li.hit", "els => els.map(e => e.dataset.captioned)")
    assert captioned == [str(n % PAGE_SIZE < 4).lower() for n in range(len(ranking))]
    # Reload: the same hits, all the loaded pages back.
    page.reload()
    page.wait_for_function(
        "(n) => document.querySelectorAll('#results li.hit').length === n", arg=len(ranking)
    )
    assert page.input_value("#q") == query and page.input_value("#rerank") == "4"


def test_filters_url_reload_and_back(page, server, ids) -> None:
    page.fill("#rerank", "0")  # no cut-off: every hit shown
    search(page, "blue sky")
    first = shown_ids(page)
    page.select_option("#camera", "Canon EOS R6")
    page.wait_for_function("() => !location.search.includes('page=0') && location.search.includes('camera=')")
    wait_count(page, 2)
    assert sorted(
        int(i) for i in page.eval_on_selector_all("#results li.hit", "e => e.map(x => x.dataset.imageId)")
    ) == sorted([ids["canon_a"], ids["canon_b"]])
    page.select_option("#camera", "")
    page.select_option("#folder", "2023/trip")
    page.fill("#from", "2023-06-01")
    page.dispatch_event("#from", "change")
    page.select_option("#sort", "date")
    page.wait_for_function("() => location.search.includes('sort=date')")
    wait_count(page, 1)
    assert shown_ids(page) == [ids["heic"]]  # the dated photo of 2023/trip (the TIFF has no date)
    params = url_params(page)
    assert params["folder"] == "2023/trip" and params["from"] == "2023-06-01" and params["q"] == "blue sky"
    page.reload()
    wait_count(page, 1)
    assert page.input_value("#folder") == "2023/trip" and page.input_value("#sort") == "date"
    # Back, filter by filter (the camera, then the cleared camera, ...), to the unfiltered search.
    for _ in range(8):
        if not set(url_params(page)) & {"folder", "from", "sort"}:
            break
        page.go_back()
        wait_results(page)  # each step's search has run before the next step reads the URL
    assert "camera" not in url_params(page)  # the camera filter cleared
    page.go_back()
    wait_results(page)
    wait_count(page, 2)
    assert url_params(page)["camera"] == "Canon EOS R6" and page.input_value("#camera") == "Canon EOS R6"
    page.go_back()
    assert url_params(page)["q"] == "blue sky" and "camera" not in url_params(page)
    wait_count(page, len(first), ">=")
    assert shown_ids(page)[: len(first)] == first and page.input_value("#folder") == ""


def forget_captions(library, image_id: int) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(library[0].resolved_database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM captions WHERE image_id = :i"), {"i": image_id})
    engine.dispose()


def test_viewer_keyboard_download_caption_and_ask(page, server, library) -> None:
    page.fill("#rerank", "0")  # no cut-off: every hit shown
    page.fill("#captions", "0")  # the viewer shows cached captions, and makes missing ones
    search(page, "holiday photos")
    wait_count(page, PAGE_SIZE, ">=")
    order = shown_ids(page)
    captions, asks = [], []
    page.on("request", lambda r: (asks if "prompt" in (r.post_data or "") else captions).append(r.post_data)
            if r.url.endswith("/api/caption") else None)  # fmt: skip
    page.locator("#results li.hit .open").nth(1).click()
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#detail-image').naturalWidth > 0")
    assert page.get_attribute("#detail-image", "src").endswith(f"/api/images/{order[1]}/display")
    assert page.get_attribute("#detail-original", "href") == f"/api/images/{order[1]}/original"
    assert page.get_attribute("#detail-original", "download") is not None
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "(id) => document.querySelector('#detail').dataset.imageId === String(id)", arg=order[2]
    )
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(
        "(id) => document.querySelector('#detail').dataset.imageId === String(id)", arg=order[0]
    )
    # A hit with no caption (its cached one removed from the catalog): the viewer makes it on demand,
    # and it is the caption the API then has cached.
    forget_captions(library, order[3])
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "(id) => document.querySelector('#detail').dataset.imageId === String(id)", arg=order[3]
    )
    page.wait_for_function(
        "() => !['', 'Captioning…'].includes(document.querySelector('#detail-caption').textContent)"
    )
    expected = httpx.post(server.url + "/api/caption", json={"image_id": order[3]}).json()
    assert expected["cached"] is True and [json.loads(c)["image_id"] for c in captions].count(order[3]) == 1
    assert page.inner_text("#detail-caption") in (expected["text"], "(the model gave an empty caption)")
    assert "ITC" in page.inner_text("#detail-meta")
    # Ask about this photo: the BLIP-2 prompt format, the model's answer shown.
    page.fill("#ask-q", "what colour is it?")
    page.press("#ask-q", "Enter")
    page.wait_for_function(
        "() => !['', 'Thinking…'].includes(document.querySelector('#ask-answer').textContent)"
    )
    assert json.loads(asks[0]) == {"image_id": order[3], "prompt": "Question: what colour is it? Answer:"}
    answer = httpx.post(server.url + "/api/caption", json=json.loads(asks[0])).json()["text"].strip()
    assert page.inner_text("#ask-answer") == (answer or "(no answer)")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def test_heic_and_tiff_shown_converted(page, server, ids) -> None:
    page.fill("#rerank", "0")
    page.select_option("#folder", "2023/trip")
    search(page, "scan")
    assert sorted(shown_ids(page)) == sorted([ids["heic"], ids["tiff"]])
    for n in range(2):
        page.locator("#results li.hit .open").nth(n).click()
        page.wait_for_function("() => document.querySelector('#detail-image').naturalWidth === 64")
        page.keyboard.press("Escape")


DROP_OR_PASTE = """([data, kind]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], 'q.jpg', {type: 'image/jpeg'}));
    const ev = kind === 'paste' ? new ClipboardEvent('paste', {clipboardData: dt})
        : new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
    document.dispatchEvent(ev);
}"""


def loaded_ids(page) -> list[int]:
    return page.eval_on_selector_all("#results li.hit", "els => els.map(e => Number(e.dataset.imageId))")


def assert_shows(page, ranking: list[dict], cut: float) -> None:
    """The page holds a prefix of ``ranking`` (pages load as the viewport allows) and shows its hits
    at or above the similarity cut-off (or all of them when none is)."""
    wait_count(page, PAGE_SIZE, ">=")
    wait_results(page)
    loaded = loaded_ids(page)
    assert loaded == [h["image_id"] for h in ranking[: len(loaded)]]
    strong = [h["image_id"] for h in ranking[: len(loaded)] if h["score"] >= cut]
    assert shown_ids(page) == (strong or loaded)


def test_image_queries_chip_drop_and_paste(page, server, ids) -> None:
    cut = api(server, "/api/config")["weak_similarity"]
    page.fill("#rerank", "0")
    search(page, "blue sky")
    wait_results(page)
    liked = shown_ids(page)[0]  # whichever photo the model puts first: "more like this" on it
    page.locator(f"#results li.hit[data-image-id='{liked}'] .similar").click()
    page.wait_for_function("() => document.querySelector('#chip-image').naturalWidth > 0")
    assert page.inner_text("#chip-label") == "Like this photo" and page.is_hidden("#q")
    assert url_params(page).items() >= {"mode": "similar", "id": str(liked)}.items()
    wait_results(page)
    assert_shows(page, api(server, f"/api/search/similar/{liked}", k=100)["hits"], cut)

    for seed, kind in [(3, "drop"), (4, "paste")]:
        image = jpeg_bytes(seed, (48, 36))
        files = {"file": ("q.jpg", image)}
        ranking = httpx.post(server.url + "/api/search/image", data={"k": "100"}, files=files).json()["hits"]
        page.evaluate(DROP_OR_PASTE, [base64.b64encode(image).decode(), kind])
        page.wait_for_function("(id) => document.querySelector('#results li.hit')?.dataset.imageId === id",
                               arg=str(ranking[0]["image_id"]))  # fmt: skip
        wait_results(page)
        assert url_params(page)["mode"] == "image" and page.inner_text("#chip-label") == "Like this image"
        assert_shows(page, ranking, cut)
    # Reload keeps the image query (session storage); Back returns to the dropped one, then to "more
    # like this"; the chip's x ends the image query.
    page.reload()
    wait_results(page)
    assert_shows(page, ranking, cut)
    assert page.is_visible("#chip-image")
    page.go_back()
    page.go_back()
    page.wait_for_function("() => document.querySelector('#chip-label').textContent === 'Like this photo'")
    assert url_params(page)["id"] == str(liked)
    page.click("#chip-clear")
    assert page.is_hidden("#query-chip") and page.is_visible("#q") and "mode" not in url_params(page)


def test_upload_errors_are_shown(page, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#upload", str(bad))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "unsupported image type" in page.locator("#status").inner_text()


def test_near_duplicates_fold_into_one_card(page, server, ids) -> None:
    page.fill("#rerank", "0")
    page.check("#group")
    search(page, "the same picture twice")
    page.wait_for_selector("#results li.hit .dupes")
    assert url_params(page)["group"] == "1"
    while page.locator("#results li.hit").count() < N_IMAGES:
        page.mouse.wheel(0, 5000)
        page.wait_for_timeout(200)
    pair = [ids["original"], ids["near_dup"]]
    leader = page.locator("#results li.hit:has(.dupes)")
    assert leader.count() == 1 and int(leader.get_attribute("data-image-id")) in pair
    assert leader.locator(".dupes").inner_text() == "+1 similar"
    assert len(shown_ids(page)) == N_IMAGES - 1
    leader.locator(".dupes").click()
    assert len(shown_ids(page)) == N_IMAGES
    # Scores are the ranking's, grouped or not.
    ranking = api(server, "/api/search", q="the same picture twice", k=100, rerank=0)["hits"]
    assert shown_ids(page) == [h["image_id"] for h in ranking]


def test_phone_width_two_columns_and_favicon(browser, server) -> None:
    context, page = _open(browser, server.url + "/?q=red&rerank=0", viewport={"width": 390, "height": 844})
    page.wait_for_function("() => document.querySelectorAll('#results li.hit').length > 0")
    columns = page.evaluate("getComputedStyle(document.querySelector('#results')).gridTemplateColumns")
    assert len(columns.split()) == 2
    icon = page.get_attribute("link[rel=icon]", "href")
    resp = httpx.get(server.url + icon)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("image/svg+xml")
    assert not page.external and not page.errors
    context.close()


def test_key_prompt_and_empty_library(browser, tmp_path_factory, tiny_checkpoints) -> None:
    from catalog.db import upgrade

    base = tmp_path_factory.mktemp("web-empty")
    settings = Settings(
        data_dir=base / "data", retrieval_model=str(tiny_checkpoints.retrieval), caption_model="",
        device="cpu", api_keys=API_KEY, api_auth_all=True,
    )  # fmt: skip
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with ServerProcess(settings) as proc:
        context, page = _open(browser, proc.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.press("#key-input", "Enter")
        page.wait_for_function(
            "() => document.querySelector('#key-error').textContent.includes('not accepted')"
        )
        page.fill("#key-input", API_KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#empty:not([hidden])")
        assert page.inner_text("#empty-command") == "blip2-search index /path/to/photos"
        assert not page.errors
        context.close()

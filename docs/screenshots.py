"""Screenshots of the web page for the docs: docs/img/page-desktop.png and docs/img/page-phone.png.

The demo's setting (generated scenes, the shipped demo model in blip2_search/demo_model), indexed and
served by a real server, photographed by Debian's Chromium through Playwright. Offline; a minute on a CPU:

    .venv/bin/python docs/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the tests' helpers: a real indexing run and a server process

from blip2_search.demo_model import DEMO_MODEL_DIR  # noqa: E402
from blip2_search.settings import Settings  # noqa: E402
from tests.support.catalog import index_folder  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

DEMO = DEMO_MODEL_DIR
CHROMIUM = "/usr/bin/chromium"
QUERY = "/?q=a+red+circle&captions=8"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def _small_png(data: bytes) -> bytes:
    # 256 colours are plenty for a flat page and keep each file well under 200 KB.
    image = Image.open(io.BytesIO(data)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img")
    parser.add_argument("--photos", type=int, default=60)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from blip2_embed.encoder import Blip2Encoder
    from blip2_train.scenes import generate_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        generate_dataset(base / "photos", args.photos, 20261127, max_objects=1)
        settings = Settings(
            data_dir=base / "data",
            retrieval_model=str(DEMO / "retrieval"),
            caption_model=str(DEMO / "caption"),
            device="cpu",
        )
        encoder = Blip2Encoder.from_pretrained(retrieval=settings.retrieval_model, caption=None, device="cpu")
        index_folder(settings, encoder, base / "photos" / "images")
        with ServerProcess(settings) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
            for name, viewport in VIEWPORTS.items():
                context = browser.new_context(viewport=viewport)
                page = context.new_page()
                page.goto(server.url + QUERY)
                try:
                    page.wait_for_function(
                        "() => /matches/.test(document.querySelector('#status').textContent)"
                        " && document.body.dataset.loading === undefined",
                        timeout=120_000,
                    )
                except Exception:
                    raise SystemExit(
                        f"the page did not show results: {page.inner_text('#status')!r}"
                    ) from None
                page.wait_for_function(  # the thumbnails on screen (lazy ones below load on scrolling)
                    "() => [...document.querySelectorAll('#results img')].filter(i => i.offsetParent"
                    " && i.getBoundingClientRect().top < innerHeight)"
                    ".every(i => i.complete && i.naturalWidth)"
                )
                target = args.out / f"page-{name}.png"
                target.write_bytes(_small_png(page.screenshot()))
                print(f"{target} ({target.stat().st_size // 1024} KB)")
                context.close()
            browser.close()


if __name__ == "__main__":
    main()

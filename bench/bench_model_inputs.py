"""Stored model inputs (catalog.model_inputs): the storage format, and what re-ranking by id deviates by.

1. ``format``: photos decoded as the indexer decodes them and resized to S (224), then encoded with
   each lossless candidate: bytes per image, encode and decode ms on one pinned core (each image's
   fastest of ``--repeats``), and a check that the round trip is exact.
2. ``deviation`` (with ``--model DIR`` holding ``retrieval/`` and ``caption/``, default: the demo model):
   folders are indexed by the real indexer, then the ITM match logits and greedy captions of every
   image *by id* (search_api.service.image_store.ImageStore, what /api/rerank and /api/caption use) are
   compared with the model run on the original file (what an upload gets, and what plain transformers
   computes), for: the stored input (exact decode), the stored input with the fast JPEG path, and the
   thumbnail fallback (BLIP2_STORE_MODEL_INPUTS=false; what every catalog did before the store).

    python bench/bench_model_inputs.py --photos ~/Pictures/sample   # camera photos (else synthetic ones)
    python bench/bench_model_inputs.py --skip-deviation --size 364

Writes bench/results/model_inputs-<tag>.json (tag defaults to cpu-<hostname>).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fast_jpeg import cpu_name, pin_to_one_core, synthetic_photo

from blip2_embed.images import (
    ImageSpec,
    decode_model_input,
    load_image,
    make_thumbnail,
    preprocess,
    sniff_format,
)
from blip2_search.demo_model import DEMO_MODEL_DIR
from catalog.model_inputs import ModelInputStore, encode_model_input

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
QUERIES = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple ring on a white background",
    "a photo of a street",
    "an orange diamond",
    "a black cross",
]


def _png(level: int):
    def encode(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    return encode


def _webp(method: int, quality: int):
    def encode(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "WEBP", lossless=True, method=method, quality=quality)
        return buf.getvalue()

    return encode


CANDIDATES = {
    "png zlib 1": _png(1),
    "png zlib 6 (Pillow default)": _png(6),
    "webp lossless m0 q0 (stored)": encode_model_input,
    "webp lossless m2 q50": _webp(2, 50),
    "webp lossless m4 q80 (libwebp default)": _webp(4, 80),
}


def photo_files(folder: Path | None, n: int, tmp: Path) -> list[Path]:
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and sniff_format(p.read_bytes()[:64]))
        return files[:n] if n else files
    out = []
    for i in range(n or 12):
        path = tmp / f"photo-{i:03d}.jpg"
        synthetic_photo(4000, 3000, seed=i).save(path, "JPEG", quality=90)
        out.append(path)
    return out


def bench_format(files: list[Path], spec: ImageSpec, repeats: int, tmp: Path) -> dict:
    inputs = [decode_model_input(f, spec, fast_jpeg=True, thumbnail_size=256) for f in files]
    thumbs = [len(make_thumbnail(load_image(f, draft_size=512), 256)) for f in files]
    out: dict = {
        "raw_bytes": spec.size * spec.size * 3,
        "thumbnail_256_q85_bytes_mean": float(np.mean(thumbs)),
    }
    for name, encode in CANDIDATES.items():
        sizes, enc_ms, dec_ms = [], [], []
        for arr in inputs:
            best_e = best_d = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = encode(arr)
                t1 = time.perf_counter()
                with Image.open(io.BytesIO(data)) as im:
                    back = np.asarray(im)
                t2 = time.perf_counter()
                best_e, best_d = min(best_e, t1 - t0), min(best_d, t2 - t1)
            assert np.array_equal(back, arr), f"{name} is not lossless"
            sizes.append(len(data))
            enc_ms.append(1000 * best_e)
            dec_ms.append(1000 * best_d)
        out[name] = {
            "bytes_mean": float(np.mean(sizes)),
            "bytes_median": float(np.median(sizes)),
            "encode_ms": float(np.mean(enc_ms)),
            "decode_ms": float(np.mean(dec_ms)),
        }
    # The read path the search API runs: file read + decode + checks (ModelInputStore.load).
    store = ModelInputStore(tmp / "store", spec)
    shas = []
    for i, arr in enumerate(inputs):
        sha = hashlib.sha256(str(i).encode()).hexdigest()
        store.put(sha, encode_model_input(arr))
        shas.append(sha)
    load_ms = []
    for sha, arr in zip(shas, inputs, strict=True):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = store.load(sha)
            best = min(best, time.perf_counter() - t0)
        assert got is not None and np.array_equal(got, arr)
        load_ms.append(1000 * best)
    out["store_load_ms"] = float(np.mean(load_ms))
    return out


# ---------------------------------------------------------------------------------------------- deviation


def _scene_folder(tmp: Path, name: str, n: int, size: int) -> Path:
    from blip2_train.scenes import generate_dataset

    generate_dataset(tmp / name, n, seed=777, image_size=size, max_objects=2)
    return tmp / name / "images"


def _noise_folder(tmp: Path, n: int) -> Path:
    folder = tmp / "noise" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(folder / f"n{i}.png")
    return folder


def _by_id(settings, encoder, folder: Path) -> dict[Path, np.ndarray]:
    """Path -> the float pixels Media hands the model for that image id."""
    from sqlalchemy.orm import Session

    from catalog import repository as repo
    from catalog.db import make_engine
    from search_api.service.catalog_reader import CatalogReader
    from search_api.service.image_store import ImageStore

    shas = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    engine = make_engine(settings.resolved_database_url)
    with Session(engine) as s:
        ids = repo.image_ids_by_hash(s, shas.values())
    engine.dispose()
    view = CatalogReader(settings.resolved_database_url)
    try:
        media = ImageStore.from_settings(view, encoder.spec, settings)
        return {p: media.pixels(ids[sha]) for p, sha in shas.items()}
    finally:
        view.close()


def _compare(encoder, by_id: dict[Path, np.ndarray], reference: np.ndarray, ref_logits, ref_caps) -> dict:
    pixels = np.stack(list(by_id.values()))
    logits = np.stack([encoder.itm(pixels, q).logits[:, 1] for q in QUERIES])
    diff = np.abs(logits - ref_logits)
    orders_differ = sum(
        not np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))
        for a, b in zip(logits, ref_logits, strict=True)
    )
    captions = encoder.caption(pixels) if encoder.caption_model is not None else []
    return {
        "itm_logit_abs_diff_max": float(diff.max()),
        "itm_logit_abs_diff_mean": float(diff.mean()),
        "queries_with_other_order": int(orders_differ),
        "captions_differing": int(sum(a != b for a, b in zip(captions, ref_caps, strict=True))),
        "pixel_abs_diff_max": float(np.abs(pixels - reference).max()),
    }


def bench_deviation(model: Path, sets: dict[str, Path], tmp: Path) -> dict:
    from blip2_embed.encoder import Blip2Encoder
    from blip2_search.settings import Settings
    from tests.support.catalog import index_folder

    encoder = Blip2Encoder.from_pretrained(
        retrieval=str(model / "retrieval"), caption=str(model / "caption"), device="cpu", batch_size=32
    )
    variants = {
        "stored input, exact decode": {"fast_jpeg": False},
        "stored input, fast JPEG": {"fast_jpeg": True},
        "thumbnail fallback (before the store)": {"fast_jpeg": False, "store_model_inputs": False},
    }
    out: dict = {"model": str(model), "spec_size": encoder.spec.size, "queries": QUERIES, "sets": {}}
    for set_name, folder in sets.items():
        files = sorted(folder.iterdir())
        # The original file through the upload routes' path: load_image (no draft) + preprocess.
        reference = np.stack([preprocess([load_image(p)], encoder.spec)[0] for p in files])
        ref_logits = np.stack([encoder.itm(reference, q).logits[:, 1] for q in QUERIES])
        ref_caps = encoder.caption(reference)
        row: dict = {"images": len(files), "formats": sorted({p.suffix for p in files})}
        for v_name, overrides in variants.items():
            settings = Settings(data_dir=tmp / f"data-{set_name}-{len(row)}", device="cpu", **overrides)
            index_folder(settings, encoder, folder)
            row[v_name] = _compare(
                encoder, _by_id(settings, encoder, folder), reference, ref_logits, ref_caps
            )
        out["sets"][set_name] = row
        print(json.dumps({set_name: row}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=Path, help="a folder of photos (default: synthetic 12 MP JPEGs)")
    parser.add_argument("--n", type=int, default=0, help="photos to use (0: all, or 12 synthetic)")
    parser.add_argument("--size", type=int, default=224, help="model input size S for the format bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--skip-deviation", action="store_true")
    parser.add_argument("--note", help="free text stored in the results (e.g. where the photos came from)")
    parser.add_argument("--tag", help="results file tag (default cpu-<hostname>)")
    args = parser.parse_args()

    core = pin_to_one_core()
    with tempfile.TemporaryDirectory(prefix="bench-model-inputs-") as tmp_name:
        tmp = Path(tmp_name)
        files = photo_files(args.photos, args.n, tmp)
        print(f"{len(files)} photos")
        fmt = bench_format(files, ImageSpec(size=args.size), args.repeats, tmp)
        print(json.dumps(fmt, indent=1))
        deviation = None
        if not args.skip_deviation:
            photos = tmp / "photos"
            photos.mkdir()
            for f in files:
                (photos / f.name).write_bytes(f.read_bytes())
            sets = {
                "photos": photos,
                "drawings 128 px (PNG)": _scene_folder(tmp, "scenes-128", 24, 128),
                "drawings 512 px (PNG)": _scene_folder(tmp, "scenes-512", 24, 512),
                "noise 320x240 (PNG)": _noise_folder(tmp, 12),
            }
            deviation = bench_deviation(args.model, sets, tmp)

    result = {
        "benchmark": "model_inputs",
        "cpu": cpu_name(),
        "pinned_core": core,
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libwebp": features.version("webp"),
        "zlib": features.version("zlib"),
        "note": args.note,
        "photos": args.photos.name if args.photos else "synthetic 4000x3000 JPEG q90 (bench_fast_jpeg)",
        "format": {"spec_size": args.size, "repeats": args.repeats, **fmt},
        "deviation": deviation,
    }
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or f"cpu-{socket.gethostname()}"
    path = RESULTS / f"model_inputs-{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

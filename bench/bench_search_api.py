"""Latency per stage and requests/s of the search API, beside the plain transformers way.

    python bench/bench_search_api.py                       # tiny checkpoints, CPU (a few minutes)
    python bench/bench_search_api.py --retrieval DIR --caption DIR --device cuda --photos 2000

Ours: a real catalog filled by the real indexer, the app in process (TestClient, so HTTP parsing is
included but no socket), stage timings from each response's ``timings_ms``; then requests/s of a real
``blip2-search serve`` process under 8 concurrent clients. Plain: the same steps as a straightforward
transformers user would write them: ``Blip2ForImageTextRetrieval.forward`` for the text vector (it needs
an image, so one dummy image rides along), a NumPy max-sim scan, ``forward(use_image_text_matching_head=
True)`` over the candidates decoded from their original files with ``Blip2Processor``, and
``Blip2ForConditionalGeneration.generate`` for captions. Writes bench/results/search_api-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2_search.settings import Settings
from tests.support.catalog import index_folder, make_photos
from tests.support.server import ServerProcess

RESULTS = Path(__file__).parent / "results"
QUERIES = ["a dog on the beach", "red car", "two people near a tree", "sunset over water", "a small cat"]


def pct(values: list[float]) -> dict[str, float]:
    vs = sorted(values)
    return {
        "p50_ms": round(statistics.median(vs), 3),
        "p95_ms": round(vs[min(len(vs) - 1, round(0.95 * (len(vs) - 1)))], 3),
        "n": len(vs),
    }


def bench_ours(client, args, database_url: str) -> dict:
    from sqlalchemy import delete

    from catalog.db import make_engine
    from catalog.models import Caption

    engine = make_engine(database_url)
    stages: dict[str, list[float]] = {}
    for i in range(args.repeats):
        q = QUERIES[i % len(QUERIES)] + f" {i}"
        if not args.caption_cache:
            # Captions are cached per image in the catalog and the top hits repeat across queries: empty
            # the cache (untimed) so every request generates its captions, as the plain loop does.
            with engine.begin() as conn:
                conn.execute(delete(Caption))
        params = {"q": q, "k": args.k, "rerank": args.depth, "captions": args.captions}
        body = client.get("/api/search", params=params).json()
        for name, ms in body["timings_ms"].items():
            stages.setdefault(name, []).append(ms)
    return {name: pct(v) for name, v in stages.items()}


def bench_plain(args, photos: list[Path], device: str) -> dict:
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    retr = Blip2ForImageTextRetrieval.from_pretrained(args.retrieval).to(device).eval()
    rproc = Blip2Processor.from_pretrained(args.retrieval)
    cap = Blip2ForConditionalGeneration.from_pretrained(args.caption).to(device).eval()
    cproc = Blip2Processor.from_pretrained(args.caption)
    dummy = Image.new("RGB", (224, 224))
    # The index: every photo's 32 vectors, computed the plain way once (not timed).
    with torch.inference_mode():
        vecs = []
        for start in range(0, len(photos), 16):
            ims = [Image.open(p).convert("RGB") for p in photos[start : start + 16]]
            inp = rproc(images=ims, text=["x"] * len(ims), return_tensors="pt").to(device)
            out = retr(**inp, use_image_text_matching_head=False)
            vecs.append(out.image_embeds.float().cpu().numpy())
    index = np.concatenate(vecs)
    times: dict[str, list[float]] = {"text_encode": [], "vector_search": [], "rerank": [], "captions": []}
    for i in range(-1, args.repeats):  # i = -1: an untimed warm-up, as the API gets
        q = QUERIES[i % len(QUERIES)] + f" {i}"
        sample: dict[str, float] = {}
        with torch.inference_mode():
            t = time.perf_counter()
            inp = rproc(images=[dummy], text=[q], return_tensors="pt").to(device)
            tvec = retr(**inp, use_image_text_matching_head=False).text_embeds[0].float().cpu().numpy()
            sample["text_encode"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            sims = np.einsum("nqd,d->nq", index, tvec).max(axis=1)
            top = np.argsort(-sims)[: max(args.depth, args.k)]
            sample["vector_search"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            cand = [Image.open(photos[j]).convert("RGB") for j in top[: args.depth]]
            inp = rproc(images=cand, text=[q] * len(cand), return_tensors="pt", padding=True).to(device)
            logits = retr(**inp, use_image_text_matching_head=True).logits_per_image
            order = np.argsort(-(logits[:, 1].float().cpu().numpy() + sims[top[: args.depth]]))
            sample["rerank"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            best = [cand[j] for j in order[: args.captions]]
            if best:
                cin = cproc(images=best, return_tensors="pt").to(device)
                cap.generate(**cin, max_new_tokens=args.max_new_tokens)
            sample["captions"] = (time.perf_counter() - t) * 1000
        if i >= 0:
            for name, ms in sample.items():
                times[name].append(ms)
    out = {name: pct(v) for name, v in times.items()}
    out["total"] = pct([sum(v[i] for v in times.values()) for i in range(args.repeats)])
    return out


def requests_per_second(server: ServerProcess, args, seconds: float, depth: int, captions: int) -> float:
    stop = threading.Event()
    done = [0, 0]  # ok, failed
    lock = threading.Lock()

    def client(w: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            n = 0
            while not stop.is_set():
                n += 1
                params = {
                    "q": f"{QUERIES[n % 5]} {w} {n}",
                    "k": args.k,
                    "rerank": depth,
                    "captions": captions,
                }
                try:
                    ok = c.get("/api/search", params=params).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    done[0 if ok else 1] += 1

    with ThreadPoolExecutor(args.clients) as pool:
        futs = [pool.submit(client, w) for w in range(args.clients)]
        t = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for f in futs:
            f.result()
    if done[1]:
        raise RuntimeError(f"{done[1]} failed requests during the throughput run")
    return round(done[0] / (time.perf_counter() - t), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrieval", help="retrieval checkpoint folder (default: tiny test checkpoints)")
    ap.add_argument("--caption", help="caption checkpoint folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--captions", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--caption-cache",
        action="store_true",
        help="let the API reuse captions stored by earlier requests (default: generate every time)",
    )
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from blip2_embed.encoder import Blip2Encoder
    from search_api.app import create_app

    work = Path(tempfile.mkdtemp(prefix="bench-search-api-"))
    if not args.retrieval:
        from blip2_train.scratch import build_tiny_checkpoints

        ck = build_tiny_checkpoints(work / "ckpt")
        args.retrieval, args.caption = str(ck.retrieval), str(ck.caption)
    photos = make_photos(work / "photos", args.photos)
    settings = Settings(
        data_dir=work / "data",
        retrieval_model=args.retrieval,
        caption_model=args.caption,
        device=args.device,
        caption_max_new_tokens=args.max_new_tokens,
    )
    encoder = Blip2Encoder.from_pretrained(args.retrieval, args.caption, device=args.device)
    t = time.perf_counter()
    index_folder(settings, encoder, work / "photos")
    index_s = time.perf_counter() - t
    with TestClient(create_app(settings, encoder=encoder)) as client:
        for q in QUERIES:  # warm-up
            client.get("/api/search", params={"q": q, "k": args.k, "rerank": args.depth, "captions": 1})
        ours = bench_ours(client, args, settings.resolved_database_url)
    plain = bench_plain(args, photos, args.device)
    with ServerProcess(settings, extra_env={"OMP_NUM_THREADS": str(torch.get_num_threads())}) as server:
        rps = {
            "itc_only": requests_per_second(server, args, args.seconds, 0, 0),
            "rerank": requests_per_second(server, args, args.seconds, args.depth, 0),
            "rerank_and_captions": requests_per_second(server, args, args.seconds, args.depth, args.captions),
        }
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "model": "tiny test checkpoints" if "ckpt" in args.retrieval else args.retrieval,
        "photos": args.photos,
        "index_seconds": round(index_s, 2),
        "params": {
            k: getattr(args, k)
            for k in ("k", "depth", "captions", "max_new_tokens", "repeats", "clients", "caption_cache")
        },
        "ours_stage_latency": ours,
        "plain_transformers_stage_latency": plain,
        "ours_requests_per_second": rps,
        "notes": "ours: stages from the API's timings_ms (rerank = ViT + ITM + captions in one batch on "
        "thumbnails; unless caption_cache, the catalog's caption cache is emptied before every request, "
        "so captions are generated each time; decoded thumbnail pixels stay cached in memory by id). "
        "plain: re-rank decodes originals with Blip2Processor and runs the full ITM forward, captions "
        "run their own ViT. requests_per_second runs leave the caption cache on (a live server).",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"search_api-{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Scale-out on one box: Ray's overhead for indexing, and the fan-out cost of a sharded index.

- ``indexing``: the same folder of JPEGs indexed by ``run_index`` locally (decode worker processes) and
  with ``--engine ray`` (Ray Data decode tasks + encoder actors) on a local Ray, each into a fresh
  SQLite catalog; images/s of both and their ratio (ray / local). The Ray figure includes starting
  the run's actors and loading the model in them (the local run loads nothing: the encoder is given).
- ``search``: ``--images`` synthetic images of 32 unit vectors (BLIP-2's shape, D=256) in one flat
  index, searched in process (``IndexHandle``, what the single-process server does), against the same
  images over 1, 2 and 4 shard actors (``search_api.scaleout``: one query fans out, the top-k lists
  merge); text query p50/p95 (ms) and, for each, that the merged top-k equals the single index's.

    python bench/bench_scale_out.py --out bench/results/scale_out-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog.index_store import VectorIndexOptions
from catalog.vector_index import MultiVectorIndex
from search_api.scaleout.shards import IndexShard

V, D = 32, 256
CHUNK = 2048


def image_vectors(ids: np.ndarray) -> np.ndarray:
    """Deterministic unit vectors per image id (any shard can make its own images')."""
    out = np.empty((len(ids), V, D), np.float32)
    for n, i in enumerate(ids):
        out[n] = np.random.default_rng(int(i)).standard_normal((V, D), dtype=np.float32)
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    return out


def fill(index: MultiVectorIndex, ids: np.ndarray) -> None:
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        index.add(chunk, image_vectors(chunk))


class SyntheticShard(IndexShard):
    """A shard whose partition is synthetic (no catalog of 100k rows needed on this box)."""

    def __init__(self, shard: int, shards: int, images: int) -> None:
        super().__init__("sqlite://", "bench", shard, shards, VectorIndexOptions(kind="flat"))
        self.images = images

    def _build(self, generation: int) -> MultiVectorIndex:
        index = MultiVectorIndex(D, kind="flat", vectors_per_image=V)
        ids = np.arange(1, self.images + 1, dtype=np.int64)
        fill(index, ids[ids % self.shards == self.shard])
        index.generation = generation
        return index


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }


def bench_search(images: int, shard_counts: list[int], queries: int, k: int) -> dict[str, Any]:
    import ray

    from search_api.scaleout.watcher import ShardedHandle
    from search_api.service.index_watcher import IndexHandle

    rng = np.random.default_rng(0)
    qs = rng.standard_normal((queries, D), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=-1, keepdims=True)
    t = time.perf_counter()
    single = MultiVectorIndex(D, kind="flat", vectors_per_image=V)
    fill(single, np.arange(1, images + 1, dtype=np.int64))
    single.generation = 1
    out: dict[str, Any] = {
        "images": images,
        "vectors_per_image": V,
        "dim": D,
        "k": k,
        "queries": queries,
        "index_bytes": single.memory_bytes(),
        "build_seconds_single": round(time.perf_counter() - t, 1),
    }
    handle = IndexHandle(single)
    handle.search(qs[0], k)  # warm-up
    times, expected = [], []
    for q in qs:
        t = time.perf_counter()
        expected.append(handle.search(q, k))
        times.append(time.perf_counter() - t)
    out["single_process"] = percentiles(times)
    del single, handle
    actor = ray.remote(SyntheticShard).options(num_cpus=0)
    for n in shard_counts:
        shards = [actor.remote(i, n, images) for i in range(n)]
        t = time.perf_counter()
        ray.get([s.prepare.remote(1) for s in shards])
        ray.get([s.activate.remote(1) for s in shards])
        sharded = ShardedHandle(shards, 1, images)
        build = time.perf_counter() - t
        sharded.search(qs[0], k)
        times, exact = [], True
        for q, want in zip(qs, expected, strict=True):
            t = time.perf_counter()
            got = sharded.search(q, k)
            times.append(time.perf_counter() - t)
            exact &= got == want
        out[f"shards_{n}"] = {**percentiles(times), "exact": exact, "build_seconds": round(build, 1)}
        out[f"shards_{n}"]["p50_ratio_vs_single"] = round(
            out[f"shards_{n}"]["p50_ms"] / out["single_process"]["p50_ms"], 2
        )
        for s in shards:
            ray.kill(s)
    # Per-shard scan rate of one flat partition, for the sizing table in docs/scale-out.md.
    out["flat_scan_rows_per_second_single"] = round(images * V / (out["single_process"]["p50_ms"] / 1000))
    return out


def bench_indexing(images: int, megapixels: float, batch: int) -> dict[str, Any]:
    from bench.bench_indexer import make_jpegs
    from blip2_embed.encoder import Blip2Encoder
    from blip2_embed.testing import build_tiny_checkpoints
    from indexer.ray_engine import EncoderRecipe, RayEngine, RayOptions
    from indexer.run import IndexOptions as RunOptions
    from indexer.run import IndexTarget, run_index

    base = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    try:
        ck = build_tiny_checkpoints(base / "ck")
        encoder = Blip2Encoder.from_pretrained(
            retrieval=str(ck.retrieval), caption=None, device="cpu", batch_size=batch
        )
        full, half = base / "full", base / "half"
        paths = make_jpegs(full, images, megapixels)
        half.mkdir()
        for p in paths[: images // 2]:
            shutil.copy(p, half / p.name)
        rows: dict[str, Any] = {}
        # Ray's first run pays for starting its worker processes (imports, model load in the actors);
        # later runs reuse idle workers. So: one cold Ray run on half the folder, then the measured
        # (warm) run on the full folder, against the local run on the full folder.
        runs = [("local", full), ("ray_cold", half), ("ray", full)]
        for name, lib in runs:
            data = base / name
            url = f"sqlite:///{data / 'catalog.db'}"
            engine = None
            if name.startswith("ray"):
                recipe = EncoderRecipe(str(ck.retrieval), None, device="cpu", batch_size=batch)
                engine = RayEngine(recipe, RayOptions(encoders=1))
            opts = RunOptions(
                roots=[lib], batch_size=batch, workers=max(1, (os.cpu_count() or 2) - 1),
                thumbnail_dir=data / "thumbnails", model_input_dir=data / "model_inputs",
            )  # fmt: skip
            target = IndexTarget(database_url=url, lock_path=data / "indexer.lock")
            t = time.perf_counter()
            summary = run_index(target, encoder, opts, model_engine=engine)
            seconds = time.perf_counter() - t
            rows[name] = {"images": summary.embedded, "seconds": round(seconds, 2),
                          "images_per_second": round(summary.embedded / seconds, 2)}  # fmt: skip
        rows["ratio_ray_vs_local"] = round(
            rows["ray"]["images_per_second"] / rows["local"]["images_per_second"], 3
        )
        rows["megapixels"] = megapixels
        rows["model"] = "tiny test checkpoint (CPU)"
        return rows
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000, help="images in the search benchmark")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--index-images", type=int, default=96, help="JPEGs in the indexing benchmark")
    ap.add_argument("--megapixels", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip", choices=["indexing", "search"], default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__},
    }
    if args.skip != "indexing":
        result["indexing"] = bench_indexing(args.index_images, args.megapixels, args.batch)
        print(json.dumps(result["indexing"], indent=1), flush=True)
    if args.skip != "search":
        shard_counts = [int(s) for s in args.shards.split(",")]
        result["search"] = bench_search(args.images, shard_counts, args.queries, args.k)
        print(json.dumps(result["search"], indent=1), flush=True)
    ray.shutdown()
    if args.out:
        # A run of one part (--skip) keeps the other part's earlier figures.
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**old, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()

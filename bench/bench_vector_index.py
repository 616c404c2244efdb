"""Speed, recall and memory of catalog.vector_index.MultiVectorIndex against collection size.

Synthetic unit vectors, D=256 and 32 vectors per image (BLIP-2's shapes), two datasets:

* ``random``: every vector uniform on the sphere. The adversarial case for IVF: nothing clusters, and the
  2nd..10th best images are near-ties of noise.
* ``clustered``: each image mixes 4 of N/100 topics (each of its 32 vectors is a topic centre plus noise),
  a rough stand-in for real embeddings, where IVF's lists mean something.

Queries are noisy copies of a random vector of a random image (so there is a right answer). For each
size the exact flat index is the ground truth for recall@10 / recall@1 of the IVF index (per codec, for
a sweep of nprobe). Latency is for one text query (M=1, k=10) after warm-up: p50 and p95 over
``--queries`` queries; image->image latency (32 query vectors, Chamfer) for the flat index.

    python bench/bench_vector_index.py                       # 10k, 100k, 1M where they fit
    python bench/bench_vector_index.py --sizes 10000 --datasets clustered
    python bench/bench_vector_index.py --device cuda         # flat searched by the torch GPU scan

Sizes whose index would not fit ``--max-index-gb`` (default 10 GB: the CPU dev box has 24 GB shared by
several people) or whose IVF assignment would exceed ``--max-ivf-gflop`` are skipped and the reason is
recorded. Writes bench/results/vector_index-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from catalog.vector_index import IvfCodec, MultiVectorIndex, auto_nlist

RESULTS = Path(__file__).parent / "results"
CHUNK = 4096  # images generated and added per step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Dataset:
    """Deterministic synthetic collection, regenerated chunk by chunk (never all in memory at once)."""

    def __init__(
        self, name: str, n: int, v: int, d: int, seed: int = 0, torch_device: str | None = None
    ) -> None:
        self.name, self.n, self.v, self.d, self.seed = name, n, v, d, seed
        self.torch_device = torch_device  # draw the noise there (fast on a GPU), else numpy
        rng = np.random.default_rng(seed)
        self.centres = self._unit(rng.standard_normal((max(64, n // 100), d), dtype=np.float32))

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        return x

    def chunk(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        count = stop - start
        if self.torch_device:
            import torch

            gen = torch.Generator(self.torch_device).manual_seed(self.seed * 1_000_003 + start)
            shape = (count, self.v, self.d)
            noise = torch.randn(shape, generator=gen, device=self.torch_device).cpu().numpy()
        else:
            noise = rng.standard_normal((count, self.v, self.d), dtype=np.float32)
        if self.name == "random":
            return self._unit(noise)
        topics = rng.integers(0, len(self.centres), (count, 4))
        pick = topics[np.arange(count)[:, None], rng.integers(0, 4, (count, self.v))]
        return self._unit(self.centres[pick] + 0.35 * self._unit(noise))

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.n, size):
            stop = min(self.n, start + size)
            yield np.arange(start, stop, dtype=np.int64), self.chunk(start, stop)

    def query_images(self, count: int) -> np.ndarray:
        """Ids of the images whose vectors the queries copy (sorted, distinct)."""
        rng = np.random.default_rng([self.seed, 2**32 - 1])
        return np.sort(rng.choice(self.n, size=min(count, self.n), replace=False))

    def queries(self, sources: np.ndarray, noise: float = 0.3) -> np.ndarray:
        """One query per source image (V, D): a noisy copy of one of its vectors."""
        rng = np.random.default_rng([self.seed, 2**32 - 2])
        q = sources[np.arange(len(sources)), rng.integers(0, self.v, len(sources))]
        return self._unit(q + noise * self._unit(rng.standard_normal(q.shape, dtype=np.float32)))

    def sample(self, images: int) -> np.ndarray:
        """A training sample spread over the collection (whole chunks at even strides)."""
        step = max(1, self.n // max(1, images))
        starts = range(0, self.n, max(step, 1))
        parts, have = [], 0
        for s in starts:
            take = min(256, self.n - s, images - have)
            if take <= 0:
                break
            parts.append(self.chunk(s, s + take))
            have += take
        return np.concatenate(parts)


def latencies(fn: Any, queries: np.ndarray, warmup: int = 3) -> dict[str, float]:
    for q in queries[:warmup]:
        fn(q)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "mean_ms": round(float(np.mean(times)), 3),
    }


def recall(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = [len(set(g[:k].tolist()) & set(t[:k].tolist())) / k for g, t in zip(got, truth, strict=True)]
    return round(float(np.mean(hits)), 4)


def bench_size(args: argparse.Namespace, dataset: str, n: int, out: dict[str, Any]) -> None:
    v, d = args.vectors_per_image, args.dim
    data = Dataset(dataset, n, v, d, torch_device="cuda" if args.device == "cuda" else None)
    query_images = data.query_images(args.queries)
    sources: list[np.ndarray] = []
    flat_bytes = n * v * d * 2
    ivf_bytes = {"sq8": n * v * (d + 48), "fp16": n * v * (2 * d + 48)}
    nlist = args.nlist or auto_nlist(n * v)
    ivf_gflop = 2 * n * v * nlist * d / 1e9
    budget = args.max_index_gb * 1e9

    build_flat = "flat" in args.kinds and flat_bytes <= budget
    if "flat" in args.kinds and not build_flat:
        out["skipped"].append(
            {
                "dataset": dataset,
                "n_images": n,
                "kind": "flat",
                "reason": f"needs {flat_bytes / 1e9:.1f} GB (fp16) > --max-index-gb {args.max_index_gb}",
            }
        )
    codecs: list[IvfCodec] = []
    for codec in args.codecs if "ivf" in args.kinds else []:
        reason = None
        if codec == "fp16" and n > args.ivf_fp16_max_images:
            reason = f"IVF-fp16 measured up to --ivf-fp16-max-images {args.ivf_fp16_max_images}"
        elif ivf_bytes[codec] + (flat_bytes if build_flat else 0) > budget:
            reason = f"needs {ivf_bytes[codec] / 1e9:.1f} GB beside the flat index > {args.max_index_gb} GB"
        elif ivf_gflop > args.max_ivf_gflop:
            reason = (
                f"assigning {n * v:,} vectors to {nlist} lists is {ivf_gflop:,.0f} GFLOP "
                f"> --max-ivf-gflop {args.max_ivf_gflop} (minutes on this CPU)"
            )
        elif not build_flat:
            reason = "no exact index to measure recall against"
        if reason:
            out["skipped"].append(
                {"dataset": dataset, "n_images": n, "kind": f"ivf-{codec}", "reason": reason}
            )
        else:
            codecs.append(codec)
    if not build_flat:
        return

    device = args.device
    indexes: dict[str, MultiVectorIndex] = {"flat": MultiVectorIndex(d, kind="flat", device=device)}
    add_s: dict[str, float] = {"flat": 0.0}
    rss: dict[str, int] = {}
    train_s: dict[str, float] = {}
    if codecs:
        sample = data.sample(math.ceil(64 * nlist / v))
        for codec in codecs:
            name = f"ivf-{codec}"
            index = MultiVectorIndex(d, kind="ivf", ivf_codec=codec, nlist=nlist, device="cpu")
            t0 = time.perf_counter()
            index.train(sample, expected_images=n)
            train_s[name] = time.perf_counter() - t0
            indexes[name] = index
            add_s[name] = 0.0
        del sample
    for name, index in indexes.items():
        before = rss_bytes()
        for ids, vecs in data.chunks():
            t0 = time.perf_counter()
            index.add(ids, vecs)
            add_s[name] += time.perf_counter() - t0
            if name == "flat":
                sources.extend(vecs[np.isin(ids, query_images)])
        rss[name] = rss_bytes() - before
        print(f"# {dataset} {n}: {name} added in {add_s[name]:.1f} s", flush=True)
    queries = data.queries(np.stack(sources))

    flat = indexes["flat"]
    truth, _ = flat.search(queries, 10)
    for name, index in indexes.items():
        row: dict[str, Any] = {
            "dataset": dataset,
            "n_images": n,
            "kind": name,
            "device": index.device if name == "flat" else "cpu",
            "add_images_per_s": round(n / add_s[name], 1),
            "memory_bytes_per_image": round(index.memory_bytes() / n, 1),
            "rss_growth_bytes_per_image": round(rss[name] / n, 1),
        }
        if name == "flat":
            row.update(latencies(lambda q, ix=index: ix.search(q, 10), queries))
            row["recall_at_10"] = 1.0
            row["image_query"] = latencies(
                lambda q, ix=index: ix.search_by_image(q, 10), np.stack(sources[:10]), warmup=1
            )
        else:
            row["train_s"] = round(train_s[name], 2)
            row["nlist"] = index.nlist
            sweep = []
            for nprobe in args.nprobe:
                if nprobe > (index.nlist or 1):
                    continue
                index.nprobe = nprobe
                got, _ = index.search(queries, 10)
                sweep.append(
                    {
                        "nprobe": nprobe,
                        "recall_at_10": recall(got, truth, 10),
                        "recall_at_1": recall(got, truth, 1),
                        **latencies(lambda q, ix=index: ix.search(q, 10), queries[: min(50, len(queries))]),
                    }
                )
            row["nprobe_sweep"] = sweep
        out["results"].append(row)
        print(json.dumps(row), flush=True)


def bench_rebuild(args: argparse.Namespace, n: int, out: dict[str, Any]) -> None:
    """Write n images (files, images, embeddings) into a SQLite catalog, then rebuild a flat index from it."""
    from sqlalchemy.orm import Session

    from catalog import db
    from catalog import repository as repo
    from catalog.index_store import VectorIndexOptions, build_from_catalog
    from catalog.models import FileStatus

    data = Dataset("clustered", n, args.vectors_per_image, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/catalog.db"
        db.upgrade(url)
        engine = db.make_engine(url)
        t0 = time.perf_counter()
        with Session(engine) as s:
            root = repo.get_or_create_root(s, tmp)
            gen = repo.open_generation(s)
            for ids, vecs in data.chunks(1024):
                found = repo.get_or_create_images(s, [(f"{i:064x}", 1) for i in ids.tolist()])
                image_ids = [found[f"{i:064x}"] for i in ids.tolist()]
                repo.store_embeddings(s, image_ids, "bench", vecs, gen)
                repo.upsert_files(
                    s,
                    root,
                    [
                        repo.FileUpdate(f"{i}.jpg", 1, 1, iid, FileStatus.INDEXED)
                        for i, iid in zip(ids, image_ids, strict=True)
                    ],
                    gen,
                )
                s.commit()
            repo.publish_generation(s, gen)
            s.commit()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = build_from_catalog(engine, "bench", VectorIndexOptions(kind="flat", device=args.device))
        rebuild_s = time.perf_counter() - t0
        assert len(index) == n
        size = Path(f"{tmp}/catalog.db").stat().st_size
        engine.dispose()
        t0 = time.perf_counter()
        index.save(Path(tmp) / "index.mvidx")
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        MultiVectorIndex.load(Path(tmp) / "index.mvidx")
        load_s = time.perf_counter() - t0
    row = {
        "n_images": n,
        "catalog": "sqlite",
        "catalog_write_images_per_s": round(n / write_s, 1),
        "catalog_bytes_per_image": round(size / n, 1),
        "rebuild_flat_images_per_s": round(n / rebuild_s, 1),
        "save_images_per_s": round(n / save_s, 1),
        "load_images_per_s": round(n / load_s, 1),
    }
    out["rebuild_from_catalog"].append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--datasets", type=strs, default=["random", "clustered"])
    parser.add_argument("--kinds", type=strs, default=["flat", "ivf"])
    parser.add_argument("--codecs", type=strs, default=["sq8", "fp16"])
    parser.add_argument("--nprobe", type=ints, default=[8, 16, 32, 64, 128])
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vectors-per-image", type=int, default=32)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument(
        "--ivf-fp16-max-images",
        type=int,
        default=10_000,
        help="IVF-fp16 builds as slowly as SQ8 and holds more memory than flat; measure it up to this size",
    )
    parser.add_argument("--catalog-sizes", type=ints, default=[10_000])
    parser.add_argument("--max-index-gb", type=float, default=10.0)
    parser.add_argument("--max-ivf-gflop", type=float, default=5_000.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    out: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "device": args.device,
            "load_average_at_start": list(os.getloadavg()),
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
        "rebuild_from_catalog": [],
        "skipped": [],
    }
    if args.device == "cuda":
        import torch

        out["machine"]["gpu"] = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    for n in args.sizes:
        for dataset in args.datasets:
            bench_size(args, dataset, n, out)
    for n in args.catalog_sizes:
        bench_rebuild(args, n, out)
    out["total_s"] = round(time.perf_counter() - started, 1)
    path = args.out or RESULTS / f"vector_index-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} in {out['total_s']} s")


if __name__ == "__main__":
    main()

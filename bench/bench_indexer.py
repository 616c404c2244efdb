"""End-to-end indexer throughput against a plain loop, in the same process and run.

Generates a folder of large JPEGs (default 12 MP, photo-like), then measures:
- ``plain``: PIL open -> transformers' BlipImageProcessor -> model forward, in batches, one process;
- ``indexer``: ``indexer.run.run_index`` (scan, hash, decode workers, model, writer, catalog, thumbnails,
  vector index) into a fresh SQLite catalog;
and writes images/s of both, their ratio, and the indexer's time split (decode wait / model / writes).

The model is the real BLIP-2 shape with random weights (``--shape real``; ViT-g + Q-Former, no hub
access needed) or the tiny test shape (``--shape tiny``, for a CPU smoke run). Random weights cost the
same FLOPs as trained ones.

    python bench/bench_indexer.py --images 64 --shape real --out bench/results/indexer-h100.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_indexer")


def _make_jpeg(args: tuple[Path, int, int, int, int]) -> Path:
    path, w, h, seed, i = args
    rng = np.random.default_rng((seed, i))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 200, (x + y) / (w + h) * 120 + 60], axis=-1)
    noise = rng.normal(0, 12, size=(h // 8, w // 8, 3)).astype(np.float32)
    noise = (
        np.asarray(Image.fromarray(np.uint8(np.clip(noise + 128, 0, 255))).resize((w, h)), np.float32) - 128
    )
    Image.fromarray(np.clip(base + noise + i, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_jpegs(folder: Path, n: int, megapixels: float, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + noise, quality 90), each with distinct content; made in
    parallel so a large set doesn't eat the benchmark machine's time."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    w = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = round(w * 3 / 4)
    jobs = [(folder / f"img_{i:05d}.jpg", w, h, seed, i) for i in range(n)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_make_jpeg, jobs))


def build_checkpoint(folder: Path, shape: str) -> str:
    """A retrieval checkpoint folder: the tiny test one, or the real BLIP-2 shape with random weights."""
    from blip2_embed.images import ImageSpec
    from blip2_train import scratch

    if shape == "tiny":
        return str(scratch.build_tiny_checkpoints(folder).retrieval)
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(
        qformer_config={"use_qformer_text_input": True, "vocab_size": len(scratch.build_bert_tokenizer())},
        image_text_hidden_size=256,
        num_query_tokens=32,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Blip2ForImageTextRetrieval(cfg).half()
    out = folder / "retrieval"
    model.save_pretrained(out)
    scratch.build_bert_tokenizer().save_pretrained(out)
    spec = ImageSpec(size=cfg.vision_config.image_size)
    (out / "preprocessor_config.json").write_text(json.dumps(spec.to_preprocessor_config()))
    return str(out)


def plain_loop(paths: list[Path], checkpoint: str, batch_size: int) -> float:
    """images/s of the obvious loop: PIL open, BlipImageProcessor, model forward per batch."""
    import torch
    from transformers import Blip2ForImageTextRetrieval, BlipImageProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = Blip2ForImageTextRetrieval.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    processor = BlipImageProcessor.from_pretrained(checkpoint)
    rate = plain_model_loop(paths, model, processor, batch_size)
    del model
    return rate


def plain_model_loop(paths: list[Path], model, processor, batch_size: int) -> float:
    """images/s of ``plain_loop`` with a model already loaded."""
    import torch

    device, dtype = model.device, model.vision_model.embeddings.patch_embedding.weight.dtype
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
            pixels = processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
            vision = model.vision_model(pixel_values=pixels).last_hidden_state
            mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=device)
            q = model.qformer(
                query_embeds=model.query_tokens.expand(len(images), -1, -1),
                encoder_hidden_states=vision,
                encoder_attention_mask=mask,
            ).last_hidden_state
            torch.nn.functional.normalize(model.vision_projection(q.to(dtype)), dim=-1).float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return len(paths) / elapsed


def indexer_run(
    paths: list[Path], checkpoint: str | None, batch_size: int, workers: int, work: Path, encoder=None
) -> dict:
    """``run_index`` end to end into a fresh SQLite catalog under ``work`` (``encoder``: an already
    loaded one, else ``checkpoint`` is loaded)."""
    from blip2_embed.encoder import Blip2Encoder
    from indexer.run import IndexOptions, IndexTarget, run_index

    if encoder is None:
        encoder = Blip2Encoder.from_pretrained(retrieval=checkpoint, caption=None, batch_size=batch_size)
    target = IndexTarget(f"sqlite:///{work / 'catalog.db'}", work / "indexer.lock", work / "index")
    opts = IndexOptions(
        roots=[paths[0].parent],
        batch_size=batch_size,
        workers=workers,
        thumbnail_dir=work / "thumbnails",
        thumbnail_size=256,
    )
    start = time.perf_counter()
    summary = run_index(target, encoder, opts)
    elapsed = time.perf_counter() - start
    assert summary.embedded == len(paths), summary.as_dict()
    return {
        "images_per_s": len(paths) / elapsed,
        "seconds": elapsed,
        "pipeline_seconds": summary.seconds,
        "timings": summary.timings,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--megapixels", type=float, default=12.0)
    ap.add_argument("--shape", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_jpegs(tmp / "photos", args.images, args.megapixels)
        log.info("generated %d JPEGs in %.1f s", len(paths), time.perf_counter() - t0)
        checkpoint = build_checkpoint(tmp / "model", args.shape)
        plain = plain_loop(paths, checkpoint, args.batch_size)
        log.info("plain loop: %.2f img/s", plain)
        ours = indexer_run(paths, checkpoint, args.batch_size, args.workers, tmp)
        log.info("indexer: %.2f img/s %s", ours["images_per_s"], ours["timings"])
    result = {
        "bench": "indexer",
        "images": args.images,
        "megapixels": args.megapixels,
        "shape": args.shape,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "plain_images_per_s": round(plain, 2),
        "indexer_images_per_s": round(ours["images_per_s"], 2),
        "ratio": round(ours["images_per_s"] / plain, 2),
        "indexer_seconds": round(ours["seconds"], 2),
        "indexer_split_seconds": ours["timings"],
        "note": "decode_wait: model loop blocked on decoders; model: forward; write: writer thread busy",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

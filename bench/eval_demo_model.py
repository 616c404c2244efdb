"""Quality of a demo-model pair on unseen scenes, per seed: what tests/blip2_train/test_quality.py gates,
at full size.

    python bench/eval_demo_model.py MODEL_DIR [--seeds 9001 9002 9003] [--n 300] [--k 16] [--json OUT]

MODEL_DIR holds retrieval/ and caption/ (the shipped pair: blip2_search/demo_model). Per seed: short
colour + shape queries' top-1 (ITC, and ITC + ITM the way the search API re-ranks), full-caption R@1
both ways (ITC, ITC + ITM), and the share of greedy captions naming colour and shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[9001, 9002, 9003])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--no-captions", action="store_true")
    parser.add_argument("--short-only", action="store_true", help="only the short-query figures")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from blip2_embed.encoder import Blip2Encoder
    from blip2_train.data import load_captions
    from blip2_train.evaluate import blind_recall, caption_accuracy, evaluate_retrieval, short_query_accuracy
    from blip2_train.scenes import generate_dataset, read_records

    caption = None if args.no_captions or args.short_only else str(args.model / "caption")
    retrieval = args.model / "retrieval" if (args.model / "retrieval").is_dir() else args.model
    enc = Blip2Encoder.from_pretrained(
        retrieval=str(retrieval), caption=caption, device="cpu", batch_size=128
    )
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(tmp, args.n, seed=seed, image_size=128)
            records = read_records(tmp)
            short = short_query_accuracy(enc, records, tmp, k=args.k)
            report = None
            if not args.short_only:
                report = evaluate_retrieval(enc, load_captions(Path(tmp) / "karpathy.json"), k=args.k)
            cap = None if caption is None else caption_accuracy(enc, records, tmp)
        row = {
            "seed": seed,
            "scenes": args.n,
            "short_itc": short.itc,
            "short_itm": short.itm,
            "short_colour_itc": short.colour_itc,
            # What a model that reads everything but the position would reach.
            "position_blind_t2i": blind_recall(records),
            "itc_t2i": None if report is None else report.itc_t2i.r1,
            "itm_t2i": None if report is None else report.itm_t2i.r1,
            "itc_i2t": None if report is None else report.itc_i2t.r1,
            "itm_i2t": None if report is None else report.itm_i2t.r1,
            "caption_colour_shape": None if cap is None else cap.accuracy,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

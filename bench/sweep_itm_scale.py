"""ITC and ITC + ITM recall of one retrieval model at several ITM logit scales, in one pass per seed.

    python bench/sweep_itm_scale.py MODEL_DIR [--seeds 9001 9002] [--n 300] [--alphas 1 0.1 0.05]

The fused re-rank score is ``alpha * ITM match logit + ITC cosine``; scaling the ITM head's weight and
bias by alpha (what docs/training.md does to the shipped model) gives exactly that, so the logits are
computed once per seed and every alpha is scored from them. Per seed and alpha: full-caption R@1 both
ways (ITC top 16 re-ranked, as the quality tests do) and short colour + shape queries' top-1 (ITC top
32 re-ranked, as /api/search does). Tune alpha on seeds the gates do not use.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_K = 16
SHORT_K = 32


def _top1(top: np.ndarray, correct: list[set[int]]) -> float:
    return float(np.mean([row[0] in correct[i] for i, row in enumerate(top)]))


def _fused_r1(
    itc: np.ndarray, top: np.ndarray, logits: np.ndarray, alpha: float, correct: list[set[int]]
) -> float:
    """R@1 when each row's ITC top-k is re-scored by alpha * logit + cosine (top-k only matters)."""
    rows = np.arange(len(itc))[:, None]
    fused = alpha * logits + itc[rows, top]
    best = top[np.arange(len(itc)), np.argmax(fused, axis=1)]
    return float(np.mean([b in correct[i] for i, b in enumerate(best)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[9001, 9002])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.2, 0.1, 0.07, 0.05, 0.03, 0.02])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from blip2_embed.encoder import Blip2Encoder, VisionFeatures, max_sim
    from blip2_train.data import load_captions
    from blip2_train.evaluate import SHORT_TEMPLATES, blind_recall, pixels_of
    from blip2_train.scenes import generate_dataset, read_records

    retrieval = args.model / "retrieval" if (args.model / "retrieval").is_dir() else args.model
    enc = Blip2Encoder.from_pretrained(retrieval=str(retrieval), caption=None, device="cpu", batch_size=128)

    def logits_of(feats: VisionFeatures, image_idx: np.ndarray, texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(image_idx), 512):
            sub = VisionFeatures(hidden=feats.hidden[torch.as_tensor(image_idx[s : s + 512])])
            out.append(enc.itm(sub, texts[s : s + 512]).logits[:, 1])
        return np.concatenate(out)

    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(tmp, args.n, seed=seed, image_size=128)
            records = read_records(tmp)
            items = load_captions(Path(tmp) / "karpathy.json")
            feats = enc.vision_features(pixels_of(items, enc))
        images = enc.embed_images(feats)
        texts = [c for item in items for c in item.captions]
        owner = np.array([i for i, item in enumerate(items) for _ in item.captions])
        itc = max_sim(images, enc.embed_texts(texts))  # (images, texts)
        t2i_ok = [{int(i)} for i in owner]
        i2t_ok = [set(np.flatnonzero(owner == i).tolist()) for i in range(len(items))]

        t2i = itc.T
        t2i_top = np.argsort(-t2i, axis=1, kind="stable")[:, :FULL_K]
        t2i_logit = logits_of(
            feats, t2i_top.reshape(-1), [texts[t] for t in np.repeat(np.arange(len(texts)), FULL_K)]
        )
        i2t_top = np.argsort(-itc, axis=1, kind="stable")[:, :FULL_K]
        i2t_logit = logits_of(
            feats, np.repeat(np.arange(len(items)), FULL_K), [texts[t] for t in i2t_top.reshape(-1)]
        )

        attrs = [(r.objects[0]["colour"], r.objects[0]["shape"]) for r in records]
        combos = sorted(set(attrs))
        short = [t.format(colour=c, shape=s) for c, s in combos for t in SHORT_TEMPLATES]
        wanted = [(c, s) for c, s in combos for _ in SHORT_TEMPLATES]
        s_itc = max_sim(images, enc.embed_texts(short)).T
        s_top = np.argsort(-s_itc, axis=1, kind="stable")[:, :SHORT_K]
        s_logit = logits_of(
            feats, s_top.reshape(-1), [short[t] for t in np.repeat(np.arange(len(short)), SHORT_K)]
        )
        s_ok = [{j for j, a in enumerate(attrs) if a == w} for w in wanted]

        row: dict[str, object] = {
            "seed": seed,
            "position_blind_t2i": round(blind_recall(records), 4),
            "itc_t2i": _top1(t2i_top, t2i_ok),
            "itc_i2t": _top1(i2t_top, i2t_ok),
            "short_itc": float(np.mean([s_top[i, 0] in s_ok[i] for i in range(len(short))])),
        }
        for alpha in args.alphas:
            row[f"a{alpha:g}"] = (
                round(_fused_r1(t2i, t2i_top, t2i_logit.reshape(-1, FULL_K), alpha, t2i_ok), 4),
                round(_fused_r1(itc, i2t_top, i2t_logit.reshape(-1, FULL_K), alpha, i2t_ok), 4),
                round(_fused_r1(s_itc, s_top, s_logit.reshape(-1, SHORT_K), alpha, s_ok), 4),
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

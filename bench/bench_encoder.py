"""Speed of blip2_embed.Blip2Encoder beside the plain transformers way of doing the same thing.

Full-size BLIP-2 shapes (EVA ViT-g, Q-Former, OPT-2.7B) with random weights: speed does not depend on
the weights, and the hub is unreachable here. ``--tiny`` uses the tiny test shapes (a CPU smoke run).

    python bench/bench_encoder.py            # full size, on CUDA when present
    python bench/bench_encoder.py --tiny     # minutes on a laptop CPU

Writes bench/results/encoder-<device>.json. Every "ours" number has a "plain" twin measured in the same
process on the same inputs, and the ratio plain_time / ours_time (> 1 means we are faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from blip2_embed.encoder import Blip2Encoder
from blip2_embed.images import ImageSpec
from blip2_train.scratch import TinyShape, build_bert_tokenizer, build_opt_tokenizer, tiny_configs

RESULTS = Path(__file__).parent / "results"

FULL = TinyShape(
    image_size=224,
    patch_size=14,
    vision_hidden=1408,
    vision_layers=39,
    qformer_hidden=768,
    qformer_layers=12,
    num_query_tokens=32,
    embed_dim=256,
    lm_hidden=2560,
    lm_layers=32,
    heads=16,
    max_text_len=35,
)


def full_configs(bert_vocab: int, opt_vocab: int, image_token: int):
    retrieval, caption = tiny_configs(FULL, bert_vocab, opt_vocab, image_token)
    # The real ViT-g MLP is 6144 wide (not 4x), the Q-Former 3072, cross-attention every other layer,
    # OPT-2.7B's FFN 10240 with 32 heads and a 50272-token vocabulary.
    for cfg in (retrieval, caption):
        cfg.vision_config.intermediate_size = 6144
        cfg.qformer_config.intermediate_size = 3072
        cfg.qformer_config.num_attention_heads = 12
        cfg.qformer_config.cross_attention_frequency = 2
        cfg.qformer_config.max_position_embeddings = 512
        cfg.text_config.ffn_dim = 10240
        cfg.text_config.num_attention_heads = 32
        cfg.text_config.vocab_size = 50272
        cfg.text_config.max_position_embeddings = 2048
    return retrieval, caption


def timed_pair(
    ours: Callable[[], object],
    plain: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> tuple[dict, dict]:
    """Time two ways of doing the same thing, alternating them so drift (clocks, a noisy host CPU that
    launches the kernels) hits both alike. Returns per-side {median_s, min_s, repeats}."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once(ours)
        once(plain)
    a, b = [], []
    for _ in range(repeats):
        a.append(once(ours))
        b.append(once(plain))

    def summary(xs: list[float]) -> dict:
        return {"median_s": statistics.median(xs), "min_s": min(xs), "repeats": repeats}

    return summary(a), summary(b)


def latency(ours: dict, plain: dict) -> dict:
    """Median and best-of times in ms and the plain/ours ratio of each (> 1: ours is faster)."""
    return {
        "ours_ms": ours["median_s"] * 1e3,
        "plain_ms": plain["median_s"] * 1e3,
        "ratio": plain["median_s"] / ours["median_s"],
        "ours_min_ms": ours["min_s"] * 1e3,
        "plain_min_ms": plain["min_s"] * 1e3,
        "ratio_min": plain["min_s"] / ours["min_s"],
    }


def build(tiny: bool, device: torch.device, dtype: torch.dtype, **encoder_kwargs: object):
    """Random-weight retrieval + caption models (same ViT blocks) and the encoder over them."""
    shape = TinyShape() if tiny else FULL
    bert = build_bert_tokenizer(max_len=shape.max_text_len)
    opt = build_opt_tokenizer()
    image_token = opt.convert_tokens_to_ids("<image>")
    if tiny:
        r_cfg, c_cfg = tiny_configs(shape, len(bert), len(opt), image_token)
    else:
        r_cfg, c_cfg = full_configs(len(bert), len(opt), image_token)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the accelerator: a CPU init of 3.9B parameters takes minutes
        retrieval = Blip2ForImageTextRetrieval(r_cfg).eval()
        caption = Blip2ForConditionalGeneration(c_cfg).eval()
    caption.vision_model.load_state_dict(retrieval.vision_model.state_dict())
    for model in (retrieval, caption):
        model.to(dtype)
        # What from_pretrained does with _keep_in_fp32_modules.
        model.qformer.float()
        model.query_tokens.data = model.query_tokens.data.float()
    spec = ImageSpec(size=shape.image_size, mean=ImageSpec.DEFAULT.mean, std=ImageSpec.DEFAULT.std)
    enc = Blip2Encoder(
        retrieval, bert, caption, opt, spec, retrieval_name="bench", caption_name="bench", **encoder_kwargs
    )
    return enc, retrieval, caption, bert, shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--caption-tokens", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    enc, retrieval, caption, bert, shape = build(args.tiny, device, dtype)
    s = shape.image_size
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "shapes": "tiny" if args.tiny else "full (ViT-g/14 224px, Q-Former, OPT-2.7B), random weights",
        "shared_vit": enc.shared_vit,
        "embed_images": [],
    }
    text = "a photo of a dog running on the beach at sunset"
    one_text = bert([text], return_tensors="pt", return_token_type_ids=False).to(device)

    def pixels(n: int) -> torch.Tensor:
        return torch.randn(n, 3, s, s, device=device, dtype=dtype)

    with torch.inference_mode():
        # 1. image embeddings (ViT + Q-Former + projection), pixels already on the device.
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            enc.batch_size = bs
            px = pixels(bs)
            texts = {k: v.expand(bs, -1) for k, v in one_text.items()}
            ours, plain = timed_pair(
                lambda px=px: enc.embed_images(px),
                lambda px=px, t=texts: retrieval(pixel_values=px, **t).image_embeds.cpu(),
                device,
                args.repeats,
            )
            results["embed_images"].append(
                {
                    "batch": bs,
                    "ours_img_per_s": bs / ours["median_s"],
                    "plain_img_per_s": bs / plain["median_s"],
                    "ratio": plain["median_s"] / ours["median_s"],
                    "ratio_min": plain["min_s"] / ours["min_s"],
                }
            )
            print("embed_images", results["embed_images"][-1], flush=True)
        enc.batch_size = 128

        # 2. text embedding latency: the plain model's forward needs an image, so it runs the ViT too.
        px1 = pixels(1)
        ours, plain = timed_pair(
            lambda: enc.embed_texts([text]),
            lambda: retrieval(pixel_values=px1, **one_text).text_embeds.cpu(),
            device,
            args.repeats * 4,
        )
        results["embed_text_1"] = latency(ours, plain)
        print("embed_text", results["embed_text_1"], flush=True)

        # 3. ITM of one text against k candidates: plain = forward with k images; ours from cached features.
        results["itm"] = []
        for k in (32, 128):
            px = pixels(k)
            feats = enc.vision_features(px)
            texts = {kk: v.expand(k, -1) for kk, v in one_text.items()}

            def plain_itm(px=px, t=texts):
                return retrieval(
                    pixel_values=px, use_image_text_matching_head=True, **t
                ).logits_per_image.cpu()

            ours_feat, plain = timed_pair(lambda f=feats: enc.itm(f, text), plain_itm, device, args.repeats)
            ours_px, _ = timed_pair(lambda px=px: enc.itm(px, text), plain_itm, device, args.repeats)
            results["itm"].append(
                {
                    "candidates": k,
                    "ours_cached_features_ms": ours_feat["median_s"] * 1e3,
                    "ours_from_pixels_ms": ours_px["median_s"] * 1e3,
                    "plain_ms": plain["median_s"] * 1e3,
                    "ratio_cached": plain["median_s"] / ours_feat["median_s"],
                    "ratio_from_pixels": plain["median_s"] / ours_px["median_s"],
                    "cached_features": latency(ours_feat, plain),
                }
            )
            print("itm", results["itm"][-1], flush=True)

        # 4. captions, fixed length so both sides generate the same number of tokens.
        results["caption"] = []
        n_tok = args.caption_tokens
        gen = {"max_new_tokens": n_tok, "min_new_tokens": n_tok, "num_beams": 1, "do_sample": False}
        for n in (1, 8):
            px = pixels(n)
            feats = enc.vision_features(px)

            def plain_caption(px=px):
                return caption.generate(pixel_values=px, **gen)

            reps = args.repeats
            ours_px, plain = timed_pair(
                lambda px=px: enc.caption_token_ids(px, **gen), plain_caption, device, reps
            )
            ours_feat, _ = timed_pair(
                lambda f=feats: enc.caption_token_ids(f, **gen), plain_caption, device, reps
            )
            results["caption"].append(
                {
                    "images": n,
                    "new_tokens": n_tok,
                    "ours_from_pixels_ms": ours_px["median_s"] * 1e3,
                    "ours_shared_features_ms": ours_feat["median_s"] * 1e3,
                    "plain_ms": plain["median_s"] * 1e3,
                    "ratio_from_pixels": plain["median_s"] / ours_px["median_s"],
                    "ratio_shared_features": plain["median_s"] / ours_feat["median_s"],
                    "from_pixels": latency(ours_px, plain),
                    "shared_features": latency(ours_feat, plain),
                }
            )
            print("caption", results["caption"][-1], flush=True)

        # 5. one query over k candidates at search time: ITM, then caption the top 8, sharing the ViT.
        k = 32
        px = pixels(k)
        texts = {kk: v.expand(k, -1) for kk, v in one_text.items()}

        def ours_rerank() -> None:
            feats = enc.vision_features(px)
            enc.itm(feats, text)
            enc.caption_token_ids(feats[slice(0, 8)], **gen)

        def plain_rerank() -> None:
            retrieval(pixel_values=px, use_image_text_matching_head=True, **texts)
            caption.generate(pixel_values=px[:8], **gen)

        ours, plain = timed_pair(ours_rerank, plain_rerank, device, args.repeats)
        results["rerank32_caption8"] = latency(ours, plain)
        print("rerank32_caption8", results["rerank32_caption8"], flush=True)

    if device.type == "cuda":
        results["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out = args.out or RESULTS / f"encoder-{'tiny-' if args.tiny else ''}{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Building and loading the models a training run starts from.

From a config (``SHAPES``): tokenizers made from the captions' words, dropout-free configs, query
tokens drawn as BLIP-2 does, and stage 2's caption model seeded with stage 1's ViT and Q-Former. From
checkpoints: plain ``from_pretrained`` in float32.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    PreTrainedTokenizerBase,
)

from blip2_train.data import CaptionedImage
from blip2_train.scenes import VOCABULARY
from blip2_train.scratch import (
    BASE_WORDS,
    TinyShape,
    build_bert_tokenizer,
    build_opt_tokenizer,
    tiny_configs,
)

# Model shapes by name. "demo" is the shipped demo model: small enough to train on two CPU cores in
# minutes and to ship in the repository, large enough to tell 8 colours x 6 shapes x 3 sizes x 9
# positions x 5 backgrounds apart. 32 queries as in BLIP-2, so the catalog sees the real layout.
SHAPES: dict[str, TinyShape] = {
    "tiny": TinyShape(),
    "demo": TinyShape(
        image_size=64,
        patch_size=16,
        vision_hidden=128,
        vision_layers=3,
        qformer_hidden=96,
        qformer_layers=2,
        num_query_tokens=32,
        embed_dim=64,
        lm_hidden=96,
        lm_layers=2,
        heads=4,
        max_text_len=32,
    ),
}


def caption_words(items: Iterable[CaptionedImage], limit: int = 4000) -> list[str]:
    """Words for the from-scratch tokenizers: the scene vocabulary, BLIP-2's test words and the most
    frequent words of the training captions, so common words are single tokens."""
    counts: Counter[str] = Counter()
    for item in items:
        for caption in (*item.captions, *item.queries):
            counts.update(re.findall(r"[a-z]+", caption.lower()))
    frequent = [w for w, _ in counts.most_common(limit)]
    return sorted(set(BASE_WORDS) | set(VOCABULARY) | set(frequent))


def build_tokenizers(
    words: Sequence[str], max_text_len: int
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    bert = build_bert_tokenizer(words, max_len=max_text_len)
    # Room for every word as one merge sequence; byte-level BPE needs 256 byte tokens + merges.
    opt = build_opt_tokenizer(words, vocab_size=max(1000, 300 + 3 * len(words)))
    return bert, opt


def scratch_configs(
    shape: TinyShape, bert: PreTrainedTokenizerBase, opt: PreTrainedTokenizerBase
) -> tuple[Blip2Config, Blip2Config]:
    """Configs for a new model pair, without dropout: with a few hundred steps on clean synthetic
    data there is nothing to regularise against and dropout only slows learning."""
    image_token = opt.convert_tokens_to_ids("<image>")
    assert isinstance(image_token, int)
    retrieval, caption = tiny_configs(shape, len(bert), len(opt), image_token)
    cfg: Any
    for cfg in (retrieval, caption):
        cfg.qformer_config.hidden_dropout_prob = 0.0
        cfg.qformer_config.attention_probs_dropout_prob = 0.0
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(cfg.text_config, key, 0.0)
    return retrieval, caption


def init_vision_positions(model: Any, std: float, seed: int) -> None:
    """Draw a new ViT's position embeddings from N(0, std).

    transformers initialises them at std 0.02, about 1/28 of a patch embedding's output. A ViT built
    that way and trained from scratch stays blind to where things are (docs/training.md, "Position");
    at std 1.0 the demo ViT learns position.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    pe = model.vision_model.embeddings.position_embedding
    with torch.no_grad():
        pe.copy_(torch.randn(pe.shape, generator=gen) * std)


def init_query_tokens(model: Any, seed: int) -> None:
    # Zeros (the HF init) would make all queries identical; BLIP-2 draws them from N(0, 0.02).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen) * 0.02)


def copy_stage1_into_caption(
    retrieval: Blip2ForImageTextRetrieval, caption: Blip2ForConditionalGeneration
) -> None:
    """Start stage 2 from stage 1: the whole ViT, the query tokens and the Q-Former's shared weights
    (the caption Q-Former has no text feed-forward branch, so those stage-1 weights are left out)."""
    with torch.no_grad():
        caption.vision_model.load_state_dict(retrieval.vision_model.state_dict())
        caption.query_tokens.copy_(retrieval.query_tokens)
        missing, _unexpected = caption.qformer.load_state_dict(retrieval.qformer.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"stage-1 Q-Former lacks weights the caption Q-Former needs: {missing[:5]}")


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def load_retrieval(path: str) -> tuple[Blip2ForImageTextRetrieval, PreTrainedTokenizerBase]:
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def load_caption(path: str) -> tuple[Blip2ForConditionalGeneration, PreTrainedTokenizerBase]:
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def queries_from_caption(
    retrieval: Blip2ForImageTextRetrieval, caption: Blip2ForConditionalGeneration
) -> None:
    """Give ``retrieval`` the caption model's query path: its Q-Former weights (self- and
    cross-attention, query feed-forward; the retrieval-only text feed-forward is kept), query tokens
    and the ViT's final LayerNorm. The ViT blocks must be the same (one shared ViT pass).

    A caption Q-Former trained long enough names colour and shape; ITC trained only on full captions
    can rank well while barely looking at shape, and learning it from there takes thousands of steps.
    """
    if not _same_blocks(retrieval, caption):
        raise ValueError("the caption checkpoint's ViT blocks differ from the retrieval model's")
    with torch.no_grad():
        retrieval.qformer.load_state_dict(caption.qformer.state_dict(), strict=False)
        retrieval.query_tokens.copy_(caption.query_tokens)
        retrieval.vision_model.post_layernorm.load_state_dict(
            caption.vision_model.post_layernorm.state_dict()
        )


def _same_blocks(a: Any, b: Any) -> bool:
    sa, sb = a.vision_model.encoder.state_dict(), b.vision_model.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

"""BLIP-2 models from scratch, built offline: shapes, tokenizers from a word list, configs, checkpoints.

Training from a config (``blip2_train.model_setup``) builds its tokenizers and configs here, and so
do the tiny checkpoints the tests and benchmarks use: same code, production layout.

Model hubs are unreachable where the tests run, so the project makes its own small checkpoints: real
``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` + tokenizer files, written with
``save_pretrained`` and read back by exactly the loader that reads ``Salesforce/blip2-*``. The two
checkpoints share their ViT blocks (as the real retrieval and OPT checkpoints do) but each has its own
final LayerNorm, so the shared-ViT path is exercised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    GPT2Tokenizer,
)

from blip2_embed.images import ImageSpec

# Words the tiny tokenizers know as whole tokens; anything else is spelled from characters/bytes.
BASE_WORDS = tuple(
    """
a an the of in on at with and or is are to by from near next above below left right top bottom
center middle corner small large big tiny huge medium red green blue yellow orange purple pink
white black gray grey brown cyan magenta circle square triangle star ring cross diamond
rectangle ellipse background picture photo image shows showing there one two three four some
many this that what where which who how question answer dog cat car tree house person people sky
water beach city street mountain flower food table room night day sunset snow grass road boat
bird horse
""".split()
)


@dataclass(frozen=True)
class TinyCheckpoints:
    """Folders of a retrieval (ITC/ITM) and a caption (OPT) checkpoint."""

    retrieval: Path
    caption: Path


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a small BLIP-2; the defaults make a model that runs in milliseconds on a CPU."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    qformer_hidden: int = 32
    qformer_layers: int = 2
    num_query_tokens: int = 32
    embed_dim: int = 16
    lm_hidden: int = 32
    lm_layers: int = 2
    heads: int = 4
    max_text_len: int = 32


def build_bert_tokenizer(words: Iterable[str] = BASE_WORDS, max_len: int = 32) -> BertTokenizer:
    """A WordPiece tokenizer (the Q-Former's BERT kind) with a small vocabulary, made without downloads."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;!?'\"-()/&")
    vocab_list = specials + chars + ["##" + c for c in chars] + sorted(set(words) - set(chars))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_len)
    return tokenizer


def build_opt_tokenizer(words: Iterable[str] = BASE_WORDS, vocab_size: int = 1000) -> GPT2Tokenizer:
    """A byte-level BPE tokenizer laid out like OPT's (``</s>`` is BOS and EOS), trained on a word list."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(words)] * 4 + [f" {w}" for w in words]
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = GPT2Tokenizer(
        vocab=state["vocab"],
        merges=merges,  # type: ignore[arg-type]  # typed as strings; the tokenizer takes pairs too
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=512,
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def tiny_configs(
    shape: TinyShape, bert_vocab: int, opt_vocab: int, image_token_index: int
) -> tuple[Blip2Config, Blip2Config]:
    """Configs for the retrieval and the caption model; sub-configs are dicts, as transformers 5 wants."""
    vision = dict(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 4,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        initializer_range=0.02,
    )
    qformer = dict(
        hidden_size=shape.qformer_hidden,
        intermediate_size=shape.qformer_hidden * 4,
        num_hidden_layers=shape.qformer_layers,
        num_attention_heads=shape.heads,
        cross_attention_frequency=1,
        encoder_hidden_size=shape.vision_hidden,
        max_position_embeddings=max(64, shape.max_text_len),
    )
    text = dict(
        model_type="opt",
        vocab_size=opt_vocab,
        hidden_size=shape.lm_hidden,
        ffn_dim=shape.lm_hidden * 4,
        num_hidden_layers=shape.lm_layers,
        num_attention_heads=shape.heads,
        word_embed_proj_dim=shape.lm_hidden,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    retrieval = Blip2Config(
        vision_config=vision,
        qformer_config={**qformer, "vocab_size": bert_vocab, "use_qformer_text_input": True},
        text_config=text,
        num_query_tokens=shape.num_query_tokens,
        image_text_hidden_size=shape.embed_dim,
    )
    caption = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=shape.num_query_tokens,
        image_token_index=image_token_index,
    )
    return retrieval, caption


def build_tiny_checkpoints(
    folder: str | Path, shape: TinyShape | None = None, seed: int = 0
) -> TinyCheckpoints:
    """Write a retrieval and a caption checkpoint under ``folder`` (``retrieval/``, ``caption/``)."""
    shape = shape or TinyShape()
    folder = Path(folder)
    bert = build_bert_tokenizer(max_len=shape.max_text_len)
    opt = build_opt_tokenizer()
    image_token = opt.convert_tokens_to_ids("<image>")
    assert isinstance(image_token, int)
    retrieval_cfg, caption_cfg = tiny_configs(shape, len(bert), len(opt), image_token)

    torch.manual_seed(seed)
    retrieval = Blip2ForImageTextRetrieval(retrieval_cfg).eval()
    caption = Blip2ForConditionalGeneration(caption_cfg).eval()
    with torch.no_grad():
        # Same frozen ViT blocks, different final LayerNorm: the layout of the real Salesforce pair.
        caption.vision_model.embeddings.load_state_dict(retrieval.vision_model.embeddings.state_dict())
        caption.vision_model.encoder.load_state_dict(retrieval.vision_model.encoder.state_dict())
        for norm in (retrieval.vision_model.post_layernorm, caption.vision_model.post_layernorm):
            norm.weight.normal_(1.0, 0.1)
            norm.bias.normal_(0.0, 0.1)
        # Random query tokens: zeros (the init) would make all 32 queries identical.
        for model in (retrieval, caption):
            model.query_tokens.normal_(0.0, 0.5)

    out = TinyCheckpoints(retrieval=folder / "retrieval", caption=folder / "caption")
    spec = ImageSpec(size=shape.image_size)
    for model, path, tokenizer in ((retrieval, out.retrieval, bert), (caption, out.caption, opt)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        # The file BlipImageProcessor reads, written as the Salesforce checkpoints have it.
        (path / "preprocessor_config.json").write_text(json.dumps(spec.to_preprocessor_config(), indent=2))
    return out

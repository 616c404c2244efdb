"""The GPU fast paths against the exact ones, on the CPU with the tiny checkpoints.

- ``GreedyDecoder`` (static KV cache, the step CUDA graphs replay) gives ``generate``'s greedy tokens
  exactly: batch sizes, prompt lengths, EOS mid-batch, every row finishing early, min lengths;
- requests that are not plain greedy go to ``generate``;
- the encoder with the fast paths on gives the same captions, embeddings and ITM scores;
- the functions CUDA graphs capture trace without a host sync or a data-dependent branch (TorchDynamo
  with ``fullgraph=True`` refuses both), which is what a capture needs;
- a bf16 Q-Former stays close to the fp32 one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from blip2_embed.decoding import GreedyDecoder, greedy_plan
from blip2_embed.encoder import Blip2Encoder

ATOL = 2e-5
PROMPT = "Question: what is in the picture? Answer:"
TEXTS = ["a red circle", "two blue squares on a white background", "a tiny green star in the corner"]


@pytest.fixture(scope="module")
def lm(tiny_checkpoints):
    return Blip2ForConditionalGeneration.from_pretrained(tiny_checkpoints.caption).eval().language_model


@pytest.fixture(scope="module")
def fast_encoder(tiny_checkpoints):
    return Blip2Encoder.from_pretrained(
        str(tiny_checkpoints.retrieval),
        str(tiny_checkpoints.caption),
        device="cpu",
        batch_size=4,
        fast_decode=True,
    )


def embeds(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    # Large random prompt embeddings make the tiny LM's rows differ from each other.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 32, generator=g) * 3


@torch.inference_mode()
def generate(lm, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
    b, p, _ = inputs_embeds.shape
    ids = torch.full((b, p), 5)
    out = lm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=torch.ones_like(ids),
        input_ids=ids,
        pad_token_id=1,
        **kwargs,
    )
    return out[:, p:]


def fast(decoder: GreedyDecoder, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
    plan = greedy_plan(decoder.model.generation_config, inputs_embeds.shape[1], pad_token_id=1, **kwargs)
    assert plan is not None
    return decoder.generate(inputs_embeds, plan)


def staggered_eos(rows: list[list[int]]) -> list[int]:
    """For each row a token it alone emits, at a later step than the previous row's: as EOS ids, they
    make the rows finish one after another."""
    eos: list[int] = []
    for r, row in enumerate(rows):
        for k in range(1 + r, len(row)):
            others = [o[: k + 1] for j, o in enumerate(rows) if j != r]
            if row[k] not in row[:k] and all(row[k] not in o for o in others):
                eos.append(row[k])
                break
    return eos


@pytest.mark.parametrize(("batch", "length"), [(1, 7), (5, 33)])
def test_greedy_decoder_equals_generate(lm, batch, length):
    decoder = GreedyDecoder(lm)
    x = embeds(batch, length, seed=batch)
    ref = generate(lm, x, max_new_tokens=10, min_new_tokens=10)
    assert torch.equal(fast(decoder, x, max_new_tokens=10, min_new_tokens=10), ref)
    assert torch.equal(fast(decoder, x, max_new_tokens=7), generate(lm, x, max_new_tokens=7))

    # EOS mid-batch: rows finish one by one and are padded after their EOS while the others go on.
    eos = staggered_eos(ref.tolist())
    for kwargs in (
        {"eos_token_id": eos},
        {"eos_token_id": eos, "min_new_tokens": 2, "min_length": length + 3},
    ):
        expected = generate(lm, x, max_new_tokens=10, **kwargs)
        got = fast(decoder, x, max_new_tokens=10, **kwargs)
        assert got.shape == expected.shape and torch.equal(got, expected), kwargs
    if batch > 1:
        lengths = [
            len([t for t in row if t != 1])
            for row in generate(lm, x, max_new_tokens=10, eos_token_id=eos).tolist()
        ]
        assert len(set(lengths)) >= 3, lengths


def test_every_row_finishing_early_stops_like_generate(lm):
    decoder = GreedyDecoder(lm)
    x = embeds(4, 12, seed=3)
    firsts = sorted(set(generate(lm, x, max_new_tokens=1)[:, 0].tolist()))
    expected = generate(lm, x, max_new_tokens=15, eos_token_id=firsts)
    got = fast(decoder, x, max_new_tokens=15, eos_token_id=firsts)
    assert expected.shape == (4, 1)
    assert got.shape == expected.shape and torch.equal(got, expected)
    # The same shape again reuses its cache: nothing leaks from the previous request.
    again = embeds(4, 12, seed=4)
    assert torch.equal(fast(decoder, again, max_new_tokens=15), generate(lm, again, max_new_tokens=15))


def test_eager_attention_masks_equal_generate(tiny_checkpoints):
    model = Blip2ForConditionalGeneration.from_pretrained(
        tiny_checkpoints.caption, attn_implementation="eager"
    )
    lm = model.eval().language_model
    decoder = GreedyDecoder(lm)
    assert decoder.supported
    x = embeds(3, 15, seed=5)
    assert torch.equal(fast(decoder, x, max_new_tokens=8), generate(lm, x, max_new_tokens=8))


def test_requests_that_are_not_plain_greedy_go_to_generate(lm):
    config = lm.generation_config
    for kwargs in (
        {"num_beams": 2},
        {"do_sample": True},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"logits_processor": []},
        {"suppress_tokens": [5]},
    ):
        assert greedy_plan(config, 33, max_new_tokens=5, pad_token_id=1, **kwargs) is None, kwargs
    assert greedy_plan(config, 33, max_new_tokens=None, pad_token_id=1) is None
    plan = greedy_plan(config, 33, max_new_tokens=5, pad_token_id=1, min_length=36, eos_token_id=[2, 7])
    assert plan is not None
    assert (plan.min_new_tokens, plan.eos_token_ids) == (3, (2, 7))
    # generate ignores sampling knobs when it does not sample; so does the plan.
    assert greedy_plan(config, 33, max_new_tokens=5, pad_token_id=1, temperature=0.5) is not None


@pytest.mark.parametrize("prompt", [None, PROMPT])
def test_encoder_fast_captions_equal_generate_path(encoder, fast_encoder, sample_images, prompt):
    assert fast_encoder.fast_decode and not encoder.fast_decode
    feats = encoder.vision_features(sample_images)  # 5 images: chunks of 4 and 1
    expected = encoder.caption_token_ids(feats, prompt, max_new_tokens=8)
    assert fast_encoder.caption_token_ids(sample_images, prompt, max_new_tokens=8) == expected
    texts = encoder.caption_tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert fast_encoder.caption(feats, prompt, max_new_tokens=8) == [t.strip() for t in texts]
    # Beams are not greedy: generate runs them.
    beams = {"max_new_tokens": 4, "num_beams": 2}
    assert fast_encoder.caption_token_ids(feats[0:2], prompt, **beams) == encoder.caption_token_ids(
        feats[0:2], prompt, **beams
    )


def test_padded_text_lengths_keep_embeddings_and_itm(encoder, tiny_checkpoints, sample_images):
    padded = Blip2Encoder.from_pretrained(str(tiny_checkpoints.retrieval), None, device="cpu", batch_size=4)
    padded.text_pad_multiple = 8  # what CUDA graphs use
    assert padded._tokenize(TEXTS)["input_ids"].shape[1] % 8 == 0
    np.testing.assert_allclose(padded.embed_texts(TEXTS), encoder.embed_texts(TEXTS), atol=ATOL)
    images = sample_images[:3]
    np.testing.assert_allclose(padded.itm(images, TEXTS).logits, encoder.itm(images, TEXTS).logits, atol=ATOL)
    np.testing.assert_allclose(
        padded.itm(images, "a cat").logits, encoder.itm(images, "a cat").logits, atol=ATOL
    )


def test_bf16_qformer_stays_close_to_fp32(encoder, tiny_checkpoints, sample_images):
    bf16 = Blip2Encoder.from_pretrained(
        str(tiny_checkpoints.retrieval), None, device="cpu", qformer_dtype="bfloat16", batch_size=4
    )
    assert bf16.retrieval.qformer.layernorm.weight.dtype == torch.bfloat16
    a, b = encoder.embed_images(sample_images), bf16.embed_images(sample_images)
    cosine = (a * b).sum(-1)  # both L2-normalised
    assert cosine.min() > 0.995, cosine.min()
    t = (encoder.embed_texts(TEXTS) * bf16.embed_texts(TEXTS)).sum(-1)
    assert t.min() > 0.995, t.min()


def test_captured_functions_trace_without_host_syncs(fast_encoder, sample_images):
    """What a CUDA-graph capture needs, checked without a GPU: TorchDynamo traces the call as one graph,
    so it has no host sync and no branch on tensor values. ITM covers the Q-Former with a padding mask,
    cross-attention and the text embeddings; the decode step covers the LM, the cache and the EOS
    bookkeeping. (bench/gpu_suite.py --tiny traces every graphed function.)"""
    enc = fast_encoder
    with torch.inference_mode():
        hidden = enc._vit(enc.to_pixels(sample_images[:2]))
        tok = enc._tokenize(TEXTS[:2])  # two lengths: a padded batch, so a 4D mask
        itm_mask = torch.cat([torch.ones(2, enc.num_queries, dtype=torch.long), tok["attention_mask"]], 1)
        args = (hidden, tok["input_ids"], *enc._mask_4d(itm_mask))
        assert len(args) == 3
        torch._dynamo.reset()
        traced = torch.compile(enc._itm_logits, backend="eager", fullgraph=True)
        np.testing.assert_allclose(traced(*args), enc._itm_logits(*args), atol=ATOL)
        decoder = enc._decoder
        plan = greedy_plan(
            decoder.model.generation_config, 20, max_new_tokens=4, pad_token_id=1, eos_token_id=[2]
        )
        runner = decoder._runner(2, 20, plan.max_new_tokens)
        runner.reset(embeds(2, 20), plan)
        torch._dynamo.reset()
        torch.compile(runner.decode_step, backend="eager", fullgraph=True)()
        torch._dynamo.reset()

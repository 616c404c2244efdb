"""blip2_embed.encoder against transformers' own BLIP-2 classes as the oracle (tiny checkpoints, CPU fp32)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipImageProcessorPil,
)

from blip2_embed.encoder import Blip2Encoder, lm_text_ids, max_sim
from blip2_embed.errors import ModelNotFoundError

TEXTS = ["a red circle", "two blue squares on a white background", "a tiny green star in the corner"]
ATOL = 2e-5


@pytest.fixture(scope="module")
def oracle(tiny_checkpoints):
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(tiny_checkpoints.retrieval).eval()
    caption = Blip2ForConditionalGeneration.from_pretrained(tiny_checkpoints.caption).eval()
    return retrieval, caption


def hf_pixels(path, images) -> torch.Tensor:
    return BlipImageProcessorPil.from_pretrained(path)(images, return_tensors="pt")["pixel_values"]


def hf_text(path, texts):
    return AutoTokenizer.from_pretrained(path)(
        texts, padding=True, return_tensors="pt", return_token_type_ids=False
    )


@torch.no_grad()
def test_itc_embeddings_and_similarity_match_transformers(encoder, oracle, tiny_checkpoints, sample_images):
    retrieval, _ = oracle
    pixels = hf_pixels(tiny_checkpoints.retrieval, sample_images)
    text = hf_text(tiny_checkpoints.retrieval, TEXTS)
    out = retrieval(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask)

    image_vecs = encoder.embed_images(sample_images)
    text_vecs = encoder.embed_texts(TEXTS)

    assert image_vecs.shape == (len(sample_images), 32, encoder.embed_dim)
    assert text_vecs.shape == (len(TEXTS), encoder.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image_vecs, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(image_vecs, out.image_embeds.numpy(), atol=ATOL)
    np.testing.assert_allclose(text_vecs, out.text_embeds.numpy(), atol=ATOL)
    np.testing.assert_allclose(max_sim(image_vecs, text_vecs), out.logits_per_image.numpy(), atol=ATOL)


@torch.no_grad()
def test_itm_pairs_and_one_text_many_images_match_transformers(
    encoder, oracle, tiny_checkpoints, sample_images
):
    retrieval, _ = oracle
    images = sample_images[:3]
    pixels = hf_pixels(tiny_checkpoints.retrieval, images)

    text = hf_text(tiny_checkpoints.retrieval, TEXTS)
    expected = retrieval(
        pixel_values=pixels,
        input_ids=text.input_ids,
        attention_mask=text.attention_mask,
        use_image_text_matching_head=True,
    ).logits_per_image
    pairs = encoder.itm(images, TEXTS)
    np.testing.assert_allclose(pairs.logits, expected.numpy(), atol=ATOL)
    np.testing.assert_allclose(pairs.probs, expected.softmax(-1)[:, 1].numpy(), atol=1e-6)

    one = hf_text(tiny_checkpoints.retrieval, [TEXTS[1]] * len(images))
    expected_one = retrieval(
        pixel_values=pixels,
        input_ids=one.input_ids,
        attention_mask=one.attention_mask,
        use_image_text_matching_head=True,
    ).logits_per_image
    # Precomputed vision features must give the same answer as raw images.
    feats = encoder.vision_features(images)
    for result in (encoder.itm(images, TEXTS[1]), encoder.itm(feats, TEXTS[1])):
        np.testing.assert_allclose(result.logits, expected_one.numpy(), atol=ATOL)


@pytest.mark.parametrize("prompt", [None, "Question: what is in the picture? Answer:"])
@torch.no_grad()
def test_greedy_captions_match_generate_token_for_token(
    encoder, oracle, tiny_checkpoints, sample_images, prompt
):
    _, caption = oracle
    processor = Blip2Processor.from_pretrained(tiny_checkpoints.caption, num_query_tokens=32)
    images = sample_images[:3]
    if prompt is None:
        inputs = {"pixel_values": hf_pixels(tiny_checkpoints.caption, images)}
    else:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        inputs.pop("token_type_ids", None)
    out = caption.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 32 + 1
    pad = processor.tokenizer.pad_token_id
    expected = [[t for t in row if t != pad] for row in out[:, prompt_len:].tolist()]

    got = encoder.caption_token_ids(images, prompt, max_new_tokens=12)
    assert got == expected
    assert all(len(row) > 0 for row in got)
    texts = encoder.caption(encoder.vision_features(images), prompt, max_new_tokens=12)
    assert texts == [s.strip() for s in processor.tokenizer.batch_decode(expected, skip_special_tokens=True)]


@torch.no_grad()
def test_prompted_captions_start_with_bos_whatever_the_tokenizer(
    encoder, tiny_checkpoints, tmp_path, sample_images
):
    # The same caption checkpoint, but its tokenizer adds no BOS (OPT's adds one; many others none).
    folder = tmp_path / "caption-no-bos"
    shutil.copytree(tiny_checkpoints.caption, folder)
    AutoTokenizer.from_pretrained(folder, add_bos_token=False).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = "Question: what is in the picture? Answer:"
    bos = encoder.caption_model.config.text_config.bos_token_id
    assert bos not in tok(prompt)["input_ids"]  # the premise
    assert lm_text_ids(tok, prompt, bos) == [bos, *tok(prompt)["input_ids"]]
    assert lm_text_ids(tok, None, bos) == [bos]  # the no-prompt path: what stage-2 training starts with
    no_bos = Blip2Encoder.from_pretrained(None, str(folder), device="cpu", batch_size=4)
    images = sample_images[:3]
    # [image] * 32 + [BOS] + prompt either way, so the model answers as with OPT's tokenizer.
    with_bos = encoder.caption_token_ids(images, prompt, max_new_tokens=12)
    assert no_bos.caption_token_ids(images, prompt, max_new_tokens=12) == with_bos
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    ids = torch.tensor([[model.config.image_token_index] * 32 + tok(prompt)["input_ids"]] * len(images))
    pixels = hf_pixels(folder, images)
    without = model.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=12)[:, ids.shape[1] :]
    pad = tok.pad_token_id
    assert [[t for t in row if t != pad] for row in without.tolist()] != with_bos  # BOS matters here


def test_shared_vit_is_detected_and_matches_separate_models(
    encoder, tiny_checkpoints, tmp_path, sample_images
):
    assert encoder.shared_vit
    assert encoder.caption_model.vision_model.encoder is encoder.retrieval.vision_model.encoder
    # A caption checkpoint whose blocks differ must not be shared, and must still give its own answers.
    other = tmp_path / "caption-other"
    shutil.copytree(tiny_checkpoints.caption, other)
    model = Blip2ForConditionalGeneration.from_pretrained(other)
    with torch.no_grad():
        model.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.05)
    model.save_pretrained(other)
    separate = Blip2Encoder.from_pretrained(str(tiny_checkpoints.retrieval), str(other), device="cpu")
    assert not separate.shared_vit
    images = sample_images[:2]
    feats = separate.vision_features(images)
    with torch.no_grad():
        expected = model.generate(pixel_values=hf_pixels(other, images), max_new_tokens=8)[:, 33:]
    pad = separate.caption_tokenizer.pad_token_id
    assert separate.caption_token_ids(feats, max_new_tokens=8) == [
        [t for t in row if t != pad] for row in expected.tolist()
    ]
    np.testing.assert_allclose(separate.embed_images(feats), encoder.embed_images(images), atol=ATOL)
    # Same retrieval model, so ITM through either encoder agrees.
    np.testing.assert_allclose(
        separate.itm(feats, "a cat").logits, encoder.itm(images, "a cat").logits, atol=ATOL
    )


def test_batching_does_not_change_results(encoder, sample_images):
    whole = encoder.embed_images(sample_images)  # batch_size=4 -> two chunks
    single = np.concatenate([encoder.embed_images([im]) for im in sample_images])
    np.testing.assert_allclose(whole, single, atol=ATOL)
    texts = [*TEXTS, "a cat", "a dog"]
    np.testing.assert_allclose(
        encoder.embed_texts(texts), np.concatenate([encoder.embed_texts([t]) for t in texts]), atol=ATOL
    )


def test_long_text_is_truncated_and_reported(encoder, caplog):
    long_text = " ".join(["red circle"] * 200)
    assert encoder.text_truncation([long_text, "a cat"]) == [True, False]
    with caplog.at_level(logging.WARNING, logger="blip2_embed.encoder"):
        vec = encoder.embed_texts([long_text])
    assert "truncated" in caplog.text
    ids = encoder.retrieval_tokenizer(long_text, truncation=True, max_length=encoder.max_text_tokens)[
        "input_ids"
    ]
    cut_text = encoder.retrieval_tokenizer.decode(ids, skip_special_tokens=True)
    np.testing.assert_allclose(vec, encoder.embed_texts([cut_text]), atol=ATOL)


def test_missing_models_raise_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        Blip2Encoder.from_pretrained(retrieval="no-such-org/no-such-blip2", caption=None, device="cpu")
    message = str(err.value)
    assert "no-such-org/no-such-blip2" in message and "BLIP2_RETRIEVAL_MODEL" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        Blip2Encoder.from_pretrained(retrieval=str(tmp_path / "empty"), caption=None, device="cpu")


def test_model_keys_are_stable_and_distinguish_weights(encoder, tiny_checkpoints):
    again = Blip2Encoder.from_pretrained(str(tiny_checkpoints.retrieval), None, device="cpu")
    assert again.retrieval_key == encoder.retrieval_key
    assert encoder.retrieval_key.startswith("retrieval@")
    assert encoder.caption_key != encoder.retrieval_key


def test_locate_checkpoint_finds_folders_and_cached_hub_ids_without_loading(
    tiny_checkpoints, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from blip2_embed.loading import locate_checkpoint

    assert locate_checkpoint(str(tiny_checkpoints.retrieval), "retrieval") == tiny_checkpoints.retrieval
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        locate_checkpoint(str(tmp_path / "models/blip2-itm-vit-g"), "retrieval")
    assert "hf download Salesforce/blip2-itm-vit-g --local-dir" in str(err.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half/config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no weights"):
        locate_checkpoint(str(tmp_path / "half"), "caption")

    # A hub id is looked up in the Hugging Face cache's own layout (refs/main -> snapshots/<rev>/).
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache") as err:
        locate_checkpoint("Salesforce/blip2-opt-2.7b", "caption")
    assert "BLIP2_CAPTION_MODEL" in str(err.value)
    repo = cache / "models--Salesforce--blip2-opt-2.7b"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0" * 40)
    for name in ("config.json", "model.safetensors.index.json"):
        (snapshot / name).write_text("{}")
    assert locate_checkpoint("Salesforce/blip2-opt-2.7b", "caption") == snapshot

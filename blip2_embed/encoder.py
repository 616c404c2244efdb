"""The BLIP-2 encoder: Q-Former image/text embeddings (ITC), ITM scores and OPT captions.

The methods call the same sub-modules, in the same order, as transformers'
``Blip2ForImageTextRetrieval.forward`` and ``Blip2ForConditionalGeneration.generate``, but split so
that each piece runs once: the ViT blocks run once per image and feed ITC, ITM and captions; the
text tower runs without an image; ITM of one text against many images reuses those images' features.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, PreTrainedTokenizerBase

from blip2_embed.images import ImageSpec, preprocess
from blip2_embed.loading import load_pretrained, load_tokenizer, model_key, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_RETRIEVAL = "Salesforce/blip2-itm-vit-g"
DEFAULT_CAPTION = "Salesforce/blip2-opt-2.7b"


@dataclass
class VisionFeatures:
    """ViT outputs of N images, before the final LayerNorm, on the model device.

    Shape ``(N, T, W)``: T = 1 + (S / patch)^2 tokens, W the ViT width. When the caption model's ViT
    blocks differ from the retrieval model's, the caption side's features are computed on first use
    from the kept pixels.
    """

    hidden: torch.Tensor
    pixels: torch.Tensor | None = None
    _caption_hidden: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: slice) -> VisionFeatures:
        return VisionFeatures(
            hidden=self.hidden[index],
            pixels=None if self.pixels is None else self.pixels[index],
            _caption_hidden=None if self._caption_hidden is None else self._caption_hidden[index],
        )


ImageInput = Union[Sequence[Image.Image], np.ndarray, torch.Tensor, VisionFeatures]  # noqa: UP007


@dataclass
class ItmResult:
    """ITM head outputs: ``probs`` (N,) = P(match) = softmax(logits)[:, 1]; ``logits`` (N, 2)."""

    probs: np.ndarray
    logits: np.ndarray


def vision_trunk(vision_model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Embeddings + encoder blocks of a Blip2VisionModel, without its final LayerNorm: (N, T, W)."""
    hidden = vision_model.embeddings(pixels)
    return vision_model.encoder(inputs_embeds=hidden).last_hidden_state


def query_output(model: nn.Module, image_embeds: torch.Tensor) -> torch.Tensor:
    """Q-Former over the learned queries with cross-attention to the image: (N, 32, H)."""
    n = image_embeds.shape[0]
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = model.qformer(
        query_embeds=model.query_tokens.expand(n, -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=mask,
        return_dict=True,
    )
    return out.last_hidden_state


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa
    )


class Blip2Encoder:
    """Batch inference over a retrieval checkpoint and/or a caption checkpoint.

    Every public method accepts PIL images, preprocessed pixels ``(N, 3, S, S)`` or
    :class:`VisionFeatures`, works in chunks of ``batch_size`` and runs under ``torch.inference_mode``.
    Image decoding is the caller's job (see ``blip2_embed.images.decode_for_model``), so worker
    processes can do it while this object keeps the accelerator busy.
    """

    def __init__(
        self,
        retrieval: Blip2ForImageTextRetrieval | None,
        retrieval_tokenizer: PreTrainedTokenizerBase | None,
        caption: Blip2ForConditionalGeneration | None,
        caption_tokenizer: PreTrainedTokenizerBase | None,
        spec: ImageSpec,
        *,
        retrieval_name: str = "",
        caption_name: str = "",
        batch_size: int = 32,
    ) -> None:
        if retrieval is None and caption is None:
            raise ValueError("at least one of the retrieval and caption models is needed")
        self.retrieval = retrieval
        self.retrieval_tokenizer = retrieval_tokenizer
        self.caption_model = caption
        self.caption_tokenizer = caption_tokenizer
        self.spec = spec
        self.batch_size = batch_size
        main = retrieval if retrieval is not None else caption
        self.device = main.device
        self.dtype = main.vision_model.embeddings.patch_embedding.weight.dtype
        self.shared_vit = False
        if retrieval is not None and caption is not None:
            self.shared_vit = self._share_vit_blocks()
        self.retrieval_key = (
            model_key(retrieval_name, retrieval.vision_projection.weight, retrieval.text_projection.weight)
            if retrieval is not None
            else None
        )
        self.caption_key = (
            model_key(caption_name, caption.language_projection.weight) if caption is not None else None
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        retrieval: str | None = DEFAULT_RETRIEVAL,
        caption: str | None = DEFAULT_CAPTION,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> Blip2Encoder:
        """Load either or both checkpoints (hub id or folder); ``None`` skips one."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        r_model = r_tok = c_model = c_tok = None
        spec_source = None
        if retrieval:
            r_model = load_pretrained(Blip2ForImageTextRetrieval, retrieval, "retrieval", dtype=dt)
            r_tok = load_tokenizer(retrieval, "retrieval")
            spec_source = retrieval
        if caption:
            c_model = load_pretrained(Blip2ForConditionalGeneration, caption, "caption", dtype=dt)
            c_tok = load_tokenizer(caption, "caption")
            spec_source = spec_source or caption
        if retrieval is None and caption is None:
            raise ValueError("give a retrieval model, a caption model, or both")
        models = [m for m in (r_model, c_model) if m is not None]
        for m in models:
            m.to(dev).eval()
        spec = ImageSpec.from_pretrained(spec_source)
        if retrieval and caption:
            other = ImageSpec.from_pretrained(caption)
            if other.size != spec.size:
                raise ValueError(
                    f"the retrieval model takes {spec.size}px images and the caption model {other.size}px; "
                    "pick checkpoints with the same input size"
                )
        return cls(
            r_model,
            r_tok,
            c_model,
            c_tok,
            spec,
            retrieval_name=retrieval or "",
            caption_name=caption or "",
            batch_size=batch_size,
        )

    def _share_vit_blocks(self) -> bool:
        """Use one copy of the ViT blocks when both checkpoints hold identical ones.

        The blocks are compared exactly (``torch.equal`` on the device, which is cheaper and safer than
        hashing), and on a match the caption model borrows the retrieval model's modules, saving a ViT
        pass per captioned image and the memory of a second copy. The final LayerNorms stay separate.
        """
        rv, cv = self.retrieval.vision_model, self.caption_model.vision_model
        if not (_same_weights(rv.embeddings, cv.embeddings) and _same_weights(rv.encoder, cv.encoder)):
            log.info("retrieval and caption ViT blocks differ: each model runs its own ViT")
            return False
        cv.embeddings, cv.encoder = rv.embeddings, rv.encoder
        log.info("retrieval and caption checkpoints share identical ViT blocks: running them once")
        return True

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        """D, the ITC embedding width (``image_text_hidden_size``)."""
        return self._need_retrieval().config.image_text_hidden_size

    @property
    def num_queries(self) -> int:
        return (self.retrieval or self.caption_model).config.num_query_tokens

    @property
    def max_text_tokens(self) -> int:
        """Longest tokenised text the Q-Former takes, special tokens included."""
        tok = self.retrieval_tokenizer
        limit = self._need_retrieval().config.qformer_config.max_position_embeddings
        model_max = getattr(tok, "model_max_length", limit) or limit
        return int(min(limit, model_max))

    def _need_retrieval(self) -> Blip2ForImageTextRetrieval:
        if self.retrieval is None:
            raise RuntimeError("this encoder was loaded without a retrieval model (ITC/ITM)")
        return self.retrieval

    def _need_caption(self) -> Blip2ForConditionalGeneration:
        if self.caption_model is None:
            raise RuntimeError("this encoder was loaded without a caption model")
        return self.caption_model

    # ------------------------------------------------------------------ inputs
    def to_pixels(self, images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """PIL images or a pixel array -> a float tensor on the model device and dtype."""
        if isinstance(images, torch.Tensor):
            pixels = images
        elif isinstance(images, np.ndarray):
            pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        else:
            pixels = torch.from_numpy(preprocess(list(images), self.spec))
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (N, 3, S, S), got {tuple(pixels.shape)}")
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            # Pinned memory makes the copy asynchronous, overlapping it with the previous batch's kernels.
            pixels = pixels.pin_memory()
        return pixels.to(self.device, self.dtype, non_blocking=True)

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def _features_chunks(self, images: ImageInput) -> Iterator[VisionFeatures]:
        if isinstance(images, VisionFeatures):
            for sl in self._chunks(len(images)):
                yield images[sl]
            return
        n = len(images)
        for sl in self._chunks(n):
            yield self._vision_features_batch(self.to_pixels(images[sl]))

    # ------------------------------------------------------------------ vision
    def _vision_features_batch(self, pixels: torch.Tensor) -> VisionFeatures:
        trunk = (self.retrieval or self.caption_model).vision_model
        hidden = vision_trunk(trunk, pixels)
        keep_pixels = self.retrieval is not None and self.caption_model is not None and not self.shared_vit
        return VisionFeatures(hidden=hidden, pixels=pixels if keep_pixels else None)

    @torch.inference_mode()
    def vision_features(self, images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> VisionFeatures:
        """Run the ViT blocks once; pass the result to ``embed_images``, ``itm`` and ``caption``."""
        parts = [self._vision_features_batch(self.to_pixels(images[sl])) for sl in self._chunks(len(images))]
        if len(parts) == 1:
            return parts[0]
        return VisionFeatures(
            hidden=torch.cat([p.hidden for p in parts]),
            pixels=None if parts[0].pixels is None else torch.cat([p.pixels for p in parts]),
        )

    def _retrieval_image_embeds(self, feats: VisionFeatures) -> torch.Tensor:
        model = self._need_retrieval()
        return model.vision_model.post_layernorm(feats.hidden)

    def _caption_image_embeds(self, feats: VisionFeatures) -> torch.Tensor:
        model = self._need_caption()
        if self.retrieval is None or self.shared_vit:
            return model.vision_model.post_layernorm(feats.hidden)
        if feats._caption_hidden is None:
            if feats.pixels is None:
                raise ValueError("these features lack the pixels the caption model's own ViT needs")
            feats._caption_hidden = vision_trunk(model.vision_model, feats.pixels)
        return model.vision_model.post_layernorm(feats._caption_hidden)

    # ------------------------------------------------------------------ ITC
    @torch.inference_mode()
    def embed_images(self, images: ImageInput) -> np.ndarray:
        """ITC image embeddings, float32 (N, 32, D), each of the 32 query vectors L2-normalised."""
        model = self._need_retrieval()
        out = []
        for feats in self._features_chunks(images):
            query = query_output(model, self._retrieval_image_embeds(feats))
            proj = model.vision_projection(query.to(model.vision_projection.weight.dtype))
            out.append(nn.functional.normalize(proj.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_queries, self.embed_dim), np.float32)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.retrieval_tokenizer
        enc = tok(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def text_truncation(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than the Q-Former takes (they are cut to ``max_text_tokens``)."""
        lengths = [len(ids) for ids in self.retrieval_tokenizer(list(texts), truncation=False)["input_ids"]]
        return [n > self.max_text_tokens for n in lengths]

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """ITC text embeddings, float32 (M, D): the L2-normalised projection of the CLS output.

        Texts longer than ``max_text_tokens`` are truncated and a warning names them; call
        ``text_truncation`` to learn which ones in code.
        """
        model = self._need_retrieval()
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings")
        cut = [i for i, t in enumerate(self.text_truncation(texts)) if t] if texts else []
        if cut:
            log.warning(
                "%d text(s) longer than %d tokens were truncated (indexes %s)",
                len(cut),
                self.max_text_tokens,
                cut[:10],
            )
        out = []
        for sl in self._chunks(len(texts)):
            enc = self._tokenize(texts[sl])
            emb = model.embeddings(input_ids=enc["input_ids"])
            hidden = model.qformer(
                query_embeds=emb, query_length=0, attention_mask=enc["attention_mask"], return_dict=True
            ).last_hidden_state
            cls_vec = hidden[:, 0, :].to(model.text_projection.weight.dtype)
            out.append(nn.functional.normalize(model.text_projection(cls_vec).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # ------------------------------------------------------------------ ITM
    @torch.inference_mode()
    def itm(self, images: ImageInput, texts: str | Sequence[str]) -> ItmResult:
        """Image-text matching: one text against every image, or N (image, text) pairs."""
        model = self._need_retrieval()
        n = len(images)
        pair_texts = [texts] * n if isinstance(texts, str) else list(texts)
        if len(pair_texts) != n:
            raise ValueError(f"{n} images but {len(pair_texts)} texts; give one text or one per image")
        logits = []
        start = 0
        for feats in self._features_chunks(images):
            batch_texts = pair_texts[start : start + len(feats)]
            start += len(feats)
            image_embeds = self._retrieval_image_embeds(feats)
            enc = self._tokenize(batch_texts)
            b = image_embeds.shape[0]
            queries = model.query_tokens.expand(b, -1, -1)
            attention = torch.cat(
                [torch.ones(queries.shape[:-1], dtype=torch.long, device=self.device), enc["attention_mask"]],
                dim=1,
            )
            embeds = model.embeddings(input_ids=enc["input_ids"], query_embeds=queries)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = model.qformer(
                query_embeds=embeds,
                query_length=queries.shape[1],
                attention_mask=attention,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                return_dict=True,
            ).last_hidden_state
            head = model.itm_head(hidden[:, : queries.shape[1], :].to(model.itm_head.weight.dtype))
            logits.append(head.mean(dim=1).float().cpu())
        all_logits = torch.cat(logits) if logits else torch.zeros((0, 2))
        return ItmResult(probs=all_logits.softmax(dim=-1)[:, 1].numpy(), logits=all_logits.numpy())

    # ------------------------------------------------------------------ captions
    def _prompt_ids(self, prompt: str | None) -> torch.Tensor:
        model = self._need_caption()
        tok = self.caption_tokenizer
        image_token = model.config.image_token_index
        if image_token is None:
            raise ValueError(
                "the caption checkpoint's config has no image_token_index; use a current "
                "Blip2ForConditionalGeneration checkpoint (e.g. Salesforce/blip2-opt-2.7b)"
            )
        if prompt:
            text_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        else:
            text_ids = [model.config.text_config.bos_token_id]
        return torch.tensor(
            [[image_token] * model.config.num_query_tokens + list(text_ids)], device=self.device
        )

    @torch.inference_mode()
    def caption_token_ids(
        self,
        images: ImageInput,
        prompt: str | None = None,
        *,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: object,
    ) -> list[list[int]]:
        """The generated token ids of each image (prompt excluded); ``caption`` decodes them."""
        model = self._need_caption()
        prompt_ids = self._prompt_ids(prompt)
        embed_tokens = model.get_input_embeddings()
        pad = self.caption_tokenizer.pad_token_id
        tokens: list[list[int]] = []
        for feats in self._features_chunks(images):
            image_embeds = self._caption_image_embeds(feats)
            query = query_output(model, image_embeds).to(image_embeds.dtype)
            soft_prompt = model.language_projection(query)
            input_ids = prompt_ids.expand(soft_prompt.shape[0], -1)
            inputs_embeds = embed_tokens(input_ids)
            image_mask = (input_ids == model.config.image_token_index).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, soft_prompt.to(inputs_embeds.dtype))
            out = model.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.ones_like(input_ids),
                input_ids=input_ids,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                pad_token_id=pad,
                **generate_kwargs,
            )
            for row in out[:, input_ids.shape[1] :].tolist():
                # Finished sequences are padded to the longest one; drop the padding.
                while row and row[-1] == pad:
                    row.pop()
                tokens.append(row)
        return tokens

    def caption(
        self,
        images: ImageInput,
        prompt: str | None = None,
        *,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: object,
    ) -> list[str]:
        """Captions (no prompt) or answers to an instruction such as ``"Question: ...? Answer:"``.

        Decoding is greedy by default (``num_beams=1``); beams and other ``generate`` options pass through.
        """
        ids = self.caption_token_ids(
            images, prompt, max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs
        )
        return [clean_text(t) for t in self.caption_tokenizer.batch_decode(ids, skip_special_tokens=True)]


# C0 and C1 control characters (Unicode category Cc), with the whitespace around them.
_CONTROL_RUN = re.compile(r"\s*[\x00-\x1f\x7f-\x9f]+\s*")


def clean_text(text: str) -> str:
    """Generated text as the product stores and serves it: each run of control characters (NUL, which
    Postgres text cannot hold; escapes, which a terminal would obey; newlines) becomes one space, and
    the ends are stripped. Text without control characters is only stripped, so ordinary captions
    equal transformers' decode."""
    return _CONTROL_RUN.sub(" ", text).strip()


def max_sim(image_vectors: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    """ITC similarity (N images, M texts): the max over each image's query vectors of the dot product."""
    return np.einsum("nqd,md->nqm", image_vectors, text_vectors).max(axis=1)

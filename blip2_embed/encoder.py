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
from typing import Any, TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, PreTrainedTokenizerBase

from blip2_embed.decoding import GreedyDecoder, greedy_plan
from blip2_embed.graphs import GraphedFunction, attention_mask_4d
from blip2_embed.images import ImageSpec, preprocess
from blip2_embed.loading import (
    load_pretrained,
    load_tokenizer,
    model_key,
    resolve_dtype,
    resolve_torch_device,
)

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

    def __getitem__(self, index: slice | torch.Tensor) -> VisionFeatures:
        return VisionFeatures(
            hidden=self.hidden[index],
            pixels=None if self.pixels is None else self.pixels[index],
            _caption_hidden=None if self._caption_hidden is None else self._caption_hidden[index],
        )


_Part = TypeVar("_Part")
ImageInput = Union[Sequence[Image.Image], np.ndarray, torch.Tensor, VisionFeatures]  # noqa: UP007


@dataclass
class ItmResult:
    """ITM head outputs: ``probs`` (N,) = P(match) = softmax(logits)[:, 1]; ``logits`` (N, 2)."""

    probs: np.ndarray
    logits: np.ndarray


def vision_trunk(vision_model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Embeddings + encoder blocks of a Blip2VisionModel, without its final LayerNorm: (N, T, W)."""
    # `Any`: transformers' sub-module attributes read as `Tensor | Module` to a type checker.
    hidden = vision_model.embeddings(pixels)
    out: torch.Tensor = vision_model.encoder(inputs_embeds=hidden).last_hidden_state
    return out


def query_output(model: Any, image_embeds: torch.Tensor) -> torch.Tensor:
    """Q-Former over the learned queries with cross-attention to the image: (N, 32, H).

    Every image token is attended, so no mask is passed: transformers drops an all-ones mask for SDPA
    anyway (after a host-side check that a CUDA graph could not capture), and eager attention adds zeros.
    """
    n = image_embeds.shape[0]
    out = model.qformer(
        query_embeds=model.query_tokens.expand(n, -1, -1),
        encoder_hidden_states=image_embeds,
        return_dict=True,
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def lm_text_ids(tokenizer: PreTrainedTokenizerBase, text: str | None, bos_token_id: int) -> list[int]:
    """The language model's text after the soft prompt: ``[BOS] + tokens(text)``.

    BOS is put here, not left to the tokenizer: OPT's adds one, others add none, and the caption
    model is trained (``blip2_train``) and run on ``[image] * Q + [BOS] + ...`` either way. For OPT
    this is exactly what ``Blip2Processor`` gives ``generate``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return [bos_token_id, *ids]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa
    )


def _loaded(part: _Part | None, what: str) -> _Part:
    if part is None:
        raise RuntimeError(f"this encoder was loaded without {what}")
    return part


class Blip2Encoder:
    """Batch inference over a retrieval checkpoint and/or a caption checkpoint.

    Every public method accepts PIL images, preprocessed pixels ``(N, 3, S, S)`` or
    :class:`VisionFeatures`, works in chunks of ``batch_size`` and runs under ``torch.inference_mode``.
    Image decoding is the caller's job (see ``blip2_embed.images.decode_for_model``), so worker
    processes can do it while this object keeps the accelerator busy.

    Fast paths (docs/blip2_embed.md), each on by default on CUDA only: ``cuda_graphs`` replays the
    ViT (batches up to ``graph_max_batch``) and the Q-Former calls (up to 4x that) from CUDA graphs;
    ``fast_decode`` makes greedy captions with :class:`blip2_embed.decoding.GreedyDecoder` (static KV
    cache, one graph replay per token) instead of ``generate``; other decoding options still go to
    ``generate``.
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
        cuda_graphs: bool | None = None,
        fast_decode: bool | None = None,
        graph_max_batch: int = 16,
    ) -> None:
        if retrieval is None and caption is None:
            raise ValueError("at least one of the retrieval and caption models is needed")
        self.retrieval = retrieval
        self.retrieval_tokenizer = retrieval_tokenizer
        self.caption_model = caption
        self.caption_tokenizer = caption_tokenizer
        self.spec = spec
        self.batch_size = batch_size
        main: Any = retrieval if retrieval is not None else caption
        self.device: torch.device = main.device
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
        on_cuda = self.device.type == "cuda"
        self.graph_max_batch = graph_max_batch
        graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs) and on_cuda
        pool = torch.cuda.graph_pool_handle() if graphs else None
        self.text_pad_multiple = 8 if graphs else 1
        self._graphed = {
            name: GraphedFunction(fn, enabled=graphs, name=name, pool=pool)
            for name, fn in (
                ("vit", self._vit),
                ("itc_image", self._itc_image),
                ("itc_text", self._itc_text),
                ("itm", self._itm_logits),
                ("soft_prompt", self._soft_prompt),
            )
        }
        self._decoder: GreedyDecoder | None = None
        if caption is not None and (on_cuda if fast_decode is None else fast_decode):
            self._decoder = GreedyDecoder(caption.language_model)
            if not self._decoder.supported:
                log.info("attention %r: captions use generate", caption.config._attn_implementation)
                self._decoder = None

    @property
    def cuda_graphs(self) -> bool:
        return self._graphed["vit"].enabled

    @property
    def fast_decode(self) -> bool:
        return self._decoder is not None

    def set_qformer_dtype(self, dtype: torch.dtype) -> None:
        """Run both Q-Formers (and their query tokens) in ``dtype``; transformers keeps them in fp32.

        bf16 is the measured fast setting on GPUs (docs/blip2_embed.md gives its cosine to fp32).
        """
        for model in (self.retrieval, self.caption_model):
            if model is not None:
                model.qformer.to(dtype)
                model.query_tokens.data = model.query_tokens.data.to(dtype)
        for graphed in self._graphed.values():
            graphed.clear()

    def _graph(self, name: str, batch: int, *args: torch.Tensor) -> torch.Tensor:
        """``name``'s function, from a CUDA graph when the batch is small enough to be launch-bound."""
        limit = self.graph_max_batch if name == "vit" else 4 * self.graph_max_batch
        graphed = self._graphed[name]
        out = graphed(*args) if batch <= limit else graphed.fn(*args)
        assert isinstance(out, torch.Tensor)  # every graphed function here returns one tensor
        return out

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
        qformer_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        cuda_graphs: bool | None = None,
        fast_decode: bool | None = None,
    ) -> Blip2Encoder:
        """Load either or both checkpoints (hub id or folder); ``None`` skips one.

        ``qformer_dtype`` (e.g. bf16) overrides transformers' fp32 Q-Former; ``attn_implementation``
        is passed to ``from_pretrained`` (transformers 5 picks ``sdpa`` for BLIP-2 by default).
        """
        dev = resolve_torch_device(device)
        dt = resolve_dtype(dtype, dev)
        load_kwargs: dict[str, object] = {"dtype": dt}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        r_model = r_tok = c_model = c_tok = None
        spec_source = None
        if retrieval:
            r_model = load_pretrained(Blip2ForImageTextRetrieval, retrieval, "retrieval", **load_kwargs)
            r_tok = load_tokenizer(retrieval, "retrieval")
            spec_source = retrieval
        if caption:
            c_model = load_pretrained(Blip2ForConditionalGeneration, caption, "caption", **load_kwargs)
            c_tok = load_tokenizer(caption, "caption")
            spec_source = spec_source or caption
        if retrieval is None and caption is None:
            raise ValueError("give a retrieval model, a caption model, or both")
        models = [m for m in (r_model, c_model) if m is not None]
        for m in models:
            m.to(dev).eval()  # type: ignore[arg-type]  # transformers types `to` for PreTrainedModel only
        assert spec_source is not None
        spec = ImageSpec.from_pretrained(spec_source)
        if retrieval and caption:
            other = ImageSpec.from_pretrained(caption)
            if other.size != spec.size:
                raise ValueError(
                    f"the retrieval model takes {spec.size}px images and the caption model {other.size}px; "
                    "pick checkpoints with the same input size"
                )
        encoder = cls(
            r_model,
            r_tok,
            c_model,
            c_tok,
            spec,
            retrieval_name=retrieval or "",
            caption_name=caption or "",
            batch_size=batch_size,
            cuda_graphs=cuda_graphs,
            fast_decode=fast_decode,
        )
        if qformer_dtype is not None:
            encoder.set_qformer_dtype(resolve_dtype(qformer_dtype, dev))
        return encoder

    def _share_vit_blocks(self) -> bool:
        """Use one copy of the ViT blocks when both checkpoints hold identical ones.

        The blocks are compared exactly (``torch.equal`` on the device, which is cheaper and safer than
        hashing), and on a match the caption model borrows the retrieval model's modules, saving a ViT
        pass per captioned image and the memory of a second copy. The final LayerNorms stay separate.
        """
        rv, cv = self._need_retrieval().vision_model, self._need_caption().vision_model
        if not (_same_weights(rv.embeddings, cv.embeddings) and _same_weights(rv.encoder, cv.encoder)):
            log.info("retrieval and caption ViT blocks differ: each model runs its own ViT")
            return False
        cv.embeddings, cv.encoder = rv.embeddings, rv.encoder
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the caption copy's ~2 GB back
        log.info("retrieval and caption checkpoints share identical ViT blocks: running them once")
        return True

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        """D, the ITC embedding width (``image_text_hidden_size``)."""
        return self._need_retrieval().config.image_text_hidden_size

    @property
    def num_queries(self) -> int:
        main: Any = self.retrieval or self.caption_model
        return int(main.config.num_query_tokens)

    @property
    def max_text_tokens(self) -> int:
        """Longest tokenised text the Q-Former takes, special tokens included."""
        tok = self.retrieval_tokenizer
        qformer_config: Any = self._need_retrieval().config.qformer_config
        limit = qformer_config.max_position_embeddings
        model_max = getattr(tok, "model_max_length", limit) or limit
        return int(min(limit, model_max))

    def _need_retrieval(self) -> Blip2ForImageTextRetrieval:
        return _loaded(self.retrieval, "a retrieval model (ITC/ITM)")

    def _need_caption(self) -> Blip2ForConditionalGeneration:
        return _loaded(self.caption_model, "a caption model")

    def _need_retrieval_tokenizer(self) -> PreTrainedTokenizerBase:
        return _loaded(self.retrieval_tokenizer, "a retrieval tokenizer")

    def _need_caption_tokenizer(self) -> PreTrainedTokenizerBase:
        return _loaded(self.caption_tokenizer, "a caption tokenizer")

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
    def _vit(self, pixels: torch.Tensor) -> torch.Tensor:
        main: Any = self.retrieval or self.caption_model
        return vision_trunk(main.vision_model, pixels)

    def _vision_features_batch(self, pixels: torch.Tensor) -> VisionFeatures:
        hidden = self._graph("vit", pixels.shape[0], pixels)
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
            pixels=None
            if parts[0].pixels is None
            else torch.cat([p.pixels for p in parts if p.pixels is not None]),
        )

    def _caption_hidden(self, feats: VisionFeatures) -> torch.Tensor:
        """The caption model's ViT blocks' output (before its own final LayerNorm)."""
        model = self._need_caption()
        if self.retrieval is None or self.shared_vit:
            return feats.hidden
        if feats._caption_hidden is None:
            if feats.pixels is None:
                raise ValueError("these features lack the pixels the caption model's own ViT needs")
            feats._caption_hidden = vision_trunk(model.vision_model, feats.pixels)
        return feats._caption_hidden

    # ------------------------------------------------------------------ ITC
    @torch.inference_mode()
    def embed_images(self, images: ImageInput) -> np.ndarray:
        """ITC image embeddings, float32 (N, 32, D), each of the 32 query vectors L2-normalised."""
        self._need_retrieval()
        out = []
        for feats in self._features_chunks(images):
            out.append(self._graph("itc_image", len(feats), feats.hidden).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_queries, self.embed_dim), np.float32)

    def _itc_image(self, hidden: torch.Tensor) -> torch.Tensor:
        model: Any = self._need_retrieval()
        query = query_output(model, model.vision_model.post_layernorm(hidden))
        proj = model.vision_projection(query.to(model.vision_projection.weight.dtype))
        return nn.functional.normalize(proj.float(), dim=-1)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and the padding mask, on the host. The length is padded up to a multiple of
        ``text_pad_multiple`` (8 with CUDA graphs, so a handful of graphs serve every text length;
        padding is masked out)."""
        tok = self._need_retrieval_tokenizer()
        enc = tok(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        multiple = self.text_pad_multiple
        extra = min(-(-ids.shape[1] // multiple) * multiple, self.max_text_tokens) - ids.shape[1]
        if extra > 0:
            ids = nn.functional.pad(ids, (0, extra), value=tok.pad_token_id or 0)
            mask = nn.functional.pad(mask, (0, extra), value=0)
        return {"input_ids": ids, "attention_mask": mask}

    def _mask_4d(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """``[]`` when nothing is padded, else ``[the 4D mask]`` on the device (see graphs.py)."""
        model = self._need_retrieval()
        dtype = model.qformer.layernorm.weight.dtype
        full = attention_mask_4d(mask, model.qformer.config._attn_implementation, dtype)
        return [] if full is None else [full.to(self.device, non_blocking=True)]

    def text_truncation(self, texts: Sequence[str]) -> list[bool]:
        """Which texts are longer than the Q-Former takes (they are cut to ``max_text_tokens``)."""
        tok = self._need_retrieval_tokenizer()
        lengths = [len(ids) for ids in tok(list(texts), truncation=False)["input_ids"]]
        return [n > self.max_text_tokens for n in lengths]

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """ITC text embeddings, float32 (M, D): the L2-normalised projection of the CLS output.

        Texts longer than ``max_text_tokens`` are truncated and a warning names them; call
        ``text_truncation`` to learn which ones in code.
        """
        self._need_retrieval()
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
            ids = enc["input_ids"].to(self.device, non_blocking=True)
            vecs = self._graph("itc_text", ids.shape[0], ids, *self._mask_4d(enc["attention_mask"]))
            out.append(vecs.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def _itc_text(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        model: Any = self._need_retrieval()
        emb = model.embeddings(input_ids=input_ids)
        hidden = model.qformer(
            query_embeds=emb, query_length=0, attention_mask=mask, return_dict=True
        ).last_hidden_state
        cls_vec = hidden[:, 0, :].to(model.text_projection.weight.dtype)
        return nn.functional.normalize(model.text_projection(cls_vec).float(), dim=-1)

    # ------------------------------------------------------------------ ITM
    @torch.inference_mode()
    def itm(self, images: ImageInput, texts: str | Sequence[str]) -> ItmResult:
        """Image-text matching: one text against every image, or N (image, text) pairs."""
        self._need_retrieval()
        n = len(images)
        pair_texts = [texts] * n if isinstance(texts, str) else list(texts)
        if len(pair_texts) != n:
            raise ValueError(f"{n} images but {len(pair_texts)} texts; give one text or one per image")
        logits = []
        start = 0
        for feats in self._features_chunks(images):
            batch_texts = pair_texts[start : start + len(feats)]
            start += len(feats)
            enc = self._tokenize(batch_texts)
            b = len(feats)
            # The queries are never padded: [queries; text] is masked where the text is.
            queries = torch.ones(b, self.num_queries, dtype=torch.long)
            attention = torch.cat([queries, enc["attention_mask"]], dim=1)
            ids = enc["input_ids"].to(self.device, non_blocking=True)
            head = self._graph("itm", b, feats.hidden, ids, *self._mask_4d(attention))
            logits.append(head.cpu())
        all_logits = torch.cat(logits) if logits else torch.zeros((0, 2))
        return ItmResult(probs=all_logits.softmax(dim=-1)[:, 1].numpy(), logits=all_logits.numpy())

    def _itm_logits(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ITM logits (B, 2) in fp32: the head on the 32 query outputs, averaged."""
        model: Any = self._need_retrieval()
        image_embeds = model.vision_model.post_layernorm(hidden)
        queries = model.query_tokens.expand(hidden.shape[0], -1, -1)
        embeds = model.embeddings(input_ids=input_ids, query_embeds=queries)
        out = model.qformer(
            query_embeds=embeds,
            query_length=queries.shape[1],
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            return_dict=True,
        ).last_hidden_state
        head = model.itm_head(out[:, : queries.shape[1], :].to(model.itm_head.weight.dtype))
        logits: torch.Tensor = head.mean(dim=1).float()
        return logits

    # ------------------------------------------------------------------ captions
    def _prompt_ids(self, prompt: str | None) -> torch.Tensor:
        model = self._need_caption()
        tok = self._need_caption_tokenizer()
        config: Any = model.config
        image_token = config.image_token_index
        if image_token is None:
            raise ValueError(
                "the caption checkpoint's config has no image_token_index; use a current "
                "Blip2ForConditionalGeneration checkpoint (e.g. Salesforce/blip2-opt-2.7b)"
            )
        text_ids = lm_text_ids(tok, prompt, config.text_config.bos_token_id)
        return torch.tensor([[image_token] * config.num_query_tokens + text_ids], device=self.device)

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
        model: Any = self._need_caption()
        prompt_ids = self._prompt_ids(prompt)
        embed_tokens = model.get_input_embeddings()
        pad = self._need_caption_tokenizer().pad_token_id
        tokens: list[list[int]] = []
        options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "pad_token_id": pad}
        options.update(generate_kwargs)
        lm = model.language_model
        plan = greedy_plan(lm.generation_config, prompt_ids.shape[1], **options) if self._decoder else None
        for feats in self._features_chunks(images):
            soft_prompt = self._graph("soft_prompt", len(feats), self._caption_hidden(feats))
            input_ids = prompt_ids.expand(soft_prompt.shape[0], -1)
            inputs_embeds = embed_tokens(input_ids)
            image_mask = (input_ids == model.config.image_token_index).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, soft_prompt.to(inputs_embeds.dtype))
            if plan is not None and self._decoder is not None:
                new = self._decoder.generate(inputs_embeds, plan)
            else:
                out = lm.generate(
                    inputs_embeds=inputs_embeds,
                    attention_mask=torch.ones_like(input_ids),
                    input_ids=input_ids,
                    **options,
                )
                new = out[:, input_ids.shape[1] :]
            for row in new.tolist():
                # Finished sequences are padded to the longest one; drop the padding.
                while row and row[-1] == pad:
                    row.pop()
                tokens.append(row)
        return tokens

    def _soft_prompt(self, hidden: torch.Tensor) -> torch.Tensor:
        """The caption Q-Former's 32 outputs projected into the LM's embedding space: (N, 32, E)."""
        model: Any = self._need_caption()
        image_embeds = model.vision_model.post_layernorm(hidden)
        query = query_output(model, image_embeds).to(image_embeds.dtype)
        projected: torch.Tensor = model.language_projection(query)
        return projected

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
        texts = self._need_caption_tokenizer().batch_decode(ids, skip_special_tokens=True)
        return [clean_text(t) for t in texts]


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

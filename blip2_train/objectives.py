"""The BLIP-2 training objectives, written from the paper (Li et al., 2023, sections 3.2 and 3.3).

Stage 1 trains the Q-Former of a :class:`~transformers.Blip2ForImageTextRetrieval` with three losses
that share one set of weights but differ in which tokens may attend to which:

- ITC (image-text contrastive): queries see the image, text sees only text (unimodal). The image side
  gives one vector per query; the image-text similarity is the best query's. In-batch negatives,
  symmetric cross-entropy, learnable temperature.
- ITM (image-text matching): queries and text see each other (bidirectional), queries see the image;
  a binary head on every query output, averaged. Negatives are hard: for each image a text, and for
  each text an image, drawn in proportion to their ITC similarity (excluding the true pair).
- ITG (image-grounded text generation): queries see the image and each other but never the text; text
  tokens see all queries and the text before them (causal). Because the queries are the only path from
  the image to the text, they learn to extract what the text needs.

Stage 2 feeds the Q-Former's query outputs, through a linear projection, to a decoder-only language
model as a soft prompt of ``num_query_tokens`` vectors and trains with the language-modelling loss on
the caption.

Stage 0 (``Stage0``) is this project's addition for models built from scratch: it stands in for the
pre-trained image encoder BLIP-2 starts from.

Nothing here changes the Hugging Face modules: the training-only parts (the temperature and the ITG
text head) live on the wrapper, so ``save_pretrained`` of the wrapped model writes exactly the layout
the rest of the project loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from blip2_embed.encoder import query_output, vision_trunk

NEG_INF = torch.finfo(torch.float32).min


def _config(model: nn.Module) -> Any:
    """A transformers model's config, read as Any (its sub-configs are typed as dicts or None)."""
    return getattr(model, "config")  # noqa: B009


def vision_embeds(model: Any, pixels: torch.Tensor, *, blocks_grad: bool = True) -> torch.Tensor:
    """ViT output after the final LayerNorm, (B, T, W). With ``blocks_grad=False`` the blocks run
    without autograd (frozen: no activations kept) while the final LayerNorm still trains."""
    vm = model.vision_model
    with torch.set_grad_enabled(blocks_grad and torch.is_grad_enabled()):
        hidden = vision_trunk(vm, pixels)
    return vm.post_layernorm(hidden)


def itg_attention_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The ITG mask as an additive (B, 1, Q+L, Q+L) float tensor (0 = may attend).

    Rows are the attending positions, columns the attended ones. Queries attend to queries only; text
    token t attends to every query and to text tokens 0..t that are not padding.
    """
    b, length = text_mask.shape
    total = num_queries + length
    allowed = torch.zeros(b, total, total, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :num_queries] = True
    allowed[:, :num_queries, num_queries:] = False
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, num_queries:, num_queries:] = causal & text_mask.bool()[:, None, :]
    mask = torch.zeros(b, 1, total, total, dtype=torch.float32, device=text_mask.device)
    return mask.masked_fill(~allowed[:, None], NEG_INF)


class TextDecoderHead(nn.Module):
    """Next-token head on the Q-Former's text outputs, for ITG only (never saved in the HF checkpoint).

    A BERT-style transform (dense, GELU, LayerNorm) then the word embeddings transposed: tying the
    output to the input embeddings costs no extra vocabulary-sized matrix and lets ITG shape the very
    embeddings ITC and ITM read.
    """

    def __init__(self, word_embeddings: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        # Kept as a plain attribute (not a submodule) so the tied matrix is owned, and saved, once.
        self._embeddings = [word_embeddings]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))
        return x @ self._embeddings[0].weight.t() + self.bias


def head_training_state(temperature: nn.Parameter, name: str, head: nn.Module) -> dict[str, torch.Tensor]:
    """A stage's parameters that live outside the HF checkpoint: its temperature and training head."""
    return {
        "temperature": temperature.detach().clone(),
        **{f"{name}.{k}": v for k, v in head.state_dict().items()},
    }


def load_head_training_state(
    state: dict[str, torch.Tensor], temperature: nn.Parameter, name: str, head: nn.Module
) -> None:
    with torch.no_grad():
        temperature.copy_(state["temperature"])
    prefix = f"{name}."
    head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


class Stage0(nn.Module):
    """CLIP-style pre-training of a ViT built from scratch: what BLIP-2 gets from EVA-CLIP.

    BLIP-2 starts from a frozen, already pre-trained image encoder. A model built from a config has
    none, and training a ViT through the Q-Former costs ~4.5x more per image than training it directly
    (the 32 queries run through three Q-Former passes, ITM on three pairs per image). So the ViT first
    learns alone: image embedding = projection of the ViT's [CLS] output (a training-only head), text
    embedding = the Q-Former's own text path (which stage 1 keeps), symmetric InfoNCE over the batch.
    """

    def __init__(self, model: Blip2ForImageTextRetrieval, *, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.model = model
        config: Any = model.config
        width = config.vision_config.hidden_size
        self.image_head = nn.Linear(width, config.image_text_hidden_size)
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))

    def training_state(self) -> dict[str, torch.Tensor]:
        return head_training_state(self.temperature, "image_head", self.image_head)

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        load_head_training_state(state, self.temperature, "image_head", self.image_head)

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
        positive: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE; ``positive`` (B, B) bool marks matching (image, text) pairs (default:
        equal ``image_ids``)."""
        image = F.normalize(self.image_head(vision_embeds(self.model, pixels)[:, 0]), dim=-1)
        m = self.model
        hidden = m.qformer(
            query_embeds=m.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        text = F.normalize(m.text_projection(hidden[:, 0]), dim=-1)
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        logits = image.float() @ text.float().t() / self.temperature
        if positive is None:
            positive = image_ids[:, None] == image_ids[None, :]
        pos = positive.to(logits.device).float()
        targets = pos / pos.sum(dim=1, keepdim=True)
        targets_t = pos.t() / pos.t().sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets_t)) / 2


@dataclass
class TextNegatives:
    """Hard-negative texts for a stage-1 batch: one per image, row i made for image i, tokenized to
    the batch's own text width (ITM concatenates them with the batch's texts).

    ``matches`` (B, B) bool marks the pairs where a negative text still describes an image of the batch
    (another image's text, by exact match); those count as positives, never as negatives.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    matches: torch.Tensor


@dataclass
class Stage1Output:
    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    itm_accuracy: float
    temperature: float


class Stage1(nn.Module):
    """ITC + ITM + ITG on a ``Blip2ForImageTextRetrieval`` (whose text path is the Q-Former's BERT).

    ``dec_token_id`` replaces the first text token ([CLS]) for ITG, as BLIP-2 does with its [DEC]
    token, so the Q-Former can tell a generation pass from an understanding pass.
    """

    def __init__(
        self,
        model: Blip2ForImageTextRetrieval,
        dec_token_id: int,
        *,
        init_temperature: float = 0.07,
        label_smoothing: float = 0.1,
        train_vision: bool = True,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.dec_token_id = dec_token_id
        self.label_smoothing = label_smoothing
        self.train_vision = train_vision
        self.itm_weight = itm_weight
        self.itg_weight = itg_weight
        self.temperature = nn.Parameter(torch.tensor(float(init_temperature)))
        self.itg_head = TextDecoderHead(
            model.embeddings.word_embeddings, eps=_config(model).qformer_config.layer_norm_eps
        )

    def training_state(self) -> dict[str, torch.Tensor]:
        """The parameters outside the HF model, for training checkpoints (resume)."""
        return head_training_state(self.temperature, "itg_head", self.itg_head)

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        load_head_training_state(state, self.temperature, "itg_head", self.itg_head)

    # ------------------------------------------------------------------ pieces
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ViT output (B, T, W), normalised ITC query embeddings (B, Q, D))."""
        image_embeds = vision_embeds(self.model, pixels, blocks_grad=self.train_vision)
        query = query_output(self.model, image_embeds)
        return image_embeds, F.normalize(self.model.vision_projection(query), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text embeddings (B, D) from the [CLS] output of the text-only pass."""
        m = self.model
        hidden = m.qformer(
            query_embeds=m.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        return F.normalize(m.text_projection(hidden[:, 0]), dim=-1)

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (B, 2): queries and text attend to each other, queries to the image."""
        m = self.model
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        q = queries.shape[1]
        mask = torch.cat(
            [
                torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            dim=1,
        )
        hidden = m.qformer(
            query_embeds=m.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=q,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        return m.itm_head(hidden[:, :q]).mean(dim=1)

    def itg_loss(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        m = self.model
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        q = queries.shape[1]
        hidden = m.qformer(
            query_embeds=m.embeddings(input_ids=dec_ids, query_embeds=queries),
            query_length=q,
            attention_mask=itg_attention_mask(q, attention_mask),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        logits = self.itg_head(hidden[:, q:])
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        # Position t predicts token t+1; the [DEC] token itself is never a target.
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
        )

    # ------------------------------------------------------------------ all three
    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        positive: torch.Tensor | None = None,
        negatives: TextNegatives | None = None,
    ) -> Stage1Output:
        """Losses on a batch of B (image, caption) pairs; pairs with equal ``image_ids`` count as matches
        (so a repeated image is never its own negative), or those ``positive`` (B, B) bool marks (a text
        that describes several images of the batch). ``generator`` drives hard-negative sampling.

        ``negatives`` adds B hard-negative texts: extra candidates of every image in ITC's image -> text
        softmax (NegCLIP), and for each image an extra ITM pair with its own negative."""
        b = pixels.shape[0]
        device = pixels.device
        if image_ids is None:
            image_ids = torch.arange(b, device=device)
        image_embeds, image_feats = self.image_features(pixels)
        text_feats = self.text_features(input_ids, attention_mask)

        # ITC: similarity of image i and text j = max over i's queries; symmetric InfoNCE.
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        sim = torch.einsum("iqd,jd->ijq", image_feats.float(), text_feats.float()).amax(dim=-1)
        logits_i2t = sim / self.temperature
        if positive is None:
            positive = image_ids[:, None] == image_ids[None, :]
        positive = positive.to(device)
        i2t_logits, i2t_positive = logits_i2t, positive
        if negatives is not None:
            neg_feats = self.text_features(negatives.input_ids, negatives.attention_mask)
            neg_sim = torch.einsum("iqd,jd->ijq", image_feats.float(), neg_feats.float()).amax(dim=-1)
            i2t_logits = torch.cat([logits_i2t, neg_sim / self.temperature], dim=1)
            i2t_positive = torch.cat([positive, negatives.matches.to(device)], dim=1)
        targets = i2t_positive.float() / i2t_positive.float().sum(dim=1, keepdim=True)
        targets_t = positive.t().float() / positive.t().float().sum(dim=1, keepdim=True)
        itc = (
            F.cross_entropy(i2t_logits, targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_i2t.t(), targets_t, label_smoothing=self.label_smoothing)
        ) / 2

        # ITM with hard negatives drawn from the ITC similarities (true pairs excluded).
        with torch.no_grad():
            # The small floor keeps every non-matching pair drawable when the softmax underflows.
            w_i2t = (F.softmax(logits_i2t.float(), dim=1) + 1e-5).masked_fill(positive, 0)
            w_t2i = (F.softmax(logits_i2t.t().float(), dim=1) + 1e-5).masked_fill(positive.t(), 0)
            # A text that describes every image of the batch has no negative: draw any (vanishingly rare).
            w_i2t[w_i2t.sum(dim=1) == 0] = 1.0
            w_t2i[w_t2i.sum(dim=1) == 0] = 1.0
            neg_text = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1).to(device)
            neg_image = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1).to(device)
        itm_images = [image_embeds, image_embeds, image_embeds[neg_image]]
        itm_ids = [input_ids, input_ids[neg_text], input_ids]
        itm_masks = [attention_mask, attention_mask[neg_text], attention_mask]
        labels = [torch.ones(b), torch.zeros(2 * b)]
        if negatives is not None:
            itm_ids.append(negatives.input_ids)
            itm_masks.append(negatives.attention_mask)
            itm_images.append(image_embeds)
            labels.append(negatives.matches.diagonal().float().cpu())
        itm_logits = self.itm_logits(torch.cat(itm_images), torch.cat(itm_ids), torch.cat(itm_masks))
        itm_labels = torch.cat(labels).long().to(device)
        itm = F.cross_entropy(itm_logits.float(), itm_labels)
        itm_accuracy = (itm_logits.argmax(dim=1) == itm_labels).float().mean().item()

        itg = self.itg_loss(image_embeds, input_ids, attention_mask)
        loss = itc + self.itm_weight * itm + self.itg_weight * itg
        return Stage1Output(
            loss, itc.detach(), itm.detach(), itg.detach(), itm_accuracy, self.temperature.item()
        )


class Stage2(nn.Module):
    """Soft-prompt captioning on a ``Blip2ForConditionalGeneration``: LM loss on the caption tokens.

    The input is ``[projection(query outputs); BOS caption EOS]``, which is what generation later sees
    (the image-token placeholders are replaced by the same projected queries, then BOS).
    """

    def __init__(self, model: Blip2ForConditionalGeneration, *, train_vision_blocks: bool = False) -> None:
        super().__init__()
        self.model = model
        self.train_vision_blocks = train_vision_blocks

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        m = self.model
        image_embeds = vision_embeds(m, pixels, blocks_grad=self.train_vision_blocks)
        query = query_output(m, image_embeds)
        lm = m.language_model
        embed = m.get_input_embeddings()
        soft = m.language_projection(query).to(embed.weight.dtype)
        inputs = torch.cat([soft, embed(input_ids)], dim=1)
        mask = torch.cat(
            [
                torch.ones(soft.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                attention_mask,
            ],
            dim=1,
        )
        logits = lm(inputs_embeds=inputs, attention_mask=mask).logits
        q = soft.shape[1]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        # The output at caption position t (sequence position q + t) predicts caption token t + 1.
        pred = logits[:, q:-1]
        return F.cross_entropy(
            pred.reshape(-1, pred.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )

"""BLIP-2 training, end to end: which stages run, on which models, from which checkpoints.

``train(TrainConfig)`` runs up to three stages and writes Hugging Face folders, ``<out>/retrieval``
and ``<out>/caption`` (config, safetensors, tokenizer, preprocessor config), that
``Blip2Encoder.from_pretrained`` loads unchanged:

- stage 0 (from-scratch models only): CLIP-style pre-training of the ViT, standing in for the
  pre-trained EVA-CLIP encoder BLIP-2 starts from (see ``objectives.Stage0``);
- stage 1: ITC + ITM + ITG on a ``Blip2ForImageTextRetrieval``, ViT blocks frozen;
- stage 2: soft-prompt captioning on a ``Blip2ForConditionalGeneration``.

Two ways to start:

- **from a config** (``shape``): a small BLIP-2 built from scratch, tokenizers made from the captions'
  words. Stage 2 copies stage 1's ViT (blocks frozen, so the pair shares its ViT blocks as the
  Salesforce checkpoints do) and Q-Former; its language model is new, so it trains too unless
  ``train_lm=False``.
- **from checkpoints** (``init_retrieval`` / ``init_caption``): the ViT blocks and the language model
  stay frozen and the Q-Former (with the query tokens, projections, heads and the ViT's final
  LayerNorm) is fine-tuned, as in the paper.

Checkpoints: every ``save_every`` steps and at the end of a stage, ``<checkpoint_dir>/stage{S}-step{N}/``
holds the HF folder of the model being trained and ``trainer_state.pt`` (optimizer, schedule, step,
the training-only parameters). ``resume=True`` continues from the newest one: the batches after it
are the ones an uninterrupted run would have seen (the sampler is a function of the step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from blip2_embed.images import ImageSpec
from blip2_train.checkpoints import checkpoint_step, latest_checkpoint, save_hf
from blip2_train.config import TrainConfig, parse_stages
from blip2_train.data import CaptionDataset, load_captions
from blip2_train.loop import StageRun, Trainer
from blip2_train.model_setup import (
    build_tokenizers,
    caption_words,
    copy_stage1_into_caption,
    freeze,
    init_query_tokens,
    init_vision_positions,
    load_caption,
    load_retrieval,
    queries_from_caption,
    scratch_configs,
)
from blip2_train.objectives import Stage0, Stage1, Stage2

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, list[dict[str, float]]]:
    """Run the configured stages; returns each stage's logged metrics.

    The process-wide torch state it changes (threads, flushing subnormals) is put back afterwards: a
    caller in the same process (a test session, a notebook) must not inherit a flushed FPU, under
    which e.g. hypothesis refuses to generate floats.
    """
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Tiny models drift into subnormal floats (Adam's second moments, small gradients), which x86
    # computes dozens of times slower; flushing them to zero costs nothing measurable in accuracy.
    torch.set_flush_denormal(True)
    try:
        return _train(cfg)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> dict[str, list[dict[str, float]]]:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = parse_stages(str(cfg.stage))
    from_scratch = not (cfg.init_retrieval or cfg.init_caption)
    if not from_scratch:
        stages = [s for s in stages if s != 0]  # a loaded checkpoint's ViT is already pre-trained
    trainer = Trainer(cfg)
    resume = latest_checkpoint(cfg.checkpoints) if cfg.resume else None
    resume_stage = checkpoint_step(resume)[0] if resume else -1
    if resume:
        log.info("resuming from %s", resume)

    items = load_captions(cfg.data, cfg.image_root, cfg.split)
    if from_scratch:
        spec = ImageSpec(size=cfg.shape.image_size)
        bert, opt = build_tokenizers(caption_words(items), cfg.shape.max_text_len)
        retrieval_cfg, caption_cfg = scratch_configs(cfg.shape, bert, opt)
    else:
        source = cfg.init_retrieval or cfg.init_caption
        assert source is not None  # not from scratch: one of them is set
        spec = ImageSpec.from_pretrained(source)
    log.info("%d captioned images, %d px input; decoding into memory", len(items), spec.size)
    dataset = CaptionDataset(items, spec)
    if cfg.text_negatives and 1 in stages and not all(i.negatives for i in items):
        raise ValueError(
            f'--text-negatives needs a "negatives" list for every image in {cfg.data} '
            "(blip2-search scenes --negatives writes them)"
        )
    if cfg.near_ratio and 1 in stages and not any(dataset.near_indices()):
        raise ValueError(
            f'--near-ratio needs "near" look-alike lists in {cfg.data} '
            "(blip2-search scenes --negatives writes them)"
        )
    results: dict[str, list[dict[str, float]]] = {}
    train_lm = cfg.train_lm if cfg.train_lm is not None else from_scratch
    # Q-Former text length: the scratch shape's, else 32 tokens as BLIP-2's pre-training used.
    text_len = cfg.shape.max_text_len if from_scratch else 32
    retrieval: Blip2ForImageTextRetrieval | None = None

    def starting_retrieval(stage: int) -> Blip2ForImageTextRetrieval:
        """The retrieval model a stage starts from: its own checkpoint when resuming it, else what the
        previous stage left (in memory, or its newest checkpoint from an earlier run), else new."""
        nonlocal bert
        if resume_stage == stage:
            assert resume is not None  # resume_stage comes from it
            model, bert = load_retrieval(str(resume / "model"))
            return model
        if retrieval is not None:
            return retrieval
        if not from_scratch:
            if not cfg.init_retrieval:
                raise ValueError("stage 1 from checkpoints needs init_retrieval")
            model, bert = load_retrieval(cfg.init_retrieval)
            return model
        earlier = latest_checkpoint(cfg.checkpoints, stage=stage - 1) if stage > 0 else None
        if earlier is not None:
            log.info("stage %d starts from %s", stage, earlier)
            model, bert = load_retrieval(str(earlier / "model"))
            return model
        torch.manual_seed(cfg.seed)
        model = Blip2ForImageTextRetrieval(retrieval_cfg)
        init_query_tokens(model, cfg.seed)
        if cfg.position_init_std is not None:
            init_vision_positions(model, cfg.position_init_std, cfg.seed)
        return model

    if 0 in stages and resume_stage <= 0:
        retrieval = starting_retrieval(0)
        run0 = StageRun(
            0, Stage0(retrieval), retrieval, bert, text_len, cfg.steps0, cfg.lr0, batch_size=cfg.batch_size0
        )
        results["stage0"] = trainer.run_stage(run0, dataset, resume if resume_stage == 0 else None)
        if not trainer.finished:
            return results

    if 1 in stages and resume_stage <= 1:
        retrieval = starting_retrieval(1)
        if cfg.queries_from_caption and resume_stage != 1:
            queries_from_caption(retrieval, load_caption(cfg.queries_from_caption)[0])
        # BLIP-2 trains the Q-Former against a frozen, pre-trained ViT. A ViT is trained here only when
        # it was built from scratch and had no stage 0; its final LayerNorm always adapts.
        train_vision = (
            cfg.train_vision
            if cfg.train_vision is not None
            else from_scratch and (0 not in stages and latest_checkpoint(cfg.checkpoints, stage=0) is None)
        )
        if not train_vision:
            freeze(retrieval.vision_model.embeddings)
            freeze(retrieval.vision_model.encoder)
        dec = bert.convert_tokens_to_ids("[DEC]")
        if dec is None or dec == bert.unk_token_id:
            dec = bert.cls_token_id  # a checkpoint whose vocabulary lacks [DEC]: reuse [CLS]
        assert isinstance(dec, int)
        module = Stage1(retrieval, dec, train_vision=train_vision, itm_weight=cfg.itm_weight)
        run = StageRun(1, module, retrieval, bert, text_len, cfg.steps1, cfg.lr1)
        results["stage1"] = trainer.run_stage(run, dataset, resume if resume_stage == 1 else None)
        if not trainer.finished:
            return results
        save_hf(retrieval, out / "retrieval", bert, spec, cfg.save_dtype)
        log.info("stage 1 done: %s", out / "retrieval")

    if 2 in stages:
        if resume_stage == 2:
            assert resume is not None
            caption, opt = load_caption(str(resume / "model"))
        elif from_scratch:
            if retrieval is None:
                retrieval, _ = load_retrieval(str(out / "retrieval"))
            torch.manual_seed(cfg.seed + 2)
            caption = Blip2ForConditionalGeneration(caption_cfg)
            copy_stage1_into_caption(retrieval, caption)
        else:
            if not cfg.init_caption:
                raise ValueError("stage 2 from checkpoints needs init_caption")
            caption, opt = load_caption(cfg.init_caption)
            if cfg.vision_from:
                donor, _ = load_retrieval(cfg.vision_from)
                caption.vision_model.load_state_dict(donor.vision_model.state_dict())
        freeze(caption.vision_model.embeddings)
        freeze(caption.vision_model.encoder)
        if not train_lm:
            freeze(caption.language_model)
        run2 = StageRun(
            2,
            Stage2(caption),
            caption,
            opt,
            64,
            cfg.steps2,
            cfg.lr2,
            lm_bos=_text_config(caption).bos_token_id,
        )
        results["stage2"] = trainer.run_stage(run2, dataset, resume if resume_stage == 2 else None)
        if not trainer.finished:
            return results
        save_hf(caption, out / "caption", opt, spec, cfg.save_dtype)
        log.info("stage 2 done: %s", out / "caption")
    return results


def _text_config(model: Blip2ForConditionalGeneration) -> Any:
    """The language model's config (transformers types sub-configs as dicts or None)."""
    return model.config.text_config

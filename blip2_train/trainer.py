"""BLIP-2 training: the loop, optimizer, schedule, mixed precision, checkpoints and resume.

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

import json
import logging
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    PreTrainedTokenizerBase,
)

from blip2_embed.images import ImageSpec
from blip2_embed.testing import (
    BASE_WORDS,
    TinyShape,
    build_bert_tokenizer,
    build_opt_tokenizer,
    tiny_configs,
)
from blip2_train.data import (
    BatchSampler,
    CaptionDataset,
    CaptionedImage,
    load_captions,
    tokenize,
    tokenize_lm,
)
from blip2_train.objectives import Stage0, Stage1, Stage2
from blip2_train.scenes import VOCABULARY

log = logging.getLogger(__name__)

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


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI fills it from flags."""

    data: str
    out: str
    image_root: str | None = None
    split: str | None = None  # keep only this split of a Karpathy file ("train"); None: all
    stage: str = "all"  # "all" (0, 1, 2), "both" (1, 2), or a list such as "1" or "0,1"
    # Where the model comes from: a shape (from scratch) or existing checkpoints.
    shape: TinyShape = field(default_factory=lambda: SHAPES["demo"])
    init_retrieval: str | None = None
    init_caption: str | None = None
    train_lm: bool | None = None  # None: train it when built from scratch, freeze it when loaded
    # Optimisation (BLIP-2: AdamW 0.9/0.98, weight decay 0.05, linear warm-up, cosine decay).
    # The defaults are the demo model's (docs/training.md).
    steps0: int = 1500  # ViT pre-training; from scratch only
    steps1: int = 1000
    steps2: int = 1200
    batch_size: int = 32
    batch_size0: int | None = 64  # stage 0's batch (None: batch_size); its steps are ~5x cheaper
    lr0: float = 2e-3
    lr1: float = 1e-3
    lr2: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # Share of stage-0/1 texts drawn from an image's queries (partial descriptions such as "the red
    # circle") instead of its captions; such a text is a positive of every batch image it describes.
    query_ratio: float = 0.0
    seed: int = 0
    # Machinery.
    device: str | None = None
    precision: str = "auto"  # auto: fp32 on CPU, bf16 (else fp16) autocast on CUDA
    num_threads: int | None = None
    save_every: int = 0  # 0: only at the end of each stage
    keep_checkpoints: int = 2
    checkpoint_dir: str | None = None  # default <out>/checkpoints
    resume: bool = False
    log_every: int = 25
    save_dtype: str = "float32"  # dtype of the exported HF weights ("float16" halves the size)
    max_steps_this_run: int | None = None  # stop early (tests, time-boxed runs); resume continues

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out) / "checkpoints"


# ---------------------------------------------------------------------------------------------- models
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
    retrieval, caption = tiny_configs(shape, len(bert), len(opt), opt.convert_tokens_to_ids("<image>"))
    for cfg in (retrieval, caption):
        cfg.qformer_config.hidden_dropout_prob = 0.0
        cfg.qformer_config.attention_probs_dropout_prob = 0.0
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(cfg.text_config, key, 0.0)
    return retrieval, caption


def init_query_tokens(model: nn.Module, seed: int) -> None:
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


def save_hf(
    model: nn.Module,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    spec: ImageSpec,
    dtype: str = "float32",
) -> None:
    """Write a Hugging Face folder: config + safetensors + tokenizer + preprocessor config."""
    folder.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, dtype)
    if target != torch.float32:
        # Cast a copy of the weights only; the model being trained stays fp32.
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=state)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(spec.to_preprocessor_config(), indent=2))


# ---------------------------------------------------------------------------------------------- optimisation
def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, embeddings, query tokens and the temperature
    (decaying them pulls scales and lookup vectors towards zero without regularising anything)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "query_tokens" in name or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if precision in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_step(path: Path) -> tuple[int, int]:
    m = re.fullmatch(r"stage([012])-step(\d+)", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, -1)


def latest_checkpoint(folder: Path, stage: int | None = None) -> Path | None:
    """The newest complete checkpoint (of one stage if given), or None.

    Complete means its ``trainer_state.pt`` exists: that file is written last, atomically.
    """
    pattern = f"stage{stage}-step*" if stage is not None else "stage*-step*"
    done = [p for p in folder.glob(pattern) if (p / "trainer_state.pt").is_file()]
    return max(done, key=_checkpoint_step) if done else None


@dataclass
class StageRun:
    """What one stage's loop needs; built by ``train`` for stage 1 or stage 2."""

    stage: int
    module: nn.Module  # Stage1 or Stage2 wrapper
    hf_model: nn.Module  # the model that is saved
    tokenizer: PreTrainedTokenizerBase
    text_len: int
    steps: int
    lr: float
    lm_bos: int | None = None  # caption model: texts become [BOS] text [EOS] with this BOS
    batch_size: int | None = None  # default: the config's


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = resolve_precision(cfg.precision, self.device)
        self.finished = False

    def _save(self, run: StageRun, step: int, optimizer, scheduler, spec: ImageSpec, scaler) -> Path:
        path = self.cfg.checkpoints / f"stage{run.stage}-step{step:06d}"
        if path.exists():
            shutil.rmtree(path)
        save_hf(run.hf_model, path / "model", run.tokenizer, spec)
        extra = run.module.training_state() if isinstance(run.module, Stage0 | Stage1) else {}
        state = {
            "stage": run.stage,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": extra,
            "config": {k: (asdict(v) if k == "shape" else v) for k, v in vars(self.cfg).items()},
        }
        tmp = path / "trainer_state.pt.tmp"
        torch.save(state, tmp)
        tmp.rename(path / "trainer_state.pt")  # complete only once this file exists
        old = sorted((p for p in self.cfg.checkpoints.glob(f"stage{run.stage}-step*")), key=_checkpoint_step)
        for p in old[: max(0, len(old) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)
        log.info("saved checkpoint %s", path)
        return path

    def run_stage(
        self, run: StageRun, dataset: CaptionDataset, resume_from: Path | None = None
    ) -> list[dict[str, float]]:
        """The training loop of one stage; returns the logged metrics."""
        cfg = self.cfg
        module = run.module.to(self.device).train()
        optimizer = torch.optim.AdamW(
            param_groups(module.named_parameters(), cfg.weight_decay), lr=run.lr, betas=cfg.betas
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(min(cfg.warmup, run.steps), run.steps, cfg.min_lr_ratio)
        )
        scaler = torch.amp.GradScaler("cuda") if self.autocast == torch.float16 else None
        start = 0
        if resume_from is not None:
            state = torch.load(resume_from / "trainer_state.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if isinstance(module, Stage0 | Stage1):
                module.load_training_state(state["extra"])
            start = state["step"]
            log.info("stage %d: resumed at step %d from %s", run.stage, start, resume_from)
        sampler = BatchSampler(len(dataset), run.batch_size or cfg.batch_size, cfg.seed + run.stage)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        metrics: list[dict[str, float]] = []
        stop = run.steps if cfg.max_steps_this_run is None else min(run.steps, start + cfg.max_steps_this_run)
        t0 = time.perf_counter()
        step = start
        for step in range(start, stop):
            indices, rng = sampler.batch(step)
            pixels = dataset.pixels(indices).to(self.device, non_blocking=True)
            ratio = cfg.query_ratio if run.stage in (0, 1) else 0.0
            texts = dataset.sample_captions(indices, rng, ratio)
            positive = dataset.positives(indices, texts).to(self.device) if ratio else None
            if run.lm_bos is not None:
                batch = tokenize_lm(run.tokenizer, texts, run.text_len, run.lm_bos)
            else:
                batch = tokenize(run.tokenizer, texts, run.text_len)
            enc = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                if isinstance(module, Stage0):
                    loss = module(
                        pixels,
                        enc["input_ids"],
                        enc["attention_mask"],
                        torch.as_tensor(indices, device=self.device),
                        positive,
                    )
                    row = {"itc": loss.item(), "temp": module.temperature.item()}
                elif isinstance(module, Stage1):
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                    image_ids = torch.as_tensor(indices, device=self.device)
                    out = module(
                        pixels,
                        enc["input_ids"],
                        enc["attention_mask"],
                        image_ids,
                        generator=gen,
                        positive=positive,
                    )
                    loss = out.loss
                    row = {
                        "itc": out.itc.item(),
                        "itm": out.itm.item(),
                        "itg": out.itg.item(),
                        "itm_acc": out.itm_accuracy,
                        "temp": out.temperature,
                    }
                else:
                    loss = module(pixels, enc["input_ids"], enc["attention_mask"])
                    row = {"lm": loss.item()}
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            row.update(step=step + 1, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            metrics.append(row)
            if (step + 1) % cfg.log_every == 0 or step + 1 == stop:
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step")
                log.info("stage %d step %d/%d %s (%.2f steps/s)", run.stage, step + 1, run.steps, shown, rate)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < stop:
                self._save(run, step + 1, optimizer, scheduler, dataset.spec, scaler)
        if stop > start:
            self._save(run, stop, optimizer, scheduler, dataset.spec, scaler)
        self.finished = stop >= run.steps
        return metrics


# ---------------------------------------------------------------------------------------------- entry point
def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _load_retrieval(path: str) -> tuple[Blip2ForImageTextRetrieval, PreTrainedTokenizerBase]:
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _load_caption(path: str) -> tuple[Blip2ForConditionalGeneration, PreTrainedTokenizerBase]:
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def parse_stages(stage: str) -> list[int]:
    """ "all" -> [0, 1, 2]; "both" -> [1, 2] (the paper's two); "1" -> [1]; "0,1" -> [0, 1]."""
    named = {"all": [0, 1, 2], "both": [1, 2]}
    if stage in named:
        return named[stage]
    stages = sorted({int(x) for x in stage.split(",")})
    if not stages or any(x not in (0, 1, 2) for x in stages):
        raise ValueError(f"stages are 0, 1 and 2 (or all / both), got {stage!r}")
    return stages


def train(cfg: TrainConfig) -> dict[str, list[dict[str, float]]]:
    """Run the configured stages; returns each stage's logged metrics."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Tiny models drift into subnormal floats (Adam's second moments, small gradients), which x86
    # computes dozens of times slower; flushing them to zero costs nothing measurable in accuracy.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = parse_stages(str(cfg.stage))
    from_scratch = not (cfg.init_retrieval or cfg.init_caption)
    if not from_scratch:
        stages = [s for s in stages if s != 0]  # a loaded checkpoint's ViT is already pre-trained
    trainer = Trainer(cfg)
    resume = latest_checkpoint(cfg.checkpoints) if cfg.resume else None
    resume_stage = _checkpoint_step(resume)[0] if resume else -1
    if resume:
        log.info("resuming from %s", resume)

    items = load_captions(cfg.data, cfg.image_root, cfg.split)
    if from_scratch:
        spec = ImageSpec(size=cfg.shape.image_size)
        bert, opt = build_tokenizers(caption_words(items), cfg.shape.max_text_len)
        retrieval_cfg, caption_cfg = scratch_configs(cfg.shape, bert, opt)
    else:
        spec = ImageSpec.from_pretrained(cfg.init_retrieval or cfg.init_caption)
    log.info("%d captioned images, %d px input; decoding into memory", len(items), spec.size)
    dataset = CaptionDataset(items, spec)
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
            model, bert = _load_retrieval(str(resume / "model"))
            return model
        if retrieval is not None:
            return retrieval
        if not from_scratch:
            if not cfg.init_retrieval:
                raise ValueError("stage 1 from checkpoints needs init_retrieval")
            model, bert = _load_retrieval(cfg.init_retrieval)
            return model
        earlier = latest_checkpoint(cfg.checkpoints, stage=stage - 1) if stage > 0 else None
        if earlier is not None:
            log.info("stage %d starts from %s", stage, earlier)
            model, bert = _load_retrieval(str(earlier / "model"))
            return model
        torch.manual_seed(cfg.seed)
        model = Blip2ForImageTextRetrieval(retrieval_cfg)
        init_query_tokens(model, cfg.seed)
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
        # BLIP-2 trains the Q-Former against a frozen, pre-trained ViT. A ViT is trained here only when
        # it was built from scratch and had no stage 0; its final LayerNorm always adapts.
        train_vision = from_scratch and (
            0 not in stages and latest_checkpoint(cfg.checkpoints, stage=0) is None
        )
        if not train_vision:
            _freeze(retrieval.vision_model.embeddings)
            _freeze(retrieval.vision_model.encoder)
        dec = bert.convert_tokens_to_ids("[DEC]")
        if dec is None or dec == bert.unk_token_id:
            dec = bert.cls_token_id  # a checkpoint whose vocabulary lacks [DEC]: reuse [CLS]
        module = Stage1(retrieval, dec, train_vision=train_vision)
        run = StageRun(1, module, retrieval, bert, text_len, cfg.steps1, cfg.lr1)
        results["stage1"] = trainer.run_stage(run, dataset, resume if resume_stage == 1 else None)
        if not trainer.finished:
            return results
        save_hf(retrieval, out / "retrieval", bert, spec, cfg.save_dtype)
        log.info("stage 1 done: %s", out / "retrieval")

    if 2 in stages:
        if resume_stage == 2:
            caption, opt = _load_caption(str(resume / "model"))
        elif from_scratch:
            if retrieval is None:
                retrieval, _ = _load_retrieval(str(out / "retrieval"))
            torch.manual_seed(cfg.seed + 2)
            caption = Blip2ForConditionalGeneration(caption_cfg)
            copy_stage1_into_caption(retrieval, caption)
        else:
            if not cfg.init_caption:
                raise ValueError("stage 2 from checkpoints needs init_caption")
            caption, opt = _load_caption(cfg.init_caption)
        _freeze(caption.vision_model.embeddings)
        _freeze(caption.vision_model.encoder)
        if not train_lm:
            _freeze(caption.language_model)
        run2 = StageRun(
            2,
            Stage2(caption),
            caption,
            opt,
            64,
            cfg.steps2,
            cfg.lr2,
            lm_bos=caption.config.text_config.bos_token_id,
        )
        results["stage2"] = trainer.run_stage(run2, dataset, resume if resume_stage == 2 else None)
        if not trainer.finished:
            return results
        save_hf(caption, out / "caption", opt, spec, cfg.save_dtype)
        log.info("stage 2 done: %s", out / "caption")
    return results

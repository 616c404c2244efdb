"""The training loop of one stage: batches, autocast, backward, clipping, schedule, checkpoints."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blip2_embed.images import ImageSpec
from blip2_train.checkpoints import save_checkpoint
from blip2_train.config import TrainConfig
from blip2_train.data import BatchSampler, CaptionDataset, tokenize, tokenize_lm
from blip2_train.objectives import Stage0, Stage1, TextNegatives
from blip2_train.optimisation import param_groups, resolve_precision, warmup_cosine

log = logging.getLogger(__name__)


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

    def _save(
        self,
        run: StageRun,
        step: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        spec: ImageSpec,
        scaler: torch.amp.GradScaler | None,
    ) -> Path:
        extra = run.module.training_state() if isinstance(run.module, Stage0 | Stage1) else {}
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": extra,
            "config": {k: (asdict(v) if k == "shape" else v) for k, v in vars(self.cfg).items()},
        }
        return save_checkpoint(
            self.cfg.checkpoints,
            run.stage,
            step,
            hf_model=run.hf_model,
            tokenizer=run.tokenizer,
            spec=spec,
            state=state,
            keep=self.cfg.keep_checkpoints,
        )

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
        near_ratio = cfg.near_ratio if run.stage in (0, 1) else 0.0
        sampler = BatchSampler(
            len(dataset),
            run.batch_size or cfg.batch_size,
            cfg.seed + run.stage,
            near=dataset.near_indices() if near_ratio else None,
            near_ratio=near_ratio,
        )
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
            negative_texts = (
                dataset.sample_negatives(indices, rng) if cfg.text_negatives and run.stage == 1 else None
            )
            negatives = None
            if run.lm_bos is not None:
                batch = tokenize_lm(run.tokenizer, texts, run.text_len, run.lm_bos)
            elif negative_texts is not None:
                # One tokenizer call, so captions and negatives share a padded width.
                both = tokenize(run.tokenizer, [*texts, *negative_texts], run.text_len)
                batch = {k: v[: len(texts)] for k, v in both.items()}
                negatives = TextNegatives(
                    both["input_ids"][len(texts) :].to(self.device),
                    both["attention_mask"][len(texts) :].to(self.device),
                    dataset.described(indices, negative_texts).to(self.device),
                )
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
                        negatives=negatives,
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

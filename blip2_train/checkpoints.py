"""Training checkpoints (``stage{S}-step{N}/``: HF folder + ``trainer_state.pt``) and HF export."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blip2_embed.images import ImageSpec

log = logging.getLogger(__name__)


def save_hf(
    model: Any,  # a transformers PreTrainedModel (its attributes read as Tensor | Module to mypy)
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


def checkpoint_step(path: Path) -> tuple[int, int]:
    m = re.fullmatch(r"stage([012])-step(\d+)", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else (0, -1)


def latest_checkpoint(folder: Path, stage: int | None = None) -> Path | None:
    """The newest complete checkpoint (of one stage if given), or None.

    Complete means its ``trainer_state.pt`` exists: that file is written last, atomically.
    """
    pattern = f"stage{stage}-step*" if stage is not None else "stage*-step*"
    done = [p for p in folder.glob(pattern) if (p / "trainer_state.pt").is_file()]
    return max(done, key=checkpoint_step) if done else None


def save_checkpoint(
    folder: Path,
    stage: int,
    step: int,
    *,
    hf_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: ImageSpec,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``folder/stage{S}-step{N}/`` (the HF folder, then ``trainer_state.pt`` atomically, last)
    and delete all but the newest ``keep`` checkpoints of that stage."""
    path = folder / f"stage{stage}-step{step:06d}"
    if path.exists():
        shutil.rmtree(path)
    save_hf(hf_model, path / "model", tokenizer, spec)
    tmp = path / "trainer_state.pt.tmp"
    torch.save({"stage": stage, "step": step, **state}, tmp)
    tmp.rename(path / "trainer_state.pt")  # complete only once this file exists
    old = sorted((p for p in folder.glob(f"stage{stage}-step*")), key=checkpoint_step)
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    log.info("saved checkpoint %s", path)
    return path

"""What a training run is told: ``TrainConfig`` (the CLI fills it from flags) and the stage list."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blip2_train.model_setup import SHAPES
from blip2_train.scratch import TinyShape


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
    # Stage 1 only: start the retrieval Q-Former's query path from this caption checkpoint's Q-Former
    # (it already extracts what captions name); the text-only branch keeps its own weights.
    queries_from_caption: str | None = None
    train_lm: bool | None = None  # None: train it when built from scratch, freeze it when loaded
    # From scratch: std of the new ViT's position embeddings (None: transformers' 0.02, which leaves
    # the demo ViT blind to position; 1.0 does not).
    position_init_std: float | None = None
    # Stage 1: train the ViT blocks too. None: only a from-scratch ViT that had no stage 0. A retrieval
    # ViT trained here no longer equals the caption model's, so the pair shares it again only after
    # stage 2 runs on it (``vision_from``).
    train_vision: bool | None = None
    # Stage 2 from checkpoints: first copy this retrieval checkpoint's ViT into the caption model.
    vision_from: str | None = None
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
    # Stage 1: contrast each image with one of its hard-negative texts (a JSONL line's "negatives")
    # in ITC (image -> text) and ITM.
    text_negatives: bool = False
    # Stages 0 and 1: share of each batch made of look-alikes of its other images (a JSONL line's "near").
    near_ratio: float = 0.0
    # Stage 1: weight of the ITM loss beside ITC and ITG (1 in BLIP-2). More keeps the re-ranking head
    # ahead of a strong ITC on the look-alikes it must separate.
    itm_weight: float = 1.0
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


def parse_stages(stage: str) -> list[int]:
    """ "all" -> [0, 1, 2]; "both" -> [1, 2] (the paper's two); "1" -> [1]; "0,1" -> [0, 1]."""
    named = {"all": [0, 1, 2], "both": [1, 2]}
    if stage in named:
        return named[stage]
    stages = sorted({int(x) for x in stage.split(",")})
    if not stages or any(x not in (0, 1, 2) for x in stages):
        raise ValueError(f"stages are 0, 1 and 2 (or all / both), got {stage!r}")
    return stages

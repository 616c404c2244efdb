"""``blip2-search scenes``, ``train`` and ``eval retrieval``: the training package's commands.

Heavy imports (torch, transformers) happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from blip2_search.settings import get_settings

log = logging.getLogger(__name__)

# Default ITM re-rank depth of ``eval retrieval``.
GPU_DEPTH = 128
CPU_DEPTH = 16

eval_app = typer.Typer(help="Evaluate models.", no_args_is_help=True)


def scenes(
    folder: Annotated[Path, typer.Argument(help="Output folder (images/, captions.jsonl, karpathy.json).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 1000,
    seed: Annotated[int, typer.Option(help="Scene stream; the same seed gives the same scenes.")] = 0,
    image_size: Annotated[int, typer.Option(min=16, help="Side of the written images in pixels.")] = 128,
    max_objects: Annotated[int, typer.Option(min=1, max=4, help="Objects per scene (1..N).")] = 1,
    captions: Annotated[int, typer.Option(min=1, max=7, help="Captions per image.")] = 5,
    split: Annotated[str, typer.Option(help="Split name written into karpathy.json.")] = "test",
    queries: Annotated[
        bool, typer.Option("--queries", help='Also write partial descriptions ("the red circle").')
    ] = False,
    negatives: Annotated[
        bool,
        typer.Option("--negatives", help="Also write hard negatives: captions with one attribute changed."),
    ] = False,
    near_attributes: Annotated[
        str,
        typer.Option(
            help='With --negatives: look-alikes differ in one of these ("position": position only).'
        ),
    ] = "colour,shape,size,position,background",
) -> None:
    """Generate a synthetic dataset: coloured shapes on backgrounds, with captions."""
    from blip2_train.progress import console_progress
    from blip2_train.scenes import check_attributes, generate_dataset

    try:
        attributes = check_attributes([a.strip() for a in near_attributes.split(",") if a.strip()])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--near-attributes") from None
    with console_progress() as progress:
        records = generate_dataset(
            folder,
            n,
            seed,
            image_size=image_size,
            max_objects=max_objects,
            captions_per_image=captions,
            split=split,
            queries=queries,
            negatives=negatives,
            near_attributes=attributes,
            progress=progress,
        )
    typer.echo(f"wrote {len(records)} scenes to {folder}")


def train(
    data: Annotated[str, typer.Argument(help="Captions: JSONL, Karpathy/COCO JSON, or an image folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: retrieval/ and caption/ are written here.")],
    image_root: Annotated[str | None, typer.Option(help="Folder relative image paths start from.")] = None,
    split: Annotated[str | None, typer.Option(help='Train on one split only (e.g. "train").')] = None,
    stage: Annotated[
        str,
        typer.Option(
            help="all; both (1,2); or a list of 0 (ViT pre-training), 1 (ITC+ITM+ITG), 2 (captions)."
        ),
    ] = "all",
    shape: Annotated[
        str, typer.Option(help="Model shape when training from scratch: demo or tiny.")
    ] = "demo",
    shape_json: Annotated[
        str | None, typer.Option(help="Overrides of the shape, e.g. '{\"vision_layers\": 4}'.")
    ] = None,
    init_retrieval: Annotated[
        str | None, typer.Option(help="Fine-tune this retrieval checkpoint (ViT frozen) instead.")
    ] = None,
    init_caption: Annotated[
        str | None, typer.Option(help="Fine-tune this caption checkpoint (ViT and LM frozen) instead.")
    ] = None,
    queries_from_caption: Annotated[
        str | None,
        typer.Option(help="Stage 1: start the Q-Former's query path from this caption checkpoint's."),
    ] = None,
    position_init_std: Annotated[
        float | None,
        typer.Option(min=0.0, help="From scratch: std of the ViT's position embeddings (1.0 recommended)."),
    ] = None,
    train_vision: Annotated[
        bool | None,
        typer.Option(
            "--train-vision/--freeze-vision",
            help="Stage 1: train the ViT blocks (default: only a new ViT without stage 0).",
        ),
    ] = None,
    vision_from: Annotated[
        str | None,
        typer.Option(help="Stage 2: put this retrieval checkpoint's ViT into the caption model first."),
    ] = None,
    train_lm: Annotated[
        bool | None,
        typer.Option("--train-lm/--freeze-lm", help="Default: train a new LM, freeze a loaded one."),
    ] = None,
    steps0: Annotated[
        int, typer.Option(min=0, help="Stage-0 steps (ViT pre-training, from scratch).")
    ] = 1500,
    steps1: Annotated[int, typer.Option(min=0, help="Stage-1 steps.")] = 1000,
    steps2: Annotated[int, typer.Option(min=0, help="Stage-2 steps.")] = 1200,
    batch_size: Annotated[int, typer.Option(min=2, help="Stage-1 and stage-2 batch.")] = 32,
    batch_size0: Annotated[int, typer.Option(min=2, help="Stage-0 batch.")] = 64,
    lr0: Annotated[float, typer.Option(help="Stage-0 peak learning rate.")] = 2e-3,
    lr1: Annotated[float, typer.Option(help="Stage-1 peak learning rate.")] = 1e-3,
    lr2: Annotated[float, typer.Option(help="Stage-2 peak learning rate.")] = 1e-3,
    warmup: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 50,
    query_ratio: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of stage-0/1 texts taken from the images' queries."),
    ] = 0.0,
    text_negatives: Annotated[
        bool,
        typer.Option(
            "--text-negatives",
            help='Stage 1: contrast each image with its hard-negative texts (a JSONL line\'s "negatives").',
        ),
    ] = False,
    near_ratio: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help='Stages 0-1: share of each batch that is look-alikes of the rest (JSONL "near" lists).',
        ),
    ] = 0.0,
    itm_weight: Annotated[
        float, typer.Option(min=0.0, help="Stage 1: weight of the ITM loss beside ITC and ITG.")
    ] = 1.0,
    weight_decay: Annotated[float, typer.Option(min=0)] = 0.05,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if present).")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (autocast on CUDA).")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    save_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (0: stage ends).")] = 0,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default: OUT/checkpoints.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    save_dtype: Annotated[
        str, typer.Option(help="Exported weights: float32, float16 or bfloat16.")
    ] = "float32",
    log_every: Annotated[int, typer.Option(min=1)] = 25,
) -> None:
    """Train a BLIP-2 pair: 0 ViT pre-training (from scratch), 1 Q-Former ITC/ITM/ITG, 2 captioning."""
    from dataclasses import replace

    from blip2_train.config import TrainConfig, parse_stages
    from blip2_train.model_setup import SHAPES
    from blip2_train.stages import train as run_training

    try:
        parse_stages(stage)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stage") from None
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape; one of {sorted(SHAPES)}", param_hint="--shape")
    model_shape = replace(SHAPES[shape], **json.loads(shape_json)) if shape_json else SHAPES[shape]
    cfg = TrainConfig(
        data=data,
        out=str(out),
        image_root=image_root,
        split=split,
        stage=stage,
        shape=model_shape,
        init_retrieval=init_retrieval,
        init_caption=init_caption,
        queries_from_caption=queries_from_caption,
        train_lm=train_lm,
        position_init_std=position_init_std,
        train_vision=train_vision,
        vision_from=vision_from,
        steps0=steps0,
        steps1=steps1,
        steps2=steps2,
        batch_size=batch_size,
        batch_size0=batch_size0,
        lr0=lr0,
        lr1=lr1,
        lr2=lr2,
        warmup=warmup,
        query_ratio=query_ratio,
        text_negatives=text_negatives,
        near_ratio=near_ratio,
        itm_weight=itm_weight,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        precision=precision,
        num_threads=threads,
        save_every=save_every,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        resume=resume,
        save_dtype=save_dtype,
        log_every=log_every,
    )
    run_training(cfg)
    typer.echo(f"models in {out}")


@eval_app.command("retrieval")
def eval_retrieval(
    data: Annotated[
        str, typer.Argument(help="A dataset folder (scenes writes one), Karpathy JSON or any caption file.")
    ],
    retrieval_model: Annotated[
        str | None,
        typer.Option(help="Retrieval checkpoint (hub id or folder). Default: BLIP2_RETRIEVAL_MODEL."),
    ] = None,
    image_root: Annotated[str | None, typer.Option(help="Folder relative image paths start from.")] = None,
    split: Annotated[str | None, typer.Option(help='Evaluate one split (e.g. "test"); default all.')] = None,
    k: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"ITC candidates re-ranked with ITM (default {GPU_DEPTH} on a GPU, {CPU_DEPTH} on a CPU).",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    device: Annotated[str | None, typer.Option(help="Default: BLIP2_DEVICE.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Default: BLIP2_BATCH_SIZE.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Image-text retrieval R@1/5/10, both directions: ITC alone and ITC top-k re-ranked by ITM."""
    from blip2_embed.encoder import Blip2Encoder
    from blip2_train.data import load_captions
    from blip2_train.evaluate import evaluate_retrieval
    from blip2_train.progress import console_progress

    settings = get_settings()  # BLIP2_RETRIEVAL_MODEL, BLIP2_DEVICE, ... like every other command
    items = load_captions(data, image_root, split)
    if limit:
        items = items[:limit]
    encoder = Blip2Encoder.from_pretrained(
        retrieval=retrieval_model or settings.retrieval_model,
        caption=None,
        device=device or settings.device,
        dtype=settings.dtype,
        batch_size=batch_size or settings.batch_size,
    )
    # LAVIS re-ranks 128 candidates; on a CPU that is minutes even for a few hundred images, and 16
    # already moves R@1 (the ITM head mostly reorders near ties at the top).
    depth = k or (GPU_DEPTH if encoder.device.type == "cuda" else CPU_DEPTH)
    with console_progress() as progress:
        report = evaluate_retrieval(encoder, items, k=depth, progress=progress)
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.table())


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``blip2-search`` app."""
    app.command("scenes")(scenes)
    app.command("train")(train)
    app.add_typer(eval_app, name="eval")

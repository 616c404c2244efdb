"""The demo BLIP-2 pair, shipped as package data so ``blip2-search demo`` works wherever the package is
installed (a wheel, a Docker image), not only in a clone. How it was made: docs/training.md."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent
RETRIEVAL = DEMO_MODEL_DIR / "retrieval"
CAPTION = DEMO_MODEL_DIR / "caption"


def demo_model_present(model_dir: Path = DEMO_MODEL_DIR) -> bool:
    """Both checkpoints of a demo-model folder are there (a partial install or a bad --model-dir)."""
    return all((model_dir / role / "config.json").is_file() for role in ("retrieval", "caption"))

"""Shared fixtures: tiny BLIP-2 checkpoints built once per test session, and the encoder over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2_train.scratch import TinyCheckpoints, build_tiny_checkpoints

# Catalog fixtures (SQLite and Postgres variants of a migrated catalog) and the Ray ones live in their
# own modules.
pytest_plugins = ["tests.support.catalog_fixtures", "tests.support.ray_fixtures"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny-blip2"))


@pytest.fixture(scope="session")
def encoder(tiny_checkpoints: TinyCheckpoints):
    from blip2_embed.encoder import Blip2Encoder

    return Blip2Encoder.from_pretrained(
        retrieval=str(tiny_checkpoints.retrieval),
        caption=str(tiny_checkpoints.caption),
        device="cpu",
        batch_size=4,
    )


@pytest.fixture(scope="session")
def sample_images():
    """A few deterministic RGB images of different sizes and aspect ratios."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    sizes = [(40, 30), (64, 64), (23, 57), (100, 80), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def pytest_report_header(config: pytest.Config) -> str:
    return f"blip2-search tests; repo at {Path(__file__).resolve().parents[1]}"


# Groups of tests that need something the machine may lack; the summary says which ran and why not.
_GROUPS = {"postgres": "Postgres", "browser": "browser (Chromium)", "ray": "Ray"}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    counts: dict[str, dict[str, int]] = {}
    reasons: dict[str, set[str]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            keywords = getattr(report, "keywords", {})
            for marker, label in _GROUPS.items():
                if marker in keywords:
                    counts.setdefault(label, {}).setdefault(outcome, 0)
                    counts[label][outcome] += 1
                    if outcome == "skipped" and isinstance(report.longrepr, tuple):
                        why = str(report.longrepr[2]).removeprefix("Skipped: ")
                        reasons.setdefault(label, set()).add(why)
    if not counts:
        return
    terminalreporter.section("test groups that need services")
    for label, c in counts.items():
        ran = c.get("passed", 0) + c.get("failed", 0) + c.get("error", 0)
        line = f"{label}: {ran} ran, {c.get('skipped', 0)} skipped"
        if c.get("skipped"):
            line += " -- " + "; ".join(sorted(reasons.get(label, ())))
        terminalreporter.write_line(line)

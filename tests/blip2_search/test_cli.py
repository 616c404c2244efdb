"""The ``blip2-search`` command's own subcommands: ``db`` and ``caption`` (others are tested with their
packages)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2_search.cli import app
from blip2_search.settings import get_settings


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    runner = CliRunner()

    def invoke(*args: str, **env: str):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return runner.invoke(app, list(args))

    yield invoke
    get_settings.cache_clear()


def test_db_upgrade_current_and_check(run, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'cat.db'}"
    before = run("db", "current", "--database-url", url)
    assert before.exit_code == 0 and "no schema yet" in before.output
    up = run("db", "upgrade", "--database-url", url)
    assert up.exit_code == 0, up.output
    current = run("db", "current", "--database-url", url)
    assert current.exit_code == 0 and current.output.strip() == "0002"  # the newest revision
    check = run("db", "check", "--database-url", url)
    assert check.exit_code == 0 and "matches the models" in check.output


def test_caption_command(run, tiny_checkpoints, encoder, tmp_path) -> None:
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    out = run(
        "caption", str(good), str(bad), "--json", "--max-new-tokens", "6",
        BLIP2_CAPTION_MODEL=str(tiny_checkpoints.caption), BLIP2_DEVICE="cpu",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in rows] == [str(good)]
    assert rows[0]["text"] == encoder.caption([Image.open(good)], max_new_tokens=6)[0]
    assert "b.jpg" in out.output  # the bad file is named, the run goes on


def test_missing_model_is_one_clear_message(run, tmp_path) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    out = run("caption", str(img), BLIP2_CAPTION_MODEL=str(tmp_path / "nowhere"), HF_HUB_OFFLINE="1")
    assert out.exit_code == 3
    assert "nowhere" in out.output and "Traceback" not in out.output


def test_usage_errors_stay_usage_errors(run) -> None:
    # The failure reporter must leave Typer's own usage errors alone (exit 2 with the usage line).
    out = run("index", "--no-such-flag")
    assert out.exit_code == 2
    assert "No such option" in out.output and "failed:" not in out.output

"""The README stays true: its configuration table lists every setting, and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from blip2_search.cli import app
from blip2_search.settings import Settings

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"`BLIP2_([A-Z0-9_]+)`", README))
    fields = {name.upper() for name in Settings.model_fields}
    # docker-compose.yml's own variables (BLIP2_BIND, ...) are documented in the Docker section.
    compose = set(re.findall(r"\$\{BLIP2_([A-Z0-9_]+)", (REPO / "docker-compose.yml").read_text()))
    assert fields - documented == set(), "settings missing from the README's table"
    assert documented - fields - compose == set(), "the README documents settings that do not exist"


def test_readme_commands_exist() -> None:
    for command in re.findall(r"^blip2-search (\w[\w-]*)", README, flags=re.M):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"`blip2-search {command}` from the README: {result.output}"
    for dev_command in re.findall(r"^\./dev\.sh (\w+)", README, flags=re.M):
        assert f"    {dev_command})" in (Path(__file__).resolve().parents[2] / "dev.sh").read_text()

"""docker-compose.yml and the Dockerfile: what a deployment relies on (no Docker engine runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) when the client has it, else the standalone `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_accepted_by_docker_compose() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs one)")
    result = subprocess.run([*cmd, "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_services_volumes_gpu_and_health_checks() -> None:
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"db", "api", "indexer"} <= set(services)
    assert services["db"]["image"].startswith("postgres")
    assert "healthcheck" in services["db"] and "healthcheck" in services["api"]
    devices = services["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    for name in ("api", "indexer"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@db:" in env["DATABASE_URL"]
        assert env["HF_HUB_OFFLINE"] == "1"  # models come from the mounted folder, never downloaded
        assert any(str(v).endswith(":/data") for v in services[name]["volumes"])
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
    assert {"data", "pgdata"} <= set(spec["volumes"])


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"0", "root"}

"""docker-compose.yml and the Dockerfile: what a deployment relies on (no Docker engine runs here).

The compose file is read as Compose reads it (variables filled in from the environment or their
defaults, ``$$`` as ``$``), checked for the properties the README promises, and the shell command of
its ``init`` service is run for real against an empty and a filled model folder.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from blip2_search.cli import app

REPO = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
DOCKERFILE = (REPO / "Dockerfile").read_text()
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax, the forms this file uses: ${X}, ${X:-default}, ${X-default}, $$."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    return _VAR.sub(one, text)


def compose(**env: str) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE_TEXT, env))


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
    for profile in ("demo", "app"):
        result = subprocess.run(
            [*cmd, "--profile", profile, "config"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        ports = [p for s in yaml.safe_load(result.stdout)["services"].values() for p in s.get("ports", [])]
        # docker-compose 1.x prints "127.0.0.1:8000:8000/tcp", Compose v2 the long form (host_ip: ...).
        hosts = [p["host_ip"] if isinstance(p, dict) else str(p).split(":")[0] for p in ports]
        assert hosts and set(hosts) == {"127.0.0.1"}, ports


def test_profiles_split_the_demo_from_the_app() -> None:
    """`--profile demo up` must start the demo alone: services without a profile would start with it
    (and the API would take the demo's port), so every service names its profile."""
    services = compose()["services"]
    assert {name: s.get("profiles") for name, s in services.items()} == {
        "demo": ["demo"],
        "db": ["app"],
        "init": ["app"],
        "api": ["app"],
        "indexer": ["app"],
    }


def test_demo_service_serves_the_bundled_model_offline() -> None:
    demo = compose()["services"]["demo"]
    argv = demo["command"]
    assert argv[:2] == ["blip2-search", "demo"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    container_port = argv[argv.index("--port") + 1]
    assert [p.rsplit(":", 1)[1] for p in demo["ports"]] == [container_port]
    assert demo["environment"]["HF_HUB_OFFLINE"] == "1"
    # The model is package data inside the image: nothing mounted, no GPU, no database to wait for.
    assert not any(":/models" in v for v in demo.get("volumes", []))
    assert "deploy" not in demo and "depends_on" not in demo
    assert demo["build"]["args"]["CUDA"] == "cpu"
    assert demo["restart"].startswith("on-failure")  # a broken demo stops instead of looping forever


def test_app_services_check_the_models_before_starting() -> None:
    services = compose()["services"]
    assert services["db"]["image"].startswith("postgres") and "healthcheck" in services["db"]
    init = services["init"]
    assert init["restart"] == "no" and init["depends_on"]["db"]["condition"] == "service_healthy"
    script = init["command"][-1]
    assert script.index("blip2-search check-models") < script.index("blip2-search db upgrade")
    for name in ("api", "indexer"):
        service = services[name]
        assert service["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@db:" in env["DATABASE_URL"]
        assert env["HF_HUB_OFFLINE"] == "1"  # models come from the mounted folder, never downloaded
        assert env["HF_HOME"].startswith("/models/")
        assert env["BLIP2_RETRIEVAL_MODEL"].startswith("/models/")
        assert env["BLIP2_CAPTION_MODEL"].startswith("/models/")
        assert "./models:/models:ro" in service["volumes"] and "data:/data" in service["volumes"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert "healthcheck" in services["api"]
    assert services["indexer"]["command"][-1] == "--watch"
    assert services["indexer"]["stop_signal"] == "SIGINT"  # the watcher's clean stop
    assert compose(MODELS="/srv/m")["services"]["api"]["volumes"][1] == "/srv/m:/models:ro"
    assert compose(BLIP2_CAPTION_MODEL="")["services"]["api"]["environment"]["BLIP2_CAPTION_MODEL"] == ""
    assert {"data", "pgdata", "demo-data"} <= set(compose()["volumes"])


def test_ports_bind_localhost_unless_told_otherwise() -> None:
    for env, host in (({}, "127.0.0.1"), ({"BLIP2_BIND": "0.0.0.0", "BLIP2_PORT": "9000"}, "0.0.0.0")):
        for name, service in compose(**env)["services"].items():
            for port in service.get("ports", []):
                want = f"{host}:{env.get('BLIP2_PORT', '8000')}:8000"
                assert port == want, f"{name}: {port}"


def _init_env(tmp_path: Path, **models: str) -> dict[str, str]:
    service = compose(MODELS=str(tmp_path / "host-models"))["services"]["init"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_", "HF_"))}
    env.update({k: str(v) for k, v in service["environment"].items()})
    env.update(
        # The container's /models and Postgres, here: a folder and a SQLite file.
        {k: v.replace("/models", str(tmp_path / "models")) for k, v in env.items() if k.startswith("HF_")}
        | {k: v.replace("/models", str(tmp_path / "models")) for k, v in env.items() if k.endswith("_MODEL")}
        | {"DATABASE_URL": f"sqlite:///{tmp_path / 'catalog.db'}", "BLIP2_DATA_DIR": str(tmp_path / "data")}
        | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        | models
    )
    return env


def test_init_fails_once_with_the_model_layout_then_succeeds_with_models(tiny_checkpoints, tmp_path) -> None:
    script = compose(MODELS=str(tmp_path / "host-models"))["services"]["init"]["command"]
    assert script[:2] == ["sh", "-c"]
    missing = subprocess.run(script, env=_init_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3, missing.stderr
    # One line per missing model (both are checked), then where they go on the host.
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in missing.stderr, lines
    assert "retrieval model folder" in lines[0] and "blip2-itm-vit-g" in lines[0]
    assert "caption model folder" in lines[1] and "blip2-opt-2.7b" in lines[1]
    assert f"models go in {tmp_path / 'host-models'} on the host" in lines[2]
    assert not (tmp_path / "catalog.db").exists()  # nothing else ran

    ok = subprocess.run(
        script,
        env=_init_env(
            tmp_path,
            BLIP2_RETRIEVAL_MODEL=str(tiny_checkpoints.retrieval),
            BLIP2_CAPTION_MODEL=str(tiny_checkpoints.caption),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"retrieval: {tiny_checkpoints.retrieval} -> " in ok.stdout and "newest revision" in ok.stdout


def _blip2_commands(service: dict[str, Any]) -> list[list[str]]:
    command = service.get("command") or []
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(m) for m in re.findall(r"blip2-search [^;|&]+", command[2])]
    return [command] if command[:1] == ["blip2-search"] else []


def test_compose_commands_and_their_flags_exist() -> None:
    runner = CliRunner()
    seen = 0
    for service in compose()["services"].values():
        for argv in _blip2_commands(service):
            words = [w for w in argv[1:] if not w.startswith("-")]
            sub = words[:2] if words[:1] == ["db"] else words[:1]
            result = runner.invoke(app, [*sub, "--help"], terminal_width=200)
            assert result.exit_code == 0, f"{argv}: {result.output}"
            for flag in (w for w in argv if w.startswith("--")):
                assert flag in result.output, f"{argv}: no {flag} in `blip2-search {' '.join(sub)}`"
            seen += 1
    assert seen >= 5


def test_docs_name_only_services_and_profiles_that_exist() -> None:
    spec = compose()
    services = set(spec["services"])
    profiles = {p for s in spec["services"].values() for p in s.get("profiles", [])}
    texts = {"docker-compose.yml": COMPOSE_TEXT, "README.md": (REPO / "README.md").read_text()}
    for name, text in texts.items():
        for line in re.findall(r"docker compose [^\n`]*", text):
            for profile in re.findall(r"--profile (\S+)", line):
                assert profile in profiles, f"{name}: {line}"
            verb = re.search(r"\b(run|logs|exec|stop|start|restart|up)\b((?: +[\w-]+)*)", line)
            named = [w for w in (verb.group(2).split() if verb else []) if not w.startswith("-")]
            assert set(named) <= services, f"{name}: {line}"


def test_dockerfile_takes_a_cuda_version_and_ships_the_demo_model() -> None:
    args = dict(re.findall(r"^ARG (\w+)=?(.*)$", DOCKERFILE, flags=re.M))
    assert args["CUDA"] == "cpu" and "${CUDA}" in args["TORCH_INDEX"]
    assert re.search(r'pip install --index-url "\$TORCH_INDEX" "torch', DOCKERFILE)
    for service in compose()["services"].values():
        build_args = (service.get("build") or {}).get("args", {})
        assert set(build_args) <= set(args), build_args
    # The package (and its demo_model data) is copied and installed, and the build checks the result.
    assert "COPY blip2_search ./blip2_search" in DOCKERFILE
    assert "demo_model_present" in DOCKERFILE
    ignored = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    for f in (REPO / "blip2_search" / "demo_model").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            rel = f.relative_to(REPO).as_posix()
            prefixes = ["/".join(rel.split("/")[: i + 1]) for i in range(rel.count("/") + 1)]
            hits = [p for p in ignored if any(fnmatch.fnmatch(x, p.lstrip("/")) for x in prefixes)]
            assert not hits, f".dockerignore drops {rel} ({hits})"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.splitlines()]
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"0", "root"}

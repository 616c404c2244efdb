"""Test and benchmark helpers: generated photo folders, a real indexed catalog, a real uvicorn process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from blip2_search.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 36), date: str | None = None) -> bytes:
    """A small JPEG with a few coloured blocks (distinct content per seed), optionally EXIF-dated."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    for _ in range(3):
        x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
    image = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    exif = Image.Exif()
    if date:
        exif[0x8769] = {0x9003: date}  # ExifIFD -> DateTimeOriginal "YYYY:MM:DD HH:MM:SS"
    image.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def make_photos(folder: Path, count: int, *, start: int = 0) -> list[Path]:
    """``count`` distinct photos in two year folders (2023/, 2024/) with EXIF dates in that year."""
    paths = []
    for i in range(start, start + count):
        year = 2023 if i % 2 == 0 else 2024
        path = folder / str(year) / f"img_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (40 + (i % 5) * 8, 30 + (i % 3) * 10)
        path.write_bytes(jpeg_bytes(i, size, f"{year}:0{1 + i % 9}:1{i % 10} 12:00:00"))
        paths.append(path)
    return paths


def index_folder(settings: Settings, encoder, folder: Path) -> object:
    """Run the real indexer over ``folder`` into ``settings``' catalog (in process, no worker pool)."""
    from indexer.run import IndexOptions, IndexTarget, run_index

    options = IndexOptions.from_settings(settings, [folder], batch_size=8, workers=0)
    # No index catch-up here: the server builds its index from the catalog on start, as in production.
    target = IndexTarget(settings.resolved_database_url, settings.resolved_indexer_lock)
    return run_index(target, encoder, options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    return settings.as_env()


class ServerProcess:
    """``blip2-search serve`` in a subprocess on a free localhost port; ``url`` once ready."""

    def __init__(self, settings: Settings, *, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings_env(settings), **(extra_env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        self.log_path = settings.data_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blip2_search.cli",
                "serve",
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

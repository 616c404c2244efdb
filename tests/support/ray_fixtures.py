"""Fixtures of the ``ray`` tests: one local Ray and one tiny library, indexed once locally, per session.

Ray's start-up (seconds) and the encoder actors' model loads dominate these tests, so every ray test
shares the cluster, the library and the local reference catalog.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.indexer import CatalogDump, dump, write_image

RAY_BATCH = 4
RAY_IMAGES = 10  # distinct photos: batches 4 + 4 + 2


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (``ray.init(num_cpus=2)``) for the session. Token auth is off: a test cluster must
    not write ~/.ray/auth_token into the user's home (docs/scale-out.md says what a real one needs)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if "ray.serve" in sys.modules:  # the sharded search tests started Serve: stop it before Ray
        sys.modules["ray.serve"].shutdown()
    ray.shutdown()


@dataclass
class RayLibrary:
    root: Path  # the photo folder
    reference: Path  # data dir of the local indexer's run over it (catalog.db, thumbnails, index)
    state: CatalogDump  # that run's end state

    @property
    def url(self) -> str:
        return f"sqlite:///{self.reference / 'catalog.db'}"


def ray_index_options(data: Path, lib: Path):
    from indexer.run import IndexOptions

    return IndexOptions(
        roots=[lib],
        batch_size=RAY_BATCH,
        workers=0,
        caption=True,
        thumbnail_dir=data / "thumbnails",
        thumbnail_size=32,
        model_input_dir=data / "model_inputs",
    )


def index_into(data: Path, lib: Path, encoder, engine=None, progress=None):
    """One ``run_index`` into a fresh or existing data dir; returns (summary, end state)."""
    from catalog.db import make_engine
    from indexer.run import IndexTarget, run_index

    url = f"sqlite:///{data / 'catalog.db'}"
    target = IndexTarget(database_url=url, lock_path=data / "indexer.lock", vector_index_dir=data / "index")
    summary = run_index(target, encoder, ray_index_options(data, lib), progress=progress, model_engine=engine)
    sql = make_engine(url)
    try:
        return summary, dump(sql, encoder.retrieval_key, data / "index")
    finally:
        sql.dispose()


@pytest.fixture(scope="session")
def ray_library(tmp_path_factory: pytest.TempPathFactory, encoder) -> RayLibrary:
    """Ten photos in two folders, a duplicate and a broken JPEG, indexed (with captions) locally."""
    base = tmp_path_factory.mktemp("ray-lib")
    lib = base / "lib"
    for i in range(RAY_IMAGES):
        write_image(lib / f"d{i % 2}/{i}.jpg", 100 + i)
    write_image(lib / "d0/copy-of-3.jpg", 103)
    (lib / "d1/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    with actor_threads():
        _, state = index_into(base / "reference", lib, encoder)
    return RayLibrary(lib, base / "reference", state)


@contextmanager
def actor_threads() -> Iterator[None]:
    """Run torch in this process with the threads of a Ray actor (Ray sets OMP_NUM_THREADS to its
    num_cpus, 1 by default). Float sums split over another number of threads differ in the last bits,
    and the ray tests compare vectors and scores bit for bit; on a 2-core machine torch uses 2 here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ray_engine(tiny_checkpoints, *, decode=None, encoder_actor=None, **options):
    from indexer.ray_engine import EncoderActor, EncoderRecipe, RayEngine, RayOptions, decode_batch

    recipe = EncoderRecipe(
        str(tiny_checkpoints.retrieval), str(tiny_checkpoints.caption), device="cpu", batch_size=RAY_BATCH
    )
    return RayEngine(
        recipe,
        RayOptions(**options),
        decode=decode or decode_batch,
        encoder_actor=encoder_actor or EncoderActor,
    )


def pausing_stages(item: int, seconds: float, decode_marker: Path, encode_marker: Path):
    """The engine's two stages wrapped: the decode task and the encoder actor whose batch holds work item
    ``item`` write their pid to their marker and sleep, once (a retried task or a restarted actor finds
    the marker and goes on). Made here, inside a function, so Ray pickles them by value."""
    import time

    from indexer.ray_engine import EncoderActor, decode_batch

    def pause(marker: Path, batch) -> None:
        if item in {int(i) for i in batch["i"]} and not marker.exists():
            marker.write_text(f"{os.getpid()}\n")
            time.sleep(seconds)

    def decode(batch, config):
        pause(decode_marker, batch)
        return decode_batch(batch, config)

    class PausingEncoder(EncoderActor):
        def __call__(self, batch):
            pause(encode_marker, batch)
            return super().__call__(batch)

    return decode, PausingEncoder

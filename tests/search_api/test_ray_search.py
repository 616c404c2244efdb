"""``serve --engine ray --shards 3``: the same answers as the single-process server, and clean 503s
while a killed shard restarts. Both apps run over the ray tests' shared reference catalog."""

from __future__ import annotations

import os
import signal
import time

import pytest
from fastapi.testclient import TestClient

from blip2_search.settings import Settings
from search_api.app import create_app
from tests.support.ray_fixtures import actor_threads

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUERIES = ["a photo", "red and blue blocks", "zzz"]


@pytest.fixture(scope="module")
def search_settings(ray_library, tiny_checkpoints) -> Settings:
    return Settings(
        data_dir=ray_library.reference,
        retrieval_model=str(tiny_checkpoints.retrieval),
        caption_model=str(tiny_checkpoints.caption),
        device="cpu",
        index_poll_seconds=0.3,
        caption_max_new_tokens=5,
    )


def _answers(client: TestClient, ids: list[int]) -> list[object]:
    """Every ranked answer the gate compares, without timings."""
    out: list[object] = []

    def keep(resp) -> None:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        body.pop("timings_ms", None)
        out.append(body)

    for q in QUERIES:
        keep(client.get("/api/search", params={"q": q, "k": 5, "rerank": 4, "captions": 2}))
        keep(client.get("/api/search", params={"q": q, "k": 3, "offset": 3, "rerank": 0}))
    for i in ids[:3]:
        keep(client.get(f"/api/search/similar/{i}", params={"k": 4}))
    keep(client.post("/api/rerank", json={"text": "a photo", "image_ids": ids[:5]}))
    # Not the default length, so generated (by the model replica) and never cached.
    keep(client.post("/api/caption", json={"image_id": ids[0], "max_new_tokens": 3}))
    return out


def _refused(client: TestClient, image_id: int) -> tuple[int, object]:
    """A request the model replica refuses (prompt + tokens beyond the caption model's positions)."""
    resp = client.post(
        "/api/caption", json={"image_id": image_id, "prompt": "a " * 400, "max_new_tokens": 200}
    )
    return resp.status_code, resp.json()


def test_sharded_answers_equal_the_single_process_servers(
    ray_local, ray_library, search_settings, encoder
) -> None:
    from search_api.scaleout.assembly import ShardLayout, create_sharded_app

    # The reference with the model replica's torch threads: the comparison below is bit for bit.
    with actor_threads(), TestClient(create_app(search_settings, encoder=encoder)) as single:
        hits = single.get("/api/search", params={"q": "a photo", "k": 50, "rerank": 0}).json()["hits"]
        ids = [h["image_id"] for h in hits]
        assert len(ids) == len(ray_library.state.embedded)
        reference = _answers(single, ids)
        refused = _refused(single, ids[0])
    assert 400 <= refused[0] < 500, refused

    app = create_sharded_app(search_settings, ShardLayout(shards=3), encoder=encoder)
    with TestClient(app) as sharded:
        assert _answers(sharded, ids) == reference  # ids, order, scores, captions
        assert _refused(sharded, ids[0]) == refused  # the replica's own error, as the same 4xx
        from ray import serve

        models = serve.status().applications["blip2-models"]
        assert models.status == "RUNNING" and "models" in models.deployments

        # A shard killed under load: every answer is the whole answer or a clean 503, then whole again.
        watcher = sharded.app.state.blip2.index
        os.kill(watcher.shard_pids()[1], signal.SIGKILL)
        want = reference[0]
        seen = set()
        deadline = time.monotonic() + 90
        while True:
            resp = sharded.get("/api/search", params={"q": QUERIES[0], "k": 5, "rerank": 4, "captions": 2})
            seen.add(resp.status_code)
            if resp.status_code == 503:
                assert resp.headers["Retry-After"] and resp.json()["status"] == 503
            else:
                assert resp.status_code == 200, resp.text
                body = resp.json()
                body.pop("timings_ms")
                assert body == want  # never a partial answer
                if 503 in seen:
                    break
            assert time.monotonic() < deadline, f"never recovered: {seen}"
            time.sleep(0.05)
        assert _answers(sharded, ids) == reference

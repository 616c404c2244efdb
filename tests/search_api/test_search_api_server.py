"""The search API as deployed: a real ``blip2-search serve`` process (uvicorn) on a free port.

Every endpoint once over real HTTP, Schemathesis fuzzing of the app's own OpenAPI schema (no 5xx),
and many parallel searches while the real indexer adds photos and publishes a new generation.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support.catalog import index_folder, jpeg_bytes, make_photos, tiny_catalog
from tests.support.server import ServerProcess

N_PHOTOS = 12
ADDED = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints, encoder):
    base = tmp_path_factory.mktemp("served")
    settings = tiny_catalog(
        base,
        tiny_checkpoints,
        encoder,
        N_PHOTOS,
        index_poll_seconds=0.3,
        caption_max_new_tokens=4,
        max_upload_bytes=300_000,
        max_upload_pixels=1_000_000,
        api_keys="secret",
    )
    with ServerProcess(settings) as server:
        yield server, settings, base / "photos"


@pytest.fixture(scope="module")
def http(served) -> httpx.Client:
    server, _, _ = served
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_every_endpoint_over_http(http: httpx.Client) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.get("/readyz").json()["indexed_images"] == N_PHOTOS
    assert "blip2_http_requests" in http.get("/metrics").text
    assert "<form" in http.get("/").text and http.get("/static/app.js").status_code == 200
    search = http.get("/api/search", params={"q": "red", "k": 4, "rerank": 6, "captions": 1}).json()
    hit = search["hits"][0]
    assert len(search["hits"]) == 4 and hit["reranked"] and hit["caption"] is not None
    iid = hit["image_id"]
    assert http.get(f"/api/search/similar/{iid}", params={"k": 3}).json()["hits"]
    img = jpeg_bytes(42)
    assert http.post("/api/search/image", files={"file": ("a.jpg", img)}, data={"k": "2"}).json()["hits"]
    rr = http.post("/api/rerank", json={"text": "red", "image_ids": [iid]}).json()
    assert rr["results"][0]["image_id"] == iid
    up = http.post("/api/rerank/upload", data={"text": "red"}, files=[("files", ("a.jpg", img))]).json()
    assert up["results"][0]["upload_index"] == 0
    assert http.post("/api/caption", json={"image_id": iid}).json()["text"] is not None
    assert http.post("/api/caption/upload", files={"file": ("a.jpg", img)}).json()["cached"] is False
    assert len(http.post("/api/embed/text", json={"texts": ["x"]}).json()["vectors"]) == 1
    assert http.post("/api/embed/image", files={"file": ("a.jpg", img)}).json()["num_vectors"] == 32
    assert http.get(f"/api/embed/image/{iid}").json()["image_id"] == iid
    assert http.get(f"/api/images/{iid}").json()["image_id"] == iid
    assert http.get(f"/api/images/{iid}/thumbnail").headers["content-type"] == "image/jpeg"
    assert http.get(f"/api/images/{iid}/original").content == Path(hit["path"]).read_bytes()
    assert http.post("/api/admin/refresh-index").status_code == 401
    assert http.post("/api/admin/refresh-index", headers={"X-API-Key": "secret"}).status_code == 200


@pytest.mark.parametrize(
    "raw_path",
    [
        "/api/images/../../../../etc/passwd",
        "/api/images/1/../../../../etc/passwd",
        "/static/../../../../../etc/passwd",
        "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/original",
    ],
)
def test_path_traversal_over_http(served, raw_path: str) -> None:
    status, data = raw_get(served[0].port, raw_path)
    assert 400 <= status < 500 and b"root:" not in data


def raw_get(port: int, raw_path: str) -> tuple[int, bytes]:
    """GET with a raw request line, so no client normalises the dots away before the server sees them."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(
    "raw_path",
    ["/api/images/%2e%2e%2f", "/api/images/%2E%2E%2F/original", "/api/search/similar/%2e%2e%2f",
     "/api/embed/image/..%2f", "/api/images/%2e%2e"],
)  # fmt: skip
def test_dot_segment_ids_are_422_over_http(served, raw_path: str) -> None:
    status, data = raw_get(served[0].port, raw_path)
    assert status == 422 and b"application/problem+json" in data, data[:300]  # not a 307 redirect


def test_bad_input_over_http_is_problem_json(http: httpx.Client) -> None:
    for resp in (
        http.get("/api/search", params={"q": ""}),
        http.get("/api/search", params={"q": "a", "k": 10_000}),
        http.post("/api/embed/image", files={"file": ("a.txt", b"plain text")}),
        http.get("/api/images/123456"),
    ):
        assert 400 <= resp.status_code < 500
        assert resp.headers["content-type"] == "application/problem+json"
        assert "Traceback" not in resp.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_server_errors(served, mode: GenerationMode) -> None:
    """Schemathesis over the app's own OpenAPI schema: valid and invalid requests, never a 5xx."""
    server, _, _ = served
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @hyp_settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=30)

        try:
            run()
        except Unsatisfiable:
            # Negative mode on an operation with no inputs (e.g. /healthz): there is nothing to break.
            assert mode is GenerationMode.NEGATIVE
            tested_negative = False
        else:
            tested_negative = True
        del tested_negative


def test_parallel_searches_while_indexing(served, encoder) -> None:
    """Zero failed requests while the indexer adds photos and publishes; results match the catalog."""
    server, settings, photos = served
    before = httpx.get(server.url + "/readyz").json()
    stop = threading.Event()
    failures: list[str] = []
    seen_sizes: set[int] = set()
    counts = {"n": 0}
    lock = threading.Lock()

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            n = 0
            while not stop.is_set():
                n += 1
                params = {"q": f"photo {worker} {n}", "k": 5, "rerank": 4 if n % 2 else 0}
                try:
                    r = c.get("/api/search", params=params)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    with lock:
                        seen_sizes.add(body["indexed_images"])
                        counts["n"] += 1
                    if len(body["hits"]) != 5:
                        failures.append(f"{len(body['hits'])} hits")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hammer, w) for w in range(8)]
        time.sleep(0.5)
        make_photos(photos, ADDED, start=N_PHOTOS)
        summary = index_folder(settings, encoder, photos)  # the real indexer; publishes a generation
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = httpx.get(server.url + "/readyz").json()
            if ready["indexed_images"] == N_PHOTOS + ADDED:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # keep searching on the new generation for a moment
        stop.set()
        for f in futures:
            f.result()
    assert not failures, failures[:5]
    assert counts["n"] > 20
    after = httpx.get(server.url + "/readyz").json()
    assert after["index_generation"] > before["index_generation"], summary
    assert after["indexed_images"] == N_PHOTOS + ADDED
    assert seen_sizes <= {N_PHOTOS, N_PHOTOS + ADDED} and N_PHOTOS + ADDED in seen_sizes
    # Every image of the new generation is findable and known to the catalog.
    hits = httpx.get(server.url + "/api/search", params={"q": "x", "k": 50, "rerank": 0}).json()["hits"]
    assert len(hits) == N_PHOTOS + ADDED
    assert {Path(h["path"]).name for h in hits} == {p.name for p in photos.rglob("*.jpg")}


JSON = {"content-type": "application/json"}
# Requests other clients send meanwhile; each must answer 200.
GOOD = [
    lambda c, n: c.post("/api/embed/text", json={"texts": [f"a photo {n}", "a dog"]}),
    lambda c, n: c.get("/api/search", params={"q": f"red {n}", "k": 3, "rerank": 4, "captions": 1}),
    lambda c, n: c.post("/api/rerank", json={"text": f"blue {n}", "image_ids": [1, 2, 3]}),
    lambda c, n: c.post(
        "/api/caption", json={"image_id": 1 + n % N_PHOTOS, "prompt": f"Question: {n}? Answer:"}
    ),
]
# Inputs that cannot run; each must answer 4xx.
BAD = [
    # refused by validation before the model thread
    lambda c: c.post("/api/embed/text", content=json.dumps({"texts": ["a dog", "\ud800"]}), headers=JSON),
    lambda c: c.post("/api/rerank", content=json.dumps({"text": "\udfff", "image_ids": [1]}), headers=JSON),
    lambda c: c.post("/api/caption", content=json.dumps({"image_id": 1, "prompt": "\ud83d"}), headers=JSON),
    lambda c: c.get("/api/search", params={"q": "a\x00b"}),
    lambda c: c.post("/api/rerank/upload", data={"text": "a", "image_ids": str(2**63)}),
    # valid requests the model thread refuses: more tokens than the caption model's positions hold
    lambda c: c.post("/api/caption", json={"image_id": 1, "prompt": "a " * 200}),
    lambda c: c.post("/api/caption", json={"image_id": 2, "max_new_tokens": 128}),
]


def test_bad_requests_never_fail_good_ones(served) -> None:
    """6 clients send good requests while 2 send poison: 0 good ones fail, every bad one gets a 4xx."""
    server, _, _ = served
    done = threading.Event()
    good_failures: list[str] = []
    bad_statuses: Counter[int | str] = Counter()
    sent = Counter()
    lock = threading.Lock()

    def good_client(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for n in range(16):
                send = GOOD[(worker + n) % len(GOOD)]
                try:
                    r = send(c, worker * 100 + n)
                    ok, what = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, what = False, repr(exc)
                with lock:
                    sent["good"] += 1
                    if not ok:
                        good_failures.append(what)

    def bad_client(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for n in range(400):  # bounded; stops once the good clients are done
                if done.is_set():
                    return
                try:
                    status: int | str = BAD[(worker + n) % len(BAD)](c).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    sent["bad"] += 1
                    bad_statuses[status] += 1

    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(bad_client, w) for w in range(2)]
        good = [pool.submit(good_client, w) for w in range(6)]
        for f in good:
            f.result(timeout=120)
        done.set()
        for f in bad:
            f.result(timeout=60)
    print(f"\npoisoning: {sent['good']} good requests, {len(good_failures)} failed; "
          f"{sent['bad']} bad requests, statuses {dict(bad_statuses)}")  # fmt: skip
    assert not good_failures, good_failures[:5]
    assert sent["good"] == 96 and sent["bad"] >= 2 * len(BAD)
    assert all(isinstance(s, int) and 400 <= s < 500 for s in bad_statuses), bad_statuses

"""The search API through FastAPI's TestClient over a real SQLite catalog filled by the real indexer.

The tiny checkpoints have random weights, so rankings are arbitrary: the tests check structure,
ordering, the documented score formula, and agreement with the encoder and the catalog.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from blip2_search.settings import Settings
from search_api.app import create_app
from search_api.service.inference import InferenceWorker, InvalidInput
from tests.support.catalog import jpeg_bytes, tiny_catalog

N_PHOTOS = 12


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints, encoder) -> Settings:
    def copy_one(photos: Path) -> None:
        # Same bytes at a second path: one image, two files.
        (photos / "2023" / "copy_of_img_000.jpg").write_bytes((photos / "2023" / "img_000.jpg").read_bytes())

    return tiny_catalog(
        tmp_path_factory.mktemp("search-api"),
        tiny_checkpoints,
        encoder,
        N_PHOTOS,
        before_index=copy_one,
        index_poll_seconds=0.2,
        caption_max_new_tokens=5,
        max_upload_bytes=200_000,
        max_upload_pixels=500_000,
    )


@pytest.fixture(scope="module")
def client(catalog: Settings, encoder) -> TestClient:
    with TestClient(create_app(catalog, encoder=encoder)) as c:
        yield c


def upload(data: bytes, name: str = "q.jpg", field: str = "file") -> dict:
    return {field: (name, data, "application/octet-stream")}


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def assert_problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in resp.text
    return body


# ---------------------------------------------------------------------------------------------- health


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["models_loaded"] and ready["caption_model"]
    assert ready["index_generation"] >= 1 and ready["index_generation"] == ready["published_generation"]
    assert ready["indexed_images"] == N_PHOTOS
    client.get("/api/search", params={"q": "dog"})
    metrics = client.get("/metrics").text
    assert "blip2_stage_seconds_bucket" in metrics and 'stage="text_encode"' in metrics
    assert "blip2_index_generation" in metrics


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/search", "/api/search/similar/{image_id}", "/api/search/image", "/api/rerank",
              "/api/rerank/upload", "/api/caption", "/api/caption/upload", "/api/embed/text",
              "/api/embed/image", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
              "/api/images/{image_id}/original", "/healthz", "/readyz", "/metrics"):  # fmt: skip
        assert p in paths
    k = next(p for p in paths["/api/search"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["maximum"] == 100


# ---------------------------------------------------------------------------------------------- search


def test_text_search_rerank_and_captions(client: TestClient, encoder, catalog: Settings) -> None:
    resp = client.get("/api/search", params={"q": "a red circle", "k": 5, "rerank": 8, "captions": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    hits = body["hits"]
    assert len(hits) == 5 and body["indexed_images"] == N_PHOTOS and body["next_offset"] == 5
    for stage in ("text_encode", "vector_search", "rerank", "total"):
        assert stage in body["timings_ms"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    for h in hits:
        assert h["reranked"]
        # The documented ranking score: ITM match logit + ITC similarity (LAVIS).
        assert h["score"] == pytest.approx(h["itm_logit"] + h["itc_score"], abs=1e-5)
        assert 0 <= h["itm_prob"] <= 1
        assert h["thumbnail_url"] == f"/api/images/{h['image_id']}/thumbnail"
        assert Path(h["path"]).is_file()
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h["caption"] is not None for h in hits[:2]) and all(h["caption"] is None for h in hits[2:])

    # ITC scores equal the encoder's max-sim on the stored (fp16) vectors.
    q = encoder.embed_texts(["a red circle"])[0]
    for h in hits:
        stored = np.asarray(client.get(f"/api/embed/image/{h['image_id']}").json()["vectors"], np.float32)
        assert h["itc_score"] == pytest.approx(float((stored @ q).max()), abs=1e-4)


def test_captions_of_a_page_past_the_rerank_depth(client: TestClient) -> None:
    # Page 2 (hits 5-8) lies past a re-rank depth of 2: its own first 3 hits are captioned.
    params = {"q": "a green square", "k": 4, "offset": 4, "rerank": 2, "captions": 3}
    hits = client.get("/api/search", params=params).json()["hits"]
    assert [h["caption"] is not None for h in hits] == [True, True, True, False]
    assert [h["rank"] for h in hits] == [5, 6, 7, 8] and not any(h["reranked"] for h in hits)


def test_rerank_matches_encoder_itm_on_the_indexed_input(
    client: TestClient, encoder, catalog: Settings
) -> None:
    body = client.get("/api/search", params={"q": "blue square", "k": 6, "rerank": 6}).json()
    ids = [h["image_id"] for h in body["hits"]]
    # Recompute ITM from the original files, decoded as the indexer decodes them (fast JPEG path).
    from blip2_embed.images import decode_model_input, normalise

    inputs = [
        decode_model_input(
            h["path"], encoder.spec, fast_jpeg=catalog.fast_jpeg, thumbnail_size=catalog.thumbnail_size
        )
        for h in body["hits"]
    ]
    pixels = normalise(np.stack(inputs), encoder.spec)
    ref = encoder.itm(pixels, "blue square")
    by_id = {h["image_id"]: h for h in body["hits"]}
    for i, prob, logit in zip(ids, ref.probs, ref.logits[:, 1], strict=True):
        assert by_id[i]["itm_prob"] == pytest.approx(float(prob), abs=1e-4)
        assert by_id[i]["itm_logit"] == pytest.approx(float(logit), abs=1e-4)

    rr = client.post("/api/rerank", json={"text": "blue square", "image_ids": ids}).json()
    probs = [r["itm_prob"] for r in rr["results"]]
    assert probs == sorted(probs, reverse=True) and [r["rank"] for r in rr["results"]] == list(range(1, 7))
    for r in rr["results"]:
        assert r["itm_prob"] == pytest.approx(by_id[r["image_id"]]["itm_prob"], abs=1e-5)
        assert r["itm_logit"] == r["itm_logits"][1]


def test_pagination_is_one_ranking(client: TestClient) -> None:
    params = {"q": "tree", "rerank": 4}
    full = client.get("/api/search", params={**params, "k": 10}).json()["hits"]
    page1 = client.get("/api/search", params={**params, "k": 5}).json()
    page2 = client.get("/api/search", params={**params, "k": 5, "offset": 5}).json()
    assert [h["image_id"] for h in page1["hits"] + page2["hits"]] == [h["image_id"] for h in full]
    assert [h["rank"] for h in page2["hits"]] == [6, 7, 8, 9, 10]
    # Re-ranked hits come first; the rest follow in ITC order.
    assert [h["reranked"] for h in full] == [True] * 4 + [False] * 6
    tail = [h["itc_score"] for h in full[4:]]
    assert tail == sorted(tail, reverse=True)
    last = client.get("/api/search", params={**params, "k": 5, "offset": 10}).json()
    assert len(last["hits"]) == 2 and last["next_offset"] is None


def test_no_rerank_ranks_by_itc(client: TestClient) -> None:
    hits = client.get("/api/search", params={"q": "cat", "k": 12, "rerank": 0}).json()["hits"]
    assert len(hits) == N_PHOTOS
    assert all(not h["reranked"] and h["itm_prob"] is None and h["score"] == h["itc_score"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_filters(client: TestClient, catalog: Settings) -> None:
    root = str((catalog.data_dir.parent / "photos").resolve())
    hits = client.get("/api/search", params={"q": "x", "k": 50, "rerank": 0, "path_prefix": "2023/"}).json()[
        "hits"
    ]
    assert hits and all("/2023/" in h["path"] for h in hits) and len(hits) == N_PHOTOS // 2
    same_root = client.get("/api/search", params={"q": "x", "k": 50, "rerank": 0, "root": root}).json()
    assert len(same_root["hits"]) == N_PHOTOS
    other = client.get("/api/search", params={"q": "x", "rerank": 0, "root": "/nonexistent"}).json()
    assert other["hits"] == []
    dated = client.get(
        "/api/search",
        params={"q": "x", "k": 50, "rerank": 0, "captured_after": "2024-01-01T00:00:00",
                "captured_before": "2024-12-31T23:59:59"},
    ).json()["hits"]  # fmt: skip
    assert dated and all("/2024/" in h["path"] for h in dated)
    for h in dated:
        assert h["captured_at"].startswith("2024")


def test_more_like_this_and_upload_search(client: TestClient, catalog: Settings) -> None:
    first = client.get("/api/search", params={"q": "dog", "k": 1, "rerank": 0}).json()["hits"][0]
    similar = client.get(f"/api/search/similar/{first['image_id']}", params={"k": 4, "captions": 1}).json()
    ids = [h["image_id"] for h in similar["hits"]]
    assert len(ids) == 4 and first["image_id"] not in ids
    assert similar["hits"][0]["caption"] is not None
    scores = [h["score"] for h in similar["hits"]]
    assert scores == sorted(scores, reverse=True)
    # Uploading the image's own file finds it first (Chamfer of identical vectors is the maximum).
    data = Path(first["path"]).read_bytes()
    up = client.post("/api/search/image", files=upload(data), data={"k": "3"})
    assert up.status_code == 200, up.text
    assert up.json()["hits"][0]["image_id"] == first["image_id"]


def test_captions_are_cached_in_the_catalog(client: TestClient, encoder) -> None:
    image_id = client.get("/api/search", params={"q": "sky", "k": 1, "rerank": 0}).json()["hits"][0][
        "image_id"
    ]
    first = client.post(
        "/api/caption", json={"image_id": image_id, "prompt": "Question: what? Answer:"}
    ).json()
    again = client.post(
        "/api/caption", json={"image_id": image_id, "prompt": "Question: what? Answer:"}
    ).json()
    assert first["cached"] is False and again["cached"] is True and again["text"] == first["text"]
    state = client.app.state.blip2
    stored = state.catalog.captions([image_id], encoder.caption_key, "Question: what? Answer:")
    assert stored[image_id] == first["text"]
    # A search that captions reuses the plain-caption cache, and the detail view shows it.
    plain = client.post("/api/caption", json={"image_id": image_id}).json()
    detail = client.get(f"/api/images/{image_id}").json()
    assert detail["caption"] == plain["text"]
    up = client.post("/api/caption/upload", files=upload(jpeg_bytes(99)), data={"max_new_tokens": "3"})
    assert up.status_code == 200 and up.json()["cached"] is False


def test_embeddings(client: TestClient, encoder) -> None:
    body = client.post("/api/embed/text", json={"texts": ["a dog", "two cats"]}).json()
    vecs = np.asarray(body["vectors"])
    assert vecs.shape == (2, encoder.embed_dim) and body["dim"] == encoder.embed_dim
    np.testing.assert_allclose(vecs, encoder.embed_texts(["a dog", "two cats"]), atol=1e-5)
    img = client.post("/api/embed/image", files=upload(jpeg_bytes(5)))
    assert img.status_code == 200
    assert np.asarray(img.json()["vectors"]).shape == (encoder.num_queries, encoder.embed_dim)


def test_images_by_id(client: TestClient, catalog: Settings) -> None:
    hit = client.get("/api/search", params={"q": "sun", "k": 1, "rerank": 0}).json()["hits"][0]
    detail = client.get(f"/api/images/{hit['image_id']}").json()
    assert detail["files"] and detail["sha256"]
    thumb = client.get(hit["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] > 0
    orig = client.get(hit["original_url"])
    assert orig.status_code == 200 and orig.content == Path(hit["path"]).read_bytes()
    # The duplicate file: one image with two paths.
    dup = [d for d in (client.get(f"/api/images/{i}").json() for i in range(1, N_PHOTOS + 1))
           if isinstance(d, dict) and len(d.get("files", [])) == 2]  # fmt: skip
    assert len(dup) == 1


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"q": ""}, 422),
        ({"q": "   "}, 422),
        ({"q": "x" * 1001}, 422),
        ({"q": "x" * 5000}, 422),
        ({}, 422),
        ({"q": "a", "k": 0}, 422),
        ({"q": "a", "k": 101}, 422),
        ({"q": "a", "k": "many"}, 422),
        ({"q": "a", "k": "1.0"}, 422),
        ({"q": "a", "offset": " 1"}, 422),
        ({"q": "a", "rerank": -1}, 422),
        ({"q": "a", "rerank": 129}, 422),
        ({"q": "a", "captions": 17}, 422),
        ({"q": "a", "offset": -1}, 422),
        ({"q": "a", "captured_after": "yesterday"}, 422),
        ({"q": "a", "captured_after": "2024-02-01T00:00:00", "captured_before": "2024-01-01T00:00:00"}, 422),
    ],
)
def test_search_bad_input(client: TestClient, params: dict, status: int) -> None:
    assert_problem(client.get("/api/search", params=params), status)


def test_unknown_ids(client: TestClient) -> None:
    for url in ("/api/images/99999", "/api/images/99999/thumbnail", "/api/images/99999/original",
                "/api/search/similar/99999", "/api/embed/image/99999"):  # fmt: skip
        assert_problem(client.get(url), 404)
    assert_problem(client.post("/api/caption", json={"image_id": 99999}), 404)
    assert_problem(client.post("/api/rerank", json={"text": "a", "image_ids": [1, 99999]}), 404)
    assert_problem(client.get("/api/images/0"), 422)
    assert_problem(client.get("/api/images/99999999999999999999999"), 422)
    assert_problem(client.get("/api/images/-1/original"), 422)
    assert_problem(client.get("/api/images/", follow_redirects=False), 404)  # no id: no route, no redirect


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2Fetc%2Fpasswd/original",
        "/api/images/1%2F..%2F..%2Fetc%2Fpasswd/original",
        "/api/images/../../etc/passwd",
        "/api/images/1/original/../../../../etc/passwd",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/api/images/1/thumbnail?path=/etc/passwd",
    ],
)
def test_path_traversal_fails(client: TestClient, url: str) -> None:
    resp = client.get(url, follow_redirects=False)
    assert b"root:" not in resp.content
    if "?path=" in url:  # a query field the route does not declare is refused, never obeyed
        assert "path" in assert_problem(resp, 422)["detail"]
    else:
        assert 400 <= resp.status_code < 500


def test_symlink_escape_is_not_served(client: TestClient, catalog: Settings, tmp_path: Path) -> None:
    hit = client.get("/api/search", params={"q": "sun", "k": 1, "rerank": 0}).json()["hits"][0]
    path = Path(hit["path"])
    state = client.app.state.blip2
    assert state.catalog.original_path(hit["image_id"]) == path.resolve()
    secret = tmp_path / "outside.jpg"
    secret.write_bytes(path.read_bytes())
    backup = path.with_suffix(".bak")
    path.rename(backup)
    try:
        path.symlink_to(secret)
        # The path now leads outside every library root: not served even though the file is an image.
        others = [
            p for p in client.get(f"/api/images/{hit['image_id']}").json()["files"] if p["path"] != str(path)
        ]
        if not others:
            assert_problem(client.get(hit["original_url"]), 404)
    finally:
        path.unlink()
        backup.rename(path)


def test_rerank_bad_input(client: TestClient) -> None:
    assert_problem(client.post("/api/rerank", json={"text": "", "image_ids": [1]}), 422)
    assert_problem(client.post("/api/rerank", json={"text": "a", "image_ids": []}), 422)
    assert_problem(client.post("/api/rerank", json={"text": "a", "image_ids": [1, 1]}), 422)
    assert_problem(client.post("/api/rerank", json={"text": "a", "image_ids": list(range(1, 70))}), 422)
    assert_problem(client.post("/api/rerank", json={"text": "a"}), 422)
    assert_problem(
        client.post("/api/rerank", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    ok = client.post(
        "/api/rerank/upload",
        data={"text": "a green field", "image_ids": ["1"]},
        files=[
            ("files", ("a.png", png_bytes((20, 10)), "image/png")),
            ("files", ("b.jpg", jpeg_bytes(3), "x/y")),
        ],
    )
    assert ok.status_code == 200, ok.text
    results = ok.json()["results"]
    assert sorted(r["upload_index"] for r in results if r["upload_index"] is not None) == [0, 1]
    assert [r["image_id"] for r in results if r["image_id"] is not None] == [1]


def test_upload_limits(client: TestClient) -> None:
    # Not an image at all, and an image in a format that is not accepted (SVG/text).
    assert_problem(client.post("/api/embed/image", files=upload(b"hello world, not an image")), 415)
    assert_problem(
        client.post("/api/embed/image", files=upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>")), 415
    )
    # Empty, truncated.
    assert_problem(client.post("/api/embed/image", files=upload(b"")), 422)
    assert_problem(client.post("/api/embed/image", files=upload(jpeg_bytes(1)[:200])), 422)
    # Too many bytes (limit 200 kB here) and too many pixels (limit 500 kpx here).
    big = b"\xff\xd8\xff" + b"\0" * 300_000
    assert_problem(client.post("/api/embed/image", files=upload(big)), 413)
    assert_problem(client.post("/api/search/image", files=upload(png_bytes((1000, 1000)))), 413)
    # Missing file field, bad form values.
    assert_problem(client.post("/api/search/image", data={"k": "3"}), 422)
    assert_problem(client.post("/api/search/image", files=upload(jpeg_bytes(1)), data={"k": "0"}), 422)
    assert_problem(
        client.post("/api/caption/upload", files=upload(jpeg_bytes(1)), data={"max_new_tokens": "999"}), 422
    )
    # A body far over the limit is refused before parsing.
    assert_problem(
        client.post("/api/embed/image", content=b"x" * 500_000, headers={"content-type": "image/jpeg"}), 413
    )


def test_embed_text_bad_input(client: TestClient) -> None:
    assert_problem(client.post("/api/embed/text", json={"texts": []}), 422)
    assert_problem(client.post("/api/embed/text", json={"texts": ["ok", ""]}), 422)
    assert_problem(client.post("/api/embed/text", json={"texts": ["a"] * 65}), 422)
    assert_problem(client.post("/api/embed/text", json={"texts": "not a list"}), 422)
    assert_problem(client.get("/api/embed/text"), 405)
    assert_problem(client.get("/no/such/route"), 404)


def test_long_query_is_truncated_not_refused(client: TestClient) -> None:
    body = client.get("/api/search", params={"q": " ".join(["dog"] * 200), "k": 2, "rerank": 2}).json()
    assert body["query_truncated"] is True and len(body["hits"]) == 2


# ---------------------------------------------------------------------------------------------- auth, CORS


def test_admin_disabled_without_keys(client: TestClient) -> None:
    assert_problem(client.post("/api/admin/refresh-index"), 403)


def test_auth_on(catalog: Settings, encoder) -> None:
    settings = catalog.with_overrides(api_keys="k1,k2", api_auth_all=False)
    with TestClient(create_app(settings, encoder=encoder)) as c:
        assert c.get("/api/search", params={"q": "a"}).status_code == 200  # reads stay open
        body = assert_problem(c.post("/api/admin/refresh-index"), 401)
        assert "X-API-Key" in body["detail"]
        assert_problem(c.post("/api/admin/refresh-index", headers={"X-API-Key": "wrong"}), 401)
        ok = c.post("/api/admin/refresh-index", headers={"X-API-Key": "k2"})
        assert ok.status_code == 200 and ok.json()["indexed_images"] == N_PHOTOS
    settings = catalog.with_overrides(api_keys="k1", api_auth_all=True, api_key_header="X-Key")
    with TestClient(create_app(settings, encoder=encoder)) as c:
        assert_problem(c.get("/api/search", params={"q": "a"}), 401)
        assert_problem(c.get("/api/images/1/thumbnail"), 401)
        assert_problem(c.get("/metrics"), 401)
        assert c.get("/api/search", params={"q": "a"}, headers={"X-Key": "k1"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200  # the page itself; its API calls carry the key


def test_cors(catalog: Settings, encoder, client: TestClient) -> None:
    assert (
        "access-control-allow-origin"
        not in client.get("/healthz", headers={"Origin": "http://a.example"}).headers
    )
    settings = catalog.with_overrides(cors_origins="http://a.example")
    with TestClient(create_app(settings, encoder=encoder)) as c:
        resp = c.get("/healthz", headers={"Origin": "http://a.example"})
        assert resp.headers["access-control-allow-origin"] == "http://a.example"
        pre = c.options(
            "/api/search", headers={"Origin": "http://a.example", "Access-Control-Request-Method": "GET"}
        )
        assert pre.status_code == 200
        assert (
            "access-control-allow-origin"
            not in c.get("/healthz", headers={"Origin": "http://b.example"}).headers
        )


def test_page_and_static(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_not_ready_before_catalog_exists(tmp_path: Path, tiny_checkpoints, encoder) -> None:
    settings = Settings(data_dir=tmp_path / "empty", retrieval_model=str(tiny_checkpoints.retrieval),
                        caption_model=None, device="cpu", index_poll_seconds=0.2)  # fmt: skip
    with TestClient(create_app(settings, encoder=encoder)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        body = c.get("/api/search", params={"q": "a"}).json()
        assert body["hits"] == [] and body["indexed_images"] == 0


# ------------------------------------------------------------------------------------------ one rule a value


def raw_json(client: TestClient, url: str, body: object):
    # json.dumps escapes a lone surrogate as "\ud800", which JSON allows (httpx's encoder would refuse it).
    return client.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def raw_form(client: TestClient, url: str, fields: list[tuple[str, str]], file_field: str | None = None):
    """Multipart with ``charset=raw_unicode_escape``: Starlette decodes fields with the client's codec,
    so a form field can carry a lone surrogate (or any other code point) too."""
    boundary = "blip2-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode(
            "raw_unicode_escape"
        )
        + b"\r\n"
        for name, value in fields
    ]
    if file_field:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="a.jpg"\r\n'
        parts.append(head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + jpeg_bytes(7) + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={boundary}; charset=raw_unicode_escape"
    return client.post(url, content=body, headers={"content-type": ctype})


def requests_count(client: TestClient, route: str, method: str, status: int) -> float:
    """``blip2_http_requests_total`` for one route, method and status, read from ``/metrics``."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "blip2_http_requests_total" and sample.labels == {
                "route": route, "method": method, "status": str(status)
            }:  # fmt: skip
                return sample.value
    return 0.0


# field -> (how to send a value in it, its documented length limit, can it carry a surrogate)
TEXT_FIELDS = {
    "q": (lambda c, v: c.get("/api/search", params={"q": v, "rerank": 0}), 1000, False),
    "root": (lambda c, v: c.get("/api/search", params={"q": "a", "root": v}), 4096, False),
    "path_prefix": (lambda c, v: c.get("/api/search/similar/1", params={"path_prefix": v}), 4096, False),
    "text": (lambda c, v: raw_json(c, "/api/rerank", {"text": v, "image_ids": [1]}), 1000, True),
    "prompt": (lambda c, v: raw_json(c, "/api/caption", {"image_id": 1, "prompt": v}), 1000, True),
    "texts.1": (lambda c, v: raw_json(c, "/api/embed/text", {"texts": ["a dog", v]}), 1000, True),
    "upload text": (lambda c, v: raw_form(c, "/api/rerank/upload", [("text", v)], "files"), 1000, True),
    "upload prompt": (lambda c, v: raw_form(c, "/api/caption/upload", [("prompt", v)], "file"), 1000, True),
}
BAD_TEXTS = {
    "surrogate": "a \ud800 b",
    "low surrogate": "\udfff",
    "NUL": "a\x00b",
    "bell": "ring\x07",
    "escape": "\x1b[31mred",
    "C1 control": "a\x9bb",
    "huge": "x" * 300_000,
}


@pytest.mark.parametrize("kind", [*BAD_TEXTS, "over limit"])
@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_bad_text_is_the_same_422_on_every_field(client: TestClient, field: str, kind: str) -> None:
    send, limit, carries_surrogates = TEXT_FIELDS[field]
    value = "y" * (limit + 1) if kind == "over limit" else BAD_TEXTS[kind]
    if not carries_surrogates:  # a query string: UTF-8, and as long as a URL may be
        if "surrogate" in kind:
            pytest.skip("a query string is UTF-8: a surrogate cannot be sent in it")
        value = value[:20_000]
    body = assert_problem(send(client, value), 422)
    assert body["detail"].startswith(field.removeprefix("upload ") + ":"), body
    assert body["type"].endswith("validation-error")
    # Tabs and newlines are text, the ends are stripped, and a text at the limit is taken.
    assert send(client, "  a red dog\tand a cat\n").status_code == 200
    at_limit = send(client, "y" * limit)
    # (1000 characters of prompt are more tokens than the tiny caption model has positions for.)
    assert at_limit.status_code == 200 or at_limit.json()["type"].endswith("invalid-input"), at_limit.text


# where an image id goes -> how to send one
ID_FIELDS = {
    "path /api/images/{id}": lambda c, v: c.get(f"/api/images/{v}", follow_redirects=False),
    "path thumbnail": lambda c, v: c.get(f"/api/images/{v}/thumbnail", follow_redirects=False),
    "path original": lambda c, v: c.get(f"/api/images/{v}/original", follow_redirects=False),
    "path similar": lambda c, v: c.get(f"/api/search/similar/{v}", follow_redirects=False),
    "path embedding": lambda c, v: c.get(f"/api/embed/image/{v}", follow_redirects=False),
    "json caption": lambda c, v: raw_json(c, "/api/caption", {"image_id": v}),
    "json rerank": lambda c, v: raw_json(c, "/api/rerank", {"text": "a", "image_ids": [v]}),
    "form rerank": lambda c, v: raw_form(c, "/api/rerank/upload", [("text", "a"), ("image_ids", str(v))]),
}
BAD_IDS = [0, -1, -5, 2**53 + 1, 2**63, 2**64, "abc", "1.5", "1.0", "%201", "１", "%2e%2e%2f", "%2e%2e"]


@pytest.mark.parametrize("value", BAD_IDS, ids=str)
@pytest.mark.parametrize("field", ID_FIELDS)
def test_bad_id_is_422_on_every_field(client: TestClient, field: str, value: object) -> None:
    assert_problem(ID_FIELDS[field](client, value), 422)
    assert_problem(ID_FIELDS[field](client, 2**53), 404)  # the largest id is in range, just unknown


@pytest.mark.parametrize("value", [True, "2", 2.5, None, [2], 1e300], ids=repr)
def test_json_ids_are_json_integers(client: TestClient, value: object) -> None:
    assert_problem(raw_json(client, "/api/caption", {"image_id": value}), 422)
    assert_problem(raw_json(client, "/api/rerank", {"text": "a", "image_ids": [value]}), 422)


@pytest.mark.parametrize(
    ("send", "field"),
    [
        (lambda c: raw_json(c, "/api/caption", {"image_id": 2, "max_tokens": 2}), "max_tokens"),
        (lambda c: raw_json(c, "/api/rerank", {"text": "a", "image_ids": [1], "k": 3}), "k"),
        (lambda c: raw_json(c, "/api/embed/text", {"texts": ["a"], "normalize": False}), "normalize"),
        (lambda c: c.get("/api/search", params={"q": "a", "kk": 3}), "kk"),
        (lambda c: c.get("/api/search/similar/1", params={"rerank": 4}), "rerank"),
        (lambda c: c.get("/api/images/1/original", params={"download": 1}), "download"),
        (lambda c: raw_form(c, "/api/caption/upload", [("max_tokens", "2")], "file"), "max_tokens"),
        (lambda c: raw_form(c, "/api/search/image", [("rerank", "4")], "file"), "rerank"),
    ],
)
def test_unknown_fields_are_refused_by_name(client: TestClient, send, field: str) -> None:
    body = assert_problem(send(client), 422)
    assert any(e["loc"][-1] == field for e in body["errors"]), body


def test_a_field_name_that_is_not_text_is_422(client: TestClient) -> None:
    # Pydantic cannot read a lone surrogate in a key; the answer must still encode (no 500).
    assert_problem(raw_json(client, "/api/embed/text", {"texts": ["a"], "\ud800": 1}), 422)
    assert_problem(raw_form(client, "/api/caption/upload", [("\ud800", "x")], "file"), 422)


def test_prompt_longer_than_the_model_takes_is_422(client: TestClient) -> None:
    # Within max_query_chars, but more tokens than the tiny OPT's 128 positions hold with 32 image tokens.
    long_prompt = "a " * 200
    for resp in (
        raw_json(client, "/api/caption", {"image_id": 1, "prompt": long_prompt}),
        raw_form(client, "/api/caption/upload", [("prompt", long_prompt)], "file"),
        raw_json(client, "/api/caption", {"image_id": 1, "max_new_tokens": 128}),
    ):
        body = assert_problem(resp, 422)
        assert "positions" in body["detail"] and body["type"].endswith("invalid-input")
    ok = raw_json(client, "/api/caption", {"image_id": 1, "max_new_tokens": 96})  # 32 + 1 + 96 - 1 = 128
    assert ok.status_code == 200 and ok.json()["cached"] is False, ok.text


def test_500_is_problem_json_counted_and_headed(
    catalog: Settings, encoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A genuine failure (the catalog loses a table under the server) answers like every other answer."""
    data = tmp_path / "data"
    shutil.copytree(catalog.data_dir, data)
    settings = catalog.model_copy(update={"data_dir": data, "index_poll_seconds": 60})
    with TestClient(create_app(settings, encoder=encoder)) as c:
        assert c.get("/api/images/1").status_code == 200
        with sqlite3.connect(data / "catalog.db") as db:
            db.execute("ALTER TABLE files RENAME TO files_gone")
        with caplog.at_level("ERROR", logger="search_api.http.middleware"):
            resp = c.get("/api/images/1")
        body = assert_problem(resp, 500)
        request_id = resp.headers["x-request-id"]
        assert request_id in body["detail"] and "Error" not in body["detail"]  # no exception text leaks
        assert "default-src 'self'" in resp.headers["content-security-policy"]
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
        assert requests_count(c, "/api/images/{image_id}", "GET", 500) == 1


def test_every_answer_is_counted_and_headed(client: TestClient) -> None:
    """Answers made outside the routes (bad path, body over the limit, no route) count and carry headers."""
    cases = [
        (lambda: client.get("/api/images/%2e%2e%2f", follow_redirects=False), "GET", 422),
        (lambda: client.post("/api/embed/image", content=b"x" * 500_000), "POST", 413),
        (lambda: client.get("/no/such/route"), "GET", 404),
    ]
    for send, method, status in cases:
        before = requests_count(client, "unmatched", method, status)
        resp = send()
        assert_problem(resp, status)
        assert resp.headers["x-content-type-options"] == "nosniff" and resp.headers["content-security-policy"]
        assert requests_count(client, "unmatched", method, status) == before + 1


# ---------------------------------------------------------------------------------------------- model worker


class Gate:
    """Holds the model worker after its first batch, so the jobs queued meanwhile share one round."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.batches: list[tuple[str, int]] = []

    def __call__(self, kind: str, items: int, seconds: float) -> None:
        self.batches.append((kind, items))
        self.open.wait(10)


def run_round(encoder, make_jobs) -> tuple[list[object], list[tuple[str, int]]]:
    """Run ``make_jobs(worker)``'s coroutines as one round of the real worker; results or exceptions."""
    gate = Gate()
    worker = InferenceWorker(encoder, on_batch=gate)
    worker.start()

    async def main() -> list[object]:
        await worker.embed_texts(["warm-up"])  # the worker now waits in the gate
        tasks = [asyncio.ensure_future(c) for c in make_jobs(worker)]
        await asyncio.sleep(0.05)  # every job is queued
        gate.open.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        worker.stop()  # joins the thread: its last on_batch call has run before batches are read
    return results, gate.batches[1:]


def test_a_bad_text_fails_alone(encoder) -> None:
    texts = [["a dog"], ["\ud800"], ["two cats", "a tree"], ["x\udfff", "fine"], ["the sea"]]
    results, batches = run_round(encoder, lambda w: [w.embed_texts(t) for t in texts])
    for t, res in zip(texts, results, strict=True):
        if any("\ud800" <= ch <= "\udfff" for s in t for ch in s):
            assert isinstance(res, InvalidInput) and "cannot be tokenized" in str(res)
        else:
            vecs, truncated = res
            np.testing.assert_allclose(vecs, encoder.embed_texts(t), atol=1e-5)
            assert truncated == [False] * len(t)
    assert batches == [("text", 4)]  # the three good jobs still ran as one batch
    assert str(results[3]).startswith("text 0 ")


def test_a_failing_batch_falls_back_to_one_by_one(encoder) -> None:
    s = encoder.spec.size
    rng = np.random.default_rng(0)
    good = [rng.standard_normal((n, 3, s, s)).astype(np.float32) for n in (1, 2)]
    broken = np.zeros((1, 4, s, s), np.float32)  # four channels: a genuine failure, not a caller's input
    results, batches = run_round(encoder, lambda w: [w.embed_images(good[0]), w.embed_images(broken),
                                                     w.embed_images(good[1])])  # fmt: skip
    np.testing.assert_allclose(results[0], encoder.embed_images(good[0]), atol=1e-5)
    np.testing.assert_allclose(results[2], encoder.embed_images(good[1]), atol=1e-5)
    assert isinstance(results[1], Exception) and not isinstance(results[1], InvalidInput)  # stays a 500
    assert batches == [("image", 1), ("image", 2)]


def test_a_prompt_over_the_model_positions_fails_alone(encoder) -> None:
    s = encoder.spec.size
    pixels = np.random.default_rng(1).standard_normal((2, 3, s, s)).astype(np.float32)
    results, _ = run_round(encoder, lambda w: [
        w.score(pixels, "a dog", caption_rows=[0], prompt="a " * 200, max_new_tokens=4),
        w.score(pixels, "a dog", caption_rows=[1], max_new_tokens=4),
    ])  # fmt: skip
    assert isinstance(results[0], InvalidInput) and "positions" in str(results[0])
    ref = encoder.itm(pixels, "a dog")
    np.testing.assert_allclose(results[1].probs, ref.probs, atol=1e-4)
    assert results[1].captions[1] == encoder.caption(pixels[1:], max_new_tokens=4)[0]
    # The check is exact: one token more than the limit is what the model itself cannot run.
    with pytest.raises(IndexError):
        encoder.caption(pixels[:1], max_new_tokens=97, min_new_tokens=97)

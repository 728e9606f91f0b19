"""The app factory in-process (Starlette's TestClient, the real tiny model in the lifespan):
pages and docs, per-app metrics, origin checks, upload limits, session options."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.testclient import WebSocketDenialResponse

from stream.app import create_app
from stream.settings import Settings


def _settings(**kw) -> Settings:
    return Settings(model="tiny", threads=1, **kw)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_settings(max_image_bytes=200_000))) as c:
        yield c


def _png(size: tuple[int, int] = (96, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_docs_sample_audio_and_config(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<video" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/mic-worklet.js").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/sessions", "/v1/sessions/{session_id}/offer", "/healthz", "/metrics"} <= set(paths)
    audio = client.get("/v1/sample-audio")
    assert audio.status_code == 200 and audio.content[:4] == b"OggS"
    ref = client.get("/v1/references/default")
    assert ref.status_code == 200 and ref.content[:4] == b"\x89PNG"
    assert client.get("/v1/references/nope.png").status_code == 404
    config = client.get("/v1/config").json()
    assert config["fps"] == 25.0 and config["auth_required"] is False
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_block_size_steps_and_resolution_settings_reach_the_engine() -> None:
    with TestClient(create_app(_settings(block_frames=2, steps=2, height=96, width=64))) as c:
        small = c.get("/v1/config").json()
        assert c.post("/v1/sessions", json={"width": 64, "height": 96}).status_code == 201
        wrong = c.post("/v1/sessions", json={"width": 128})
        assert wrong.status_code == 400 and "64x96" in wrong.json()["detail"]
    assert (small["width"], small["height"]) == (64, 96)
    with TestClient(create_app(_settings())) as c:
        default = c.get("/v1/config").json()
    assert small["steps"] == 2 and default["steps"] == 4
    assert small["frames_per_block"] < default["frames_per_block"]


def test_each_app_has_its_own_metrics_registry() -> None:
    with TestClient(create_app(_settings())) as a, TestClient(create_app(_settings())) as b:
        sid = a.post("/v1/sessions").json()["session_id"]
        assert "diffstream_active_sessions 1.0" in a.get("/metrics").text
        assert "diffstream_active_sessions 0.0" in b.get("/metrics").text
        assert a.delete(f"/v1/sessions/{sid}").status_code == 204
        assert 'diffstream_sessions_total{outcome="deleted"} 1.0' in a.get("/metrics").text


def test_reference_upload_multipart_and_base64_and_limits(client: TestClient) -> None:
    r = client.post(
        "/v1/sessions", files={"image": ("me.png", _png(), "image/png")}, data={"seed": "3"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["width"] == 128
    client.delete(f"/v1/sessions/{r.json()['session_id']}")
    r = client.post(
        "/v1/sessions", json={"image_base64": base64.b64encode(_png()).decode(), "steps": 2}
    )
    assert r.status_code == 201, r.text
    client.delete(f"/v1/sessions/{r.json()['session_id']}")
    too_big = client.post(
        "/v1/sessions", files={"image": ("big.png", b"\0" * 300_000, "image/png")}
    )
    assert too_big.status_code == 413
    tiny = client.post("/v1/sessions", files={"image": ("t.png", _png((4, 4)), "image/png")})
    assert tiny.status_code == 400 and "at least" in tiny.json()["detail"]
    bad = client.post("/v1/sessions", json={"steps": 0})
    assert bad.status_code == 422 and "steps" in bad.json()["detail"]
    unknown = client.post("/v1/sessions", json={"colour": "blue"})
    assert unknown.status_code == 422


def test_session_size_out_of_range_or_not_the_servers_is_refused_naming_the_field(
    client: TestClient,
) -> None:
    """A width or height of 0, negative or over 4096 (JSON, or a form's text) is a 422 naming
    the field and the bound; one in range that is not the server's 128x128 (130: not even a
    multiple of the autoencoder's factor) a 400 naming the field and the server's size. No
    session is made; the server's own size, or none, still is one.

    Fails if SessionOptions' width/height lose their range: 0 then read as "omitted" (`or`)
    made a session at the server's size."""
    before = len(client.get("/v1/sessions").json())
    out_of_range = [
        ({"width": 0}, "width", "16"),
        ({"height": 0}, "height", "16"),
        ({"width": -128}, "width", "16"),
        ({"height": 8}, "height", "16"),
        ({"width": 5000}, "width", "4096"),
    ]
    for body, field, bound in out_of_range:
        r = client.post("/v1/sessions", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert field in r.json()["detail"] and bound in r.json()["detail"], r.text
    for fields in ({"width": (None, "0")}, {"height": (None, "-1")}):
        r = client.post("/v1/sessions", files=fields)
        assert r.status_code == 422 and next(iter(fields)) in r.json()["detail"], r.text
    for body, named in (({"width": 130}, "width 130"), ({"width": 128, "height": 64}, "height 64")):
        r = client.post("/v1/sessions", json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert named in r.json()["detail"] and "128x128" in r.json()["detail"], r.text
    assert len(client.get("/v1/sessions").json()) == before
    for body in ({"width": 128, "height": 128}, {"height": 128}):
        ok = client.post("/v1/sessions", json=body)
        assert ok.status_code == 201, ok.text
        client.delete(f"/v1/sessions/{ok.json()['session_id']}")


def test_websocket_origin_is_checked_when_origins_are_configured() -> None:
    app = create_app(_settings(allowed_origins=["https://app.example"]))
    with TestClient(app) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        url = f"/v1/sessions/{sid}/audio"
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            c.websocket_connect(url, headers={"origin": "https://evil.example"}),
        ):
            pass
        assert denied.value.status_code == 403
        with c.websocket_connect(url, headers={"origin": "https://app.example"}) as ws:
            ws.send_json({"type": "start", "sample_rate": 22050, "channels": 1, "format": "f32le"})
            assert ws.receive_json()["type"] == "started"
        # A second audio socket on the same session is refused while one is open.
        with c.websocket_connect(url) as first:
            first.send_json({"type": "start", "sample_rate": 16000})
            first.receive_json()
            with pytest.raises(WebSocketDenialResponse) as busy, c.websocket_connect(url):
                pass
            assert busy.value.status_code == 409
        cors = c.options(
            "/v1/sessions",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert cors.headers.get("access-control-allow-origin") == "https://app.example"

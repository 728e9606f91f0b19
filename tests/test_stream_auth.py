"""The token on every route, from the app's own route list: a route added later cannot be
forgotten, because a route with no row in the tables below fails the test.

With `--auth-token T` every `/v1` route (HTTP and the audio websocket) refuses a request with no
token or a wrong one and serves the right one. What answers without the token is listed in OPEN,
each with the reason it is open on purpose (docs/service.md and the README's API table say the
same); nothing under `/v1` is open.
"""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from stream.app import create_app
from stream.settings import Settings

TOKEN = "s3cret-token"

# Open on purpose: path -> (what to GET there, why it needs no token).
OPEN = {
    "/": ("/", "the page: it asks for the token and sends it on every /v1 call"),
    "/static": ("/static/app.js", "the page's script and styles: code, no data"),
    "/healthz": ("/healthz", "load balancers, Docker's HEALTHCHECK, orchestrators' probes"),
    "/livez": ("/livez", "orchestrators' liveness probes"),
    "/metrics": ("/metrics", "Prometheus scrapes inside the network; aggregate counts only"),
    "/openapi.json": ("/openapi.json", "the API's description, as public as the README"),
    "/docs": ("/docs", "the same, rendered"),
    "/docs/oauth2-redirect": ("/docs/oauth2-redirect", "part of the rendered docs"),
    "/redoc": ("/redoc", "the same, rendered"),
}

# Every /v1 HTTP route: the status the right token gets (a session id is filled in; the offer
# body is not SDP, so a served request is a 400 from the handler itself, past the token).
PROTECTED = {
    ("GET", "/v1/config"): 200,
    ("GET", "/v1/references"): 200,
    ("GET", "/v1/references/{name}"): 200,
    ("GET", "/v1/sample-audio"): 200,
    ("POST", "/v1/sessions"): 201,
    ("GET", "/v1/sessions"): 200,
    ("GET", "/v1/sessions/{session_id}"): 200,
    ("POST", "/v1/sessions/{session_id}/offer"): 400,
    ("DELETE", "/v1/sessions/{session_id}"): 204,
}
WEBSOCKETS = {"/v1/sessions/{session_id}/audio"}


def _registered(app) -> list[tuple[object, str, set[str]]]:  # noqa: ANN001
    """(route, path, methods) of every route the app serves, routers' routes included.

    FastAPI 0.165+ keeps an included router as one lazy entry of `app.routes`;
    `iter_route_contexts` walks into it (with the router's prefix). Older FastAPI copies the
    routers' routes into `app.routes` itself."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return [(r, r.path, set(getattr(r, "methods", None) or ())) for r in app.routes]
    return [
        (c.original_route, c.path, set(c.methods or ())) for c in iter_route_contexts(app.routes)
    ]


def app_routes(app) -> tuple[set[tuple[str, str]], set[str], set[str]]:  # noqa: ANN001
    """(method, path) of every HTTP route, every websocket path, every mount, as registered."""
    http, sockets, mounts = set(), set(), set()
    for route, path, methods in _registered(app):
        if isinstance(route, APIWebSocketRoute):
            sockets.add(path)
        elif isinstance(route, (APIRoute, Route)):
            http |= {(m, path) for m in methods if m != "HEAD"}
        elif isinstance(route, Mount):
            mounts.add(path)
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}; classify it here")
    return http, sockets, mounts


@pytest.fixture(scope="module")
def client():
    settings = Settings(model="tiny", threads=1, engine_process=False, auth_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        yield c


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _fill(path: str, session_id: str) -> str:
    return path.replace("{session_id}", session_id).replace("{name}", "default")


def test_every_route_has_a_row(client: TestClient) -> None:
    """Fails if a route is added (or renamed) without deciding here whether it is open."""
    http, sockets, mounts = app_routes(client.app)
    listed = set(PROTECTED) | {("GET", p) for p in OPEN if p not in mounts}
    assert http == listed, (
        f"routes without a row: {sorted(http - listed)}; rows without a route: "
        f"{sorted(listed - http)}"
    )
    assert sockets == WEBSOCKETS
    assert mounts <= set(OPEN)
    assert not [p for p in OPEN if p.startswith("/v1")], "nothing under /v1 is open"


@pytest.mark.parametrize("method,path", sorted(PROTECTED))
def test_v1_route_refuses_no_token_and_a_wrong_one_and_serves_the_right_one(
    client: TestClient, method: str, path: str
) -> None:
    """Fails if a /v1 route answers without the token or with a wrong one (e.g. `dependencies=
    auth` dropped from DELETE /v1/sessions/{id}: it ends the session with no token), or refuses
    the right one."""
    sid = client.post("/v1/sessions", headers=_headers(TOKEN)).json()["session_id"]
    url = _fill(path, sid)
    body = {"sdp": "not sdp", "type": "offer"} if path.endswith("/offer") else None
    try:
        for token in (None, "wrong-token"):
            r = client.request(method, url, headers=_headers(token), json=body)
            assert r.status_code == 401, f"{method} {path} with token {token!r}: {r.status_code}"
            assert r.headers.get("www-authenticate") == "Bearer"
        # The session is untouched by the refused requests.
        assert client.get(f"/v1/sessions/{sid}", headers=_headers(TOKEN)).status_code == 200
        r = client.request(method, url, headers=_headers(TOKEN), json=body)
        assert r.status_code == PROTECTED[(method, path)], (method, path, r.status_code, r.text)
        if (method, path) == ("POST", "/v1/sessions"):
            client.delete(f"/v1/sessions/{r.json()['session_id']}", headers=_headers(TOKEN))
    finally:
        client.delete(f"/v1/sessions/{sid}", headers=_headers(TOKEN))


@pytest.mark.parametrize("path", sorted(WEBSOCKETS))
def test_websocket_refuses_no_token_and_a_wrong_one_and_serves_the_right_one(
    client: TestClient, path: str
) -> None:
    """Fails if the audio socket starts without a token (in the query or the first message) or
    with a wrong one."""
    sid = client.post("/v1/sessions", headers=_headers(TOKEN)).json()["session_id"]
    url = _fill(path, sid)
    start = {"type": "start", "sample_rate": 16000, "channels": 1, "format": "s16le"}
    try:
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect(url + "?token=wrong-token"),
        ):
            pass
        assert denied.value.status_code == 401
        for first in (start, {**start, "token": "wrong-token"}):
            with client.websocket_connect(url) as ws:
                ws.send_json(first)
                reply = ws.receive_json()
                assert reply["type"] == "error" and "token" in reply["message"], reply
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 4401
        with client.websocket_connect(url + f"?token={TOKEN}") as ws:
            ws.send_json(start)
            assert ws.receive_json()["type"] == "started"
        with client.websocket_connect(url) as ws:  # the token in the first message
            ws.send_json({**start, "token": TOKEN})
            assert ws.receive_json()["type"] == "started"
    finally:
        client.delete(f"/v1/sessions/{sid}", headers=_headers(TOKEN))


@pytest.mark.parametrize("path", sorted(OPEN))
def test_open_route_answers_without_the_token(client: TestClient, path: str) -> None:
    """Fails if a route documented as open starts refusing requests with no token (the load
    balancer would take the replica out, the page could not load to ask for the token)."""
    r = client.get(OPEN[path][0])
    assert r.status_code == 200, (path, r.status_code)


class _CountedBody:
    """An ASGI `receive` sending `chunks` chunks of 64 KiB, counting the bytes the app pulls."""

    CHUNK = 64 * 1024

    def __init__(self, chunks: int) -> None:
        self.left = chunks
        self.pulled = 0

    async def __call__(self) -> dict:
        if self.left < 0:
            return {"type": "http.disconnect"}
        if self.left == 0:
            self.left = -1
            return {"type": "http.request", "body": b"", "more_body": False}
        self.left -= 1
        self.pulled += self.CHUNK
        return {"type": "http.request", "body": b" " * self.CHUNK, "more_body": True}


def _post_raw(client: TestClient, path: str, headers: dict[str, str], body: _CountedBody) -> int:
    """POST straight to the ASGI app (TestClient reads a streamed body whole before the app
    runs, so it cannot show how much the app pulled); the response status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    started: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            started.append(message["status"])

    client.portal.call(client.app, scope, body, send)
    return started[0]


def test_offer_checks_the_token_before_reading_and_reads_a_bounded_body(
    client: TestClient,
) -> None:
    """An offer without the token, or with a wrong one, is a 401 before any of its body is
    read (so a stranger cannot make the server take in megabytes first); with the token, a body
    over the offer limit is a 413 after at most the limit (a declared Content-Length over it:
    before any), not read whole.

    Fails if `offer` reads its body before the token check (a `body: Offer` parameter: FastAPI
    parses it before the router's dependencies), or reads it with an unbounded `request.body()`."""
    from stream.protocol import MAX_OFFER_BYTES

    sid = client.post("/v1/sessions", headers=_headers(TOKEN)).json()["session_id"]
    path = f"/v1/sessions/{sid}/offer"
    json_type = {"Content-Type": "application/json"}
    chunks = 4 * MAX_OFFER_BYTES // _CountedBody.CHUNK  # four times the limit, streamed
    try:
        for token in (None, "wrong-token"):
            body = _CountedBody(chunks)
            assert _post_raw(client, path, {**json_type, **_headers(token)}, body) == 401
            assert body.pulled == 0, f"token {token!r}: {body.pulled} bytes read before the 401"
        body = _CountedBody(chunks)
        assert _post_raw(client, path, {**json_type, **_headers(TOKEN)}, body) == 413
        assert body.pulled <= MAX_OFFER_BYTES + _CountedBody.CHUNK, body.pulled
        declared = {**json_type, **_headers(TOKEN), "Content-Length": str(MAX_OFFER_BYTES + 1)}
        body = _CountedBody(chunks)
        assert _post_raw(client, path, declared, body) == 413
        assert body.pulled == 0, body.pulled
        # The session is untouched: a body within the limit is still read and answered.
        assert client.get(f"/v1/sessions/{sid}", headers=_headers(TOKEN)).status_code == 200
        r = client.post(path, headers=_headers(TOKEN), json={"sdp": "not sdp", "type": "offer"})
        assert r.status_code == 400, r.text
    finally:
        client.delete(f"/v1/sessions/{sid}", headers=_headers(TOKEN))

"""Per-client quotas and the end of sessions nobody watches, in-process (TestClient, tiny model).

A client is its address here (no token); the app is wrapped so each request can say which
address it comes from. Over its quota a client gets 429 with Retry-After and a JSON `limit`;
other clients keep being served; the rate limit's bucket refills with time (a fake clock).
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from stream.app import create_app
from stream.quotas import SessionRateLimiter, client_key
from stream.settings import Settings


def _app(**kw):  # noqa: ANN202
    """The service, with `X-Test-Client: ADDR` standing in for the peer's address."""
    app = create_app(Settings(model="tiny", threads=1, engine_process=False, **kw))

    async def asgi(scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] in ("http", "websocket"):
            for name, value in scope["headers"]:
                if name == b"x-test-client":
                    scope = {**scope, "client": (value.decode(), 50000)}
        await app(scope, receive, send)

    asgi.state = app.state  # type: ignore[attr-defined]
    return asgi


def _as(addr: str) -> dict[str, str]:
    return {"X-Test-Client": addr}


def _metric(c: TestClient, sample: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_client_over_its_session_quota_gets_429_while_another_client_gets_201() -> None:
    """Fails if a client can hold more than max_sessions_per_client sessions (e.g. `held_by`
    counting nothing: the third POST of 10.0.0.1 got 201), or if one client's quota refuses
    another client, or a freed slot is not given back."""
    with TestClient(_app(max_sessions=4, max_sessions_per_client=2, session_rate=0)) as c:
        a = [c.post("/v1/sessions", headers=_as("10.0.0.1")) for _ in range(2)]
        assert [r.status_code for r in a] == [201, 201]
        over = c.post("/v1/sessions", headers=_as("10.0.0.1"))
        assert over.status_code == 429, over.text
        assert int(over.headers["retry-after"]) >= 1
        body = over.json()
        assert body["limit"] == "sessions_per_client" and "2 of its 2" in body["detail"], body
        other = c.post("/v1/sessions", headers=_as("10.0.0.2"))
        assert other.status_code == 201, other.text
        # Ending one of its sessions gives the client its slot back.
        sid = a[0].json()["session_id"]
        assert c.delete(f"/v1/sessions/{sid}", headers=_as("10.0.0.1")).status_code == 204
        assert c.post("/v1/sessions", headers=_as("10.0.0.1")).status_code == 201
        assert _metric(c, 'diffstream_sessions_rejected_total{reason="client_sessions"}') == 1
        assert _metric(c, 'diffstream_sessions_rejected_total{reason="capacity"}') == 0


def test_session_rate_limit_answers_429_and_refills() -> None:
    """6 per minute in bursts of 2: the third creation in a row waits 10 s for its token.

    Fails if the bucket never refills (e.g. `_tokens` without the `(now - at) * rate` term:
    still 429 after the clock moved 10 s), if Retry-After is not the wait, or if the rate of
    one client limits another."""
    now = [1000.0]
    with TestClient(
        _app(max_sessions=8, max_sessions_per_client=8, session_rate=6, session_burst=2)
    ) as c:
        c.app.state.sessions.rate.clock = lambda: now[0]
        for _ in range(2):
            r = c.post("/v1/sessions", headers=_as("10.0.0.1"))
            assert r.status_code == 201, r.text
            c.delete(f"/v1/sessions/{r.json()['session_id']}")
        fast = c.post("/v1/sessions", headers=_as("10.0.0.1"))
        assert fast.status_code == 429, fast.text
        assert fast.json()["limit"] == "session_rate"
        assert fast.headers["retry-after"] == "10" and fast.json()["retry_after_s"] == 10
        assert c.post("/v1/sessions", headers=_as("10.0.0.2")).status_code == 201
        now[0] += 5.0  # half a token: still too early
        assert c.post("/v1/sessions", headers=_as("10.0.0.1")).status_code == 429
        now[0] += 5.0
        assert c.post("/v1/sessions", headers=_as("10.0.0.1")).status_code == 201
        assert c.post("/v1/sessions", headers=_as("10.0.0.1")).status_code == 429  # spent again
        assert _metric(c, 'diffstream_sessions_rejected_total{reason="client_rate"}') == 3


def test_a_session_nobody_ever_watched_ends_after_idle_no_viewer_s() -> None:
    """A session with neither an offer nor an audio socket ends after idle_no_viewer_s; one
    whose audio socket came and went keeps the longer idle_timeout_s.

    Fails if the reaper ignores idle_no_viewer_s (e.g. its no-viewer branch removed: the
    unwatched session lives on for idle_timeout_s = 60 s), or if it also ends a session that
    had an audio socket (e.g. `watched` never set by the audio_socket setter)."""
    with TestClient(_app(idle_no_viewer_s=0.5, idle_timeout_s=60)) as c:
        unwatched = c.post("/v1/sessions").json()["session_id"]
        used = c.post("/v1/sessions").json()["session_id"]
        with c.websocket_connect(f"/v1/sessions/{used}/audio") as ws:
            ws.send_json({"type": "start", "sample_rate": 16000})
            assert ws.receive_json()["type"] == "started"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ids = {s["session_id"] for s in c.get("/v1/sessions").json()}
            if unwatched not in ids:
                break
            time.sleep(0.1)
        assert unwatched not in ids, "the never-watched session was not ended"
        assert used in ids, "a session that had an audio socket was ended as never watched"
        assert _metric(c, 'diffstream_sessions_total{outcome="no_viewer"}') == 1
        assert c.get(f"/v1/sessions/{unwatched}").status_code == 404


def test_rate_buckets_stay_bounded_and_clients_are_keyed_by_address_and_token() -> None:
    """Fails if a flood of addresses grows the bucket table without end (e.g. `_forget_full`
    never called), if the token itself is kept as a key, or if callers sharing one token at
    different addresses count as one client (the token alone as the key)."""
    now = [0.0]
    limiter = SessionRateLimiter(60, 2, clock=lambda: now[0], max_clients=8)
    for i in range(100):
        limiter.take(f"addr:10.0.{i}.1")
        now[0] += 0.01
    assert len(limiter) <= 8
    assert limiter.wait_s("addr:10.0.99.1") == 0  # one token left of its two
    assert client_key(None, "10.0.0.1") == "addr:10.0.0.1"
    assert client_key(None, None) == "addr:unknown"
    keyed = client_key("s3cret", "10.0.0.1")
    assert keyed.startswith("token:") and "s3cret" not in keyed
    assert keyed != client_key("s3cret", "10.0.0.2")  # a shared token: two clients
    assert keyed != client_key("other", "10.0.0.1") != client_key(None, "10.0.0.1")


@pytest.mark.parametrize("rate,burst", [(0, 1), (0.5, 1)])
def test_rate_limiter_edges(rate: float, burst: int) -> None:
    """Fails if a rate of 0 limits at all, or a slow rate refuses the first creation."""
    limiter = SessionRateLimiter(rate, burst)
    assert limiter.wait_s("a") == 0
    limiter.take("a")
    assert (limiter.wait_s("a") == 0) == (rate == 0)

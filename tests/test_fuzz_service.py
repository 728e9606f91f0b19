"""Fuzzing a real `diffstream serve` process while an aiortc viewer watches it.

hypothesis drives the audio websocket (control JSON valid and not, odd fields and types, PCM of
every length, start/stop/interrupt/segment in any order) on sessions of their own, then hostile
PCM (NaN, infinities, odd lengths, faster than real time) into the watched session itself, and
broken offers and images over HTTP. Meanwhile the viewer must keep receiving frames with no gap
beyond a bound, and /healthz must answer 200 after every example and at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream.client import AvatarClient
from stream.harness import ServiceProcess
from tests.fuzz_inputs import (
    DOCUMENTED_CLOSE_CODES,
    TOKEN,
    control_messages,
    pcm_messages,
    png_declaring,
    real_offer,
    socket_messages,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("DIFFSTREAM_FUZZ_EXAMPLES", "30"))
MAX_GAP_S = 2.0  # longest the viewer may go without a frame during the run
STEP_TIMEOUT_S = 10.0  # any single socket or HTTP step; beyond it the service hangs
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class Viewer:
    """An AvatarClient watching one session from a thread of its own (its own event loop), so
    the fuzzing in the test's thread cannot starve it of a loop."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.client: AvatarClient | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="viewer", daemon=True)

    def start(self) -> Viewer:
        self._thread.start()
        if not self.ready.wait(90) or self.error is not None:
            raise RuntimeError(f"the viewer never got a frame: {self.error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() and the checks
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client = AvatarClient(self.base, token=TOKEN)
        self.client = client
        await client.create()
        await client.watch(audio=True, stats=True)
        await asyncio.wait_for(client.first_video.wait(), 60)
        self.ready.set()
        await self._stop.wait()
        await client.close()

    @property
    def session_id(self) -> str:
        assert self.client is not None and self.client.session_id is not None
        return self.client.session_id

    def frames(self) -> int:
        return len(self.client.received.video) if self.client else 0

    def max_gap(self, since: float) -> float:
        """The longest wait between frames that arrived after `since` (and up to now)."""
        times = [t for t, _ in list(self.client.received.video) if t >= since]
        if not times:
            return time.monotonic() - since
        points = [since, *times, time.monotonic()]
        return max(b - a for a, b in zip(points, points[1:], strict=False))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with ServiceProcess(
        "--auth-token",
        TOKEN,
        "--max-sessions",
        "16",
        "--max-sessions-per-client",
        "16",
        "--session-rate",
        "0",
        "--max-message-bytes",
        str(1 << 20),
        "--viewer-timeout",
        "30",
        "--no-compile",
        log_path=log,
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def viewer(service: ServiceProcess):
    v = Viewer(service.base).start()
    yield v
    v.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _healthy(service: ServiceProcess) -> None:
    r = httpx.get(f"{service.base}/healthz", timeout=STEP_TIMEOUT_S)
    assert r.status_code == 200, (r.status_code, r.text, service.log_tail())


def _ws_url(service: ServiceProcess, sid: str, with_token: bool) -> str:
    url = service.base.replace("http", "ws", 1) + f"/v1/sessions/{sid}/audio"
    return url + f"?token={TOKEN}" if with_token else url


async def _drive(url: str, messages: list[str | bytes]) -> tuple[int | None, list[dict]]:
    """Send the messages, then probe with an auth message. Returns the close code (None: the
    socket stayed open and answered the probe) and the JSON the service sent. Every step is
    bounded: a service that stops answering fails with TimeoutError."""
    got: list[dict] = []
    async with websockets.connect(url, max_size=2**24, open_timeout=STEP_TIMEOUT_S) as ws:
        try:
            for m in messages:
                await asyncio.wait_for(ws.send(m), STEP_TIMEOUT_S)
            await asyncio.wait_for(ws.send(json.dumps({"type": "auth", "token": TOKEN})), 5)
            while True:
                raw = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT_S)
                if isinstance(raw, str):
                    got.append(json.loads(raw))
                    if got[-1].get("type") == "authenticated":
                        return None, got
        except websockets.ConnectionClosed:
            pass
        # Closed by the service: what it sent before its close frame is still to be read.
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                raw = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT_S)
                if isinstance(raw, str):
                    got.append(json.loads(raw))
        await asyncio.wait_for(ws.wait_closed(), STEP_TIMEOUT_S)
        return ws.close_code, got


def _check_socket_outcome(code: int | None, got: list[dict]) -> None:
    errors = [m for m in got if m.get("type") == "error"]
    for e in errors:
        assert isinstance(e.get("message"), str) and e["message"].strip(), e
    if code is None:
        assert not errors, errors  # an error always ends its socket
        return
    assert code in DOCUMENTED_CLOSE_CODES, (code, got)
    if code not in (1000, 1001, 4410):  # stopped, shutting down, session ended: no error
        assert errors, f"closed with {code} without a {{'type': 'error'}} message: {got}"


# The whole run: one test so the viewer's stream is checked across all of it -----------------------


def test_fuzz_the_running_service_while_a_viewer_watches(
    service: ServiceProcess, viewer: Viewer
) -> None:
    """Websocket sequences on fresh sessions, hostile PCM into the watched session, broken
    offers and images: every socket ends with a documented close code (and an error message)
    or stays usable (answers an auth probe), every HTTP answer is below 500, /healthz is 200
    after each example, and the viewer's frame count keeps growing with no gap over MAX_GAP_S.

    Fails if a control message can crash the handler (e.g. parse_control letting a
    RecursionError out: the socket ends without a documented code), if audio or control ends or
    stalls the watched session (e.g. Session.interrupt closing it: its GET is 404, the viewer's
    frames stop), or if the server ends unhealthy."""
    start = time.monotonic()
    frames_before = viewer.frames()
    http = httpx.Client(base_url=service.base, headers=_auth(), timeout=STEP_TIMEOUT_S)
    outcomes: dict[int | None, int] = {}

    @FUZZ
    @given(messages=socket_messages(), with_token=st.booleans())
    # What the fuzzing found once, tried every run: deep nesting (RecursionError), NaN (int()
    # raises), a non-ASCII token (compare_digest raises), audio before start.
    @example(messages=["[" * 100_000 + "]" * 100_000], with_token=True)
    @example(messages=['{"type": "start", "sample_rate": NaN}'], with_token=True)
    @example(messages=[json.dumps({"type": "auth", "token": "\u00e9"})], with_token=False)
    @example(messages=[b"\x01\x02\x03", json.dumps({"type": "stop"})], with_token=True)
    def fuzz_fresh_session_sockets(messages: list[str | bytes], with_token: bool) -> None:
        r = http.post("/v1/sessions")
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        try:
            code, got = asyncio.run(_drive(_ws_url(service, sid, with_token), messages))
        finally:
            assert http.delete(f"/v1/sessions/{sid}").status_code in (204, 404)
        outcomes[code] = outcomes.get(code, 0) + 1
        _check_socket_outcome(code, got)
        _healthy(service)

    fuzz_fresh_session_sockets()

    watched_url = _ws_url(service, viewer.session_id, True)

    @FUZZ
    @given(
        start=control_messages().filter(lambda m: '"start"' in m and "sample_rate" in m),
        chunks=st.lists(
            st.one_of(
                pcm_messages(),
                st.sampled_from(
                    [json.dumps({"type": "interrupt"}), json.dumps({"type": "segment"})]
                ),
            ),
            max_size=12,
        ),
    )
    def fuzz_watched_session_audio(start: str, chunks: list[str | bytes]) -> None:
        # The interrupt empties what earlier examples queued: backpressure (a full 20 s buffer
        # stops the reading, as documented) is not what this checks.
        interrupt = json.dumps({"type": "interrupt"})
        code, got = asyncio.run(_drive(watched_url, [start, interrupt, *chunks]))
        _check_socket_outcome(code, got)
        # The watched session survives whatever its audio was: it still exists and streams.
        assert http.get(f"/v1/sessions/{viewer.session_id}").status_code == 200
        _healthy(service)

    fuzz_watched_session_audio()

    # Offers and images against the real server (the in-process suite fuzzes these harder).
    sid = http.post("/v1/sessions").json()["session_id"]
    real = real_offer()
    for sdp in ["garbage", real[: len(real) // 2], real_offer(video=False), real * 200]:
        r = http.post(f"/v1/sessions/{sid}/offer", json={"sdp": sdp, "type": "offer"})
        assert 400 <= r.status_code < 500 and r.json()["detail"], (r.status_code, r.text[:200])
    for image in [png_declaring(50_000, 50_000), png_declaring(100, 100, idat=b"x")]:
        multipart = http.post("/v1/sessions", files={"image": ("x.png", image, "image/png")})
        encoded = http.post("/v1/sessions", json={"image_base64": base64.b64encode(image).decode()})
        for r in (multipart, encoded):
            assert r.status_code == 400 and "image" in r.json()["detail"], r.text[:200]
    http.delete(f"/v1/sessions/{sid}")

    # The whole-run property.
    frames_after = viewer.frames()
    gap = viewer.max_gap(start)
    elapsed = time.monotonic() - start
    print(
        f"fuzz run {elapsed:.0f} s: viewer frames {frames_before} -> {frames_after}, "
        f"longest gap {gap * 1000:.0f} ms; socket outcomes {outcomes}"
    )
    assert viewer.error is None, viewer.error
    assert frames_after > frames_before + 10 * elapsed, "the viewer stopped receiving frames"
    assert gap <= MAX_GAP_S, f"the viewer went {gap:.1f} s without a frame"
    _healthy(service)
    # Only the viewer's session is left: every fuzzed one is gone (a `stop`ped one may still be
    # finishing its close when its DELETE returns, so give it a moment).
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{service.base}/healthz").json())["sessions"] != 1:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    http.close()


@pytest.mark.slow
def test_fuzz_with_more_examples() -> None:
    """The fuzz suites again with ten times the examples (`make test-slow`)."""
    env = {**os.environ, "DIFFSTREAM_FUZZ_EXAMPLES": "300"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    cmd += ["tests/test_fuzz_api.py", "tests/test_fuzz_service.py"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=3600)

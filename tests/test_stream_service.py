"""The real service in a child process, the tiny model, aiortc and websockets as clients.

Covers the issue's "must show" list except the browser and the leak test (own files): tracks
arrive with pts at the model's rate and A/V within 80 ms over 20 s; every bad input answered with
a clear error while a second session keeps streaming; admission control; auth; recording.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection

from stream.client import AvatarClient, ServiceError, http
from stream.harness import ServiceProcess

TOKEN = "s3cret-token"
LIMIT = 65536
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("service") / "serve.log"
    with ServiceProcess(
        "--auth-token",
        TOKEN,
        "--max-sessions",
        "4",
        "--max-message-bytes",
        str(LIMIT),
        "--viewer-timeout",
        "4",
        log_path=log,
    ) as svc:
        yield svc


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of harmonics: loud/quiet structure like speech, no file needed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    gate = (np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)) > -0.2).astype(np.float32)
    return (0.25 * voice * gate).astype(np.float32)


async def _healthy_session(base: str) -> tuple[AvatarClient, asyncio.Task]:
    client = AvatarClient(base, token=TOKEN)
    await client.create()
    await client.watch()
    await asyncio.wait_for(client.first_video.wait(), 30)
    await client.open_audio(16000)
    sender = asyncio.create_task(client.send_pcm(speech_like(120), 16000))
    return client, sender


# A/V over 20 s ---------------------------------------------------------------------------------


def test_tracks_arrive_at_the_model_rate_and_stay_in_sync(service: ServiceProcess) -> None:
    async def run() -> dict:
        client = AvatarClient(service.base, token=TOKEN)
        created = await client.create()
        assert created["fps"] == 25.0
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        await client.open_audio(16000)
        t0 = time.monotonic()
        await client.send_pcm(speech_like(20.5), 16000)
        t1 = time.monotonic()
        await asyncio.sleep(0.5)
        await client.close()
        return {"client": client, "t0": t0, "t1": t1}

    out = asyncio.run(run())
    client: AvatarClient = out["client"]
    video, audio = client.received.video, client.received.audio
    assert video and audio, "both tracks must arrive"
    assert out["t1"] - out["t0"] >= 20.0

    # Video pts advance by 90 kHz / 25 fps = 3600 per frame, and in step with the wall clock.
    pts = np.array([p for _, p in video])
    assert np.median(np.diff(pts)) == 3600
    assert np.all(np.diff(pts) > 0)
    span_media = (pts[-1] - pts[0]) / 90000
    span_wall = video[-1][0] - video[0][0]
    assert abs(span_media / span_wall - 1) < 0.03, (span_media, span_wall)
    fps = client.video_fps(out["t0"], out["t1"])
    assert fps >= 23, f"received {fps:.1f} fps"
    # Audio arrives in 20 ms frames at 48 kHz.
    apts = np.array([p for _, p, _ in audio])
    assert np.median(np.diff(apts)) == 960

    offsets = client.av_offsets(window_s=1.0)
    assert len(offsets) >= 19, "A/V measured over at least 20 s"
    worst = max(abs(o) for o in offsets)
    print(
        f"A/V offset per second (ms): {[round(o * 1000) for o in offsets]}; worst {worst * 1000:.0f}"
    )
    assert worst <= 0.080, f"audio and video drift apart by {worst * 1000:.0f} ms"

    # The engine kept real time: the frames were generated, not repeated.
    stats = [s for s in client.received.stats if s.get("generated_fps") is not None][2:]
    gen = np.mean([s["generated_fps"] for s in stats])
    print(f"generated fps {gen:.1f}, server latency {stats[-1]['latency_ms']} ms")
    assert gen >= 20, f"engine produced {gen:.1f} fps; see block_ms {stats[-1]['block_ms']}"
    # The driving audio came back: loud where the speech was loud.
    rms = np.array([r for _, _, r in audio])
    assert (rms > 0.05).mean() > 0.3


# Bad input -------------------------------------------------------------------------------------


async def _ws_error(url: str, *messages: str | bytes) -> tuple[int, str, dict | None]:
    """Send messages, return (close code, close reason, error JSON if one came)."""
    error = None
    async with websockets.connect(url, max_size=2**24) as ws:
        try:
            for m in messages:
                await ws.send(m)
            while True:
                raw = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    if msg.get("type") == "error":
                        error = msg
        except websockets.ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason or "", error


def test_bad_input_ends_only_its_own_socket_or_request(service: ServiceProcess) -> None:
    base = service.base
    auth = {"token": TOKEN}

    async def run() -> None:
        healthy, sender = await _healthy_session(base)
        victim = AvatarClient(base, token=TOKEN)
        await victim.create()
        ws_url = (
            base.replace("http", "ws") + f"/v1/sessions/{victim.session_id}/audio?token={TOKEN}"
        )
        start = {"type": "start", "sample_rate": 16000, "channels": 1, "format": "s16le"}
        cases = [
            ("malformed JSON", ["{oops"], 1007, "malformed JSON"),
            ("audio before start", [b"\x00\x01" * 160], 1008, 'before the "start"'),
            (
                "unknown format",
                [json.dumps({**start, "format": "mp3"})],
                1003,
                "unknown audio format",
            ),
            ("rate 0", [json.dumps({**start, "sample_rate": 0})], 1008, "0 Hz is out of range"),
            (
                "rate 10 MHz",
                [json.dumps({**start, "sample_rate": 10_000_000})],
                1008,
                "10000000 Hz",
            ),
            ("over the limit", [json.dumps(start), b"\x00" * (LIMIT + 1000)], 1009, "limit"),
            ("far over the limit", [json.dumps(start), b"\x00" * (LIMIT * 8)], 1009, ""),
        ]
        for name, messages, code, words in cases:
            got_code, reason, error = await _ws_error(ws_url, *messages)
            assert got_code == code, f"{name}: close code {got_code} ({reason})"
            assert words in reason or (error and words in error["message"]), (name, reason, error)
            if words:
                assert error is not None and words in error["message"], name

        # The victim session itself survived its bad sockets: a good socket still works.
        await victim.watch()
        await asyncio.wait_for(victim.first_video.wait(), 30)
        reply = await victim.open_audio(16000)
        assert reply["type"] == "started"
        await victim.close()

        # A session id that does not exist: 404 for HTTP and for the websocket handshake.
        for method, path in [
            ("POST", "/v1/sessions/nope/offer"),
            ("DELETE", "/v1/sessions/nope"),
            ("GET", "/v1/sessions/nope"),
        ]:
            body = {"sdp": "v=0", "type": "offer"} if method == "POST" else None
            with pytest.raises(ServiceError) as err:
                await asyncio.to_thread(http, method, base + path, body, **auth)
            assert err.value.status == 404 and "not found" in err.value.detail
        with pytest.raises(websockets.InvalidStatus) as handshake:
            await websockets.connect(
                base.replace("http", "ws") + f"/v1/sessions/nope/audio?token={TOKEN}"
            )
        assert handshake.value.response.status_code == 404

        # An offer with no video transceiver, and one that is not SDP.
        other = AvatarClient(base, token=TOKEN)
        await other.create()
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        for sdp, words in [(pc.localDescription.sdp, "no video transceiver"), ("hello", "SDP")]:
            with pytest.raises(ServiceError) as err:
                await asyncio.to_thread(
                    http,
                    "POST",
                    f"{base}/v1/sessions/{other.session_id}/offer",
                    {"sdp": sdp, "type": "offer"},
                    **auth,
                )
            assert err.value.status == 400 and words in err.value.detail, err.value.detail
        await pc.close()
        await other.close()

        # An image that is not an image: multipart and base64.
        boundary = "xyzzy"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\nthis is not a png\r\n--{boundary}--\r\n"
        ).encode()
        with pytest.raises(ServiceError) as err:
            await asyncio.to_thread(
                http,
                "POST",
                f"{base}/v1/sessions",
                form,
                content_type=f"multipart/form-data; boundary={boundary}",
                **auth,
            )
        assert err.value.status == 400 and "not an image" in err.value.detail
        junk = base64.b64encode(b"GIF89a but not really").decode()
        with pytest.raises(ServiceError) as err:
            await asyncio.to_thread(
                http, "POST", f"{base}/v1/sessions", {"image_base64": junk}, **auth
            )
        assert err.value.status == 400 and "image" in err.value.detail

        # A client that disappears mid-stream: a process killed while it watches and talks.
        vanished = await _killed_client(base)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, sessions = await asyncio.to_thread(http, "GET", f"{base}/v1/sessions", **auth)
            if vanished not in {s["session_id"] for s in sessions}:
                break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the vanished client's session was never released")

        # Through all of it, the healthy session kept streaming at full rate.
        now = time.monotonic()
        fps = healthy.video_fps(now - 5, now)
        assert fps >= 20, f"healthy session fell to {fps:.1f} fps"
        assert not sender.done()
        sender.cancel()
        await healthy.close()

    asyncio.run(run())
    assert service.proc.poll() is None  # the server is still up
    samples = service.metrics()
    assert samples['diffstream_sessions_total{outcome="viewer_gone"}'] >= 1
    assert samples['diffstream_client_errors_total{kind="malformed_json"}'] >= 1


KILLED_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, numpy as np
    from stream.client import AvatarClient

    async def main():
        c = AvatarClient(sys.argv[1], token=sys.argv[2])
        await c.create()
        await c.watch()
        await c.first_video.wait()
        await c.open_audio(16000)
        print(c.session_id, flush=True)
        t = np.arange(16000 * 60) / 16000
        await c.send_pcm((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)

    asyncio.run(main())
    """
)


async def _killed_client(base: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CLIENT, base, TOKEN, cwd=ROOT, stdout=subprocess.PIPE
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    session_id = line.decode().strip()
    await asyncio.sleep(1.5)  # mid-stream
    proc.kill()
    await proc.wait()
    return session_id


# Auth ------------------------------------------------------------------------------------------


def test_token_is_required_everywhere(service: ServiceProcess) -> None:
    base = service.base
    for token in (None, "wrong"):
        with pytest.raises(ServiceError) as err:
            http("POST", f"{base}/v1/sessions", token=token)
        assert err.value.status == 401
        with pytest.raises(ServiceError) as err:
            http("GET", f"{base}/v1/sessions", token=token)
        assert err.value.status == 401
    _, created = http("POST", f"{base}/v1/sessions", token=TOKEN)
    sid = created["session_id"]
    ws = base.replace("http", "ws") + f"/v1/sessions/{sid}/audio"

    async def run() -> None:
        with pytest.raises(websockets.InvalidStatus) as err:
            await websockets.connect(ws + "?token=wrong")
        assert err.value.response.status_code == 401
        start = {"type": "start", "sample_rate": 16000, "format": "s16le"}
        code, reason, _ = await _ws_error(ws, json.dumps(start))  # no token at all
        assert code == 4401 and "token" in reason
        code, reason, _ = await _ws_error(ws, json.dumps({"type": "auth", "token": "nope"}))
        assert code == 4401
        async with websockets.connect(ws) as conn:  # token in the first message
            await conn.send(json.dumps({**start, "token": TOKEN}))
            assert json.loads(await conn.recv())["type"] == "started"

    asyncio.run(run())
    http("DELETE", f"{base}/v1/sessions/{sid}", token=TOKEN)
    assert http("GET", f"{base}/healthz")[0] == 200  # health and metrics stay open
    assert "diffstream_active_sessions" in http("GET", f"{base}/metrics")[1]


# Admission and recording -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_service(tmp_path_factory: pytest.TempPathFactory):
    rec = tmp_path_factory.mktemp("recordings")
    with ServiceProcess("--max-sessions", "2", "--recording-dir", str(rec)) as svc:
        svc.recordings = rec
        yield svc


def test_admission_refuses_session_n_plus_one_until_one_ends(small_service: ServiceProcess) -> None:
    base = small_service.base
    ids = [http("POST", f"{base}/v1/sessions")[1]["session_id"] for _ in range(2)]
    with pytest.raises(ServiceError) as err:
        http("POST", f"{base}/v1/sessions")
    assert err.value.status == 503
    assert "capacity" in err.value.detail and "2 of 2" in err.value.detail
    http("DELETE", f"{base}/v1/sessions/{ids[0]}")
    status, body = http("POST", f"{base}/v1/sessions")
    assert status == 201
    ids = [ids[1], body["session_id"]]
    for sid in ids:
        http("DELETE", f"{base}/v1/sessions/{sid}")
    assert small_service.metrics()['diffstream_sessions_rejected_total{reason="capacity"}'] >= 1
    assert http("GET", f"{base}/v1/sessions")[1] == []


def test_stop_plays_out_and_the_recording_holds_video_and_audio(
    small_service: ServiceProcess,
) -> None:
    async def run() -> AvatarClient:
        client = AvatarClient(small_service.base)
        await client.create()
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        await client.open_audio(16000)
        await client.send_pcm(speech_like(2.0), 16000)
        await client.control("stop")

        # The server plays out the queued audio, then closes the socket normally.
        assert await client.wait_socket_closed(20) == 1000
        await client.close(delete=False)
        return client

    asyncio.run(run())
    deadline = time.monotonic() + 20
    files: list[Path] = []
    while time.monotonic() < deadline and not files:
        files = [p for p in small_service.recordings.glob("*.mp4") if p.stat().st_size > 0]
        time.sleep(0.3)
    assert files, "no recording written"
    time.sleep(1.0)
    with av.open(str(files[0])) as container:
        kinds = {s.type: s.codec_context.name for s in container.streams}
        assert kinds == {"video": "h264", "audio": "aac"}
        frames = sum(1 for _ in container.decode(video=0))
        duration = container.duration / 1e6
    assert frames >= 50 and 2.0 <= duration <= 6.0, (frames, duration)


# Interrupt and degradation -----------------------------------------------------------------------


def test_interrupt_cuts_queued_speech_at_once(service: ServiceProcess) -> None:
    async def run() -> tuple[AvatarClient, float, dict]:
        client = AvatarClient(service.base, token=TOKEN)
        await client.create()
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        await client.open_audio(16000)
        # A TTS backend sends 8 s of speech at once; the service queues it (bounded) and plays
        # it at real time.
        await client.send_pcm(speech_like(8.0), 16000, realtime=False)
        await asyncio.sleep(2.0)
        reply = await client.control("interrupt", reply="interrupted", timeout=5)
        cut = time.monotonic()
        await asyncio.sleep(2.0)
        await client.close()
        return client, cut, reply

    client, cut, reply = asyncio.run(run())
    assert reply["type"] == "interrupted"
    audio = client.received.audio
    before = [r for t, _, r in audio if cut - 1.5 <= t < cut]
    after = [r for t, _, r in audio if cut + 0.5 <= t < cut + 2.0]
    assert np.mean(np.array(before) > 0.05) > 0.3, "speech was playing before the interrupt"
    assert max(after) < 0.01, "speech still playing 0.5 s after the interrupt"
    video_after = [t for t, _ in client.received.video if cut + 0.5 <= t < cut + 2.0]
    assert len(video_after) >= 30, "the avatar kept moving (idling) after the interrupt"


def test_behind_real_time_drops_blocks_on_purpose_and_counts_them(
    service: ServiceProcess,
) -> None:
    """A session asking for many more steps than real time allows: the service keeps the video
    moving, drops whole blocks of audio instead of letting latency grow, and says so. (64
    steps and 9 s of speech: on a quiet 2-core box 48 steps over 6 s ran at ~70 % of real time
    and never piled up the 1.5 s backlog that starts the drops.)"""
    before = service.metrics()

    async def run() -> AvatarClient:
        client = AvatarClient(service.base, token=TOKEN)
        await client.create(steps=64)
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 60)
        await client.open_audio(16000)
        await client.send_pcm(speech_like(9.0), 16000)
        await asyncio.sleep(1.5)
        await client.close()
        return client

    client = asyncio.run(run())
    after = service.metrics()
    key = 'diffstream_blocks_dropped_total{reason="behind_real_time"}'
    dropped = after.get(key, 0) - before.get(key, 0)
    stats = client.received.stats[-1]
    print(f"slow session: {stats}")
    assert stats["block_ms"] > 1000 * 3 / 25, "the session was not actually behind real time"
    assert dropped > 0 and stats["dropped_blocks"] > 0
    # Latency stays bounded by the backlog limit instead of growing with the stream.
    assert max(s["audio_buffer_s"] for s in client.received.stats) < 1.5 + 0.5
    assert client.video_fps(client.received.video[0][0], client.received.video[-1][0]) >= 20

"""A Python client of the service (aiortc + websockets), used by the tests and the benchmark.

It does what the browser page does: create a session, offer to receive video and audio plus the
`stats` channel, stream PCM over the websocket in real time, and it records every received frame
with its arrival time and pts, so callers can measure fps, A/V alignment and latency. Every JSON
message the service sends on the audio socket (replies, playback events, the closing error) is
read by one task and kept in order in `received.messages`; `wait_message` waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

# What aiortc's receiver holds back before a frame reaches `track.recv()` (rtcrtpreceiver.py,
# jitterbuffer.py): the audio jitter buffer releases a packet once 4 more have arrived
# (prefetch=4, 20 ms each); the video one releases a frame when the next frame's first packet
# arrives, one frame period later. Arrival minus hold is when the media reached the receiver.
AUDIO_RECEIVER_HOLD_S = 4 * 0.020
VIDEO_RECEIVER_HOLD_FRAMES = 1


class ServiceError(Exception):
    """An HTTP error from the service, with its status and the `detail` it sent."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """One blocking HTTP call; returns (status, decoded JSON or text). Raises ServiceError >= 400."""
    data = None
    headers = {}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")
        raise ServiceError(exc.code, str(detail)) from None
    if not raw:
        return status, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


async def ahttp(method: str, url: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    return await asyncio.to_thread(http, method, url, body, **kw)


@dataclass
class Received:
    """Everything the client got, with arrival times on time.monotonic()."""

    video: list[tuple[float, int]] = field(default_factory=list)  # (arrival, pts at 90 kHz)
    video_means: list[float] = field(default_factory=list)  # mean RGB value per frame, when kept
    audio: list[tuple[float, int, float]] = field(default_factory=list)  # (arrival, pts, rms)
    audio_pcm: list[np.ndarray] = field(default_factory=list)  # mono int16 chunks, when kept
    stats: list[dict[str, Any]] = field(default_factory=list)
    last_frame: np.ndarray | None = None
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # audio socket

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        """The audio socket's messages of these types, in the order they came."""
        return [m for _, m in self.messages if m.get("type") in types]


class AvatarClient:
    """One session seen from outside: HTTP for control, WebRTC to watch, websocket to talk."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        keep_audio: bool = False,
        keep_video_means: bool = False,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.keep_audio = keep_audio
        self.keep_video_means = keep_video_means
        self.session_id: str | None = None
        self.session: dict[str, Any] = {}
        self.pc: RTCPeerConnection | None = None
        self.ws: Any = None
        self.received = Received()
        self._tasks: list[asyncio.Task[Any]] = []
        self.first_video = asyncio.Event()
        self._message_came = asyncio.Condition()
        self.socket_closed = asyncio.Event()
        self.socket_close_code: int | None = None

    # Session ----------------------------------------------------------------------------------

    async def create(self, **options: Any) -> dict[str, Any]:
        _, body = await ahttp("POST", f"{self.base}/v1/sessions", options or None, token=self.token)
        self.session = body
        self.session_id = body["session_id"]
        return body

    async def watch(
        self, *, audio: bool = True, stats: bool = True, relay_only: bool = False
    ) -> None:
        """Offer to receive the avatar; frames are recorded as they arrive.

        ICE uses the session's `ice_servers`, as a browser would; `relay_only` is the browser's
        iceTransportPolicy "relay" (only TURN relay candidates).
        """
        assert self.session_id is not None
        servers = [
            RTCIceServer(
                urls=entry["urls"],
                username=entry.get("username"),
                credential=entry.get("credential"),
            )
            for entry in self.session.get("ice_servers") or []
        ]
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
        self.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        if audio:
            pc.addTransceiver("audio", direction="recvonly")
        if stats:
            channel = pc.createDataChannel("stats")

            @channel.on("message")
            def _on_message(message: str) -> None:
                with contextlib.suppress(ValueError):
                    self.received.stats.append(json.loads(message))

        @pc.on("track")
        def _on_track(track: Any) -> None:
            reader = self._read_video if track.kind == "video" else self._read_audio
            self._tasks.append(asyncio.ensure_future(reader(track)))

        await pc.setLocalDescription(await pc.createOffer())
        _, answer = await ahttp(
            "POST",
            f"{self.base}/v1/sessions/{self.session_id}/offer",
            {"sdp": pc.localDescription.sdp, "type": "offer"},
            token=self.token,
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def _read_video(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                self.received.video.append((time.monotonic(), int(frame.pts)))
                if self.keep_video_means:
                    rgb = frame.to_ndarray(format="rgb24")
                    self.received.video_means.append(float(rgb.mean()))
                if len(self.received.video) % 25 == 1:
                    self.received.last_frame = frame.to_ndarray(format="rgb24")
                self.first_video.set()

    async def _read_audio(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                mono = pcm.reshape(-1, channels)[:, 0] if pcm.ndim == 2 else pcm
                if mono.dtype != np.int16:
                    mono = (np.clip(mono, -1, 1) * 32767).astype(np.int16)
                rms = float(np.sqrt(np.mean(mono.astype(np.float32) ** 2)) / 32768.0)
                self.received.audio.append((time.monotonic(), int(frame.pts), rms))
                if self.keep_audio:
                    self.received.audio_pcm.append(mono.copy())

    # Audio ------------------------------------------------------------------------------------

    async def open_audio(
        self, sample_rate: int, *, channels: int = 1, fmt: str = "s16le"
    ) -> dict[str, Any]:
        """Open the audio websocket and send "start"; returns the server's reply."""
        import websockets

        url = self.base.replace("http", "ws", 1) + f"/v1/sessions/{self.session_id}/audio"
        if self.token:
            url += f"?token={self.token}"
        self.ws = await websockets.connect(url, max_size=2**22)
        self.socket_closed.clear()
        self._tasks.append(asyncio.ensure_future(self._read_socket(self.ws)))
        since = len(self.received.messages)
        start = {"type": "start", "sample_rate": sample_rate, "channels": channels, "format": fmt}
        await self.ws.send(json.dumps(start))
        return await self.wait_message("started", "error", since=since)

    async def _read_socket(self, ws: Any) -> None:
        import websockets

        try:
            async for raw in ws:
                if not isinstance(raw, str):
                    continue
                with contextlib.suppress(ValueError):
                    message = json.loads(raw)
                    async with self._message_came:
                        self.received.messages.append((time.monotonic(), message))
                        self._message_came.notify_all()
        except (websockets.ConnectionClosed, asyncio.CancelledError):
            pass
        finally:
            self.socket_close_code = ws.close_code
            self.socket_closed.set()
            async with self._message_came:
                self._message_came.notify_all()

    async def wait_message(self, *types: str, since: int = 0, timeout: float = 10.0) -> dict:
        """The first audio-socket message of one of `types` at index `since` or later; raises
        TimeoutError, or ConnectionError if the socket closed without one."""

        def found() -> dict | None:
            for _, message in self.received.messages[since:]:
                if message.get("type") in types:
                    return message
            return None

        async def wait() -> dict:
            async with self._message_came:
                while (message := found()) is None:
                    if self.socket_closed.is_set():
                        raise ConnectionError(
                            f"audio socket closed ({self.socket_close_code}) before {types}"
                        )
                    await self._message_came.wait()
                return message

        return await asyncio.wait_for(wait(), timeout)

    async def wait_socket_closed(self, timeout: float = 20.0) -> int | None:
        """Until the service closes the audio socket; returns its close code."""
        await asyncio.wait_for(self.socket_closed.wait(), timeout)
        return self.socket_close_code

    async def send_pcm(
        self,
        audio: np.ndarray,
        sample_rate: int,
        *,
        chunk_ms: float = 20.0,
        realtime: bool = True,
        on_chunk: Any = None,
    ) -> None:
        """Send mono float audio as s16le chunks, paced at real time unless told otherwise."""
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        step = max(1, int(sample_rate * chunk_ms / 1000))
        start = time.monotonic()
        for i in range(0, len(pcm), step):
            if realtime:
                due = start + i / sample_rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if on_chunk is not None:
                on_chunk(i, time.monotonic())
            await self.ws.send(pcm[i : i + step].tobytes())

    async def control(self, kind: str, *, reply: str | None = None, timeout: float = 10.0) -> Any:
        """Send a control message; with `reply`, wait for that answer and return it."""
        since = len(self.received.messages)
        await self.ws.send(json.dumps({"type": kind}))
        if reply is not None:
            return await self.wait_message(reply, since=since, timeout=timeout)
        return None

    def media_started(self) -> dict[str, Any] | None:
        """The service's `media_started` event: where this receiver's pts begin."""
        found = self.received.of_type("media_started")
        return found[-1] if found else None

    def video_media_time(self, pts: int) -> float:
        """Seconds on the session's media clock (the events' `media_time_s`) of a received video
        frame; aiortc numbers pts from the first frame it got, the service says where that was."""
        origin = self.media_started()
        return (pts + (origin["video_pts"] if origin else 0)) / 90000.0

    def audio_media_time(self, pts: int) -> float:
        origin = self.media_started()
        return (pts + ((origin or {}).get("audio_pts") or 0)) / 48000.0

    # End --------------------------------------------------------------------------------------

    async def delete(self) -> None:
        if self.session_id is not None:
            with contextlib.suppress(ServiceError):
                await ahttp(
                    "DELETE", f"{self.base}/v1/sessions/{self.session_id}", token=self.token
                )

    async def close(self, *, delete: bool = True) -> None:
        """Leave: close the socket and the peer connection, optionally DELETE the session."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None
        if delete:
            await self.delete()
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # Measures ---------------------------------------------------------------------------------

    def video_fps(self, since: float, until: float) -> float:
        n = sum(1 for t, _ in self.received.video if since <= t < until)
        return n / max(1e-9, until - since)

    def receiver_holds(self) -> tuple[float, float]:
        """(video, audio) seconds aiortc's receiver holds a frame back (see the constants)."""
        fps = float(self.session.get("fps") or 25.0)
        return VIDEO_RECEIVER_HOLD_FRAMES / fps, AUDIO_RECEIVER_HOLD_S

    def media_origins(self) -> tuple[float, float]:
        """(video, audio): the arrival time (time.monotonic) at which each track's media time 0
        (its first received frame) reached this receiver, from the least-delayed frame of the
        track less the receiver's hold; a frame with pts p was due at origin + p in seconds.
        Network and decoding only add delay, so the least-delayed frame is the one on time."""
        v, a = self.received.video, self.received.audio
        hold_v, hold_a = self.receiver_holds()
        v0, a0 = v[0][1], a[0][1]
        video = min(t - (p - v0) / 90000.0 for t, p in v) - hold_v
        audio = min(t - (p - a0) / 48000.0 for t, p, _ in a) - hold_a
        return video, audio

    def av_offsets(self, window_s: float = 1.0) -> list[float]:
        """Per window of arrival time: video's delay minus audio's delay, in seconds.

        A track's delay is arrival time minus media time (pts since its first frame) minus what
        the receiver holds back; positive means video arrives later than the audio of the same
        instant. Both tracks start at the same media instant on the server's shared clock, so a
        correct stream stays near zero. The least-delayed frame of each window is used: network
        and decoding only add delay.
        """
        v, a = self.received.video, self.received.audio
        if len(v) < 2 or len(a) < 2:
            return []
        v0, a0 = v[0][1], a[0][1]
        hold_v, hold_a = self.receiver_holds()
        va = np.array([t - hold_v - (p - v0) / 90000.0 for t, p in v])  # arrival minus media
        aa = np.array([t - hold_a - (p - a0) / 48000.0 for t, p, _ in a])
        vt = np.array([t for t, _ in v])
        at = np.array([t for t, _, _ in a])
        out = []
        t = max(vt[0], at[0])
        end = min(vt[-1], at[-1])
        while t + window_s <= end:
            vm = va[(vt >= t) & (vt < t + window_s)]
            am = aa[(at >= t) & (at < t + window_s)]
            if len(vm) and len(am):
                out.append(float(vm.min() - am.min()))
            t += window_s
        return out

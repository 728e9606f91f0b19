"""A pipecat video service backed by a diffstream server: the self-hosted talking avatar.

Install with `pip install "diffstream[pipecat]"`. Put it between the TTS and the output transport:

    transport.input() → STT → user aggregator → LLM → TTS → DiffstreamVideoService
                      → transport.output() → assistant aggregator

Who sends what to whom:

    TTS ─ TTSAudioRawFrame (any rate/channels) ─▶ DiffstreamVideoService ─ PCM, "segment" on
                                                    │   ▲                   TTSStoppedFrame,
                                                    │   │                   "interrupt" ─▶ websocket
                                                    │   └─ playback events, "interrupted" ─┘
      transport.output() ◀─ OutputImageRawFrame ────┤◀─ video (WebRTC, aiortc) ◀── diffstream
                         ◀─ SpeechOutputAudioRawFrame◀─ the audio that drove it ◀┘ session

The TTS audio is consumed, never forwarded: the transport plays the audio the service sends back
with the frames it drove, so lips and voice cannot drift apart. Both tracks are put on the
session's media clock (the `media_started` event says where the receiver's pts begin) and pushed
in pts order. On an interruption the service is told at once; frames of the cut speech that were
already on their way (sent before the cut, `interrupted.media_time_s`) are dropped here.

A session that ends under the service (server restart, DELETE) is replaced once; if that fails
the service reports a non-fatal ErrorFrame and passes the TTS audio through without video, so the
conversation goes on audibly. EndFrame plays out what was sent, then closes; CancelFrame closes
at once. Everything this service starts is owned by pipecat's task manager and ends with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import aiohttp
    import websockets
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        ErrorFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        SpeechOutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
        UserStartedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"{exc.name} is missing: the pipecat integration needs the extra, "
        'pip install "diffstream[pipecat]"'
    ) from exc

VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000
MAX_QUEUED_FRAMES = 100  # per track, waiting to be pushed in pts order (a few seconds)
MAX_PENDING_AUDIO_S = 20.0  # TTS audio kept while (re)connecting; the server buffers as much
ORDER_WAIT_S = 0.5  # how long one track waits for the other before it is pushed anyway
CUT_REPLY_TIMEOUT_S = 1.0  # frames are held this long for the "interrupted" reply


class DiffstreamError(Exception):
    """The diffstream server refused or lost the session."""


@dataclass
class _Media:
    media_time: float  # seconds on the session's media clock
    frame: Frame


class _Connection:
    """One diffstream session as seen by the service: HTTP, the audio socket, the viewer."""

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.ws: Any = None
        self.pc: RTCPeerConnection | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.declared: tuple[int, int] | None = None  # (rate, channels) of the last "start"
        self.origins: dict[str, int] | None = None  # from "media_started"
        self.origin_known = asyncio.Event()
        self.lost = asyncio.Event()  # the server ended the session (not us)
        self.closing = False
        self.close_code: int | None = None


class DiffstreamVideoService(AIService):
    """Turns the TTS audio into a talking avatar on a diffstream server (see module docstring).

    Event handlers: `on_connected(service, session_id)`, `on_disconnected(service, reason)`,
    `on_playback_started(service, event)`, `on_playback_finished(service, event)` with the
    service's JSON events (`position_s`, `interrupted`: how far the user saw and heard an
    utterance before it ended or was cut).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        image: bytes | str | Path | None = None,
        prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        interrupt_on_user_speaking: bool = False,
        reconnect: bool = True,
        playout_timeout_s: float = 25.0,
        connect_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        # No model to choose: the server's model is the server's business.
        kwargs.setdefault("settings", ServiceSettings(model=None))
        super().__init__(**kwargs)
        self._url = url.rstrip("/")
        self._token = token
        self._image = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        self._options = {
            k: v
            for k, v in {"prompt": prompt, "seed": seed, "steps": steps}.items()
            if v is not None
        }
        self._interrupt_on_user_speaking = interrupt_on_user_speaking
        self._reconnect = reconnect
        self._playout_timeout_s = playout_timeout_s
        self._connect_timeout_s = connect_timeout_s

        self._http: aiohttp.ClientSession | None = None
        self._conn: _Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._pusher: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._failed = False  # gave up on the server: TTS audio passes through
        self._closed = False
        self._out_rate = 24000
        self._frame_s = 0.04  # the session's frame period, from its fps
        # TTS audio sent while no socket is up, replayed on (re)connect: (rate, channels, pcm).
        self._pending: deque[tuple[int, int, bytes]] = deque()
        self._pending_s = 0.0
        self._segment_pending = False
        # Media waiting to be pushed in pts order, and the cut of the last interruption.
        self._queues: dict[str, deque[_Media]] = {"audio": deque(), "video": deque()}
        self._last_pushed: dict[str, float] = {}
        self._media_came = asyncio.Event()
        self._push_lock = asyncio.Lock()
        self._hold_until: float | None = None  # loop time: frames held for the cut reply
        self._drop_before = float("-inf")  # media time: earlier frames belong to a cut
        self.frames_dropped = 0  # media frames of cut speech (or overflow) not pushed
        self.audio_sent_s = 0.0  # TTS audio handed to the server
        self.session_id: str | None = None
        self.reconnects = 0
        for name in (
            "on_connected",
            "on_disconnected",
            "on_playback_started",
            "on_playback_finished",
        ):
            self._register_event_handler(name)

    def can_generate_metrics(self) -> bool:
        return False

    # Lifecycle -------------------------------------------------------------------------------

    async def setup(self, setup: Any) -> None:
        await super().setup(setup)
        self._out_rate = getattr(setup, "audio_out_sample_rate", None) or self._out_rate

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self._closed = False
        self._http = aiohttp.ClientSession()
        self._pusher = self.create_task(self._push_media(), "diffstream-push")
        self._supervisor = self.create_task(self._supervise(), "diffstream-session")

    async def stop(self, frame: EndFrame) -> None:
        """Play out what the avatar was given, then close everything."""
        await super().stop(frame)
        conn = self._conn
        if conn is not None and conn.ws is not None and not conn.lost.is_set():
            with contextlib.suppress(Exception):
                await conn.ws.send(json.dumps({"type": "stop"}))
            conn.closing = True  # the server's normal close after playing out is expected
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.lost.wait(), self._playout_timeout_s)
            await self._drain_media()
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in ("_supervisor", "_pusher"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                await self.cancel_task(task)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._disconnect(conn, delete=True)
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
        self._connected.clear()
        self._pending.clear()
        self._pending_s = 0.0
        for queue in self._queues.values():
            queue.clear()

    # Frames in ------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if self._failed:
                await self.push_frame(frame, direction)  # no avatar: keep the voice
            else:
                await self._send_audio(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._send_segment()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame) or (
            self._interrupt_on_user_speaking and isinstance(frame, UserStartedSpeakingFrame)
        ):
            async with self._push_lock:  # no media frame goes out between here and the frame
                await self._interrupt()
                await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        if not frame.audio:
            return
        key = (frame.sample_rate, frame.num_channels)
        conn = self._conn
        if conn is None or conn.ws is None or not self._connected.is_set():
            seconds = len(frame.audio) / (2 * frame.num_channels * frame.sample_rate)
            self._pending.append((*key, frame.audio))
            self._pending_s += seconds
            while self._pending_s > MAX_PENDING_AUDIO_S and self._pending:
                rate, channels, pcm = self._pending.popleft()
                self._pending_s -= len(pcm) / (2 * channels * rate)
            return
        try:
            await self._declare(conn, *key)
            await conn.ws.send(frame.audio)
            self.audio_sent_s += len(frame.audio) / (2 * frame.num_channels * frame.sample_rate)
        except websockets.ConnectionClosed:
            conn.lost.set()

    async def _declare(self, conn: _Connection, rate: int, channels: int) -> None:
        """(Re)declare the PCM format when the TTS changes it; the server resamples."""
        if conn.declared != (rate, channels):
            start = {"type": "start", "sample_rate": rate, "channels": channels, "format": "s16le"}
            if self._token:
                start["token"] = self._token
            await conn.ws.send(json.dumps(start))
            conn.declared = (rate, channels)

    async def _send_segment(self) -> None:
        conn = self._conn
        if conn is None or conn.ws is None or not self._connected.is_set():
            self._segment_pending = bool(self._pending)
            return
        with contextlib.suppress(websockets.ConnectionClosed):
            await conn.ws.send(json.dumps({"type": "segment"}))

    async def _interrupt(self) -> None:
        """Tell the server, hold what arrives until it says where it cut, forget what waits."""
        self._pending.clear()
        self._pending_s = 0.0
        self._segment_pending = False
        conn = self._conn
        if conn is None or conn.ws is None or not self._connected.is_set():
            return
        self._hold_until = asyncio.get_running_loop().time() + CUT_REPLY_TIMEOUT_S
        try:
            await conn.ws.send(json.dumps({"type": "interrupt"}))
        except websockets.ConnectionClosed:
            conn.lost.set()
            self._hold_until = None

    def _cut_at(self, media_time: float | None) -> None:
        """The server's cut: what was shown before it is cut speech, still on its way here."""
        if media_time is not None:
            self._drop_before = max(self._drop_before, media_time)
        else:  # the clock had not started: nothing was shown, nothing is on its way
            self._drop_before = max(self._drop_before, self._newest_media())
        self._hold_until = None
        self._media_came.set()

    def _newest_media(self) -> float:
        times = [q[-1].media_time for q in self._queues.values() if q]
        return max([*times, *self._last_pushed.values(), float("-inf")])

    # Session ----------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep one session: connect, wait until it is lost, replace it once, else give up."""
        attempts_left = 1 if self._reconnect else 0
        first = True
        while not self._closed:
            conn = _Connection()
            self._conn = conn
            try:
                await asyncio.wait_for(self._connect(conn), self._connect_timeout_s)
            except (Exception, asyncio.TimeoutError) as exc:
                await self._disconnect(conn, delete=True)
                self._conn = None
                if attempts_left > 0 and not first:
                    attempts_left -= 1
                    continue
                await self._give_up(f"cannot open a diffstream session at {self._url}: {exc}")
                return
            first = False
            attempts_left = 1 if self._reconnect else 0
            self._connected.set()
            await self._call_event_handler("on_connected", conn.session_id)
            await self._flush_pending(conn)
            await conn.lost.wait()
            self._connected.clear()
            reason = f"session ended (close code {conn.close_code})"
            await self._call_event_handler("on_disconnected", reason)
            if conn.closing or self._closed:
                return
            await self._disconnect(conn, delete=True)
            self._conn = None
            if attempts_left <= 0:
                await self._give_up(f"the diffstream session ended: {reason}")
                return
            attempts_left -= 1
            self.reconnects += 1
            # Frames of the old session carry its clock; the new one starts its own.
            for queue in self._queues.values():
                queue.clear()
            self._last_pushed.clear()
            self._drop_before = float("-inf")
            self._hold_until = None

    async def _give_up(self, message: str) -> None:
        self._failed = True
        self._pending.clear()
        self._pending_s = 0.0
        await self.push_frame(
            ErrorFrame(error=f"{message}; speaking without the avatar"), FrameDirection.UPSTREAM
        )

    async def _connect(self, conn: _Connection) -> None:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        body: dict[str, Any] = dict(self._options)
        if self._image is not None:
            body["image_base64"] = base64.b64encode(self._image).decode()
        async with self._http.post(
            f"{self._url}/v1/sessions", json=body or None, headers=headers
        ) as resp:
            created = await _json_or_raise(resp, "creating a session")
        conn.session_id = self.session_id = created["session_id"]
        self._frame_s = 1.0 / float(created.get("fps") or 25.0)

        # The audio socket first, so the service tells us where the viewer's tracks begin.
        ws_url = self._url.replace("http", "ws", 1) + f"/v1/sessions/{conn.session_id}/audio"
        if self._token:
            ws_url += f"?token={self._token}"
        conn.ws = await websockets.connect(ws_url, max_size=2**22)
        await self._declare(conn, self._out_rate, 1)
        conn.tasks.append(self.create_task(self._read_events(conn), "diffstream-events"))

        pc = RTCPeerConnection()
        conn.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")

        @pc.on("track")
        def _on_track(track: Any) -> None:
            reader = self._read_video if track.kind == "video" else self._read_audio
            conn.tasks.append(self.create_task(reader(conn, track), f"diffstream-{track.kind}"))

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not conn.closing:
                conn.lost.set()

        await pc.setLocalDescription(await pc.createOffer())
        async with self._http.post(
            f"{self._url}/v1/sessions/{conn.session_id}/offer",
            json={"sdp": pc.localDescription.sdp, "type": "offer"},
            headers=headers,
        ) as resp:
            answer = await _json_or_raise(resp, "answering the offer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def _disconnect(self, conn: _Connection, *, delete: bool) -> None:
        conn.closing = True
        if conn.ws is not None:
            with contextlib.suppress(Exception):
                await conn.ws.close()
        if conn.pc is not None:
            with contextlib.suppress(Exception):
                await conn.pc.close()
        for task in conn.tasks:
            await self.cancel_task(task)
        conn.tasks.clear()
        if delete and conn.session_id is not None and self._http is not None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            with contextlib.suppress(Exception):
                async with self._http.delete(
                    f"{self._url}/v1/sessions/{conn.session_id}",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=5),
                ):
                    pass

    async def _flush_pending(self, conn: _Connection) -> None:
        pending, self._pending = self._pending, deque()
        self._pending_s = 0.0
        try:
            for rate, channels, pcm in pending:
                await self._declare(conn, rate, channels)
                await conn.ws.send(pcm)
            if self._segment_pending:
                await conn.ws.send(json.dumps({"type": "segment"}))
        except websockets.ConnectionClosed:
            conn.lost.set()
        self._segment_pending = False

    async def _read_events(self, conn: _Connection) -> None:
        try:
            async for raw in conn.ws:
                if not isinstance(raw, str):
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                kind = event.get("type")
                if kind == "media_started":
                    conn.origins = event
                    conn.origin_known.set()
                elif kind == "interrupted":
                    self._cut_at(event.get("media_time_s"))
                elif kind == "playback_started":
                    await self._call_event_handler("on_playback_started", event)
                elif kind == "playback_finished":
                    await self._call_event_handler("on_playback_finished", event)
                elif kind == "error":
                    await self.push_frame(
                        ErrorFrame(error=f"diffstream: {event.get('message')}"),
                        FrameDirection.UPSTREAM,
                    )
        except websockets.ConnectionClosed:
            pass
        finally:
            conn.close_code = conn.ws.close_code
            conn.lost.set()

    # Media out --------------------------------------------------------------------------------

    async def _origin(self, conn: _Connection, track: str) -> int:
        """Where this receiver's pts begin on the media clock (0 if the server never said)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(conn.origin_known.wait(), 2.0)
        value = (conn.origins or {}).get(f"{track}_pts")
        return int(value) if value is not None else 0

    async def _read_video(self, conn: _Connection, track: Any) -> None:
        origin = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if origin is None:
                    origin = await self._origin(conn, "video")
                media_time = (frame.pts + origin) / VIDEO_CLOCK
                image = frame.to_ndarray(format="rgb24")
                out = OutputImageRawFrame(
                    image=image.tobytes(), size=(image.shape[1], image.shape[0]), format="RGB"
                )
                out.pts = round(media_time * 1e9)
                self._enqueue("video", _Media(media_time, out))

    async def _read_audio(self, conn: _Connection, track: Any) -> None:
        origin = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if origin is None:
                    origin = await self._origin(conn, "audio")
                media_time = (frame.pts + origin) / AUDIO_CLOCK
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                mono = pcm.reshape(-1, channels)[:, 0] if channels > 1 else pcm.reshape(-1)
                if mono.dtype != np.int16:
                    mono = (np.clip(mono, -1, 1) * 32767).astype(np.int16)
                out = SpeechOutputAudioRawFrame(
                    audio=mono.tobytes(), sample_rate=frame.sample_rate, num_channels=1
                )
                out.pts = round(media_time * 1e9)
                self._enqueue("audio", _Media(media_time, out))

    def _enqueue(self, track: str, media: _Media) -> None:
        queue = self._queues[track]
        queue.append(media)
        while len(queue) > MAX_QUEUED_FRAMES:
            queue.popleft()
            self.frames_dropped += 1
        self._media_came.set()

    async def _push_media(self) -> None:
        """Push both tracks in pts order; a track waits for the other at most ORDER_WAIT_S."""
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        while True:
            item = None
            if self._hold_until is not None and loop.time() >= self._hold_until:
                self._cut_at(None)  # no reply came: drop everything received so far
            if self._hold_until is None:
                item, waiting_since = self._next_media(loop.time(), waiting_since)
            if item is None:
                self._media_came.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._media_came.wait(), 0.02)
                continue
            async with self._push_lock:
                if self._hold_until is not None:
                    continue  # an interruption came in while we waited for the lock
                track, media = item
                self._queues[track].popleft()
                if media.media_time < self._drop_before:
                    self.frames_dropped += 1
                    continue
                self._last_pushed[track] = media.media_time
                await self.push_frame(media.frame)

    def _next_media(
        self, now: float, waiting_since: float | None
    ) -> tuple[tuple[str, _Media] | None, float | None]:
        audio, video = self._queues["audio"], self._queues["video"]
        if audio and video:
            track = "audio" if audio[0].media_time <= video[0].media_time else "video"
            return (track, self._queues[track][0]), None
        if not audio and not video:
            return None, None
        track, other = ("audio", "video") if audio else ("video", "audio")
        head = self._queues[track][0]
        if head.media_time < self._drop_before:
            return (track, head), None  # about to be dropped anyway
        # The other track's next frame is due right after the last one pushed.
        step = self._frame_s if other == "video" else 0.02
        last_other = self._last_pushed.get(other)
        if last_other is not None and head.media_time <= last_other + step:
            return (track, head), None
        if waiting_since is None:
            return None, now
        if now - waiting_since >= ORDER_WAIT_S:
            # The other track stalled: this one goes on alone until the other is back.
            return (track, head), waiting_since
        return None, waiting_since

    async def _drain_media(self) -> None:
        """Give the pusher a moment to send what arrived before the end."""
        deadline = time.monotonic() + 1.0
        while any(self._queues.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


async def _json_or_raise(resp: aiohttp.ClientResponse, doing: str) -> dict[str, Any]:
    text = await resp.text()
    if resp.status >= 400:
        try:
            detail = json.loads(text).get("detail", text)
        except ValueError:
            detail = text
        raise DiffstreamError(f"{doing}: HTTP {resp.status}: {detail}")
    return json.loads(text)

"""The audio websocket edge: handshake checks, control messages, PCM into the session's ingest.

Every client mistake becomes a `ProtocolError` (or the project's InvalidAudioError) answered with
an `{"type":"error"}` message and a close code; it ends this socket only, never the session, so
a client can reconnect and the avatar keeps idling meanwhile.

Everything the service says on the socket (replies, playback events, the closing error) goes
through one bounded outbox and one writer task, so messages keep their order and the media
path that raises an event never waits on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from models.errors import InvalidAudioError
from stream.ingest import AudioIngest
from stream.metrics import ServiceMetrics
from stream.playback import TooManyUtterances
from stream.protocol import (
    AuthMessage,
    CloseCode,
    InterruptMessage,
    ProtocolError,
    SegmentMessage,
    StartMessage,
    StopMessage,
    error_message,
    parse_control,
)
from stream.sessions import Session
from stream.settings import Settings

log = logging.getLogger(__name__)

MAX_OUTBOX = 256  # messages waiting for a client that does not read; beyond, the oldest go
FLUSH_TIMEOUT_S = 2.0  # how long a closing socket waits for its outbox to reach the client


def origin_allowed(websocket: WebSocket, allowed: list[str]) -> bool:
    """Browsers send Origin; allow same-origin pages and the configured list."""
    origin = websocket.headers.get("origin")
    if origin is None or not allowed or "*" in allowed or origin in allowed:
        return True
    return urlparse(origin).netloc == websocket.headers.get("host")


async def deny(websocket: WebSocket, status: int, reason: str) -> None:
    """Refuse the websocket handshake with an HTTP status (or a close code if unsupported)."""
    try:
        await websocket.send_denial_response(JSONResponse({"detail": reason}, status_code=status))
    except RuntimeError:
        await websocket.close(code=4000 + status, reason=reason[:120])


class AudioSocket:
    """One audio websocket of a session: parses control messages, feeds PCM to the ingest."""

    def __init__(
        self,
        websocket: WebSocket,
        session: Session,
        settings: Settings,
        metrics: ServiceMetrics,
        *,
        authed: bool,
    ) -> None:
        self.ws = websocket
        self.session = session
        self.ingest: AudioIngest = session.ingest
        self.limit = settings.max_message_bytes
        self.metrics = metrics
        self.authed = authed
        self.ready = False  # replied to "start" or "auth": unsolicited events may follow
        self._media_announced = False
        self._outbox: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._closed = asyncio.Event()  # close() has sent the close frame
        self._writer: asyncio.Task[None] | None = None

    # Outgoing ---------------------------------------------------------------------------------

    def post(self, message: dict[str, Any]) -> None:
        """Queue a message for the client (never blocks; the oldest go when a client stops
        reading, counted as client errors of kind "events_dropped")."""
        if self._closing:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.metrics.client_errors.labels(kind="events_dropped").inc()
        self._outbox.append(message)
        self._idle.clear()
        self._wake.set()

    def announce_media(self, event: dict[str, Any] | None) -> None:
        """Tell the client where the viewer's tracks start on the media clock, once, after its
        first reply (so a client reading replies in step never meets an event first)."""
        if event is not None and self.ready and not self._media_announced:
            self._media_announced = True
            self.post(event)

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._outbox:
                    await self.ws.send_json(self._outbox.popleft())
                self._idle.set()
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            self._outbox.clear()
            self._idle.set()

    async def close(self, code: int, reason: str, error: str | None = None) -> None:
        """Send what is queued (and `error`, if any), then close; safe to call twice."""
        if self._closing:
            return
        if error is not None:
            self.post(error_message(error))
        self._closing = True
        try:
            if self._writer is not None and not self._writer.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), FLUSH_TIMEOUT_S)
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, reason=reason[:120])
        finally:
            self._closed.set()

    # Incoming ---------------------------------------------------------------------------------

    async def run(self, token_ok: Callable[[str | None], bool]) -> None:
        session = self.session
        session.audio_socket = self
        session.touch()
        self._writer = asyncio.ensure_future(self._write())
        try:
            while not session.closed:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data: bytes | None = message.get("bytes")
                text: str | None = message.get("text")
                size = len(data) if data is not None else len((text or "").encode())
                if size > self.limit:
                    raise ProtocolError(
                        CloseCode.TOO_BIG,
                        f"message of {size} bytes is over the {self.limit}-byte limit; "
                        "send audio in smaller chunks (20-100 ms each)",
                        "too_big",
                    )
                if text is not None:
                    await self._control(parse_control(text), token_ok)
                elif data is not None:
                    await self._audio(data)
            if session.closed:
                # The session is ending: it closes this socket with its reason (after the
                # events still queued); returning first would drop the connection unclosed.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), 2 * FLUSH_TIMEOUT_S + 5)
        except ProtocolError as exc:
            self.metrics.client_errors.labels(kind=exc.kind).inc()
            await self.close(exc.code, exc.message, error=exc.message)
        except InvalidAudioError as exc:
            self.metrics.client_errors.labels(kind="invalid_audio").inc()
            await self.close(CloseCode.POLICY, str(exc), error=str(exc))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass  # the client went away; the session idles on silence
        finally:
            self._closing = True
            # The slot first, with no await before it: a client that reconnects right after
            # closing must find the session free.
            if session.audio_socket is self:
                session.audio_socket = None
                session.socket_gone()
                session.touch()
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)

    async def _control(self, message: Any, token_ok: Callable[[str | None], bool]) -> None:
        if not self.authed:
            given = getattr(message, "token", None)
            if not token_ok(given):
                raise ProtocolError(
                    CloseCode.UNAUTHORIZED,
                    "missing or wrong token: pass ?token= or send it in the first message",
                    "unauthorized",
                )
            self.authed = True
        if isinstance(message, AuthMessage):
            self.post({"type": "authenticated"})
            self._ready()
        elif isinstance(message, StartMessage):
            self.ingest.start(message)
            self.post(
                {
                    "type": "started",
                    "sample_rate": message.sample_rate,
                    "channels": message.channels,
                    "format": message.format,
                    "model_sample_rate": self.ingest.model_rate,
                }
            )
            self._ready()
        elif isinstance(message, InterruptMessage):
            dropped, resume_s = self.session.interrupt()
            self.post({"type": "interrupted", "dropped_frames": dropped, "media_time_s": resume_s})
        elif isinstance(message, SegmentMessage):
            try:
                ended = self.session.end_segment()
            except TooManyUtterances as exc:
                raise ProtocolError(CloseCode.POLICY, str(exc), "too_many_segments") from None
            self.post({"type": "segment_ended", **ended})
        elif isinstance(message, StopMessage):
            self.session.stop_audio()
            self.post({"type": "stopping"})

    def _ready(self) -> None:
        self.ready = True
        self.announce_media(self.session.media_started_event())

    async def _audio(self, data: bytes) -> None:
        if not self.authed:
            raise ProtocolError(
                CloseCode.UNAUTHORIZED, "authenticate before sending audio", "unauthorized"
            )
        if not self.ingest.started:
            raise ProtocolError(
                CloseCode.POLICY,
                'binary audio arrived before the "start" message; send '
                '{"type":"start","sample_rate":N,"channels":1,"format":"s16le"} first',
                "audio_before_start",
            )
        await self.ingest.wait_for_room()
        if self.session.closed:
            return
        self.ingest.push(data)
        self.metrics.audio_bytes.inc(len(data))
        self.session.scheduler.wake()

"""The audio websocket edge: handshake checks, control messages, PCM into the session's ingest.

Every client mistake becomes a `ProtocolError` (or the project's InvalidAudioError) answered with
an `{"type":"error"}` message and a close code; it ends this socket only, never the session, so
a client can reconnect and the avatar keeps idling meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from models.errors import InvalidAudioError
from stream.ingest import AudioIngest
from stream.metrics import ServiceMetrics
from stream.protocol import (
    AuthMessage,
    CloseCode,
    InterruptMessage,
    ProtocolError,
    StartMessage,
    StopMessage,
    error_message,
    parse_control,
)
from stream.sessions import Session
from stream.settings import Settings


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

    async def run(self, token_ok: Callable[[str | None], bool]) -> None:
        session = self.session
        session.audio_socket = self.ws
        session.touch()
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
        except ProtocolError as exc:
            self.metrics.client_errors.labels(kind=exc.kind).inc()
            await self._end(exc.code, exc.message)
        except InvalidAudioError as exc:
            self.metrics.client_errors.labels(kind="invalid_audio").inc()
            await self._end(CloseCode.POLICY, str(exc))
        except (WebSocketDisconnect, RuntimeError, ConnectionError):
            pass  # the client went away; the session idles on silence
        finally:
            if session.audio_socket is self.ws:
                session.audio_socket = None
                session.touch()

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
            await self.ws.send_json({"type": "authenticated"})
        elif isinstance(message, StartMessage):
            self.ingest.start(message)
            await self.ws.send_json(
                {
                    "type": "started",
                    "sample_rate": message.sample_rate,
                    "channels": message.channels,
                    "format": message.format,
                    "model_sample_rate": self.ingest.model_rate,
                }
            )
        elif isinstance(message, InterruptMessage):
            dropped = self.session.interrupt()
            await self.ws.send_json({"type": "interrupted", "dropped_frames": dropped})
        elif isinstance(message, StopMessage):
            self.session.stop_audio()
            await self.ws.send_json({"type": "stopping"})

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

    async def _end(self, code: int, message: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_json(error_message(message))
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=message[:120])

"""The client-facing vocabulary: websocket control messages, close codes and HTTP bodies.

Everything a client can send is parsed here into a typed message or rejected with a
`ProtocolError` that carries the close code and a sentence the client can act on, so the socket
handler stays a short dispatch and every bad input gets the same treatment.
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
# A video side in pixels, as the server's --width/--height take it (stream.settings); a session
# asks for the server's own size or omits it, and anything out of this range is a 422.
MIN_SIDE, MAX_SIDE = 16, 4096
MAX_SDP_CHARS = 200_000  # an offer's SDP; a browser's is a few kB
# The most bytes of an offer's JSON body the server reads: the SDP with every character
# escaped (`\uXXXX`, 6 bytes) plus room for the rest. Over it: a 413, the rest left unread.
MAX_OFFER_BYTES = 6 * MAX_SDP_CHARS + 4096


class CloseCode:
    """Websocket close codes: RFC 6455 where one fits, 4000 + HTTP status otherwise."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    UNAUTHORIZED = 4401
    NOT_FOUND = 4404
    CONFLICT = 4409
    SESSION_ENDED = 4410


class ProtocolError(Exception):
    """A client message that ends its websocket: the close code and the reason to send."""

    def __init__(self, code: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind


class StartMessage(BaseModel):
    """Declares the PCM that follows as binary messages."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["start"]
    sample_rate: int
    channels: Literal[1, 2] = 1
    format: Literal["s16le", "f32le"] = "s16le"
    token: str | None = None


class AuthMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["auth"]
    token: str


class InterruptMessage(BaseModel):
    """Drop queued audio and every block not yet shown (a voice agent cutting the avatar off)."""

    type: Literal["interrupt"]


class StopMessage(BaseModel):
    """No more audio: play out what is queued, then end the session."""

    type: Literal["stop"]


class SegmentMessage(BaseModel):
    """The audio sent since the previous marker (or start, or interrupt) is one utterance: the
    service reports when the viewer has been shown all of it (`playback_finished`)."""

    type: Literal["segment"]


ControlMessage = StartMessage | AuthMessage | InterruptMessage | StopMessage | SegmentMessage
_BY_TYPE: dict[str, type[BaseModel]] = {
    "start": StartMessage,
    "auth": AuthMessage,
    "interrupt": InterruptMessage,
    "stop": StopMessage,
    "segment": SegmentMessage,
}


def parse_control(text: str) -> ControlMessage:
    """Parse one JSON text message; raises ProtocolError saying what is wrong with it."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD,
            "control message nests too deeply; send a flat JSON object",
            "malformed_json",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD,
            f"malformed JSON control message ({exc.msg} at position {exc.pos})"
            if isinstance(exc, json.JSONDecodeError)
            else "control message is not UTF-8 text",
            "malformed_json",
        ) from None
    except ValueError as exc:  # an integer of over 4300 digits (int's conversion limit)
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD, f"malformed JSON control message ({exc})", "malformed_json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError(
            CloseCode.INVALID_PAYLOAD,
            'a control message must be a JSON object with a string "type"',
            "malformed_json",
        )
    kind = data["type"]
    model = _BY_TYPE.get(kind)
    if model is None:
        raise ProtocolError(
            CloseCode.POLICY,
            f"unknown message type {kind!r}; expected one of {', '.join(_BY_TYPE)}",
            "unknown_type",
        )
    if kind == "start":
        _check_start_fields(data)
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ProtocolError(
            CloseCode.POLICY, f"invalid {kind} message: {problems}", "invalid_message"
        ) from None


def _check_start_fields(data: dict) -> None:
    """Name the usual mistakes in a start message before generic validation does."""
    fmt = data.get("format", "s16le")
    if fmt not in ("s16le", "f32le"):
        raise ProtocolError(
            CloseCode.UNSUPPORTED_DATA,
            f"unknown audio format {fmt!r}; send PCM as 's16le' or 'f32le'",
            "unknown_format",
        )
    rate = data.get("sample_rate")
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or (isinstance(rate, float) and not math.isfinite(rate))  # NaN, Infinity: int() raises
        or rate != int(rate)
    ):
        raise ProtocolError(
            CloseCode.POLICY,
            f"sample_rate must be an integer number of Hz, got {rate!r}",
            "bad_sample_rate",
        )
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            CloseCode.POLICY,
            f"sample_rate {int(rate)} Hz is out of range; use {MIN_SAMPLE_RATE} to "
            f"{MAX_SAMPLE_RATE} Hz",
            "bad_sample_rate",
        )
    channels = data.get("channels", 1)
    if channels not in (1, 2) or isinstance(channels, bool):
        raise ProtocolError(
            CloseCode.POLICY,
            f"channels must be 1 (mono) or 2 (interleaved stereo), got {channels!r}",
            "bad_channels",
        )


def error_message(message: str) -> dict[str, str]:
    """The JSON sent before a close, so clients that ignore close reasons still see why."""
    return {"type": "error", "message": message}


class SessionOptions(BaseModel):
    """Options of POST /v1/sessions besides the image (JSON body or multipart fields)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=64)
    sink_refresh: bool | None = Field(
        None, description="replace the sink by the first generated frame (omitted: the model's)"
    )
    prompt: str | None = Field(
        None,
        max_length=4000,
        description="text prompt for models that take one (Live Avatar); omitted: the server's",
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="must be the server's width (or omit it); pixels, within the range",
    )
    height: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="must be the server's height (or omit it); pixels, within the range",
    )
    image_base64: str | None = Field(
        None, description="reference image, base64 (PNG/JPEG/WebP); omitted: the default avatar"
    )


class SessionCreated(BaseModel):
    session_id: str
    width: int
    height: int
    fps: float
    audio_sample_rate: int
    offer_url: str
    audio_url: str
    ice_servers: list[dict]
    # The loaded model's reference check (models/reference_check.py); null for models without
    # one. A warning does not refuse the session: it says the picture will likely be poor.
    reference_score: float | None = None
    reference_warning: str | None = None


class SessionInfo(BaseModel):
    session_id: str
    state: str
    age_s: float
    viewer: str | None
    audio_connected: bool
    blocks: int
    frames_sent: int
    dropped_frames: int
    dropped_blocks: int


class ErrorBody(BaseModel):
    """Every HTTP error answer: a sentence saying what is wrong and what to change."""

    detail: str


class QuotaBody(ErrorBody):
    """A 429: which of the client's limits, and when to come back (also `Retry-After`)."""

    limit: str
    retry_after_s: int


class Offer(BaseModel):
    sdp: str = Field(..., max_length=MAX_SDP_CHARS)
    type: Literal["offer"]


class Answer(BaseModel):
    sdp: str
    type: Literal["answer"]

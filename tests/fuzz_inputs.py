"""Hostile inputs for the fuzz tests (tests/test_fuzz_api.py, tests/test_fuzz_service.py):
hypothesis strategies for SDP offers, reference images and audio-socket messages, and the
hand-made ones (a PNG declaring 50000x50000 pixels, a real offer to truncate).

Nothing here talks to a server; the tests send these and check the answers.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import struct
import zlib
from typing import Any

from hypothesis import strategies as st
from PIL import Image

TOKEN = "fuzz-token"

# Close codes docs/service.md promises on the audio socket (stream.protocol.CloseCode).
DOCUMENTED_CLOSE_CODES = {1000, 1001, 1003, 1007, 1008, 1009, 1011, 4401, 4410}


# SDP ---------------------------------------------------------------------------------------------


@functools.cache
def real_offer(*, video: bool = True, audio: bool = True, channel: bool = True) -> str:
    """An offer as aiortc (so a browser) makes it: recvonly transceivers and the stats channel."""
    from aiortc import RTCPeerConnection

    async def make() -> str:
        pc = RTCPeerConnection()
        if video:
            pc.addTransceiver("video", direction="recvonly")
        if audio:
            pc.addTransceiver("audio", direction="recvonly")
        if channel:
            pc.createDataChannel("stats")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def _lines(sdp: str) -> list[str]:
    return [line for line in sdp.split("\r\n") if line]


def _join(lines: list[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


def _without_video(sdp: str) -> str:
    """The offer with its video m-section (and the BUNDLE group naming it) cut out."""
    out: list[str] = []
    skipping = False
    for line in _lines(sdp):
        if line.startswith("m="):
            skipping = line.startswith("m=video")
        if not skipping and not line.startswith("a=group:BUNDLE"):
            out.append(line)
    return _join(out)


def _video_direction(sdp: str, direction: str) -> str:
    out: list[str] = []
    in_video = False
    for line in _lines(sdp):
        if line.startswith("m="):
            in_video = line.startswith("m=video")
        if in_video and line in ("a=recvonly", "a=sendrecv", "a=sendonly", "a=inactive"):
            line = f"a={direction}"
        out.append(line)
    return _join(out)


SDP_LINE = st.one_of(
    st.sampled_from(
        [
            "v=0",
            "o=- 1 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "m=video -1 UDP/TLS/RTP/SAVPF x",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "m=application 9 DTLS/SCTP 5000",
            "c=IN IP4 0.0.0.0",
            "a=recvonly",
            "a=rtpmap:96 VP8/90000",
            "a=rtpmap:96",
            "a=rtpmap:abc VP8/notanumber",
            "a=fmtp:96 x",
            "a=ice-ufrag:",
            "a=ice-pwd:x",
            "a=fingerprint:sha-256 zz",
            "a=setup:bogus",
            "a=mid:",
            "a=ssrc:notanumber cname:x",
            "a=candidate:1 1 udp 1 999.1.1.1 99999 typ host",
            "a=candidate:garbage",
            "a=group:BUNDLE 0 1 2",
            "a=rtcp-fb:96 nack",
            "a=extmap:x urn:x",
        ]
    ),
    st.text(max_size=80).map(lambda s: s.replace("\r", "").replace("\n", "")),
)


@st.composite
def sdp_offers(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON body for POST /v1/sessions/{id}/offer: mostly broken offers, some fine ones."""
    real = real_offer()
    kind = draw(
        st.sampled_from(
            [
                "garbage",
                "sdp_lines",
                "truncated",
                "dropped_lines",
                "mutated_line",
                "no_video",
                "video_sendonly",
                "huge",
                "real",
            ]
        )
    )
    if kind == "garbage":
        sdp = draw(st.text(max_size=500))
    elif kind == "sdp_lines":
        sdp = _join(["v=0", *draw(st.lists(SDP_LINE, max_size=30))])
    elif kind == "truncated":
        sdp = real[: draw(st.integers(0, len(real)))]
    elif kind == "dropped_lines":
        lines = _lines(real)
        keep = draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
        sdp = _join([line for line, k in zip(lines, keep, strict=True) if k])
    elif kind == "mutated_line":
        lines = _lines(real)
        i = draw(st.integers(1, len(lines) - 1))
        lines[i] = draw(SDP_LINE)
        sdp = _join(lines)
    elif kind == "no_video":
        sdp = _without_video(real)
        if draw(st.booleans()):
            sdp = real_offer(video=False, audio=draw(st.booleans()), channel=True)
    elif kind == "video_sendonly":
        sdp = _video_direction(real, draw(st.sampled_from(["sendonly", "inactive"])))
    elif kind == "huge":
        # Around the 200,000-character limit of the Offer model, on both sides of it.
        n = draw(st.sampled_from([10_000, 190_000, 200_001, 1_000_000]))
        filler = "a=x-filler:" + "z" * 60 + "\r\n"
        sdp = real + filler * (n // len(filler) + 1)
    else:
        sdp = real
    body: dict[str, Any] = {"sdp": sdp, "type": "offer"}
    odd = draw(st.sampled_from(["none", "none", "none", "type", "sdp_type", "missing", "extra"]))
    if odd == "type":
        body["type"] = draw(st.one_of(st.just("answer"), st.none(), st.integers(), st.text()))
    elif odd == "sdp_type":
        body["sdp"] = draw(st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=2)))
    elif odd == "missing":
        del body[draw(st.sampled_from(["sdp", "type"]))]
    elif odd == "extra":
        body["extra"] = draw(st.text(max_size=10))
    return body


# Images ------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, *, idat: bytes | None = None) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height RGB
    pixels: a decompression bomb if anything decodes it before checking the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if idat is None:  # a few rows of zeros, compressed: a decoder would pad the rest
        idat = zlib.compress(b"\0" * (1 + 3 * min(width, 4096)) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def encoded_image(fmt: str, mode: str, size: tuple[int, int] = (48, 40)) -> bytes:
    img = Image.new("RGB", size, (200, 120, 90)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# (format, mode) pairs PIL writes; the upload path must read each or say why not.
IMAGE_KINDS = [
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "P"),
    ("PNG", "L"),
    ("PNG", "LA"),
    ("PNG", "1"),
    ("PNG", "I;16"),
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("GIF", "P"),
    ("BMP", "RGB"),
    ("TIFF", "RGB"),
    ("TIFF", "F"),
    ("TIFF", "I;16"),
    ("TIFF", "CMYK"),
    ("TIFF", "YCbCr"),
    ("ICO", "RGBA"),
    ("PPM", "RGB"),
    ("TGA", "RGB"),
]


@st.composite
def image_uploads(draw: st.DrawFn) -> bytes:
    """Image bytes: real ones in many formats and modes, truncated, bit-flipped, bombs."""
    kind = draw(st.sampled_from(["real", "truncated", "flipped", "bomb", "garbage", "declared"]))
    if kind == "garbage":
        return draw(st.binary(max_size=2000))
    if kind == "bomb":
        w = draw(st.sampled_from([50_000, 8193, 65535, 2**31 - 1, 100_000]))
        h = draw(st.sampled_from([50_000, 16, 8193, 65535, 2**31 - 1]))
        return png_declaring(w, h)
    if kind == "declared":
        return png_declaring(
            draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 2**32 - 1)),
            idat=draw(st.binary(max_size=64)),
        )
    fmt, mode = draw(st.sampled_from(IMAGE_KINDS))
    size = (draw(st.integers(16, 64)), draw(st.integers(16, 64)))
    data = encoded_image(fmt, mode, size)
    if kind == "truncated":
        return data[: draw(st.integers(1, len(data) - 1))]
    if kind == "flipped":
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return bytes(raw)
    return data


# Audio socket --------------------------------------------------------------------------------------

_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def control_messages(draw: st.DrawFn) -> str:
    """One text message: valid controls, the same with odd fields and types, and non-JSON."""
    kind = draw(
        st.sampled_from(
            [
                "start",
                "start",
                "start_odd",
                "auth",
                "interrupt",
                "stop",
                "segment",
                "odd_fields",
                "unknown",
                "not_object",
                "malformed",
                "nested",
                "bignum",
            ]
        )
    )
    if kind == "start":
        msg: dict[str, Any] = {
            "type": "start",
            "sample_rate": draw(st.sampled_from([8000, 16000, 22050, 44100, 48000, 192000])),
            "channels": draw(st.sampled_from([1, 2])),
            "format": draw(st.sampled_from(["s16le", "f32le"])),
        }
        if draw(st.booleans()):
            msg["token"] = draw(st.sampled_from([TOKEN, "wrong"]))
        return _dumps(msg)
    if kind == "start_odd":
        msg = {"type": "start"}
        for field in draw(
            st.lists(st.sampled_from(["sample_rate", "channels", "format", "token"]))
        ):
            msg[field] = draw(_ODD_VALUES)
        return _dumps(msg)
    if kind == "auth":
        token = draw(st.one_of(st.just(TOKEN), st.just("wrong"), _ODD_VALUES))
        return _dumps({"type": "auth", "token": token})
    if kind in ("interrupt", "stop", "segment"):
        msg = {"type": kind}
        if draw(st.booleans()):
            msg[draw(st.text(max_size=8))] = draw(_ODD_VALUES)
        return _dumps(msg)
    if kind == "odd_fields":
        msg = draw(st.dictionaries(st.text(max_size=8), _ODD_VALUES, max_size=4))
        msg["type"] = draw(st.one_of(st.sampled_from(["start", "auth", "stop"]), _ODD_VALUES))
        return _dumps(msg)
    if kind == "unknown":
        return _dumps({"type": draw(st.text(max_size=12))})
    if kind == "not_object":
        return _dumps(draw(st.one_of(_ODD_VALUES, st.lists(st.text(max_size=3), max_size=3))))
    if kind == "nested":  # deep nesting: the JSON parser's recursion, not a size limit
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return "[" * depth + "]" * depth
    if kind == "bignum":  # over int()'s 4300-digit limit for decimal strings
        return '{"type": "start", "sample_rate": ' + "9" * draw(st.sampled_from([400, 5000])) + "}"
    return draw(st.text(max_size=40))


@st.composite
def pcm_messages(draw: st.DrawFn) -> bytes:
    """Binary PCM of every length, odd ones included, including NaN and infinity as f32."""
    kind = draw(st.sampled_from(["odd", "any", "nan", "empty"]))
    if kind == "empty":
        return b""
    if kind == "nan":
        values = draw(
            st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3.4e38, 0.5]))
        )
        return struct.pack(f"<{len(values)}f", *values) + draw(st.binary(max_size=3))
    if kind == "odd":
        n = draw(st.integers(0, 600)) * 2 + 1
        return draw(st.binary(min_size=n, max_size=n))
    return draw(st.binary(max_size=4000))


def socket_messages() -> st.SearchStrategy[list[str | bytes]]:
    """A sequence of audio-socket messages, in any order (start, stop, interrupt mixed)."""
    return st.lists(st.one_of(control_messages(), pcm_messages()), max_size=8)

"""Sessions as a resource: create, list, read and end them, and answer a viewer's SDP offer."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from models.errors import ConfigError, InvalidImageError
from stream.protocol import (
    MAX_OFFER_BYTES,
    MAX_SDP_CHARS,
    MAX_SIDE,
    MIN_SIDE,
    Answer,
    Offer,
    SessionCreated,
    SessionInfo,
    SessionOptions,
)
from stream.routes.deps import AUTH, ManagerDep, SettingsDep, client_of, error_responses
from stream.turn import session_ice_servers
from stream.webrtc import answer_offer

if TYPE_CHECKING:
    import numpy as np

    from models.reference_check import ReferenceVerdict

log = logging.getLogger(__name__)
router = APIRouter(tags=["sessions"], dependencies=AUTH, responses=error_responses(401))


def _form_field(what: str) -> dict[str, str]:
    return {"type": "string", "description": f"{what}; text, as forms send it (empty: omitted)"}


# Multipart fields are text on the wire; the server reads them with SessionOptions' lax rules
# ("3", "true"/"1"/"yes", "" for an empty input), a 422 for text it cannot read. Declared as
# strings, since the JSON body's types ("seed": integer) would be a promise a form cannot keep.
_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "binary"},
        "seed": _form_field("integer >= 0"),
        "steps": _form_field("integer, 1 to 64"),
        "sink_refresh": _form_field("boolean: true/false, 1/0, yes/no, on/off"),
        "prompt": {"type": "string", "maxLength": 4000},
        "width": _form_field(f"integer, {MIN_SIDE} to {MAX_SIDE}: the server's width"),
        "height": _form_field(f"integer, {MIN_SIDE} to {MAX_SIDE}: the server's height"),
    },
}


@router.post(
    "/v1/sessions",
    status_code=201,
    response_model=SessionCreated,
    responses=error_responses(400, 413, 415, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": SessionOptions.model_json_schema()},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
            "required": False,
        }
    },
)
async def create_session(
    request: Request, settings: SettingsDep, mgr: ManagerDep
) -> SessionCreated:
    """Open a session from a reference image (multipart `image` or JSON `image_base64`;
    none: the default avatar) and options. 429 with Retry-After when this client is over its
    quota (sessions held, creation rate), 503 with Retry-After when the server is at capacity."""
    client = client_of(request)
    mgr.admit(client)  # refuse before reading a large upload
    options, image = await read_session_request(request, settings.max_image_bytes)
    info = request.app.state.executor.info
    # In MIN_SIDE..MAX_SIDE already (SessionOptions, a 422 otherwise); None: the server's.
    asked = {"width": options.width, "height": options.height}
    server = {"width": info.width, "height": info.height}
    wrong = [f"{k} {v}" for k, v in asked.items() if v is not None and v != server[k]]
    if wrong:
        raise ConfigError(
            f"{' and '.join(wrong)}: this server generates {info.width}x{info.height} and a "
            "session cannot change the resolution; send width/height equal to it or omit "
            "them, or start the server with --width/--height"
        )
    if image is None:
        reference = request.app.state.default_reference
    else:
        from pipelines.reference import load_reference_image

        reference = await asyncio.to_thread(load_reference_image, image, info.height, info.width)
    verdict = await check_reference(request, settings.model, reference)
    session = await mgr.create(
        reference,
        seed=options.seed,
        steps=options.steps,
        sink_refresh=options.sink_refresh,
        prompt=options.prompt,
        client=client,
    )
    base = f"/v1/sessions/{session.id}"
    return SessionCreated(
        session_id=session.id,
        width=info.width,
        height=info.height,
        fps=info.fps,
        audio_sample_rate=info.audio_sample_rate,
        offer_url=f"{base}/offer",
        audio_url=f"{base}/audio",
        ice_servers=session_ice_servers(settings, session),
        reference_score=verdict.score if verdict else None,
        reference_warning=verdict.warning if verdict else None,
    )


async def check_reference(
    request: Request, model: str, reference: np.ndarray
) -> ReferenceVerdict | None:
    """The loaded model's verdict on a session's reference (None: the model has no check).
    The check is built once per app, on first use."""
    from models.reference_check import reference_check_for

    state = request.app.state
    if not hasattr(state, "reference_check"):
        state.reference_check = await asyncio.to_thread(reference_check_for, model)
    if state.reference_check is None:
        return None
    verdict = await asyncio.to_thread(state.reference_check, reference)
    if verdict.warning:
        log.info("reference out of distribution (%.2f dB): %s", verdict.score, verdict.warning)
    return verdict


@router.get("/v1/sessions")
async def list_sessions(mgr: ManagerDep) -> list[SessionInfo]:
    return [s.describe() for s in mgr.sessions.values()]


@router.get("/v1/sessions/{session_id}", responses=error_responses(404))
async def get_session(session_id: str, settings: SettingsDep, mgr: ManagerDep) -> dict[str, Any]:
    session = mgr.get(session_id)
    base = f"/v1/sessions/{session.id}"
    return {
        **session.describe().model_dump(),
        "offer_url": f"{base}/offer",
        "audio_url": f"{base}/audio",
        "ice_servers": session_ice_servers(settings, session),
        "stats": session.stats(),
    }


@router.delete("/v1/sessions/{session_id}", status_code=204, responses=error_responses(404))
async def delete_session(session_id: str, mgr: ManagerDep) -> Response:
    session = mgr.get(session_id)
    await session.close("deleted")
    return Response(status_code=204)


@router.post(
    "/v1/sessions/{session_id}/offer",
    response_model=Answer,
    responses=error_responses(400, 404, 409, 413, 503),
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": Offer.model_json_schema()}},
            "required": True,
        }
    },
)
async def offer(
    session_id: str, request: Request, settings: SettingsDep, mgr: ManagerDep
) -> Answer:
    """SDP offer in, answer out: a video track, the driving audio and the `stats` channel."""
    # Read here, not as a `body: Offer` parameter: FastAPI parses a declared body before the
    # router's token check runs, so a caller without the token got 422s for malformed JSON
    # (and made the server read all of it first). Read bounded: 413 past MAX_OFFER_BYTES.
    raw = await read_bounded_body(
        request, MAX_OFFER_BYTES, f"an offer (its SDP is at most {MAX_SDP_CHARS} characters)"
    )
    try:
        body = Offer.model_validate_json(raw)
    except ValidationError as exc:  # FastAPI's own 422 shape, without echoing a huge SDP
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None
    session = mgr.get(session_id)
    return await answer_offer(session, body, settings)


async def read_bounded_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, at most `limit` bytes: a declared Content-Length over it is a 413
    before anything is read, a streamed body a 413 as soon as it passes it (the rest unread)."""
    too_large = HTTPException(413, f"request body over {limit} bytes, the limit for {what}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_session_request(
    request: Request, max_image_bytes: int
) -> tuple[SessionOptions, bytes | None]:
    """Options and image bytes from a JSON body, a multipart form, or no body at all."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isdigit()
        and int(declared) > max_image_bytes * 4 // 3 + 65536
    ):
        raise HTTPException(413, f"request too large; the image limit is {max_image_bytes} bytes")
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_part_size=max_image_bytes)
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
            options = SessionOptions.model_validate({k: v for k, v in fields.items() if v != ""})
            upload = form.get("image")
            image = None
            if upload is not None and not isinstance(upload, str):
                image = await upload.read(max_image_bytes + 1)
                await upload.close()
                if len(image) > max_image_bytes:
                    raise HTTPException(413, f"image larger than {max_image_bytes} bytes")
            return options, image
        raw = await request.body()
        if not raw.strip():
            return SessionOptions(), None
        if "json" not in ctype and ctype:
            raise HTTPException(
                415, "send the image as multipart/form-data (field 'image') or JSON image_base64"
            )
        # Strict: JSON has types, so `"width": false` or `"seed": "3"` is a 422 as the schema
        # says, not coerced (lax mode took false for 0); form fields are text and stay lax.
        options = SessionOptions.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise HTTPException(422, f"invalid session options: {problems}") from None
    image = None
    if options.image_base64:
        data = options.image_base64
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            image = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError("image_base64 is not valid base64") from None
        if len(image) > max_image_bytes:
            raise HTTPException(413, f"image larger than {max_image_bytes} bytes")
    return options, image

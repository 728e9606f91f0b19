"""The ASGI app: `create_app(settings)` builds routes, metrics and a lifespan that loads the model.

Nothing happens at import: the executor (and with it the model) is built when the app starts and
shared by all sessions; it is closed, after every session, when the app stops. HTTP handlers stay
thin: they validate, call the session manager or the WebRTC edge, and map the project's errors to
statuses with a sentence the client can act on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from models.errors import (
    ConfigError,
    DiffstreamError,
    ExecutorError,
    InvalidAudioError,
    InvalidImageError,
    SessionError,
)
from pipelines.executors.base import Executor
from stream.audio_socket import AudioSocket, deny, origin_allowed
from stream.metrics import ServiceMetrics
from stream.protocol import (
    Answer,
    Offer,
    SessionCreated,
    SessionInfo,
    SessionOptions,
)
from stream.sessions import AdmissionError, SessionManager
from stream.settings import Settings
from stream.webrtc import OfferError, ViewerConflict, answer_offer

log = logging.getLogger(__name__)

SAMPLE_AUDIO = "sample.ogg"
ENGINE_STATS_TIMEOUT_S = 2.0  # a scrape waits this long for the engine's own figures


def load_engine(settings: Settings) -> Executor:
    """Load the model behind the chosen executor (blocking: seconds to minutes)."""
    import torch

    from pipelines.executors import build_executor

    torch.set_num_threads(settings.torch_threads())
    devices = settings.resolved_devices()
    log.info("loading model %r on %s (%s executor)", settings.model, devices, settings.executor)
    return build_executor(
        settings.executor,
        model=settings.model,
        devices=devices,
        **settings.executor_options(),
    )


def create_app(settings: Settings | None = None, *, executor: Executor | None = None) -> FastAPI:
    """Build the service from one settings object.

    The model loads when the app starts, unless `diffstream serve` already loaded it (so a bad
    model name is one line on the terminal, not a traceback from inside the server); either way
    the app owns the executor and closes it when it stops.
    """
    settings = settings or Settings()
    metrics = ServiceMetrics()
    preloaded = executor

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from pipelines.reference import default_reference

        executor = preloaded or await asyncio.to_thread(load_engine, settings)
        info = executor.info
        app.state.executor = executor
        app.state.default_reference = await asyncio.to_thread(
            default_reference, info.height, info.width
        )
        manager = SessionManager(executor, settings, metrics)
        app.state.sessions = manager
        manager.start_reaper()
        # Everything loaded so far lives as long as the process: keep it out of the collector's
        # way, so the collection after each session (see Session.close) costs milliseconds.
        gc.collect()
        gc.freeze()
        log.info(
            "model %s ready: %dx%d at %g fps, %d frames per block; serving on http://%s:%d/",
            info.name,
            info.width,
            info.height,
            info.fps,
            info.frames_per_block,
            settings.host,
            settings.port,
        )
        try:
            yield
        finally:
            await manager.stop_reaper()
            await manager.close_all()
            await asyncio.to_thread(executor.close)

    app = FastAPI(
        title="diffstream",
        description="Real-time talking avatar: websocket audio in, WebRTC video and audio out.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _install_error_handlers(app, metrics)
    _install_routes(app, settings, metrics)
    return app


# Errors ------------------------------------------------------------------------------------------

_STATUS = [
    (AdmissionError, 503),
    (ViewerConflict, 409),
    (OfferError, 400),
    (InvalidImageError, 400),
    (InvalidAudioError, 400),
    (ConfigError, 400),
    (SessionError, 404),
    (ExecutorError, 503),
]


def _install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.exception_handler(DiffstreamError)
    async def _project_error(request: Request, exc: DiffstreamError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400)
        metrics.client_errors.labels(kind=type(exc).__name__).inc()
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


# Routes ------------------------------------------------------------------------------------------


def _install_routes(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    web_dir = settings.web_dir

    def token_ok(given: str | None) -> bool:
        return token is None or (given is not None and secrets.compare_digest(given, token))

    def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not token_ok(given.strip()):
            raise HTTPException(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def manager(request: Request) -> SessionManager:
        return request.app.state.sessions

    auth = [Depends(require_token)]

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(web_dir / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=web_dir), name="static")

    @app.get("/v1/sample-audio", tags=["demo"], dependencies=auth, response_class=FileResponse)
    async def sample_audio() -> FileResponse:
        """A few seconds of speech for demos (`/?autostart=1&audio=/v1/sample-audio`)."""
        return FileResponse(web_dir / SAMPLE_AUDIO, media_type="audio/ogg")

    refs_dir = Path(__file__).resolve().parent.parent / "models" / "default" / "refs"

    def shipped_references() -> dict[str, Path]:
        if not refs_dir.is_dir():
            return {}
        return {p.name: p for p in sorted(refs_dir.glob("*.png"))}

    @app.get("/v1/references", tags=["demo"], dependencies=auth)
    async def list_references() -> list[dict[str, str]]:
        """Sample reference images shipped with the default model, for the page to offer."""
        return [{"name": n, "url": f"/v1/references/{n}"} for n in shipped_references()]

    @app.get("/v1/references/{name}", tags=["demo"], dependencies=auth, response_class=FileResponse)
    async def get_reference(name: str, request: Request) -> Response:
        """A shipped reference image; `default` is the one sessions without an image get."""
        if name == "default":
            return Response(
                await asyncio.to_thread(_png, request.app.state.default_reference),
                media_type="image/png",
            )
        path = shipped_references().get(name)
        if path is None:
            raise HTTPException(404, f"no shipped reference image named {name!r}")
        return FileResponse(path, media_type="image/png")

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and load; 503 when the executor's worker is gone."""
        executor = getattr(request.app.state, "executor", None)
        sessions: SessionManager | None = getattr(request.app.state, "sessions", None)
        healthy = executor is not None and executor.healthy()
        body = {
            "status": "ok" if healthy else "unhealthy",
            "model": executor.info.name if executor is not None else None,
            "executor": settings.executor,
            "sessions": len(sessions.sessions) if sessions else 0,
            "max_sessions": settings.max_sessions,
            "workers": executor.pids() if executor is not None else [],
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        executor = getattr(request.app.state, "executor", None)
        if executor is not None:  # asked now: the workers' own count, not the service's
            held = await asyncio.to_thread(executor.held_sessions, ENGINE_STATS_TIMEOUT_S)
            metrics.set_engine_sessions(held)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/config", tags=["sessions"], dependencies=auth)
    async def client_config(request: Request) -> dict[str, Any]:
        """What a client needs before it starts: whether a token is needed, the model's shape."""
        info = request.app.state.executor.info
        return {
            "auth_required": token is not None,
            "model": info.name,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "audio_sample_rate": info.audio_sample_rate,
            "frames_per_block": info.frames_per_block,
            "steps": info.steps,
            "max_message_bytes": settings.max_message_bytes,
        }

    @app.post(
        "/v1/sessions",
        tags=["sessions"],
        dependencies=auth,
        status_code=201,
        response_model=SessionCreated,
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": SessionOptions.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "seed": {"type": "integer"},
                                "steps": {"type": "integer"},
                                "sink_refresh": {"type": "boolean"},
                                "prompt": {"type": "string", "maxLength": 4000},
                                "width": {"type": "integer"},
                                "height": {"type": "integer"},
                            },
                        }
                    },
                },
                "required": False,
            }
        },
    )
    async def create_session(request: Request) -> SessionCreated:
        """Open a session from a reference image (multipart `image` or JSON `image_base64`;
        none: the default avatar) and options. 503 with Retry-After when at capacity."""
        mgr = manager(request)
        if mgr.in_use >= settings.max_sessions:
            # Refuse before reading a large upload.
            mgr.metrics.sessions_rejected.inc()
            raise AdmissionError(
                f"server at capacity: {mgr.in_use} of {settings.max_sessions} sessions in use; "
                "retry when one ends"
            )
        options, image = await _read_session_request(request, settings.max_image_bytes)
        info = request.app.state.executor.info
        asked = (options.width or info.width, options.height or info.height)
        if asked != (info.width, info.height):
            raise ConfigError(
                f"this server generates {info.width}x{info.height}; a session cannot change the "
                f"resolution (asked {asked[0]}x{asked[1]}); start the server with --width/--height"
            )
        if image is None:
            reference = request.app.state.default_reference
        else:
            from pipelines.reference import load_reference_image

            reference = await asyncio.to_thread(
                load_reference_image, image, info.height, info.width
            )
        session = await mgr.create(
            reference,
            seed=options.seed,
            steps=options.steps,
            sink_refresh=options.sink_refresh,
            prompt=options.prompt,
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
            ice_servers=settings.ice_servers(),
        )

    @app.get("/v1/sessions", tags=["sessions"], dependencies=auth)
    async def list_sessions(request: Request) -> list[SessionInfo]:
        return [s.describe() for s in manager(request).sessions.values()]

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], dependencies=auth)
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        session = manager(request).get(session_id)
        base = f"/v1/sessions/{session.id}"
        return {
            **session.describe().model_dump(),
            "offer_url": f"{base}/offer",
            "audio_url": f"{base}/audio",
            "ice_servers": settings.ice_servers(),
            "stats": session.stats(),
        }

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"], dependencies=auth, status_code=204)
    async def delete_session(session_id: str, request: Request) -> Response:
        session = manager(request).get(session_id)
        await session.close("deleted")
        return Response(status_code=204)

    @app.post(
        "/v1/sessions/{session_id}/offer",
        tags=["sessions"],
        dependencies=auth,
        response_model=Answer,
    )
    async def offer(session_id: str, body: Offer, request: Request) -> Answer:
        """SDP offer in, answer out: a video track, the driving audio and the `stats` channel."""
        session = manager(request).get(session_id)
        return await answer_offer(session, body, settings)

    @app.websocket("/v1/sessions/{session_id}/audio")
    async def audio_socket(websocket: WebSocket, session_id: str) -> None:
        """JSON "start", then binary PCM; "interrupt" and "stop" as JSON at any time."""
        if not origin_allowed(websocket, settings.allowed_origins):
            metrics.client_errors.labels(kind="origin").inc()
            await deny(websocket, 403, "origin not allowed")
            return
        given = websocket.query_params.get("token")
        if given is not None and not token_ok(given):
            metrics.client_errors.labels(kind="unauthorized").inc()
            await deny(websocket, 401, "wrong token")
            return
        try:
            session = websocket.app.state.sessions.get(session_id)
        except SessionError as exc:
            metrics.client_errors.labels(kind="unknown_session").inc()
            await deny(websocket, 404, str(exc))
            return
        if session.audio_socket is not None:
            await deny(websocket, 409, "this session already has an audio socket")
            return
        await websocket.accept()
        handler = AudioSocket(
            websocket, session, settings, metrics, authed=token is None or given is not None
        )
        await handler.run(token_ok)


async def _read_session_request(
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
        options = SessionOptions.model_validate_json(raw)
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


def _png(image: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()

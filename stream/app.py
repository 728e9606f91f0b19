"""The ASGI app: `create_app(settings)` builds metrics, a lifespan that loads the model, and
mounts the routers of stream/routes/ (sessions, audio, ops, page).

Nothing happens at import: the executor (and with it the model) is built when the app starts and
shared by all sessions; it is closed, after every session, when the app stops. HTTP handlers stay
thin: they validate, call the session manager or the WebRTC edge, and map the project's errors to
statuses with a sentence the client can act on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from models.errors import (
    ConfigError,
    DiffstreamError,
    ExecutorError,
    InvalidAudioError,
    InvalidImageError,
    SessionError,
)
from pipelines.executors.base import Executor
from stream.metrics import ServiceMetrics
from stream.quotas import QuotaExceeded
from stream.routes import audio, ops, page, sessions
from stream.sessions import AdmissionError, SessionManager
from stream.settings import Settings
from stream.webrtc import OfferError, ViewerConflict

log = logging.getLogger(__name__)


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
    # One router per resource (stream/routes/); they read everything from app.state.
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=settings.web_dir), name="static")
    app.include_router(ops.router)
    app.include_router(sessions.router)
    app.include_router(audio.router)
    return app


async def drain(app: FastAPI, seconds: float) -> None:
    """Graceful shutdown's first half (SIGTERM, see stream.server): stop admitting, let running
    sessions play out for up to `seconds`, end the rest. The lifespan's exit does the rest."""
    manager: SessionManager | None = getattr(app.state, "sessions", None)
    if manager is not None:
        await manager.drain(seconds)


# Errors ------------------------------------------------------------------------------------------

_STATUS = [
    (QuotaExceeded, 429),
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
        if isinstance(exc, QuotaExceeded):  # which limit, and when to come back
            return JSONResponse(
                exc.body(),
                status_code=status,
                headers={"Retry-After": str(exc.retry_after_header())},
            )
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

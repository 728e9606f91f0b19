"""Run the app under uvicorn with the limits that belong to the transport, not the app.

Shared by `diffstream serve`, the tests and the benchmark, so all of them run the service the
same way (websocket size limit, no uvicorn signal handlers when embedded in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from pipelines.executors.base import Executor
from stream.app import create_app, drain
from stream.settings import Settings

# Room above the app's own limit, so an oversized message reaches the app and gets its clear
# error; anything far larger is cut by the protocol layer (close code 1009) before it is buffered.
WS_SIZE_SLACK = 64 * 1024


def build_server(settings: Settings, executor: Executor | None = None) -> uvicorn.Server:
    """A uvicorn server for `create_app(settings)` that drains on SIGTERM; call `.run()` or
    `await .serve()`."""
    app = create_app(settings, executor=executor)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.max_message_bytes + WS_SIZE_SLACK,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return DrainingServer(config, app, drain_s=settings.drain_s)


log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM draining the app before the usual shutdown.

    On the first SIGTERM the server keeps serving (so /healthz can answer "draining" and new
    sessions get a 503) while `stream.app.drain` lets running sessions play out for up to
    `drain_s`; then it shuts down as uvicorn does. SIGINT, or a second SIGTERM, shuts down at
    once. SIGTERM is not re-raised after shutdown (uvicorn re-raises the signals it caught), so a
    drained service exits 0.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, *, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        if self.draining:  # a second SIGTERM: stop waiting
            log.info("second SIGTERM: shutting down now")
            self.should_exit = True
            return
        self.draining = True
        log.info("SIGTERM: draining for up to %g s", self.drain_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self.app, self.drain_s)
        except Exception:
            log.exception("drain failed; shutting down")
        finally:
            self.should_exit = True

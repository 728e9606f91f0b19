"""Run the app under uvicorn with the limits that belong to the transport, not the app.

Shared by `diffstream serve`, the tests and the benchmark, so all of them run the service the
same way (websocket size limit, no uvicorn signal handlers when embedded in a thread).
"""

from __future__ import annotations

import uvicorn

from pipelines.executors.base import Executor
from stream.app import create_app
from stream.settings import Settings

# Room above the app's own limit, so an oversized message reaches the app and gets its clear
# error; anything far larger is cut by the protocol layer (close code 1009) before it is buffered.
WS_SIZE_SLACK = 64 * 1024


def build_server(settings: Settings, executor: Executor | None = None) -> uvicorn.Server:
    """A uvicorn server for `create_app(settings)`; call `.run()` or `await .serve()`."""
    config = uvicorn.Config(
        create_app(settings, executor=executor),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.max_message_bytes + WS_SIZE_SLACK,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)

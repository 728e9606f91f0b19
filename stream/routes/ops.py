"""Operations (all open): `/healthz` for load balancers and readiness probes, `/livez` for
liveness probes, `/metrics` for Prometheus."""

from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from stream.routes.deps import MetricsDep, SettingsDep

ENGINE_STATS_TIMEOUT_S = 2.0  # a scrape waits this long for the engine's own figures

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz(request: Request, settings: SettingsDep) -> JSONResponse:
    """Liveness and load; 503 when the executor's worker is gone or the server is draining."""
    executor = getattr(request.app.state, "executor", None)
    sessions = getattr(request.app.state, "sessions", None)
    draining = sessions is not None and sessions.draining
    healthy = executor is not None and executor.healthy() and not draining
    body = {
        "status": "ok" if healthy else "draining" if draining else "unhealthy",
        "model": executor.info.name if executor is not None else None,
        "replica": settings.replica_id,
        "executor": settings.executor,
        "sessions": len(sessions.sessions) if sessions else 0,
        "max_sessions": settings.max_sessions,
        "workers": executor.pids() if executor is not None else [],
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/livez")
async def livez(request: Request) -> JSONResponse:
    """Liveness: 503 only when the engine's worker is gone, 200 while draining. /healthz turns
    503 on a drain too (a balancer must stop sending new sessions), so an orchestrator that
    restarts on a failed liveness probe would kill a replica mid-drain if it probed /healthz;
    and without a liveness check on the engine a replica whose worker died would sit out of
    rotation for good (only a new session restarts the worker, and none is routed to it)."""
    executor = getattr(request.app.state, "executor", None)
    alive = executor is not None and executor.healthy()
    return JSONResponse({"status": "ok" if alive else "unhealthy"}, 200 if alive else 503)


@router.get("/metrics", response_class=Response)
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    executor = getattr(request.app.state, "executor", None)
    if executor is not None:  # asked now: the workers' own count, not the service's
        held = await asyncio.to_thread(executor.held_sessions, ENGINE_STATS_TIMEOUT_S)
        metrics.set_engine_sessions(held)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

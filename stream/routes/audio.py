"""The audio websocket of a session: handshake checks here, the protocol in stream.audio_socket."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from models.errors import SessionError
from stream.audio_socket import AudioSocket, deny, origin_allowed
from stream.routes.deps import auth_token, get_manager, get_metrics, get_settings, token_ok

router = APIRouter()


@router.websocket("/v1/sessions/{session_id}/audio")
async def audio_socket(websocket: WebSocket, session_id: str) -> None:
    """JSON "start", then binary PCM; "interrupt" and "stop" as JSON at any time."""
    settings, metrics = get_settings(websocket), get_metrics(websocket)
    if not origin_allowed(websocket, settings.allowed_origins):
        metrics.client_errors.labels(kind="origin").inc()
        await deny(websocket, 403, "origin not allowed")
        return
    given = websocket.query_params.get("token")
    if given is not None and not token_ok(settings, given):
        metrics.client_errors.labels(kind="unauthorized").inc()
        await deny(websocket, 401, "wrong token")
        return
    try:
        session = get_manager(websocket).get(session_id)
    except SessionError as exc:
        metrics.client_errors.labels(kind="unknown_session").inc()
        await deny(websocket, 404, str(exc))
        return
    if session.audio_socket is not None:
        await deny(websocket, 409, "this session already has an audio socket")
        return
    await websocket.accept()
    handler = AudioSocket(
        websocket,
        session,
        settings,
        metrics,
        authed=auth_token(settings) is None or given is not None,
    )
    await handler.run(lambda token: token_ok(settings, token))

"""What the routers share, read from `app.state`: settings, metrics, the session manager, auth.

`create_app` puts `settings` and `metrics` on `app.state` when it builds the app, and the
lifespan adds `executor`, `default_reference` and `sessions` when the model is loaded.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from starlette.requests import HTTPConnection

from stream.metrics import ServiceMetrics
from stream.protocol import MAX_OFFER_BYTES, ErrorBody, QuotaBody
from stream.quotas import client_key
from stream.sessions import SessionManager
from stream.settings import Settings


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_metrics(conn: HTTPConnection) -> ServiceMetrics:
    return conn.app.state.metrics


def get_manager(conn: HTTPConnection) -> SessionManager:
    return conn.app.state.sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ManagerDep = Annotated[SessionManager, Depends(get_manager)]


def auth_token(settings: Settings) -> str | None:
    """The token every /v1 route wants, or None when the service is open."""
    return settings.auth_token.get_secret_value() if settings.auth_token else None


def token_ok(settings: Settings, given: str | None) -> bool:
    """Whether `given` is the service's token (any value when there is none)."""
    token = auth_token(settings)
    # As bytes: compare_digest raises TypeError for a str with non-ASCII characters, which any
    # client can send (a header, ?token=, an `auth` message); that is a wrong token, not a 500.
    return token is None or (
        given is not None
        and secrets.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())
    )


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of an `Authorization: Bearer T` header, None without one."""
    scheme, _, given = conn.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def require_token(request: Request) -> None:
    """The dependency on every /v1 HTTP route: 401 without the right bearer token."""
    settings = get_settings(request)
    if auth_token(settings) is None:
        return
    if not token_ok(settings, bearer_token(request)):
        raise HTTPException(
            401,
            "missing or wrong token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AUTH = [Depends(require_token)]

_ERRORS: dict[int, str] = {
    400: "the request cannot be served as sent (an image that is not one, an offer without "
    "video, a size the server does not generate): the detail says what to change",
    401: "missing or wrong token (only when the service runs with --auth-token)",
    404: "no such session (never created, or ended)",
    409: "the session already has a viewer",
    413: "the upload is over its limit (a reference image: the image limit; an offer's body: "
    f"{MAX_OFFER_BYTES} bytes)",
    415: "the body is neither JSON nor multipart/form-data",
    422: "invalid session options",
    429: "this client is over its quota; come back after Retry-After seconds",
    503: "the server is at capacity, draining or its engine is down; retry after Retry-After",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of the error statuses a route answers: each a `{"detail": ...}` body
    (a 429 also names the limit), with the headers that come with it."""
    return {
        status: {
            "model": QuotaBody if status == 429 else ErrorBody,
            "description": _ERRORS[status],
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def client_of(conn: HTTPConnection) -> str:
    """Whom a request's sessions count against (stream.quotas): its token when the service
    has one (checked by `require_token` before), else its address."""
    token = bearer_token(conn) if auth_token(get_settings(conn)) is not None else None
    return client_key(token, conn.client.host if conn.client else None)

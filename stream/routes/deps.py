"""What the routers share, read from `app.state`: settings, metrics, the session manager, auth.

`create_app` puts `settings` and `metrics` on `app.state` when it builds the app, and the
lifespan adds `executor`, `default_reference` and `sessions` when the model is loaded.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.requests import HTTPConnection

from stream.metrics import ServiceMetrics
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
    return token is None or (given is not None and secrets.compare_digest(given, token))


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


def client_of(conn: HTTPConnection) -> str:
    """Whom a request's sessions count against (stream.quotas): its token when the service
    has one (checked by `require_token` before), else its address."""
    token = bearer_token(conn) if auth_token(get_settings(conn)) is not None else None
    return client_key(token, conn.client.host if conn.client else None)

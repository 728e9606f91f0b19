"""Short-lived TURN credentials: coturn's TURN REST API scheme (`use-auth-secret`).

With `turn_secret` set, no browser ever sees a long-lived password. Each session gets its own
credentials, derived from the secret the service shares with the TURN server:

    username = "<expiry unix time>:<name>"
    password = base64(HMAC-SHA1(secret, username))

coturn (`use-auth-secret`, `static-auth-secret=<secret>`) recomputes the password from the
username and refuses an allocation, or the refresh of one, once the expiry has passed. The
browser's credentials are named after the session id; the service's own aiortc peer for that
session gets a different name, so a leaked browser credential never doubles as the service's.
Both expire `turn_ttl_s` after the session was created.

Without a secret, the static `turn_username`/`turn_password` are handed out as before
(`Settings.ice_servers`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from stream.settings import Settings

SEPARATOR = ":"  # coturn's default rest-api-separator
SERVICE_SUFFIX = "-service"  # the name of the service's own peer is "<session id>-service"


def rest_credentials(secret: str, name: str, expires_at: int) -> tuple[str, str]:
    """(username, password) for `name`, valid until the unix time `expires_at`."""
    username = f"{int(expires_at)}{SEPARATOR}{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers_for(settings: Settings, name: str, expires_at: int) -> list[dict[str, object]]:
    """The configured STUN servers plus the TURN servers with credentials for `name`."""
    if settings.turn_secret is None:
        raise ValueError("per-session TURN credentials need turn_secret")
    username, password = rest_credentials(settings.turn_secret.get_secret_value(), name, expires_at)
    servers: list[dict[str, object]] = []
    if settings.stun_servers:
        servers.append({"urls": list(settings.stun_servers)})
    servers.append(
        {"urls": list(settings.turn_servers), "username": username, "credential": password}
    )
    return servers


class _SessionLike(Protocol):
    id: str
    created_at: float  # unix time


def session_ice_servers(
    settings: Settings, session: _SessionLike, *, service: bool = False
) -> list[dict[str, object]]:
    """ICE servers (RTCIceServer shape) for a session's browser, or with `service` its own peer.

    The expiry is `turn_ttl_s` after the session's creation, so every call about one session
    gives the same credentials. Without `turn_secret`: the static `Settings.ice_servers()`.
    """
    if settings.turn_secret is None or not settings.turn_servers:
        return settings.ice_servers()
    name = session.id + (SERVICE_SUFFIX if service else "")
    return ice_servers_for(settings, name, int(session.created_at) + settings.turn_ttl_s)

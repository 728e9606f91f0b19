"""Per-client admission: how many sessions a client holds and how fast it may open new ones.

A client is its address, and its bearer token too when the service has one (`client_key`). The
session count is read from the live sessions (stream.sessions.SessionManager); the creation rate
is a token bucket per client kept here, with a bounded table so a flood of addresses cannot grow
it without end.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from models.errors import SessionError

MAX_TRACKED_CLIENTS = 4096  # buckets kept; beyond, full (idle) ones are forgotten first


class QuotaExceeded(SessionError):
    """A client is over one of its own limits (429), while the server may still have room."""

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit  # "sessions_per_client" or "session_rate"
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        """The JSON answer: the sentence, which limit, and when to try again."""
        return {
            "detail": str(self),
            "limit": self.limit,
            "retry_after_s": self.retry_after_header(),
        }

    def retry_after_header(self) -> int:
        return max(1, math.ceil(self.retry_after_s))


def client_key(token: str | None, address: str | None) -> str:
    """Who a request counts against: its address, and with a bearer token (already checked)
    that token at that address. A service with one shared `--auth-token` would otherwise count
    every caller as a single client and cap itself at one client's quota; with a token per
    user, a user at two addresses is two clients.

    The token is kept as a short digest, so the quota table never holds the secret itself."""
    where = "addr:" + (address or "unknown")
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16] + "@" + where
    return where


class SessionRateLimiter:
    """A token bucket per client: `burst` creations at once, refilled at `per_minute`."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.rate = per_minute / 60.0  # tokens per second; 0 = no limit
        self.burst = float(max(1, burst))
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def wait_s(self, key: str) -> float:
        """Seconds until `key` may create a session (0.0: now)."""
        if not self.enabled:
            return 0.0
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> None:
        """Spend one creation of `key` (call after `wait_s` said 0)."""
        if not self.enabled:
            return
        now = self.clock()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1.0), now)
        if len(self._buckets) > self.max_clients:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled (a forgotten client starts full anyway); if every
        client is mid-bucket, drop the oldest ones down to the limit."""
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[key]
        if len(self._buckets) > self.max_clients:
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in oldest[: len(self._buckets) - self.max_clients]:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

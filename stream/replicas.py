"""Many replicas behind one load balancer: session ids that name their replica, and the HAProxy
configuration that routes by them.

Sessions live in the memory of the process that created them, so every request of a session
after POST /v1/sessions (the SDP offer, the audio websocket, GET and DELETE) must reach that
process. With `--replica-id r1` a replica's session ids are `r1-<32 hex digits>`, and the
balancer sends `/v1/sessions/r1-<hex>...` to replica r1 and everything else (session creation,
the page, /metrics) to any healthy replica. Only signalling goes through the balancer: WebRTC
media flows directly between the viewer and the replica (ICE), or through a TURN server.

`python -m stream.replicas r1=10.0.0.1:8000 r2=10.0.0.2:8000 --bind :8080` prints that
configuration (deploy/haproxy.cfg is an example of its output; tests/test_replicas.py starts
HAProxy with it in front of two real replicas).
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import uuid
from collections.abc import Sequence

from models.errors import SessionError

# A replica id is a DNS label (a Kubernetes StatefulSet's pod name, such as diffstream-0, is one).
REPLICA_ID = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_REPLICA_RE = re.compile(REPLICA_ID)
# An id is the replica's id and a dash before a uuid4's 32 hex digits, or those digits alone
# (a replica without an id). The fixed-length tail keeps `a-b-<hex>` apart from `a-<hex>`.
_SESSION_RE = re.compile(rf"(?:(?P<replica>{REPLICA_ID})-)?[0-9a-f]{{32}}")


def check_replica_id(value: str) -> str:
    """`value` if it can prefix session ids (a DNS label), else ValueError."""
    if not _REPLICA_RE.fullmatch(value):
        raise ValueError(
            f"replica id {value!r} must be a DNS label: lowercase letters, digits and dashes, "
            "at most 63, starting and ending with a letter or digit"
        )
    return value


def derived_replica_id(hostname: str | None = None) -> str:
    """The replica id `auto` stands for: the host name's first label, lowercased, anything but
    letters, digits and dashes made a dash (in Kubernetes, the pod's name)."""
    label = (hostname or socket.gethostname()).split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]", "-", label).strip("-")[:63].strip("-")
    return check_replica_id(label or "replica")


def new_session_id(replica_id: str | None) -> str:
    """A fresh session id, prefixed with the replica's id when it has one."""
    token = uuid.uuid4().hex
    return f"{replica_id}-{token}" if replica_id else token


def check_session_id(session_id: str, replica_id: str | None) -> None:
    """Raise SessionError (404) for a string that is no session id, or one of another replica
    (a balancer that does not route by the id's prefix sends requests there)."""
    shown = session_id if len(session_id) <= 100 else session_id[:100] + "..."
    match = _SESSION_RE.fullmatch(session_id)
    if match is None:
        raise SessionError(f"session {shown!r} not found: that is not a session id")
    owner = match.group("replica")
    if owner != replica_id:
        where = f"replica {owner!r}" if owner else "a replica without an id"
        here = f"replica {replica_id!r}" if replica_id else "a replica without an id"
        raise SessionError(
            f"session {shown!r} not found: it belongs to {where}, not to this one ({here}); "
            "the load balancer must route /v1/sessions/<id> by the id's prefix "
            "(docs/service.md, Scaling out)"
        )


# HAProxy ---------------------------------------------------------------------------------------


def haproxy_config(
    replicas: Sequence[tuple[str, str]],
    *,
    bind: str = ":8080",
    check_interval_ms: int = 1000,
    resolvers: bool = False,
) -> str:
    """haproxy.cfg for `replicas` (id, host:port) behind one frontend on `bind`.

    POST /v1/sessions and every other path go round-robin to the replicas whose /healthz says
    200 (a draining, unhealthy or dead replica gets no new sessions); /v1/sessions/<id>... goes
    to the replica the id names, whatever its /healthz says (a draining replica still serves
    the sessions it holds), and is 503 when that replica is down (its sessions are gone).
    `resolvers`: resolve the addresses at run time through /etc/resolv.conf and start even when
    a name does not resolve yet (Kubernetes pod names).
    """
    if not replicas:
        raise ValueError("no replicas")
    seen: set[str] = set()
    for replica_id, address in replicas:
        check_replica_id(replica_id)
        if replica_id in seen:
            raise ValueError(f"replica id {replica_id!r} given twice")
        seen.add(replica_id)
        if ":" not in address:
            raise ValueError(f"replica {replica_id}: address {address!r} is not host:port")
    check = f"check inter {check_interval_ms} fall 2 rise 1"
    dns = " resolvers dns init-addr last,libc,none" if resolvers else ""
    lines = [
        "# Generated by `python -m stream.replicas` (diffstream): see docs/service.md, Scaling out.",
        "# Signalling only: WebRTC media goes directly between viewer and replica (ICE/TURN).",
        "global",
        "    maxconn 4096",
        "",
    ]
    if resolvers:
        lines += [
            "resolvers dns",
            "    parse-resolv-conf",
            "    hold valid 10s",
            "",
        ]
    lines += [
        "defaults",
        "    mode http",
        "    option forwardfor",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    # an audio websocket lives as long as its session",
        "    timeout tunnel 1h",
        "    # a request sent to a replica that just died is retried on another one",
        "    retries 2",
        "    retry-on conn-failure empty-response",
        "",
        "frontend diffstream",
        f"    bind {bind}",
    ]
    for replica_id, _ in replicas:
        lines.append(
            f"    acl session_{replica_id} path_reg ^/v1/sessions/{replica_id}-[0-9a-f]{{32}}(/|$)"
        )
    for replica_id, _ in replicas:
        lines.append(f"    use_backend replica_{replica_id} if session_{replica_id}")
    lines += [
        "    default_backend replicas",
        "",
        "# new sessions and everything not of a session: any replica whose /healthz is 200",
        "backend replicas",
        "    balance roundrobin",
        "    option redispatch",
        "    option httpchk GET /healthz",
        "    http-check expect status 200",
    ]
    for replica_id, address in replicas:
        lines.append(f"    server {replica_id} {address} {check}{dns}")
    for replica_id, address in replicas:
        lines += [
            "",
            f"# sessions of replica {replica_id} (a TCP check: draining, it still serves them)",
            f"backend replica_{replica_id}",
            f"    server {replica_id} {address} {check}{dns}",
        ]
    return "\n".join(lines) + "\n"


def _replica(text: str) -> tuple[str, str]:
    replica_id, sep, address = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID=HOST:PORT")
    try:
        return check_replica_id(replica_id), address
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream.replicas",
        description="Print haproxy.cfg for diffstream replicas started with --replica-id.",
    )
    parser.add_argument("replicas", nargs="+", type=_replica, help="ID=HOST:PORT per replica")
    parser.add_argument("--bind", default=":8080", help="the balancer's address (:8080)")
    parser.add_argument("--check-interval-ms", type=int, default=1000, help="health checks")
    parser.add_argument(
        "--resolvers",
        action="store_true",
        help="resolve names at run time and start before they resolve (Kubernetes)",
    )
    args = parser.parse_args(argv)
    try:
        text = haproxy_config(
            args.replicas,
            bind=args.bind,
            check_interval_ms=args.check_interval_ms,
            resolvers=args.resolvers,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

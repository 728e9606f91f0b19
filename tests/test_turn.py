"""Short-lived TURN credentials (--turn-secret, coturn's TURN REST API scheme): their format
and HMAC, what the API hands out, the settings' refusals, and, against a real coturn started
here (Debian's `coturn`, installed by scripts/install-browser.sh), that the issued credentials
relay a real session and that expired ones are refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from models.errors import ConfigError
from stream.cli import main
from stream.settings import Settings, load_settings
from stream.turn import rest_credentials, session_ice_servers

SECRET = "coturn-shared-s3cret"
TURN_URL = "turn:turn.example:3478"


def _expected_password(secret: str, username: str) -> str:
    """coturn's check, written out here: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


# Credentials -------------------------------------------------------------------------------------


def test_rest_credentials_match_coturns_scheme() -> None:
    """Fails if the HMAC is not SHA-1 over the whole username (tried: hashlib.sha256 there)."""
    username, password = rest_credentials("s3cret", "abc123", 1700003600)
    assert username == "1700003600:abc123"
    # `printf %s 1700003600:abc123 | openssl dgst -sha1 -hmac s3cret -binary | base64`
    assert password == "LsNh6JfgYeFdfpWToFuYc8M69hQ="
    assert password == _expected_password("s3cret", username)


def test_each_session_and_the_service_peer_get_credentials_of_their_own() -> None:
    """Fails if the expiry ignores the TTL (tried: created_at + 3600 whatever turn_ttl_s says)
    or if the service's peer reuses the browser's name (tried: SERVICE_SUFFIX = "")."""
    settings = load_settings(
        turn_servers=[TURN_URL], turn_secret=SECRET, turn_ttl_s=600, stun_servers=["stun:s:3478"]
    )
    created = 1_800_000_000.7
    one = SimpleNamespace(id="sessA", created_at=created)
    browser = session_ice_servers(settings, one)
    assert browser[0] == {"urls": ["stun:s:3478"]}
    turn = browser[1]
    assert turn["urls"] == [TURN_URL]
    assert turn["username"] == f"{1_800_000_000 + 600}:sessA"
    assert turn["credential"] == _expected_password(SECRET, turn["username"])
    assert session_ice_servers(settings, one) == browser  # the same every time it is asked
    service = session_ice_servers(settings, one, service=True)[1]
    assert service["username"] == f"{1_800_000_600}:sessA-service"
    assert service["credential"] == _expected_password(SECRET, service["username"])
    other = session_ice_servers(settings, SimpleNamespace(id="sessB", created_at=created))[1]
    assert other["username"] != turn["username"] and other["credential"] != turn["credential"]
    # No secret: the static credentials, as before.
    static = load_settings(turn_servers=[TURN_URL], turn_username="u", turn_password="p")
    assert session_ice_servers(static, one) == static.ice_servers()
    assert static.ice_servers() == [{"urls": [TURN_URL], "username": "u", "credential": "p"}]


def test_turn_secret_settings_refusals_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fails if a secret is accepted together with a static password (tried: the validator's
    mixing check removed) or without TURN servers."""
    with pytest.raises(ConfigError, match="turn_secret needs TURN servers"):
        load_settings(turn_secret=SECRET)
    with pytest.raises(ConfigError, match="exclude each other"):
        load_settings(turn_servers=[TURN_URL], turn_secret=SECRET, turn_password="p")
    with pytest.raises(ConfigError, match="exclude each other"):
        load_settings(turn_servers=[TURN_URL], turn_secret=SECRET, turn_username="u")
    with pytest.raises(ConfigError, match="turn_ttl_s"):
        load_settings(turn_servers=[TURN_URL], turn_secret=SECRET, turn_ttl_s=5)
    # The serve command: exit 2 and one line, before any model loads.
    monkeypatch.setenv("DIFFSTREAM_TURN_PASSWORD", "static-pw")
    rc = main(["serve", "--turn", TURN_URL, "--turn-secret", SECRET, "--turn-ttl-seconds", "900"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "exclude each other" in err, err
    assert SECRET not in err and "static-pw" not in err


def test_the_api_hands_out_per_session_credentials_and_never_the_secret() -> None:
    """POST /v1/sessions and GET /v1/sessions/{id} carry the session's own HMAC credentials,
    the same in both; no response body holds the secret. Fails if the routes hand out
    Settings.ice_servers() (tried: session_ice_servers returning it: no TURN entry at all) or
    if the secret leaks as the credential (tried: "credential": the secret in stream/turn.py)."""
    from stream.app import create_app

    settings = Settings(model="tiny", threads=1, turn_servers=[TURN_URL], turn_secret=SECRET)
    with TestClient(create_app(settings)) as c:
        before = int(time.time())
        created = c.post("/v1/sessions")
        after = int(time.time())
        assert created.status_code == 201, created.text
        body = created.json()
        sid = body["session_id"]
        (turn,) = body["ice_servers"]
        assert turn["urls"] == [TURN_URL]
        expiry, _, name = turn["username"].partition(":")
        assert name == sid
        assert before + 3600 <= int(expiry) <= after + 3600
        assert turn["credential"] == _expected_password(SECRET, turn["username"])
        got = c.get(f"/v1/sessions/{sid}")
        assert got.status_code == 200
        assert got.json()["ice_servers"] == body["ice_servers"]
        second = c.post("/v1/sessions").json()["ice_servers"][0]
        assert second["username"] != turn["username"]
        texts = [created.text, got.text, c.get("/v1/sessions").text, c.get("/v1/config").text]
        for text in texts:
            assert SECRET not in text


# Against a real coturn ---------------------------------------------------------------------------


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port for turnserver")


def _answers_stun(port: int) -> bool:
    from aioice import stun

    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(bytes(request), ("127.0.0.1", port))
        try:
            sock.recvfrom(2048)
        except OSError:
            return False
    return True


class Coturn(SimpleNamespace):
    port: int
    log: Path


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    binary = shutil.which("turnserver") or (
        "/usr/bin/turnserver" if Path("/usr/bin/turnserver").exists() else None
    )
    if binary is None:
        pytest.skip("turnserver not installed (Debian's coturn; scripts/install-browser.sh)")
    work = tmp_path_factory.mktemp("coturn")
    port = _free_udp_and_tcp_port()
    log = work / "turn.log"
    args = [
        binary,
        "-n",  # no configuration file: only these flags
        f"--listening-port={port}",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        "--allow-loopback-peers",
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        "--realm=diffstream",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--fingerprint",
        "--verbose",
        f"--log-file={log}",
        "--simple-log",
        f"--userdb={work / 'turndb'}",
        f"--pidfile={work / 'turn.pid'}",
    ]
    proc = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not _answers_stun(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"turnserver did not start (rc {proc.poll()}): {tail}")
        yield Coturn(port=port, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _allocate(port: int, username: str, password: str) -> tuple[str, int]:
    """A TURN allocation on the server with these credentials; the relayed address."""
    from aioice import turn

    transport, _ = await turn.create_turn_endpoint(
        asyncio.DatagramProtocol, ("127.0.0.1", port), username, password
    )
    try:
        return transport.get_extra_info("sockname")
    finally:
        transport.close()


def test_coturn_allocates_with_issued_credentials_and_refuses_expired_ones(
    coturn: Coturn,
) -> None:
    """Fails if the password is not coturn's (tried: HMAC-SHA256 in rest_credentials: 401 on
    the fresh credentials too) or if the expiry were not in the username (tried: username
    without the "<expiry>:" part: coturn finds no credentials)."""
    from aioice.stun import TransactionFailed

    now = int(time.time())
    fresh = rest_credentials(SECRET, "sess-fresh", now + 600)
    host, relayed_port = asyncio.run(_allocate(coturn.port, *fresh))
    assert host == "127.0.0.1" and relayed_port > 0
    # The same scheme with the right secret, but an expiry in the past: refused.
    expired = rest_credentials(SECRET, "sess-old", now - 5)
    with pytest.raises(TransactionFailed) as refused:
        asyncio.run(_allocate(coturn.port, *expired))
    assert refused.value.response.attributes["ERROR-CODE"][0] == 401
    # And a wrong secret, for contrast.
    forged = rest_credentials("not-the-secret", "sess-forged", now + 600)
    with pytest.raises(TransactionFailed):
        asyncio.run(_allocate(coturn.port, *forged))


def test_a_real_session_streams_through_the_relay(coturn: Coturn, tmp_path: Path) -> None:
    """The service with --turn/--turn-secret; the client uses only the session's ice_servers
    with iceTransportPolicy "relay" (relay candidates only), connects and gets video; the
    service's own peer allocated on coturn with its own "<expiry>:<id>-service" credentials.
    Fails if the browser's credentials are wrong (tried: the browser's credential computed
    from another secret, the service's left right: no video in 60 s) or if the service's peer uses the browser's name
    (tried: SERVICE_SUFFIX = "")."""
    from stream.client import AvatarClient
    from stream.harness import ServiceProcess

    flags = ("--turn", f"turn:127.0.0.1:{coturn.port}", "--turn-secret", SECRET)
    with ServiceProcess(*flags, log_path=tmp_path / "service.log") as service:

        async def run() -> tuple[AvatarClient, str, str]:
            client = AvatarClient(service.base)
            await client.create()
            try:
                await client.watch(relay_only=True)
                await asyncio.wait_for(client.first_video.wait(), 60)
                assert client.pc is not None
                return (
                    client,
                    client.pc.localDescription.sdp,
                    client.pc.remoteDescription.sdp,
                )
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

        client, local_sdp, remote_sdp = asyncio.run(run())
    assert client.received.video, "no video through the relay"
    candidates = [line for line in local_sdp.splitlines() if line.startswith("a=candidate")]
    assert candidates and all(" typ relay" in line for line in candidates), local_sdp
    assert " typ relay" in remote_sdp, "the service's peer got no relay candidate"
    (turn,) = client.session["ice_servers"]
    sid = client.session_id
    log = coturn.log.read_text(errors="replace")
    expiry = turn["username"].split(":")[0]
    for user in (f"{expiry}:{sid}", f"{expiry}:{sid}-service"):
        assert f"user <{user}>: incoming packet ALLOCATE processed, success" in log, user
    assert SECRET not in service.log_tail(10**6)

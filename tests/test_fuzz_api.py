"""Fuzzing the HTTP API in-process (the real tiny model in the app's lifespan).

schemathesis generates requests from the service's own OpenAPI document for every /v1 route,
with the token, without it and with a wrong one; hypothesis sends broken SDP offers and broken
or hostile reference images. The property everywhere: never a 5xx, a 4xx says why, and the
responses match what /openapi.json promises. DIFFSTREAM_FUZZ_EXAMPLES=300 runs more examples
(the slow test of tests/test_fuzz_service.py does).
"""

from __future__ import annotations

import base64
import os

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from stream.app import create_app
from stream.settings import Settings
from tests.fuzz_inputs import TOKEN, image_uploads, png_declaring, real_offer, sdp_offers

EXAMPLES = int(os.environ.get("DIFFSTREAM_FUZZ_EXAMPLES", "25"))
MAX_IMAGE_BYTES = 200_000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _settings() -> Settings:
    return Settings(
        model="tiny",
        threads=1,
        auth_token=TOKEN,
        max_sessions=64,
        max_sessions_per_client=64,
        session_rate=0,
        max_image_bytes=MAX_IMAGE_BYTES,
    )


# schemathesis ------------------------------------------------------------------------------------
#
# Driven through each operation's hypothesis strategy (`as_strategy`), positive and negative:
# schemathesis' own pytest integration (`from_fixture`/`parametrize`) does not run on pytest 9.2.


@pytest.fixture(scope="module")
def api_schema():
    """The app's OpenAPI document, called in-process; schemathesis runs the lifespan once."""
    app = create_app(_settings())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/v1/")
    yield schema
    schemathesis_asgi.shutdown_lifespans()


AUTH_HEADERS = {
    "token": {"Authorization": f"Bearer {TOKEN}"},
    "no_token": {},
    "wrong_token": {"Authorization": "Bearer not-the-token"},
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _fuzz_every_operation(schema, auth: str, examples: int) -> list[str]:
    """Run `examples` positive and `examples` negative cases of every operation; returns the
    operations' labels (so a test can insist every /v1 route was covered)."""
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                _call(case, auth)

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no parameters
            except BaseException as exc:
                exc.add_note(f"operation {operation.label}, {mode.value} data, auth {auth}")
                raise
    return labels


def negative_data_rejected(ctx, response, case):  # noqa: ANN001, ANN201 (schemathesis check)
    """schemathesis' negative_data_rejection, with 413 also counted as a rejection: a body over
    a route's size limit (the offer's MAX_OFFER_BYTES) is refused for its size before its schema
    is read, which is the rejection the document declares for it."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


def _call(case, auth: str) -> None:
    checks = [*CHECKS, negative_data_rejected] if auth == "token" else CHECKS
    response = case.call_and_validate(headers=AUTH_HEADERS[auth], checks=checks)
    if auth != "token":
        assert response.status_code == 401, (case.path, response.status_code)
        assert response.headers.get("www-authenticate") == ["Bearer"]
    elif response.status_code == 201 and case.path == "/v1/sessions":
        sid = response.json()["session_id"]
        gone = case.operation.schema.find_operation_by_path("DELETE", "/v1/sessions/{session_id}")
        deleted = gone.Case(path_parameters={"session_id": sid}).call(headers=AUTH_HEADERS["token"])
        assert deleted.status_code == 204


V1_OPERATIONS = {
    "POST /v1/sessions",
    "GET /v1/sessions",
    "GET /v1/sessions/{session_id}",
    "DELETE /v1/sessions/{session_id}",
    "POST /v1/sessions/{session_id}/offer",
    "GET /v1/config",
    "GET /v1/references",
    "GET /v1/references/{name}",
    "GET /v1/sample-audio",
}


def test_api_with_the_token_never_answers_5xx_and_keeps_to_its_document(api_schema) -> None:
    """Every /v1 operation, positive and negative data, with the token: no 5xx; the status
    codes, content types, headers and bodies the document declares; negative data rejected.

    Fails if a handler raises, or if an answered status is not in the document (e.g. drop the
    `responses=error_responses(...)` of create_session: its 400/413/415/422 go undeclared)."""
    labels = _fuzz_every_operation(api_schema, "token", EXAMPLES)
    assert set(labels) >= V1_OPERATIONS, set(labels) ^ V1_OPERATIONS


def test_api_without_a_token_is_401_everywhere(api_schema) -> None:
    """The same operations without an Authorization header: 401 with `WWW-Authenticate:
    Bearer`, as documented, never a 5xx.

    Fails if a /v1 route loses its `require_token` dependency (e.g. the sessions router's
    `dependencies=AUTH`), or the 401 goes undeclared in the document."""
    _fuzz_every_operation(api_schema, "no_token", max(5, EXAMPLES // 3))


def test_api_with_a_wrong_token_is_401_everywhere(api_schema) -> None:
    """A wrong bearer token: 401 everywhere, never a 5xx.

    Fails if token_ok accepts any token (e.g. `return True`)."""
    _fuzz_every_operation(api_schema, "wrong_token", max(5, EXAMPLES // 3))


# SDP offers and images -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_settings()), headers=AUTH_HEADERS["token"]) as c:
        yield c


class _Sessions:
    """One session to offer to, renewed when an offer was answered (a viewer now holds it)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.sid: str | None = None

    def current(self) -> str:
        if self.sid is None:
            r = self.client.post("/v1/sessions")
            assert r.status_code == 201, r.text
            self.sid = r.json()["session_id"]
        return self.sid

    def renew(self) -> None:
        if self.sid is not None:
            self.client.delete(f"/v1/sessions/{self.sid}")
            self.sid = None


@pytest.fixture(scope="module")
def offer_sessions(client: TestClient):
    sessions = _Sessions(client)
    yield sessions
    sessions.renew()


def _assert_clear_4xx(r, *words: str) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    if isinstance(detail, list):  # FastAPI's own validation errors: one entry per problem
        assert detail and all(d.get("msg") for d in detail), detail
    else:
        assert isinstance(detail, str) and detail.strip(), r.text[:300]
        assert not detail.rstrip().endswith(":"), f"a sentence cut short: {detail!r}"
        if words:
            assert any(w in detail for w in words), detail


def test_offer_edge_cases_get_a_clear_4xx(client: TestClient) -> None:
    """The offers the issue lists, each once: no video, sendonly video, not SDP, truncated,
    over the size limit.

    Fails if check_offer stops refusing offers without video itself (aiortc's own error then
    says nothing a browser developer can act on), or if a parse error escapes as a 500."""
    sessions = _Sessions(client)
    real = real_offer()
    cases = {
        "no video": (real_offer(video=False), 400, "no video transceiver"),
        "sendonly video": (
            real.replace("a=recvonly", "a=sendonly", 1),
            400,
            "recvonly or sendrecv",
        ),
        "not sdp": ("hello", 400, "SDP"),
        "truncated": (real[: len(real) // 3], 400, "offer"),
        "huge": (real + "a=x:" + "z" * 300_000 + "\r\n", 422, ""),
    }
    for name, (sdp, status, word) in cases.items():
        r = client.post(
            f"/v1/sessions/{sessions.current()}/offer", json={"sdp": sdp, "type": "offer"}
        )
        assert r.status_code == status, (name, r.text[:300])
        _assert_clear_4xx(r, word)
    ok = client.post(
        f"/v1/sessions/{sessions.current()}/offer", json={"sdp": real, "type": "offer"}
    )
    assert ok.status_code == 200 and ok.json()["type"] == "answer"
    sessions.renew()


def _with_line(line: str) -> dict:
    """The real offer with one bad line in its video section (aiortc's parser raises on it,
    with an empty message for these two)."""
    lines = real_offer().split("\r\n")
    at = next(i for i, x in enumerate(lines) if x.startswith("m=video")) + 2
    return {"sdp": "\r\n".join([*lines[:at], line, *lines[at:]]), "type": "offer"}


@FUZZ
@given(body=sdp_offers())
@example(body=_with_line("a=candidate:garbage"))
@example(body=_with_line("a=fmtp:96 x"))
def test_fuzzed_offers_never_get_a_5xx(
    client: TestClient, offer_sessions: _Sessions, body: dict
) -> None:
    """Garbage, truncated, line-dropped and mutated offers, huge ones, offers without video,
    wrong types: 200 with an answer or a 4xx with a message, never a 5xx (TestClient re-raises
    a handler's exception, so a crash fails here with its traceback).

    Fails if an aiortc parse error gets through (e.g. drop check_offer's `except Exception`
    around SessionDescription.parse: a truncated or mutated line is then a 500)."""
    r = client.post(f"/v1/sessions/{offer_sessions.current()}/offer", json=body)
    if r.status_code == 200:
        assert r.json()["type"] == "answer" and r.json()["sdp"].startswith("v=0")
        offer_sessions.renew()
    else:
        _assert_clear_4xx(r)


def test_decompression_bomb_and_truncated_images_get_400_or_413(client: TestClient) -> None:
    """A PNG of a few hundred bytes declaring 50000x50000 pixels, one declaring 2^31-1 a side,
    a truncated PNG, a file over the byte limit: each refused before anything is decoded, with a
    sentence naming the problem, over multipart and JSON base64 alike.

    Fails if load_reference_image decodes before checking the size (PIL would either raise its
    DecompressionBombError, a 500, or allocate gigabytes), or the byte limit check goes."""
    bombs = [png_declaring(50_000, 50_000), png_declaring(2**31 - 1, 2**31 - 1)]
    real = png_bytes()
    uploads = [(b, 400, "limit") for b in bombs]
    uploads += [
        (real[: len(real) // 2], 400, "truncated"),
        (b"\0" * (MAX_IMAGE_BYTES + 1), 413, "larger"),
    ]
    for data, status, word in uploads:
        multipart = client.post("/v1/sessions", files={"image": ("x.png", data, "image/png")})
        encoded = client.post(
            "/v1/sessions", json={"image_base64": base64.b64encode(data).decode()}
        )
        for r in (multipart, encoded):
            assert r.status_code == status, (word, r.status_code, r.text[:300])
            _assert_clear_4xx(r, word)
    assert client.get("/healthz").status_code == 200


def png_bytes() -> bytes:
    from tests.fuzz_inputs import encoded_image

    return encoded_image("PNG", "RGB", (64, 64))


@FUZZ
@given(data=image_uploads(), as_json=st.booleans())
def test_fuzzed_images_never_get_a_5xx(client: TestClient, data: bytes, as_json: bool) -> None:
    """Real images in 22 format/mode pairs, truncated, bit-flipped, garbage, bombs and PNGs
    declaring any size: 201 (then deleted), or 400/413 with a message; never a 5xx.

    Fails if the upload path lets a PIL exception other than the ones it maps escape (e.g.
    narrow load_reference_image's `except` to UnidentifiedImageError)."""
    if as_json:
        r = client.post("/v1/sessions", json={"image_base64": base64.b64encode(data).decode()})
    else:
        r = client.post("/v1/sessions", files={"image": ("x", data, "application/octet-stream")})
    if r.status_code == 201:
        assert client.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 204
    else:
        assert r.status_code in (400, 413), (r.status_code, r.text[:300])
        _assert_clear_4xx(r, "image", "reference")


# Regressions: what the fuzzers found --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_non_ascii_token_is_a_401_not_a_500(client: TestClient) -> None:
    """A bearer header or ?token= with non-ASCII characters is a wrong token (401, or the
    socket refused with 401), as is an `auth` message carrying one (closed 4401).

    Fails if token_ok hands such a string to secrets.compare_digest, which raises TypeError
    for non-ASCII str (a 500 on HTTP, a crashed handshake or socket handler)."""
    for value in (b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff"):
        r = client.get("/v1/config", headers={"Authorization": value})
        assert r.status_code == 401, r.text
    sid = client.post("/v1/sessions").json()["session_id"]
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect(f"/v1/sessions/{sid}/audio?token=%C3%A9t%C3%A9"),
    ):
        pass
    assert denied.value.status_code == 401
    with client.websocket_connect(f"/v1/sessions/{sid}/audio") as ws:
        ws.send_json({"type": "auth", "token": "été"})
        assert ws.receive_json()["type"] == "error"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401
    client.delete(f"/v1/sessions/{sid}")


@pytest.mark.timeout(60)  # a handler that dies without closing leaves receive() waiting
@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, 1007, "nest"),
        ('{"type": "start", "sample_rate": ' + "9" * 5000 + "}", 1007, "digits"),
        ('{"type": "start", "sample_rate": NaN}', 1008, "sample_rate"),
        ('{"type": "start", "sample_rate": Infinity}', 1008, "sample_rate"),
        ('{"type": "start", "sample_rate": -Infinity}', 1008, "sample_rate"),
    ],
)
def test_control_messages_that_crashed_the_parser_close_with_a_code(
    client: TestClient, text: str, code: int, words: str
) -> None:
    """Deeply nested JSON (RecursionError in json.loads), an integer of 5000 digits (a
    ValueError that is no JSONDecodeError) and a NaN or infinite sample_rate (int() of them
    raises) end the socket with an error message and a documented close code,
    and the session stays usable.

    Fails if parse_control lets RecursionError, ValueError or OverflowError out: the handler
    dies and the socket ends without an error message or a documented code."""
    sid = client.post("/v1/sessions").json()["session_id"]
    url = f"/v1/sessions/{sid}/audio?token={TOKEN}"
    with client.websocket_connect(url) as ws:
        ws.send_text(text)
        error = ws.receive_json()
        assert error["type"] == "error" and words in error["message"], error
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == code
    with client.websocket_connect(url) as ws:  # the session takes a new socket
        ws.send_json({"type": "start", "sample_rate": 16000})
        assert ws.receive_json()["type"] == "started"
    client.delete(f"/v1/sessions/{sid}")


def test_json_session_options_are_not_coerced(client: TestClient) -> None:
    """Found by schemathesis' negative_data_rejection: `{"width": false}` made a session (lax
    validation read false as 0, then 0 as "the server's width"). JSON options of the wrong type
    are a 422 naming the field; multipart fields, text by nature, still convert.

    Fails if read_session_request validates JSON bodies in lax mode again."""
    for body in ({"width": False}, {"seed": "3"}, {"steps": True}, {"sink_refresh": "yes"}):
        r = client.post("/v1/sessions", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text[:200])
        assert next(iter(body)) in r.json()["detail"], r.text
    # Text fields convert, and an empty one is "omitted" (what a form with an empty input
    # sends; the document's multipart schema allows "" since schemathesis flagged it).
    for fields in ({"seed": (None, "3"), "sink_refresh": (None, "true")}, {"seed": (None, "")}):
        form = client.post("/v1/sessions", files=fields)
        assert form.status_code == 201, form.text
        client.delete(f"/v1/sessions/{form.json()['session_id']}")


def test_an_offer_without_the_token_is_401_before_its_body_is_read(client: TestClient) -> None:
    """Found by schemathesis without a token: a malformed offer body got FastAPI's 422 (with
    the parse errors) before the router's token check ran; now 401, and with the token the
    same body is still FastAPI's 422.

    Fails if `offer` declares its body as a parameter again (`body: Offer`)."""
    sid = client.post("/v1/sessions").json()["session_id"]
    url = f"/v1/sessions/{sid}/offer"
    json_type = {"Content-Type": "application/json"}
    for body in (b"{not json", b'{"sdp": 1}', b""):
        wrong = client.post(url, content=body, headers={**json_type, "Authorization": "Bearer x"})
        assert wrong.status_code == 401, (body, wrong.status_code, wrong.text[:200])
        right = client.post(url, content=body, headers=json_type)
        assert right.status_code == 422 and isinstance(right.json()["detail"], list), right.text
    client.delete(f"/v1/sessions/{sid}")


def test_an_oversized_offer_is_a_documented_413(api_schema) -> None:
    """The case schemathesis found in CI once the offer body got its size limit: an SDP past
    `maxLength` in a body past MAX_OFFER_BYTES is answered 413, which the document declares
    (status, content type, body schema) and `negative_data_rejected` counts as a rejection."""
    op = api_schema["/v1/sessions/{session_id}/offer"]["POST"]
    case = op.Case(
        path_parameters={"session_id": "nope"},
        body={"type": "O", "sdp": "r" + "\U0001f3fb" * 210_000},
        media_type="application/json",
    )
    response = case.call_and_validate(
        headers=AUTH_HEADERS["token"], checks=[*CHECKS, negative_data_rejected]
    )
    assert response.status_code == 413

"""End to end in a real browser: Debian's chromium driven by Playwright opens the page with
`?autostart=1&audio=...`, which creates a session with the default reference, connects over
WebRTC and streams the audio file through the websocket; the <video> element must present at
least 20 frames per second for 10 seconds, counted in the page with requestVideoFrameCallback.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.harness import ServiceProcess

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("browser") / "serve.log"
    with ServiceProcess("--max-sessions", "2", log_path=log) as svc:
        yield svc


def _run_page(service: ServiceProcess, audio_url: str, shot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{service.base}/?autostart=1&loop=1&audio={audio_url}")
            page.wait_for_function(
                "window.diffstream && window.diffstream.presentedFrames > 10", timeout=30_000
            )
            state = page.evaluate("window.diffstream")
            assert state["status"] == "connected", state
            f0 = page.evaluate("window.diffstream.presentedFrames")
            t0 = time.monotonic()
            page.wait_for_timeout(10_000)
            f1 = page.evaluate("window.diffstream.presentedFrames")
            t1 = time.monotonic()
            state = page.evaluate("window.diffstream")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(shot))
            page.evaluate("document.getElementById('disconnect').click()")
            page.wait_for_function("window.diffstream.status === 'idle'", timeout=10_000)
        finally:
            browser.close()
    return {"fps": (f1 - f0) / (t1 - t0), "state": state, "errors": errors}


def test_browser_plays_the_avatar_at_20_fps_for_10_seconds(service: ServiceProcess) -> None:
    # The sample endpoint serves speech (espeak-ng, Opus in Ogg); the page decodes it with
    # WebAudio and streams it as s16le in real time, looping so 10 s are always covered.
    out = _run_page(service, "/v1/sample-audio", ARTIFACTS / "browser.png")
    state = out["state"]
    print(f"browser presented {out['fps']:.1f} fps; server stats {state['stats']}")
    assert not out["errors"], out["errors"]
    assert state["error"] is None, state["error"]
    assert out["fps"] >= 20, f"the <video> presented {out['fps']:.1f} fps"
    # The frames were generated, not the last one repeated: the server's own count agrees.
    history = state["statsHistory"][-8:]
    generated = sum(s["generated_fps"] for s in history) / len(history)
    assert generated >= 20, f"the engine produced {generated:.1f} fps ({history[-1]})"
    assert state["audioSentSeconds"] >= 10  # the page streamed the audio in real time
    assert (ARTIFACTS / "browser.png").stat().st_size > 10_000
    # Leaving the page's session with its Disconnect button frees it on the server.
    deadline = time.monotonic() + 10
    while service.health()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert service.health()["sessions"] == 0

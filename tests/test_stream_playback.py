"""Playback events on the audio websocket: `segment` markers delimit utterances, the service says
when the viewer is shown the first frame of each (`playback_started`) and how much of it was shown
when it ended (`playback_finished` with `position_s`, `interrupted`), on the media clock.

The tracker is tested directly with slots built by hand; the service (tiny model, real WebRTC
viewer in this process) is checked against what the viewer actually received: the audio the
viewer got between an utterance's events is speech, after an interrupt's cut it is silence.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from stream.client import AvatarClient
from stream.harness import ServiceProcess
from stream.playback import PlaybackTracker, TooManyUtterances
from tests.speech import espeak

RATE, FPS = 16000, 25.0
SPF = 640  # samples per frame at 16 kHz and 25 fps
FRAME_S = 1 / FPS


def _tracker(**kw) -> tuple[PlaybackTracker, list[dict]]:
    events: list[dict] = []
    return PlaybackTracker(RATE, FPS, events.append, **kw), events


def _show(tracker: PlaybackTracker, first_slot: int, lo: int, hi: int) -> int:
    """Decide one slot per frame of samples [lo, hi); returns the next slot."""
    k = first_slot
    for a in range(lo, hi, SPF):
        tracker.slot(k, (a, min(hi, a + SPF)))
        k += 1
    return k


# The tracker ------------------------------------------------------------------------------------


def test_an_utterance_finishes_when_its_last_frame_has_been_shown() -> None:
    """Fails if playback_finished went out when the last frame was decided instead of after it
    was shown (media time 0.40 instead of 0.44), or if position_s counted the audio received
    instead of the audio shown."""
    t, events = _tracker()
    t.audio(0, 10 * SPF)  # utterance 1: 0.4 s
    assert t.delimit(10 * SPF, None) == {"utterance": 1, "duration_s": 0.4}
    t.audio(10 * SPF, 15 * SPF)  # utterance 2, still open
    t.slot(0, None)  # idle frame
    k = _show(t, 1, 0, 10 * SPF)  # slots 1..10
    assert [e["type"] for e in events] == ["playback_started"]
    assert events[0] == {"type": "playback_started", "utterance": 1, "media_time_s": 0.04}
    _show(t, k, 10 * SPF, 11 * SPF)  # slot 11: the first frame of utterance 2
    finished, started = events[1], events[2]
    assert finished == {
        "type": "playback_finished",
        "utterance": 1,
        "position_s": 0.4,
        "duration_s": 0.4,
        "interrupted": False,
        "reason": "played",
        "media_time_s": 0.44,
    }
    assert started["utterance"] == 2 and started["media_time_s"] == 0.44


def test_an_interrupt_reports_only_what_was_shown() -> None:
    """Fails if playback_finished after an interrupt reports the full position (0.4 s) or the
    audio received, or not `interrupted`."""
    t, events = _tracker()
    t.audio(0, 10 * SPF)
    t.delimit(10 * SPF, None)
    k = _show(t, 0, 0, 4 * SPF)  # 4 of its 10 frames shown
    t.interrupt(k)
    (finished,) = [e for e in events if e["type"] == "playback_finished"]
    assert finished["interrupted"] is True and finished["reason"] == "interrupt"
    assert finished["position_s"] == 0.16 and finished["duration_s"] == 0.4
    assert finished["media_time_s"] == 0.16
    assert t.pending == 0 and t.open_utterance is None


def test_utterances_sharing_a_frame_and_a_late_marker() -> None:
    """Two utterances meeting inside one frame each get their own share of it; a segment
    marker that arrives after all of its audio was shown finishes the utterance at once.
    Fails if an utterance's share of a frame it begins in is not counted (utterance 2 would
    report 0.045 s instead of 0.0625 s), or if a late marker waits for a frame that never comes."""
    t, events = _tracker()
    t.audio(0, 1000)
    t.delimit(1000, None)
    t.audio(1000, 2000)
    t.delimit(2000, None)
    for k, span in enumerate([(0, 640), (640, 1280), (1280, 1920), (1920, 2000)]):
        t.slot(k, span)
    t.slot(4, None)
    finished = [e for e in events if e["type"] == "playback_finished"]
    assert [(e["utterance"], e["position_s"], e["media_time_s"]) for e in finished] == [
        (1, 0.0625, 0.08),
        (2, 0.0625, 0.16),
    ]
    # The marker comes late: everything was already shown.
    t.audio(2000, 2640)
    t.slot(5, (2000, 2640))
    t.delimit(2640, now_slot=7)
    assert events[-1]["type"] == "playback_finished"
    assert events[-1]["media_time_s"] == 0.28 and events[-1]["position_s"] == 0.04


def test_skipped_utterance_and_session_end_and_bound() -> None:
    """An utterance whose audio never reached a frame (dropped when behind real time) ends as
    "dropped" with position 0; one cut by the session ending as "ended" with what was shown;
    and delimited utterances waiting to play are bounded. Fails if a dropped utterance reported
    its duration as played, or if markers could pile up utterances without limit."""
    t, events = _tracker(max_pending=2)
    t.audio(0, SPF)
    t.delimit(SPF, None)
    t.audio(SPF, 3 * SPF)
    t.delimit(3 * SPF, None)
    t.slot(0, (SPF, 2 * SPF))  # utterance 1 was skipped over
    t.slot(1, (2 * SPF, 3 * SPF))
    (dropped,) = [e for e in events if e["type"] == "playback_finished"]
    assert dropped["utterance"] == 1 and dropped["reason"] == "dropped"
    assert dropped["position_s"] == 0.0 and not dropped["interrupted"]
    t.audio(3 * SPF, 6 * SPF)  # utterance 3, open, one frame of it shown
    t.slot(2, (3 * SPF, 4 * SPF))
    t.close(now_slot=3)
    ended = events[-1]
    assert (ended["utterance"], ended["reason"], ended["position_s"]) == (3, "ended", 0.04)
    # utterance 2 played out before the end: its last frame was decided
    assert [e["reason"] for e in events if e["type"] == "playback_finished"] == [
        "dropped",
        "played",
        "ended",
    ]

    t2, _ = _tracker(max_pending=2)
    for i in range(2):
        t2.audio(i * 10, i * 10 + 10)
        t2.delimit(i * 10 + 10, None)
    t2.audio(20, 30)
    with pytest.raises(TooManyUtterances):
        t2.delimit(30, None)
    assert t2.pending == 3


# The service ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("playback") / "serve.log"
    # No degradation: on a busy machine the engine may fall behind, and dropping audio on
    # purpose (tested elsewhere) would make "the whole utterance was shown" untrue.
    with ServiceProcess("--max-sessions", "2", "--degrade", "none", log_path=log) as svc:
        yield svc


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, np.ndarray, int]:
    first, rate = espeak("Hello, I am the avatar. This is my first sentence.")
    second, _ = espeak("And here is a second, much longer sentence that you will cut short.")
    return first, second, rate


def _loud(client: AvatarClient, since_s: float, until_s: float) -> np.ndarray:
    """Per received 20 ms audio frame with media time in [since_s, until_s): audible or not."""
    return np.array(
        [
            rms > 0.01
            for _, p, rms in client.received.audio
            if since_s <= client.audio_media_time(p) < until_s
        ]
    )


def test_events_match_what_the_viewer_received(service: ServiceProcess, speech) -> None:
    """Two utterances sent ahead as a TTS sends them, delimited by `segment`; the second is
    interrupted while it plays. Fails if an event's media time is not on the viewer's clock
    (the speech the viewer got must lie between an utterance's events, and after the
    interrupt's cut it must be silent), if the first does not finish as played with its whole
    duration, or if the interrupted one reports more than what was shown before the cut."""
    first, second, rate = speech

    async def run() -> AvatarClient:
        client = AvatarClient(service.base)
        await client.create()
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        started = await client.open_audio(rate)
        assert started["type"] == "started"
        await client.send_pcm(first / 32768.0, rate, realtime=False)
        one = await client.control("segment", reply="segment_ended")
        await client.send_pcm(second / 32768.0, rate, realtime=False)
        two = await client.control("segment", reply="segment_ended")
        assert (one["utterance"], two["utterance"]) == (1, 2)
        assert one["duration_s"] == pytest.approx(len(first) / rate, abs=0.01)
        await client.wait_message("playback_started", timeout=30)
        n = len(client.received.messages)
        await client.wait_message("playback_finished", timeout=30)
        started2 = await client.wait_message("playback_started", since=n, timeout=30)
        assert started2["utterance"] == 2
        await asyncio.sleep(1.2)
        client.interrupt_reply = await client.control("interrupt", reply="interrupted")
        await asyncio.sleep(1.5)
        await client.close()
        return client

    client = asyncio.run(run())
    messages = [m for _, m in client.received.messages]
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "started" and "media_started" in kinds
    s1, s2 = client.received.of_type("playback_started")
    f1, f2 = client.received.of_type("playback_finished")
    cut = client.interrupt_reply
    print(f"events: {s1}, {f1}, {s2}, {f2}, {cut}")

    # Utterance 1 played out whole, contiguously on the media clock.
    assert (f1["utterance"], f1["reason"], f1["interrupted"]) == (1, "played", False)
    assert f1["position_s"] == pytest.approx(f1["duration_s"], abs=FRAME_S)
    # On the media clock it lasts at least its audio (longer by any frame repeated while a
    # block was late: a repeat carries silence).
    span1 = f1["media_time_s"] - s1["media_time_s"]
    assert f1["duration_s"] - FRAME_S <= span1 <= f1["duration_s"] + 1.0
    # Utterance 2 was cut: the finish event comes before the interrupt's reply, and reports what
    # was shown up to the cut.
    assert messages.index(f2) < messages.index(cut)
    assert (f2["utterance"], f2["reason"], f2["interrupted"]) == (2, "interrupt", True)
    assert 0.5 < f2["position_s"] < f2["duration_s"] - 0.5
    assert f2["media_time_s"] == cut["media_time_s"]
    assert f2["position_s"] <= cut["media_time_s"] - s2["media_time_s"] + FRAME_S

    # What the viewer received, placed on the media clock by `media_started`.
    during1 = _loud(client, s1["media_time_s"], f1["media_time_s"])
    before = _loud(client, 0.0, s1["media_time_s"] - 0.1)
    during2 = _loud(client, s2["media_time_s"], cut["media_time_s"])
    after = _loud(client, cut["media_time_s"] + 0.1, 1e9)
    print(
        f"audible share: before {before.mean():.2f}, utterance 1 {during1.mean():.2f}, "
        f"utterance 2 {during2.mean():.2f}, after the cut {after.mean():.2f} of {len(after)}"
    )
    assert len(before) >= 5 and not before.any(), "speech before its playback_started"
    assert during1.mean() > 0.4 and during2.mean() > 0.4
    assert len(after) >= 25 and not after.any(), "speech after the interrupt's media time"


def test_events_without_a_viewer(service: ServiceProcess, speech) -> None:
    """A program that only feeds audio still gets the events: nothing was shown, so an
    interrupt reports position 0 with no media time, and `stop` ends the last utterance as
    "ended" before the socket closes normally. Fails if events depended on a viewer (none
    would come) or if a cut reported audio as played that no one was shown."""
    first, _, rate = speech

    async def run() -> AvatarClient:
        client = AvatarClient(service.base)
        await client.create()
        await client.open_audio(rate)
        await client.send_pcm(first[: rate // 2] / 32768.0, rate, realtime=False)
        await client.control("segment", reply="segment_ended")
        reply = await client.control("interrupt", reply="interrupted")
        assert reply["media_time_s"] is None
        await client.send_pcm(first[: rate // 4] / 32768.0, rate, realtime=False)
        await client.control("stop")
        assert await client.wait_socket_closed(20) == 1000
        await client.close(delete=False)
        return client

    client = asyncio.run(run())
    f1, f2 = client.received.of_type("playback_finished")
    assert not client.received.of_type("playback_started")
    assert (f1["utterance"], f1["interrupted"], f1["position_s"], f1["media_time_s"]) == (
        1,
        True,
        0.0,
        None,
    )
    assert f1["duration_s"] == pytest.approx(0.5, abs=0.01)
    assert (f2["utterance"], f2["reason"], f2["position_s"]) == (2, "ended", 0.0)
    kinds = [m["type"] for _, m in client.received.messages]
    assert kinds.index("stopping") < kinds.index("playback_finished", kinds.index("stopping"))


def test_stop_reports_the_last_utterance_played(service: ServiceProcess, speech) -> None:
    """`stop` without a marker: the open utterance plays out, its playback_finished (played,
    the whole duration) reaches the client, then the socket closes with 1000. Fails if `stop`
    does not end the open utterance (it would finish as "ended" when the session closes)."""
    first, _, rate = speech

    async def run() -> AvatarClient:
        client = AvatarClient(service.base)
        await client.create()
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        await client.open_audio(rate)
        await client.send_pcm(first / 32768.0, rate, realtime=False)
        await client.control("stop", reply="stopping")
        assert await client.wait_socket_closed(30) == 1000
        await client.close(delete=False)
        return client

    client = asyncio.run(run())
    (finished,) = client.received.of_type("playback_finished")
    assert (finished["reason"], finished["interrupted"]) == ("played", False)
    assert finished["position_s"] == pytest.approx(len(first) / rate, abs=FRAME_S)


def test_segment_markers_cannot_pile_up(service: ServiceProcess) -> None:
    """A client that sends a marker after every few samples, with nothing playing them, gets
    a clear error and only its socket ends. Fails if utterances waiting to play were unbounded
    (no error after 300 markers), or if a closing socket drops the error still in its outbox
    (the writer cancelled before it is flushed)."""

    async def run() -> tuple[int, dict | None]:
        client = AvatarClient(service.base)
        await client.create()
        url = service.base.replace("http", "ws") + f"/v1/sessions/{client.session_id}/audio"
        error = None
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            try:
                for _ in range(300):
                    await ws.send(b"\x00\x10" * 16)
                    await ws.send(json.dumps({"type": "segment"}))
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message["type"] == "error":
                        error = message
            except websockets.ConnectionClosed:
                pass
            code = ws.close_code
        await client.close()
        return code, error

    code, error = asyncio.run(run())
    assert code == 1008 and error is not None and "segment markers" in error["message"]
    assert service.metrics()['diffstream_client_errors_total{kind="too_many_segments"}'] >= 1

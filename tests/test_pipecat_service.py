"""The pipecat video service against the real service on localhost, in a real pipecat Pipeline
run by a PipelineTask: TTS frames of espeak-ng speech enter, the sink at the end collects the
avatar's image and audio frames. No keys, no network beyond localhost.

The sink processes frames in direct mode, so it sees them in exactly the order the service
pushed them (a queued processor would let the InterruptionFrame, a system frame, overtake media
frames pushed just before it). Timing claims are made on the frames' pts (the session's media
clock), never on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from stream.client import http
from stream.harness import ServiceProcess
from stream.integrations.pipecat import DiffstreamVideoService
from tests.speech import espeak

TOKEN = "pipecat-token"
AV_LIMIT_S = 0.080
LOUD = 0.02  # rms (of full scale) above which a 20 ms audio frame is speech


# Pipeline parts ---------------------------------------------------------------------------------


class Collector(FrameProcessor):
    """Records every frame in the order it arrives (direct mode: the order it was pushed)."""

    def __init__(self, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        super().__init__(enable_direct_mode=True)
        self.direction = direction
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


@dataclass
class Run:
    """One pipeline: [upstream collector, service, sink], and what the service reported."""

    service: DiffstreamVideoService
    upstream: Collector
    sink: Collector
    task: PipelineTask
    runner_task: asyncio.Task
    events: list[dict] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_event(self, kind: str, n: int = 1, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e["type"] == kind]
            if len(found) >= n:
                return found[n - 1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind} #{n} within {timeout} s; events: {self.events}")

    async def finish(self, frame: Frame | None = None, timeout: float = 60.0) -> None:
        await self.task.queue_frame(frame or EndFrame())
        await asyncio.wait_for(self.runner_task, timeout)


async def start_pipeline(base: str, *, token: str | None = TOKEN, **options: Any) -> Run:
    service = DiffstreamVideoService(base, token=token, **options)
    upstream, sink = Collector(FrameDirection.UPSTREAM), Collector()
    task = PipelineTask(
        Pipeline([upstream, service, sink]),
        params=PipelineParams(audio_out_sample_rate=24000),
        cancel_on_idle_timeout=False,
    )
    runner = PipelineRunner(handle_sigint=False)
    run = Run(service, upstream, sink, task, asyncio.create_task(runner.run(task)))

    @service.event_handler("on_connected")
    async def _connected(_service: Any, session_id: str) -> None:
        run.sessions.append(session_id)
        run.connected.set()

    @service.event_handler("on_playback_started")
    async def _started(_service: Any, event: dict) -> None:
        run.events.append(event)

    @service.event_handler("on_playback_finished")
    async def _finished(_service: Any, event: dict) -> None:
        run.events.append(event)

    await asyncio.wait_for(run.connected.wait(), 60)
    return run


def tts_frames(pcm: np.ndarray, rate: int, channels: int = 1, chunk_s: float = 0.02) -> list:
    """What a TTS service pushes: started, 20 ms audio chunks, stopped."""
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1).reshape(-1)
    step = int(rate * chunk_s) * channels
    audio = [
        TTSAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=rate, num_channels=channels)
        for i in range(0, len(pcm), step)
    ]
    return [TTSStartedFrame(), *audio, TTSStoppedFrame()]


def audio_track(frames: list[SpeechOutputAudioRawFrame]) -> tuple[np.ndarray, np.ndarray]:
    """(pts in seconds, rms) per audio frame the sink got."""
    pts = np.array([f.pts / 1e9 for f in frames])
    rms = np.array(
        [np.sqrt(np.mean((np.frombuffer(f.audio, "<i2") / 32768.0) ** 2)) for f in frames]
    )
    return pts, rms


def av_skew(frames: list[Frame]) -> list[float]:
    """For each media frame in push order: newest audio pts minus newest video pts (s)."""
    audio = video = None
    out = []
    for f in frames:
        if isinstance(f, SpeechOutputAudioRawFrame):
            audio = f.pts / 1e9
        elif isinstance(f, OutputImageRawFrame):
            video = f.pts / 1e9
        else:
            continue
        if audio is not None and video is not None:
            out.append(audio - video)
    return out


# Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("pipecat") / "serve.log"
    # No degradation on purpose: the claims here are about the integration, and a busy test
    # machine must not drop speech behind real time.
    with ServiceProcess(
        "--auth-token",
        TOKEN,
        "--max-sessions",
        "4",
        "--max-sessions-per-client",
        "4",  # one token: every session here is the same client
        "--degrade",
        "none",
        log_path=log,
    ) as svc:
        svc.block_s = 3 * 4 / 25  # tiny: 3 latent frames of 4 video frames at 25 fps
        yield svc


@pytest.fixture(scope="module")
def sentence() -> tuple[np.ndarray, int]:
    return espeak("Hello! I am your avatar, and I speak with the voice that moves my face.")


@pytest.fixture(scope="module")
def long_sentence() -> tuple[np.ndarray, int]:
    return espeak(
        "This is a long answer that goes on and on, about the weather, the sea, the mountains, "
        "and many other things, so that there is plenty of time to cut it short."
    )


@contextlib.asynccontextmanager
async def finally_cancelled(r: Run):
    """If the test body fails, cancel the pipeline so the failure is reported, not a hang."""
    try:
        yield
    finally:
        if not r.runner_task.done():
            await r.task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.runner_task, 20)


async def until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        await asyncio.sleep(0.02)


def _sessions(svc: ServiceProcess) -> list[str]:
    return [s["session_id"] for s in http("GET", f"{svc.base}/v1/sessions", token=TOKEN)[1]]


# Tests ------------------------------------------------------------------------------------------


def test_speech_comes_back_as_avatar_frames_with_its_own_audio(service, sentence) -> None:
    """TTS frames enter, EndFrame right behind them: the service plays the speech out before
    it ends. Fails if the raw TTS audio is forwarded instead of the service's (a
    TTSAudioRawFrame reaches the sink), if the EndFrame closes the session before the speech
    was shown (no audible audio at the sink), if frames do not come at the model's fps for the
    length of the speech, or if audio and video drift more than 80 ms apart by pts, or
    more than a frame: pushed as they arrive instead of in pts order (aiortc's receiver holds
    audio back longer than video), they are 80 ms apart."""
    pcm, rate = sentence

    async def run() -> Run:
        r = await start_pipeline(service.base)
        async with finally_cancelled(r):
            await r.task.queue_frames(tts_frames(pcm, rate))
            await r.wait_event("playback_started")
            await r.finish()
        return r

    r = asyncio.run(run())
    assert not r.sink.of(TTSAudioRawFrame), "the raw TTS audio was forwarded"
    video = r.sink.of(OutputImageRawFrame)
    audio = r.sink.of(SpeechOutputAudioRawFrame)
    started, finished = r.events[0], r.events[-1]
    assert (finished["type"], finished["reason"]) == ("playback_finished", "played")
    assert finished["position_s"] == pytest.approx(len(pcm) / rate, abs=0.05)
    assert isinstance(r.sink.frames[-1], EndFrame)

    # Video at the model's rate across the speech, by pts.
    t0, t1 = started["media_time_s"], finished["media_time_s"]
    vpts = np.array([f.pts / 1e9 for f in video])
    speaking = vpts[(vpts >= t0) & (vpts < t1)]
    steps = np.diff(vpts)
    print(
        f"{len(video)} frames; {len(speaking)} over {t1 - t0:.2f} s of speech; size "
        f"{video[0].size}; {r.service.frames_dropped} dropped by the service"
    )
    assert np.median(steps) == pytest.approx(0.04, abs=1e-3) and np.all(steps > 0)
    # A frame may be lost on a loaded machine (aiortc's receiver, the sender's drift reset).
    assert len(speaking) >= 0.9 * (t1 - t0) * 25
    assert (
        video[0].format == "RGB" and len(video[0].image) == 3 * video[0].size[0] * video[0].size[1]
    )

    # The service's audio, with the speech in it where the events say.
    apts, rms = audio_track(audio)
    assert audio[0].sample_rate == 48000 and audio[0].num_channels == 1
    during = rms[(apts >= t0) & (apts < t1)]
    assert len(during) >= 0.9 * (t1 - t0) / 0.02 and (during > LOUD).mean() > 0.4
    assert not (rms[apts < t0 - 0.1] > LOUD).any(), "speech before playback_started"

    skew = av_skew(r.sink.frames)
    worst = max(abs(s) for s in skew)
    print(
        f"A/V skew in push order by pts: median {1000 * np.median(skew):.0f} ms, worst {1000 * worst:.0f} ms"
    )
    assert worst <= AV_LIMIT_S
    # Pushed in pts order, the two tracks are never more than one video frame apart.
    assert worst <= 0.04 + 1e-3, "the tracks were pushed as they arrived, not in pts order"


def test_interruption_stops_new_speech_at_once(service, long_sentence) -> None:
    """An InterruptionFrame in the middle of a long answer: the service tells the server,
    forwards the frame, and no speech frame follows it; the server's playback_finished says the
    answer was cut, with the position the user reached. Fails if `interrupt` is never sent (the
    answer keeps playing after the frame), if frames of the cut speech already on their way are
    pushed after the frame, or if the position is the whole answer."""
    pcm, rate = long_sentence

    async def run() -> Run:
        r = await start_pipeline(service.base)
        async with finally_cancelled(r):
            await r.task.queue_frames(tts_frames(pcm, rate))
            started = await r.wait_event("playback_started")
            # Let the answer play for a while on the media clock (as the sink sees it).
            played = started["media_time_s"] + 1.5
            await until(
                lambda: (
                    r.sink.frames and r.sink.frames[-1].pts and r.sink.frames[-1].pts / 1e9 > played
                )
            )
            r.sent_at_cut = r.service.audio_sent_s
            await r.task.queue_frame(InterruptionFrame())
            await r.wait_event("playback_finished")
            # Keep watching the idle avatar for a while after the cut.
            cut_at = len(r.sink.frames)
            await until(
                lambda: (
                    len([f for f in r.sink.frames[cut_at:] if isinstance(f, OutputImageRawFrame)])
                    >= 40
                )
            )
            await r.finish(CancelFrame())
        return r

    r = asyncio.run(run())
    frames = r.sink.frames
    cut = next(i for i, f in enumerate(frames) if isinstance(f, InterruptionFrame))
    before = [f for f in frames[:cut] if isinstance(f, SpeechOutputAudioRawFrame)]
    after = [f for f in frames[cut:] if isinstance(f, SpeechOutputAudioRawFrame)]
    last_pts = (
        max(
            f.pts
            for f in frames[:cut]
            if isinstance(f, (SpeechOutputAudioRawFrame, OutputImageRawFrame))
        )
        / 1e9
    )
    b_pts, b_rms = audio_track(before)
    a_pts, a_rms = audio_track(after)
    finished = [e for e in r.events if e["type"] == "playback_finished"][0]
    resume = finished["media_time_s"]  # the server's cut: from here on, no cut speech
    loud_after = a_pts[a_rms > LOUD]
    late = (loud_after.max() - last_pts) if len(loud_after) else 0.0
    print(
        f"last pts before the InterruptionFrame {last_pts:.2f} s, server's cut {resume:.2f} s; "
        f"audible frames after it: {np.round(loud_after, 2).tolist()} (last "
        f"{1000 * late:.0f} ms after the last pts before it; one block = "
        f"{1000 * service.block_s:.0f} ms); first frame after it at +"
        f"{1000 * (a_pts[0] - last_pts):.0f} ms; {r.service.frames_dropped} frames dropped "
        f"here; TTS audio sent {r.sent_at_cut:.2f} s before the cut, "
        f"{r.service.audio_sent_s:.2f} s in all; {finished}"
    )
    assert (b_rms[-50:] > LOUD).mean() > 0.3, "the answer was not playing when cut"
    assert late <= service.block_s, "speech went on for more than a block after the cut"
    # Frames of the cut speech still on their way (before the server's cut) are dropped...
    assert not (loud_after < resume).any(), "cut speech was pushed after the interruption"
    # ...and after the cut only the codec's overlap into the next 20 ms may still be audible.
    assert not (loud_after >= resume + 0.02).any(), "new speech after the interruption"
    assert len(after) >= 25, "the avatar did not go on (idling) after the cut"
    assert finished["interrupted"] is True and finished["reason"] == "interrupt"
    assert 1.0 < finished["position_s"] < finished["duration_s"] - 1.0


def test_a_lost_session_is_replaced_once(tmp_path, sentence) -> None:
    """The session is deleted under the running pipeline: the service opens a new one and the
    avatar goes on. Then the server goes away: the one attempt to replace the session fails,
    the service says so with a non-fatal ErrorFrame upstream and lets the TTS audio through, so
    the bot still speaks. Fails if the service does not reconnect (no second session, no frames
    after the loss), retries without end, or swallows the voice once it has given up."""
    pcm, rate = sentence
    svc = ServiceProcess("--auth-token", TOKEN, "--max-sessions", "2", log_path=tmp_path / "log")
    svc.start()

    async def run() -> Run:
        r = await start_pipeline(svc.base)
        async with finally_cancelled(r):
            await until(lambda: len(r.sink.of(OutputImageRawFrame)) >= 10)
            r.connected.clear()
            await asyncio.to_thread(
                http, "DELETE", f"{svc.base}/v1/sessions/{r.sessions[0]}", token=TOKEN
            )
            await asyncio.wait_for(r.connected.wait(), 60)
            seen = len(r.sink.of(OutputImageRawFrame))
            await until(lambda: len(r.sink.of(OutputImageRawFrame)) >= seen + 25)
            await r.task.queue_frames(tts_frames(pcm[:rate], rate))
            await r.wait_event("playback_started")

            await asyncio.to_thread(svc.stop)  # the server goes away
            await until(lambda: r.upstream.of(ErrorFrame))
            await r.task.queue_frames(tts_frames(pcm[: rate // 2], rate))
            await until(lambda: len(r.sink.of(TTSAudioRawFrame)) >= 20)
            await r.finish()
        return r

    try:
        r = asyncio.run(run())
    finally:
        svc.stop()
    assert len(r.sessions) == 2 and r.sessions[0] != r.sessions[1]
    assert r.service.reconnects == 2  # two losses, one attempt each; the second failed
    (error,) = r.upstream.of(ErrorFrame)
    print(f"gave up with: {error.error}")
    assert not error.fatal and "without the avatar" in error.error
    assert len(r.sink.of(TTSAudioRawFrame)) >= 20  # half a second of 20 ms chunks


def _threads_and_tasks() -> tuple[int, int]:
    gc.collect()
    return threading.active_count(), len(asyncio.all_tasks())


def test_twenty_pipelines_leave_no_thread_or_task_behind(service, sentence) -> None:
    """20 start/stop cycles, ended alternately by EndFrame and CancelFrame: threads and
    asyncio tasks of this process and the server's sessions stay flat. Fails if the service
    starts a task it does not end (e.g. the pusher started with asyncio.ensure_future instead
    of pipecat's task manager: one more task per cycle) or leaves a session on the server."""
    pcm, rate = sentence
    samples: list[tuple[int, int]] = []

    async def run() -> None:
        for cycle in range(20):
            r = await start_pipeline(service.base)
            async with finally_cancelled(r):
                await until(lambda r=r: len(r.sink.of(OutputImageRawFrame)) >= 5)
                await r.task.queue_frames(tts_frames(pcm[: rate // 2], rate))
                await r.finish(EndFrame() if cycle % 2 else CancelFrame())
            await asyncio.sleep(0.3)
            samples.append(_threads_and_tasks())

    asyncio.run(run())
    print(f"(threads, tasks) after each cycle: {samples}")
    warm = samples[4]
    assert samples[-1][0] <= warm[0] + 2, f"threads grew: {samples}"
    assert samples[-1][1] <= warm[1], f"tasks grew: {samples}"
    deadline = time.monotonic() + 10
    while _sessions(service) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sessions(service) == []

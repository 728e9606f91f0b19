"""The service's parts with no network: settings, protocol, ingest, the media clock and tracks,
and one session's scheduler driving the real tiny engine (frames pulled through the tracks)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.errors import ConfigError, InvalidAudioError
from stream.ingest import AudioIngest
from stream.protocol import (
    CloseCode,
    InterruptMessage,
    ProtocolError,
    StartMessage,
    parse_control,
)
from stream.settings import Settings, load_settings
from stream.timeline import AUDIO_FRAME_SAMPLES, AUDIO_RATE, MediaTimeline, MediaUnit
from stream.tracks import AvatarVideoTrack, DrivingAudioTrack

# Settings ----------------------------------------------------------------------------------------


def test_settings_read_env_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFSTREAM_MAX_SESSIONS", "7")
    monkeypatch.setenv("DIFFSTREAM_STUN_SERVERS", "stun:a.example:3478, stun:b.example:3478")
    monkeypatch.setenv("DIFFSTREAM_ALLOWED_ORIGINS", "https://app.example")
    s = load_settings(port=9001)
    assert s.max_sessions == 7 and s.port == 9001
    assert s.stun_servers == ["stun:a.example:3478", "stun:b.example:3478"]
    assert s.allowed_origins == ["https://app.example"]
    assert load_settings(max_sessions=2).max_sessions == 2  # a flag beats the environment
    assert s.ice_servers() == [{"urls": ["stun:a.example:3478", "stun:b.example:3478"]}]


def test_threads_reach_the_engine_worker_processes() -> None:
    workers = load_settings(executor="tpp", devices="cpu:3", threads=1, steps=2)
    assert workers.executor_options() == {"steps": 2, "threads": 1}
    # The local engine runs in a worker process by default, with the service's thread count.
    local = load_settings(threads=1)
    assert local.executor_options() == {"process": True, "threads": 1}
    in_thread = load_settings(threads=1, engine_process=False)
    assert in_thread.executor_options() == {"process": False} and in_thread.torch_threads() == 1


def test_schedule_shift_and_cache_mode_reach_the_engine() -> None:
    """serve --steps 3 --shift 4 --cache-mode reencode: the flags become settings, the settings
    executor options, and the engine runs with them, not with the model's own (the default:
    2 steps, shift 2, timestep forcing; the values differ from it on purpose, or the engine
    would pass with the options dropped); bad values are refused naming the flag's field."""
    from pipelines.executors import build_executor
    from stream.cli import build_parser
    from stream.commands.serve import settings_from_args

    argv = ["serve", "--steps", "3", "--shift", "4", "--cache-mode", "reencode"]
    s = settings_from_args(build_parser(argv).parse_args(argv))
    opts = {k: s.executor_options()[k] for k in ("steps", "shift", "cache_mode")}
    assert opts == {"steps": 3, "shift": 4.0, "cache_mode": "reencode"}
    ex = build_executor("local", "default", "cpu", **opts)
    try:
        config = ex.generator.config
        assert (config.steps, config.shift, config.cache_mode) == (3, 4.0, "reencode")
    finally:
        ex.close()
    plain = load_settings()
    assert "shift" not in plain.executor_options() and "cache_mode" not in plain.executor_options()
    with pytest.raises(ConfigError, match="cache_mode"):
        load_settings(cache_mode="sideways")
    with pytest.raises(ConfigError, match="shift"):
        load_settings(shift=0)


def test_settings_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="max_sessions"):
        load_settings(max_sessions=0)
    with pytest.raises(ConfigError, match="turn_username"):
        load_settings(turn_servers=["turn:turn.example:3478"])
    with pytest.raises(ConfigError, match="must start with stun"):
        load_settings(stun_servers=["turn:x"])
    s = load_settings(turn_servers=["turn:turn.example:3478"], turn_username="u", turn_password="p")
    assert s.ice_servers() == [
        {"urls": ["turn:turn.example:3478"], "username": "u", "credential": "p"}
    ]


# Protocol ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("{not json", CloseCode.INVALID_PAYLOAD, "malformed JSON"),
        ("[1, 2]", CloseCode.INVALID_PAYLOAD, "JSON object"),
        ('{"type": "dance"}', CloseCode.POLICY, "unknown message type"),
        ('{"type":"start","sample_rate":16000,"format":"mp3"}', CloseCode.UNSUPPORTED_DATA, "mp3"),
        ('{"type":"start","sample_rate":0}', CloseCode.POLICY, "0 Hz is out of range"),
        ('{"type":"start","sample_rate":10000000}', CloseCode.POLICY, "10000000 Hz"),
        ('{"type":"start","sample_rate":"fast"}', CloseCode.POLICY, "integer"),
        ('{"type":"start","sample_rate":16000,"channels":6}', CloseCode.POLICY, "channels"),
    ],
)
def test_bad_control_messages_get_a_code_and_a_reason(text: str, code: int, words: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_control(text)
    assert err.value.code == code
    assert words in err.value.message


def test_good_control_messages_parse() -> None:
    start = parse_control('{"type":"start","sample_rate":44100,"channels":2,"format":"f32le"}')
    assert isinstance(start, StartMessage) and start.channels == 2
    assert isinstance(parse_control('{"type":"interrupt"}'), InterruptMessage)


# Ingest ------------------------------------------------------------------------------------------


def _ingest(jitter_s: float = 0.05, max_buffer_s: float = 5.0) -> AudioIngest:
    ingest = AudioIngest(16000, max_buffer_s=max_buffer_s, jitter_s=jitter_s)
    ingest.start(StartMessage(type="start", sample_rate=16000, channels=1, format="s16le"))
    return ingest


def _s16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def test_ingest_idles_on_silence_and_never_invents_audio() -> None:
    ingest = _ingest()
    assert ingest.take(1920, force=False) is None  # nothing yet and not due: wait
    window = ingest.take(1920, force=True)  # due: silence keeps the avatar moving
    assert window is not None and window.silent and not window.audio.any()


def test_ingest_pads_speech_onset_in_front_and_keeps_a_cushion() -> None:
    ingest = _ingest(jitter_s=0.05)  # cushion 800 samples
    speech = np.linspace(0.1, 0.9, 1600, dtype=np.float32)
    ingest.push(_s16(speech))
    window = ingest.take(1920, force=True)
    assert window is not None
    real = 1600 - 800
    assert window.real_samples == real and window.first_real_offset == 1920 - real
    assert not window.audio[: 1920 - real].any()  # padding first, speech at the end
    assert ingest.buffered_samples == 800  # the cushion waits for the next window
    # While speaking, windows follow back to back with no padding.
    ingest.push(_s16(np.full(1920, 0.5, np.float32)))
    nxt = ingest.take(1920, force=False)
    assert nxt is not None and nxt.real_samples == 1920 and nxt.first_real_offset == 0
    np.testing.assert_allclose(nxt.audio[:800], speech[800:], atol=1e-4)  # nothing lost
    # Speech running dry mid-window is padded at the end.
    ingest.push(_s16(np.full(300, 0.5, np.float32)))
    tail = ingest.take(1920, force=True)
    assert tail is not None and tail.real_samples == 800 + 300 and not tail.audio[1100:].any()


def test_ingest_resamples_stereo_and_rejects_impossible_formats() -> None:
    ingest = AudioIngest(16000, max_buffer_s=5, jitter_s=0)
    ingest.start(StartMessage(type="start", sample_rate=48000, channels=2, format="f32le"))
    stereo = np.zeros((4800, 2), np.float32)
    stereo[:, 0] = 0.5
    stereo[:, 1] = 0.5
    ingest.push(stereo.astype("<f4").tobytes()[:-3])  # a message may end mid-sample
    ingest.push(stereo.astype("<f4").tobytes()[-3:])
    assert abs(ingest.buffered_samples - 1600) <= 64  # 100 ms at 16 kHz, minus filter delay
    with pytest.raises(InvalidAudioError):
        AudioIngest(16000, max_buffer_s=1, jitter_s=0).push(b"\0\0")


def test_ingest_interrupt_and_backpressure() -> None:
    ingest = _ingest(max_buffer_s=0.2)
    ingest.push(_s16(np.full(4000, 0.3, np.float32)))
    assert not ingest._room.is_set()  # over 0.2 s: the socket reader will wait
    assert ingest.interrupt() == 4000
    assert ingest.buffered_samples == 0 and ingest._room.is_set()


# Media clock and tracks --------------------------------------------------------------------------


def _marked_units(timeline: MediaTimeline, first: int, count: int) -> list[MediaUnit]:
    """Frame k is filled with value k; its audio samples all equal 100 + k."""
    units = []
    for k in range(first, first + count):
        frame = np.full((16, 16, 3), k % 256, np.uint8)
        audio = np.full(timeline.samples_in_slot(k), 100 + k, np.int16)
        units.append(MediaUnit(frame=frame, audio=audio, block_index=k // 3))
    return units


def test_tracks_share_one_clock_and_audio_matches_the_frame_on_screen() -> None:
    """Video pts advance by 90 kHz / fps; every 20 ms of audio carries the shown frame's audio."""

    async def run() -> None:
        fps = 25.0
        tl = MediaTimeline(fps, 16, 16, max_queued_frames=64)
        video, audio = AvatarVideoTrack(tl), DrivingAudioTrack(tl)
        tl.push(_marked_units(tl, 0, 30))
        vframes, aframes = [], []

        async def pull_video() -> None:
            for _ in range(30):
                vframes.append(await video.recv())

        async def pull_audio() -> None:
            for _ in range(60):
                aframes.append(await audio.recv())

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(pull_video(), pull_audio())
        elapsed = loop.time() - t0
        assert 1.0 <= elapsed <= 1.6  # 30 frames at 25 fps are paced, not burst
        pts = [f.pts for f in vframes]
        assert pts[0] == 0 and set(np.diff(pts)) == {3600}
        assert [f.time_base.denominator for f in vframes[:1]] == [90000]
        shown = {f.pts * AUDIO_RATE // 90000: int(f.to_ndarray()[0, 0, 0]) for f in vframes}
        assert list(shown.values()) == list(range(30))
        for f in aframes:
            assert f.sample_rate == AUDIO_RATE and f.samples == AUDIO_FRAME_SAMPLES
            k = tl.slot_of_sample(f.pts)  # the video slot on screen when this audio plays
            assert set(np.unique(f.to_ndarray())) == {100 + k}

    asyncio.run(run())


def test_timeline_repeats_the_last_frame_in_silence_when_generation_is_late() -> None:
    async def run() -> None:
        tl = MediaTimeline(50.0, 16, 16, max_queued_frames=64)
        video, audio = AvatarVideoTrack(tl), DrivingAudioTrack(tl)
        tl.push(_marked_units(tl, 0, 3))
        frames = [await video.recv() for _ in range(6)]
        values = [int(f.to_ndarray()[0, 0, 0]) for f in frames]
        assert values == [0, 1, 2, 2, 2, 2]  # never stalls: the last frame holds
        assert tl.repeated_slots >= 3
        late_audio = await audio.recv()  # audio of repeated slots is silence
        assert late_audio.pts >= 3 * AUDIO_RATE // 50
        assert not late_audio.to_ndarray().any()

    asyncio.run(run())


def test_track_resets_drift_instead_of_bursting() -> None:
    async def run() -> None:
        tl = MediaTimeline(25.0, 16, 16, max_queued_frames=256)
        video = AvatarVideoTrack(tl, max_drift_s=0.1)
        tl.push(_marked_units(tl, 0, 100))
        first = await video.recv()
        await asyncio.sleep(0.5)  # the event loop was busy: 12 frames late
        nxt = await video.recv()
        after = await video.recv()
        assert nxt.pts - first.pts >= 10 * 3600  # jumped to the present
        assert video.skipped >= 10
        assert after.pts - nxt.pts == 3600
        # ...and paced again afterwards: the next frame waited for its own slot.
        assert tl.clock() >= tl.slot_time(after.pts // 3600) - 0.002

    asyncio.run(run())


# One session against the real engine, no network -------------------------------------------------


def test_session_pipeline_with_the_real_engine_keeps_speech_whole() -> None:
    """Audio in through the ingest, the tiny model generates, frames out through the tracks: the
    audio of the generated frames is the input speech, in order, with no holes, and the latency
    from audio in to its frame is bounded. (Whether it keeps real time is the service tests' job;
    here a repeated frame, which carries silence, is set aside.)"""
    from pipelines.executors import build_executor
    from pipelines.messages import SessionSpec
    from pipelines.reference import default_reference
    from stream.metrics import ServiceMetrics
    from stream.scheduler import BlockScheduler

    executor = build_executor("local", model="tiny")
    info = executor.info

    async def run() -> None:
        executor.open_session(SessionSpec("s", default_reference(info.height, info.width)))
        metrics = ServiceMetrics()
        fresh_audio: list[np.ndarray] = []
        latencies: list[float] = []

        def on_slot(slot) -> None:  # noqa: ANN001
            if slot.fresh:
                fresh_audio.append(slot.audio)
                if slot.latency is not None:
                    latencies.append(slot.latency)

        tl = MediaTimeline(info.fps, info.height, info.width, max_queued_frames=64, on_slot=on_slot)
        ingest = AudioIngest(info.audio_sample_rate, max_buffer_s=5, jitter_s=0.08)
        ingest.start(StartMessage(type="start", sample_rate=16000, channels=1, format="s16le"))
        sched = BlockScheduler("s", executor, ingest, tl, metrics)
        task = asyncio.create_task(sched.run())
        video, audio = AvatarVideoTrack(tl), DrivingAudioTrack(tl)
        # 1.5 s of a 300 Hz tone between silences, sent at real-time pace in 20 ms chunks.
        sr = 16000
        t = np.arange(int(1.5 * sr)) / sr
        tone = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)

        async def send() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.5
            for i in range(0, len(tone), 320):
                await asyncio.sleep(max(0.0, start + i / sr - loop.time()))
                ingest.push(_s16(tone[i : i + 320]))
                sched.wake()

        async def pull(track, n: int) -> None:  # noqa: ANN001
            for _ in range(n):
                await track.recv()

        await asyncio.gather(send(), pull(audio, 150), pull(video, 75))  # 3 s
        sched.stop()
        await task
        assert tl.fresh_slots >= 30 and sched.blocks_done >= 10
        out = np.concatenate(fresh_audio).astype(np.float32) / 32767
        loud = np.abs(out) > 0.25
        onset, end = np.argmax(loud), len(loud) - np.argmax(loud[::-1])
        span = (end - onset) / AUDIO_RATE
        assert abs(span - 1.5) < 0.01, f"tone lasts {span:.3f} s in the generated frames' audio"
        inside = np.abs(out[onset:end])
        envelope = [inside[i : i + 480].max() for i in range(0, len(inside) - 480, 480)]
        assert min(envelope) > 0.3  # no dropouts inside the tone (10 ms resolution)
        crossings = np.sum(np.diff(np.signbit(out[onset:end])) != 0) / 2 / span
        assert abs(crossings - 300) < 3  # pitch kept: resampled, not stretched
        # Audio in to its frame: one block of audio, the jitter cushion, generation, margin.
        assert latencies and 0 < float(np.median(latencies)) < 1.5

    try:
        asyncio.run(run())
    finally:
        executor.close()


def test_settings_defaults_need_no_environment() -> None:
    s = Settings()
    assert s.model == "default" and s.executor == "local" and s.max_sessions >= 1
    assert s.torch_threads() >= 1

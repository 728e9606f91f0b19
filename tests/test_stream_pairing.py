"""A/V pairing through the real service: every frame reaches the viewer with the audio that drove
it, not merely with audio paced like it.

The instrument is the `av-probe` model (models/av_probe.py): the real engine and service with a
formula for a network, so each frame's brightness is the loudness of exactly the 40 ms of audio
that drove it. The client sends a 1 kHz tone whose loudness climbs steadily (a sawtooth, one
ramp per second), so loudness tells time: a frame's brightness names the instant of the ramp its
driving audio came from. At the receiver (aiortc over real WebRTC, VP8 and Opus), each frame is
put on the receiver's clock (its pts from the least-delayed arrival of its track) and the audio
that arrived at that same moment is searched for the instant whose loudness the frame shows;
the distance between the two is how far that frame's own audio was played from it.
"""

from __future__ import annotations

import asyncio
from itertools import pairwise

import numpy as np
import pytest

from models.av_probe import FULL_SCALE_RMS, brightness_of, loudness_of
from stream.client import AvatarClient
from stream.harness import ServiceProcess

SR = 16000
TONE_HZ = 1000.0
RAMP_S = 1.0  # loudness climbs from LOW to HIGH in this long, then starts again
LOW, HIGH = 0.05, 0.45
AUDIO_RATE = 48000
PROBE_BLOCK_FRAMES = 3  # av-probe's block: 3 latent frames, one video frame each


def ramp_audio(seconds: float) -> np.ndarray:
    """A tone whose rms loudness rises linearly from LOW to HIGH once per RAMP_S."""
    t = np.arange(int(seconds * SR)) / SR
    level = LOW + (HIGH - LOW) * ((t / RAMP_S) % 1.0)
    return (np.sqrt(2) * level * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def test_probe_frames_show_the_loudness_of_their_own_audio() -> None:
    """The instrument itself, in process through the real generator: each frame's brightness is
    the loudness of its own share of the block's audio. Fails if the probe's frames stop
    encoding their own audio (e.g. LoudnessFeatures cutting the window at the wrong frame
    edges, or the velocity formula not landing on the target at the last step)."""
    from models.registry import load_model
    from pipelines.generator import StreamingGenerator
    from pipelines.reference import default_reference

    gen = StreamingGenerator.from_bundle(load_model("av-probe"))
    state = gen.new_session(default_reference(gen.height, gen.width))
    rng = np.random.default_rng(0)
    for block in range(4):
        n = gen.block_samples(block)
        frames_n = gen.block_video_frames(block)
        edges = [round(j * n / frames_n) for j in range(frames_n + 1)]
        levels = rng.uniform(0.0, FULL_SCALE_RMS, frames_n)  # one loudness per frame
        amp = np.repeat(levels, np.diff(edges))
        t = np.arange(n) / SR
        audio = (np.sqrt(2) * amp * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
        frames, _ = gen.generate_block(state, audio)
        rms = [np.sqrt(np.mean(audio[a:b] ** 2)) for a, b in pairwise(edges)]
        assert frames.shape[0] == frames_n
        assert np.ptp(frames, axis=(1, 2, 3)).max() == 0, "each frame is one flat grey"
        np.testing.assert_allclose(frames[:, 0, 0, 0], brightness_of(np.array(rms)), atol=0.51)


def pairing_offsets(client: AvatarClient, shift_video_s: float = 0.0) -> np.ndarray:
    """For each received frame inside the ramp: seconds from the frame to the audio that drove
    it, as both reached the receiver (positive: its audio came later). NaN where no instant of
    the nearby audio has the frame's loudness (a repeated frame, which carries silence).

    `shift_video_s` moves every frame on the receiver's clock, for the negative control."""
    rec = client.received
    video_origin, audio_origin = client.media_origins()
    v0, a0 = rec.video[0][1], rec.audio[0][1]
    # The received audio on its own sample axis (pts at 48 kHz, relative to the first frame).
    pts = np.array([p for _, p, _ in rec.audio]) - a0
    pcm = np.zeros(int(pts[-1]) + len(rec.audio_pcm[-1]))
    for p, chunk in zip(pts, rec.audio_pcm, strict=True):
        pcm[p : p + len(chunk)] = chunk / 32768.0
    # aiortc's Opus encoder upmixes the mono track to stereo at -3 dB: calibrate the level by
    # the loudest parts of each stream (a gain, not a time: it cannot hide a shift).
    frame_levels = loudness_of(np.array(rec.video_means))
    chunk_rms = np.array([np.sqrt(np.mean((c / 32768.0) ** 2)) for c in rec.audio_pcm])
    gain = np.percentile(chunk_rms, 90) / np.percentile(frame_levels, 90)
    assert 0.6 < gain < 1.1, f"the received audio is {gain:.2f} times as loud as it was sent"
    # Loudness of the 40 ms (one frame) starting at every millisecond of the received audio.
    width, step = round(AUDIO_RATE / client.session["fps"]), AUDIO_RATE // 1000
    sums = np.concatenate([[0.0], np.cumsum((pcm / gain) ** 2)])
    starts = np.arange(0, len(pcm) - width, step)
    track = np.sqrt((sums[starts + width] - sums[starts]) / width)

    out = []
    margin = 0.08 * (HIGH - LOW)  # frames at the ramp's ends straddle its restart
    for (_, p), level in zip(rec.video, frame_levels, strict=True):
        if not LOW + margin < level < HIGH - margin:
            continue
        arrived = video_origin + (p - v0) / 90000.0 + shift_video_s
        due = (arrived - audio_origin) * AUDIO_RATE / step  # index into `track`
        lo, hi = int(max(0, due - 0.4 * 1000)), int(min(len(track) - 1, due + 0.4 * 1000))
        d = track[lo : hi + 1] - level
        rising = np.where((d[:-1] < 0) & (d[1:] >= 0))[0]
        if not len(rising):
            out.append(np.nan)
            continue
        at = lo + rising - d[rising] / (d[rising + 1] - d[rising])  # interpolated crossing
        out.append((at[np.argmin(np.abs(at - due))] - due) * step / AUDIO_RATE)
    return np.array(out)


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> AvatarClient:
    log = tmp_path_factory.mktemp("pairing") / "serve.log"

    async def run(base: str) -> AvatarClient:
        client = AvatarClient(base, keep_audio=True, keep_video_means=True)
        await client.create()
        await client.watch()
        await asyncio.wait_for(client.first_video.wait(), 30)
        await client.open_audio(SR)
        await client.send_pcm(ramp_audio(8.0), SR)
        await asyncio.sleep(0.5)
        await client.close()
        return client

    with ServiceProcess("--max-sessions", "1", model="av-probe", log_path=log) as svc:
        return asyncio.run(run(svc.base))


def test_each_frame_arrives_with_the_audio_that_drove_it(received: AvatarClient) -> None:
    """Fails if the audio the service sends to the viewer is shifted against the frames, e.g.
    by one block (3 frames, 120 ms: the scheduler's viewer-audio FIFO starting with one block
    of silence puts the median offset at +120 ms), while each track alone keeps its pace."""
    frame_s = 1.0 / received.session["fps"]
    offsets = pairing_offsets(received)
    found = offsets[~np.isnan(offsets)]
    print(
        f"{len(offsets)} frames in the ramp, {len(found)} paired; offset to their own audio: "
        f"median {1000 * np.median(found):.1f} ms, 5-95 % "
        f"{np.round(1000 * np.percentile(found, [5, 95]), 1).tolist()} ms"
    )
    assert len(offsets) >= 120, "too few frames carried the ramp (not generated from it?)"
    assert len(found) >= 0.95 * len(offsets), "frames whose own audio never arrived near them"
    assert abs(np.median(found)) <= frame_s / 2
    within = np.mean(np.abs(found) <= frame_s)
    assert within >= 0.95, f"only {within:.0%} of frames arrive within a frame of their audio"


def test_the_pairing_measure_sees_a_one_block_shift(received: AvatarClient) -> None:
    """Negative control of the instrument: the same stream with every frame moved one block
    later on the receiver's clock reads as one block (120 ms) off. Fails if the measure could
    not see audio paired with the wrong block (e.g. a search that settles on any instant of
    the right loudness, or origins taken from the content instead of the clock)."""
    block_s = PROBE_BLOCK_FRAMES / received.session["fps"]
    offsets = pairing_offsets(received, shift_video_s=block_s)
    found = offsets[~np.isnan(offsets)]
    assert abs(np.median(found) + block_s) <= 0.5 / received.session["fps"], np.median(found)
    assert np.mean(np.abs(found) <= 1 / received.session["fps"]) < 0.05

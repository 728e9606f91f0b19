"""What `diffstream eval` measures: lip sync, identity drift with/without the rolling sink, speed,
and fidelity (PSNR, SSIM) against the renderer's true frames for held-out identities and speech.

Everything runs the real StreamingGenerator block by block (the path the service runs) and is
measured from the generated pixels with `metrics`, so any model can be evaluated the same way.
`ground_truth_scores` takes any generator function, so a non-streaming model can be measured on
the same clips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.generator import StreamingGenerator

from .avatar import default_mouth_box
from .dataset import ClipSampler
from .metrics import identity_drift, lip_sync_correlation, mouth_openness, psnr, ssim
from .speech import loudness_envelope

# (label, pipeline overrides): the sink rows the drift table compares. Refresh needs a sink.
DRIFT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sink on, refresh off", {"sink": True, "sink_refresh": False}),
    ("sink on, refresh on", {"sink": True, "sink_refresh": True}),
    ("sink off", {"sink": False, "sink_refresh": False}),
)


@dataclass
class StreamRun:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    block_seconds: list[float]
    stage_seconds: dict[str, float]
    fps: float


def run_stream(
    bundle: Any,
    reference: np.ndarray,
    audio: np.ndarray,
    frames: int,
    seed: int = 0,
    **overrides: Any,
) -> StreamRun:
    """Generate `frames` video frames driven by `audio` (looped when shorter), block by block."""
    gen = StreamingGenerator.from_bundle(bundle, **overrides)
    state = gen.new_session(reference, seed=seed)
    need = round(frames * gen.audio_sample_rate / gen.fps) + gen.audio_sample_rate
    reps = -(-need // max(1, audio.shape[0]))
    audio = np.tile(np.asarray(audio, dtype=np.float32), reps)
    out, blocks = [], []
    stages = {"features": 0.0, "denoise": 0.0, "cache_update": 0.0, "decode": 0.0}
    pos = made = 0
    t0 = time.perf_counter()
    while made < frames:
        n = gen.block_samples(state.block_index)
        block, timing = gen.generate_block(state, audio[pos : pos + n])
        pos += n
        made += block.shape[0]
        out.append(block)
        blocks.append(timing.total)
        for k in stages:
            stages[k] += getattr(timing, k)
    wall = time.perf_counter() - t0
    video = np.concatenate(out)[:frames]
    return StreamRun(video, blocks, stages, made / wall)


@dataclass
class EvalReport:
    frames: int
    lip_sync: float
    lip_sync_silence_vs_speech: dict[str, float]
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    fps: float = 0.0
    ms_per_block: float = 0.0
    stage_share: dict[str, float] = field(default_factory=dict)
    ground_truth: dict[str, Any] = field(default_factory=dict)  # `ground_truth_scores`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drift_summary(frames: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Drift at the start, middle and end (mean over 5 % windows) and overall."""
    d = identity_drift(frames, reference)
    w = max(1, d.size // 20)
    mid = d.size // 2
    return {
        "start": float(d[:w].mean()),
        "middle": float(d[mid - w // 2 : mid - w // 2 + w].mean()),
        "end": float(d[-w:].mean()),
        "mean": float(d.mean()),
    }


def evaluate(
    bundle: Any,
    reference: np.ndarray,
    audio: np.ndarray,
    frames: int,
    drift_frames: int | None = None,
    seed: int = 0,
) -> tuple[EvalReport, dict[str, StreamRun]]:
    """Lip sync and speed on the default settings; drift for each row of DRIFT_SETTINGS."""
    sr = bundle.defaults.audio_sample_rate
    fps = bundle.defaults.fps
    main = run_stream(bundle, reference, audio, frames, seed)
    box = default_mouth_box(main.frames.shape[1])
    n = main.frames.shape[0]
    used = np.tile(audio, -(-round(n * sr / fps) // max(1, audio.size)))[: round(n * sr / fps)]
    sync = lip_sync_correlation(main.frames, used, sr, fps, box)
    env = loudness_envelope(used, sr, fps, num_frames=n)
    openness = mouth_openness(main.frames, box)
    loud, quiet = env > 0.6, env < 0.1
    split = {
        "openness_loud": float(openness[loud].mean()) if loud.any() else float("nan"),
        "openness_quiet": float(openness[quiet].mean()) if quiet.any() else float("nan"),
    }
    total = sum(main.stage_seconds.values())
    report = EvalReport(
        frames=n,
        lip_sync=float(sync),
        lip_sync_silence_vs_speech=split,
        fps=main.fps,
        ms_per_block=1000 * float(np.mean(main.block_seconds)),
        stage_share={k: v / total for k, v in main.stage_seconds.items()},
    )
    runs = {"main": main}
    for label, overrides in DRIFT_SETTINGS:
        run = run_stream(bundle, reference, audio, drift_frames or frames, seed, **overrides)
        report.drift[label] = drift_summary(run.frames, reference)
        runs[label] = run
    return report, runs


def loudness_openness_gap(bundle: Any, reference: np.ndarray, seconds: float = 1.2) -> float:
    """Mean mouth openness on synthetic speech minus that on silence (same seed, same image)."""
    from .speech import synth_speech

    sr = bundle.defaults.audio_sample_rate
    loud = synth_speech(seconds, sr, np.random.default_rng(123))
    silent = np.zeros_like(loud)
    frames = int(seconds * bundle.defaults.fps)
    box = default_mouth_box(reference.shape[0])
    with torch.inference_mode():
        a = run_stream(bundle, reference, loud, frames).frames
        b = run_stream(bundle, reference, silent, frames).frames
    return float(mouth_openness(a, box).mean() - mouth_openness(b, box).mean())


# generate(reference uint8 [H, W, 3], audio float32 [samples], frames) -> uint8 [frames, H, W, 3]
Generate = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
FIDELITY_KEYS = ("psnr_frame", "psnr_mouth", "ssim_frame", "ssim_mouth")


def _fidelity(frames: np.ndarray, truth: np.ndarray, box: tuple[int, int, int, int]) -> dict:
    return {
        "psnr_frame": psnr(frames, truth),
        "psnr_mouth": psnr(frames, truth, box),
        "ssim_frame": ssim(frames, truth),
        "ssim_mouth": ssim(frames, truth, box),
    }


def ground_truth_scores(
    generate: Generate,
    count: int = 3,
    frames: int = 100,
    size: int = 128,
    seed: int = 0,
    *,
    fps: float = 25,
    sample_rate: int = 16000,
) -> dict[str, Any]:
    """PSNR and SSIM of generated frames against the renderer's frames for held-out clips.

    Draws `count` clips from `ClipSampler(split="eval", clip_frames=frames, size=size,
    seed=seed)`: identities and speech the training split never draws. For each, `generate`
    gets the clip's reference image and the audio the model would hear (augmented: room, mic,
    noise, gain; `frames * sample_rate / fps` samples) and must return `frames` uint8 frames;
    they are compared with the rendered ground truth over the whole frame and inside the clip's
    own `mouth_box` (`metrics.psnr`, capped at 100 dB per frame, and `metrics.ssim`).

    Returns means over clips of psnr_frame, psnr_mouth (dB), ssim_frame, ssim_mouth, the same
    four for a still image of the reference in every frame under "reference" (the score of a
    generator that never moves: a model should beat it, at least in the mouth), and
    "per_clip": one dict per clip with its seeds, mouth box and four scores.
    """
    if count < 1 or frames < 1:
        raise ValueError("count and frames must be at least 1")
    sampler = ClipSampler(
        size=size, fps=fps, sample_rate=sample_rate, clip_frames=frames, seed=seed, split="eval"
    )
    per_clip, still = [], []
    for _ in range(count):
        clip = sampler.sample()
        out = np.asarray(generate(clip.reference, clip.audio, frames))
        if out.dtype != np.uint8 or out.shape != clip.frames.shape:
            raise ValueError(
                f"generate returned {out.dtype} {out.shape}; expected uint8 {clip.frames.shape}"
            )
        reference = np.broadcast_to(clip.reference, clip.frames.shape)
        per_clip.append(
            {
                "identity_seed": clip.identity_seed,
                "speech_seed": clip.speech_seed,
                "mouth_box": list(clip.mouth_box),
                **_fidelity(out, clip.frames, clip.mouth_box),
            }
        )
        still.append(_fidelity(reference, clip.frames, clip.mouth_box))
    result: dict[str, Any] = {"clips": count, "frames": frames, "size": size}
    result.update({k: float(np.mean([c[k] for c in per_clip])) for k in FIDELITY_KEYS})
    result["reference"] = {k: float(np.mean([c[k] for c in still])) for k in FIDELITY_KEYS}
    result["per_clip"] = per_clip
    return result


def stream_generate(bundle: Any, seed: int = 0, **overrides: Any) -> Generate:
    """A `Generate` that runs `bundle` block by block with `run_stream` (pipeline overrides).

    Frame i is driven by audio samples [round(i*sr/fps), round((i+1)*sr/fps)), the same
    alignment as the clips. The last block may reach past the clip's audio: the audio is padded
    with silence there (`run_stream` would loop it instead, putting the clip's first sound into
    the last block), and the frames past `frames` are dropped.
    """

    def generate(reference: np.ndarray, audio: np.ndarray, frames: int) -> np.ndarray:
        sr = bundle.defaults.audio_sample_rate
        need = round(frames * sr / bundle.defaults.fps) + sr  # what run_stream would loop to
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        audio = np.pad(audio, (0, max(0, need - audio.size)))
        with torch.inference_mode():
            return run_stream(bundle, reference, audio, frames, seed, **overrides).frames

    return generate

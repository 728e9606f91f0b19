"""`diffstream render`: generate offline from a reference image and an audio file.

Writes OUT.mp4 (H.264 video with the driving audio muxed, AAC) and OUT.npy (uint8 [N, H, W, 3]).
It runs the same StreamingGenerator the service runs, block by block, so what you render is
what a viewer would see for the same seed.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

CACHE_MODES = ("reencode", "timestep_forcing")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="reference image (PNG, JPEG, WebP)")
    p.add_argument("--audio", required=True, help="driving audio (wav, mp3, ogg, flac, m4a...)")
    p.add_argument("-o", "--output", required=True, help="output path without extension")
    p.add_argument("--model", default="default", help="model name or folder (default: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block")
    p.add_argument("--cache-mode", choices=CACHE_MODES, default=None)
    p.add_argument("--sink-refresh", action="store_true", help="re-anchor on the first frame")
    p.add_argument("--no-sink", action="store_true", help="disable the rolling sink frame")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much audio")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def write_mp4(
    path: Path, frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int
) -> None:
    """H.264 + AAC in one pass; audio is trimmed or padded to the video's duration."""
    import av

    fps_q = Fraction(fps).limit_denominator(1001)
    n = frames.shape[0]
    want = round(n * sample_rate / fps)
    audio = np.pad(audio[:want], (0, max(0, want - audio.shape[0]))).astype(np.float32)
    with av.open(str(path), mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps_q)
        vs.height, vs.width = (
            frames.shape[1] - frames.shape[1] % 2,
            frames.shape[2] - frames.shape[2] % 2,
        )
        vs.pix_fmt = "yuv420p"
        as_ = out.add_stream("aac", rate=sample_rate)
        as_.layout = "mono"
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: vs.height, : vs.width]))
            vf.pts = i
            vf.time_base = 1 / fps_q
            out.mux(vs.encode(vf))
        out.mux(vs.encode(None))
        fifo = av.AudioFifo()
        af = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
        af.sample_rate = sample_rate
        af.pts = 0
        fifo.write(af)
        size = as_.codec_context.frame_size or 1024
        while fifo.samples >= size:
            out.mux(as_.encode(fifo.read(size)))
        tail = fifo.read()
        if tail is not None:
            out.mux(as_.encode(tail))
        out.mux(as_.encode(None))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.audio import load_audio
    from models.errors import InvalidAudioError
    from models.registry import load_model
    from pipelines.executors import parse_devices
    from pipelines.generator import StreamingGenerator
    from pipelines.reference import load_reference_image

    device = parse_devices(args.device)[0]
    bundle = load_model(args.model)
    if bundle.notice:
        print(f"note: {bundle.notice}", file=sys.stderr)
    overrides = {"steps": args.steps, "cache_mode": args.cache_mode}
    if args.sink_refresh:
        overrides["sink_refresh"] = True
    if args.no_sink:
        overrides["sink"] = False
    gen = StreamingGenerator.from_bundle(bundle, device=device, **overrides)
    reference = load_reference_image(args.image, gen.height, gen.width)
    audio = load_audio(args.audio, gen.audio_sample_rate)
    if args.max_seconds is not None:
        audio = audio[: int(args.max_seconds * gen.audio_sample_rate)]
    if audio.size == 0:
        raise InvalidAudioError(f"{args.audio}: no audio samples to drive the video")
    state = gen.new_session(reference, seed=args.seed, steps=args.steps)

    blocks: list[np.ndarray] = []
    pos = 0
    total = audio.shape[0]
    bar = tqdm(total=round(total / gen.audio_sample_rate, 2), unit="s", disable=args.quiet)
    while pos < total:
        n = gen.block_samples(state.block_index)
        window = audio[pos : pos + n]
        if window.shape[0] < n:
            window = np.pad(window, (0, n - window.shape[0]))
        frames, _ = gen.generate_block(state, window)
        blocks.append(frames)
        pos += n
        bar.update(round(n / gen.audio_sample_rate, 2))
    bar.close()
    video = np.concatenate(blocks)
    out = Path(args.output)
    if out.suffix in (".mp4", ".npy"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), video)
    write_mp4(out.with_suffix(".mp4"), video, gen.fps, audio, gen.audio_sample_rate)
    print(
        f"wrote {out.with_suffix('.mp4')} and {out.with_suffix('.npy')}: "
        f"{video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {gen.fps:g} fps"
    )
    return 0

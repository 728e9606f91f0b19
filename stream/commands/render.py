"""`diffstream render`: generate offline from a reference image and an audio file.

Writes OUT.mp4 (H.264 video with the driving audio muxed, AAC) and OUT.npy (uint8 [N, H, W, 3]).
It drives the same executor interface the service drives, block by block, so what you render
is what a viewer would see for the same seed, and `--executor tpp|dualparal --devices ...`
renders across several devices (or `cpu:N` processes) exactly as `serve` would.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

CACHE_MODES = ("reencode", "timestep_forcing")
EXECUTORS = ("local", "tpp", "dualparal")
IN_FLIGHT = 8  # blocks submitted ahead of the one being collected (fills a TPP pipeline)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="reference image (PNG, JPEG, WebP)")
    p.add_argument("--audio", required=True, help="driving audio (wav, mp3, ogg, flac, m4a...)")
    p.add_argument("-o", "--output", required=True, help="output path without extension")
    p.add_argument(
        "--model",
        default="default",
        help="model name or folder (default: default); Live Avatar: liveavatar:DIR",
    )
    p.add_argument("--lora", default=None, help="LoRA folder merged into the model (Live Avatar)")
    p.add_argument("--prompt", default=None, help="text prompt (models that take one)")
    p.add_argument(
        "--text-encoder",
        default=None,
        choices=("keep", "cpu", "offload", "free"),
        help="where the prompt encoder stays after encoding (default keep)",
    )
    p.add_argument("--height", type=int, default=None, help="video height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="video width (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block")
    p.add_argument("--cache-mode", choices=CACHE_MODES, default=None)
    p.add_argument(
        "--sink-refresh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-anchor the sink on the first generated frame (default: the model's)",
    )
    p.add_argument("--no-sink", action="store_true", help="disable the rolling sink frame")
    p.add_argument(
        "--executor", default="local", choices=EXECUTORS, help="local (default), tpp or dualparal"
    )
    p.add_argument(
        "--devices",
        "--device",
        dest="devices",
        default="cpu",
        help="cpu, cuda, cuda:1 for local; cuda:0,cuda:1,... or cpu:N for tpp and dualparal",
    )
    from stream.commands.bench import add_speed_arguments

    add_speed_arguments(p)
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
    from collections import deque

    from tqdm import tqdm

    from models.audio import load_audio
    from models.errors import ExecutorError, InvalidAudioError
    from models.registry import model_notice
    from pipelines.executors import ExecutorBusy, build_executor
    from pipelines.messages import BlockRequest, SessionSpec
    from pipelines.reference import load_reference_image
    from stream.commands.bench import compile_default

    options: dict = {
        "compile": compile_default() if args.compile is None else args.compile,
        "warm_up": False,  # the render's own first blocks build the compiled graphs
        "quant": args.quant,
        "steps": args.steps,
        "cache_mode": args.cache_mode,
        "lora": args.lora,
        "text_encoder": args.text_encoder,
        "height": args.height,
        "width": args.width,
    }
    if args.no_sink:
        options["sink"] = False
    options = {k: v for k, v in options.items() if v is not None}
    with build_executor(args.executor, model=args.model, devices=args.devices, **options) as ex:
        info = ex.info
        notice = model_notice(args.model)
        if notice:
            print(f"note: {notice}", file=sys.stderr)
        reference = load_reference_image(args.image, info.height, info.width)
        audio = load_audio(args.audio, info.audio_sample_rate)
        if args.max_seconds is not None:
            audio = audio[: int(args.max_seconds * info.audio_sample_rate)]
        if audio.size == 0:
            raise InvalidAudioError(f"{args.audio}: no audio samples to drive the video")
        spec = SessionSpec(
            "render",
            reference,
            seed=args.seed,
            steps=args.steps,
            sink_refresh=args.sink_refresh,
            prompt=args.prompt,
        )
        ex.open_session(spec)

        blocks: list[np.ndarray] = []
        pending: deque = deque()
        total = audio.shape[0]
        sr = info.audio_sample_rate
        padded, blocks_needed = 0, 0  # the last block is padded with silence: count it whole
        while padded < total:
            padded += info.block_samples(blocks_needed)
            blocks_needed += 1
        bar = tqdm(total=round(padded / sr, 2), unit="s", disable=args.quiet)

        def collect() -> None:
            result = pending.popleft().result()
            if not result.ok:
                raise ExecutorError(f"block {result.block_index} failed: {result.error}")
            blocks.append(result.frames)
            bar.update(round(info.block_samples(result.block_index) / sr, 2))

        pos = index = 0
        while pos < total:
            n = info.block_samples(index)
            window = audio[pos : pos + n]
            if window.shape[0] < n:
                window = np.pad(window, (0, n - window.shape[0]))
            while len(pending) >= IN_FLIGHT:
                collect()
            try:
                pending.append(ex.submit(BlockRequest("render", index, window)))
            except ExecutorBusy:
                if not pending:
                    raise
                collect()
                continue
            pos += n
            index += 1
        while pending:
            collect()
        bar.close()
        ex.close_session("render")
    video = np.concatenate(blocks)
    out = Path(args.output)
    if out.suffix in (".mp4", ".npy"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), video)
    write_mp4(out.with_suffix(".mp4"), video, info.fps, audio, sr)
    print(
        f"wrote {out.with_suffix('.mp4')} and {out.with_suffix('.npy')}: "
        f"{video.shape[0]} frames {video.shape[2]}x{video.shape[1]} at {info.fps:g} fps"
    )
    return 0

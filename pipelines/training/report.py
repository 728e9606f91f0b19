"""Figures and tables for the default model's documentation (docs/default_model.md).

`python -m pipelines.training.report --audio a.wav [b.wav] --out docs` writes the drift table
over a long stream, a strip of frames from its start/middle/end, lip-sync plots and a JSON of
every number, all from `evaluate` runs of the shipped model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.audio import load_audio
from models.registry import load_model

from .avatar import default_mouth_box, reference_image, sample_identity
from .evaluate import DRIFT_SETTINGS, drift_summary, run_stream
from .metrics import lagged_correlations, mouth_openness
from .speech import loudness_envelope

REF_SEED = 90_000  # identities drawn from a seed the training data never used


def sample_references(count: int, size: int = 128) -> list[np.ndarray]:
    """Reference images of held-out identities (the training clips use seeds 0..)."""
    rng = np.random.default_rng(REF_SEED)
    return [reference_image(sample_identity(rng), size) for _ in range(count)]


def plot_lip_sync(openness: np.ndarray, envelope: np.ndarray, path: Path, title: str) -> None:
    """Two normalised curves (loudness grey, measured mouth opening red) on one Pillow canvas."""
    w, h, pad = 900, 220, 24
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    n = min(openness.size, envelope.size)

    def curve(y: np.ndarray, colour: str) -> None:
        y = (y - y.min()) / max(float(y.max() - y.min()), 1e-6)
        xs = pad + np.arange(n) * (w - 2 * pad) / max(1, n - 1)
        ys = h - pad - y[:n] * (h - 2 * pad)
        d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=2)

    curve(envelope[:n], "#999999")
    curve(openness[:n], "#d62728")
    d.text(
        (pad, 4), f"{title}   grey: loudness envelope   red: mouth opening (pixels)", fill="black"
    )
    img.save(path)


def strip(rows: list[tuple[str, np.ndarray]], picks: list[int], path: Path) -> None:
    """One row per setting, one column per picked frame index."""
    size = rows[0][1].shape[1]
    label_w = 150
    img = Image.new("RGB", (label_w + size * len(picks), 16 + size * len(rows)), "white")
    d = ImageDraw.Draw(img)
    for c, p in enumerate(picks):
        d.text((label_w + c * size + 4, 2), f"frame {p}", fill="black")
    for r, (label, frames) in enumerate(rows):
        d.text((4, 16 + r * size + size // 2), label, fill="black")
        for c, p in enumerate(picks):
            img.paste(
                Image.fromarray(frames[min(p, len(frames) - 1)]),
                (label_w + c * size, 16 + r * size),
            )
    img.save(path)


def output_picture(
    reference: np.ndarray, frames: np.ndarray, openness: np.ndarray, path: Path, count: int = 6
) -> None:
    """The README's picture: the reference, then `count` generated frames from quiet to loud
    (picked by measured mouth opening), each shown at twice its size."""
    order = np.argsort(openness, kind="stable")
    picks = [int(order[round(q * (order.size - 1))]) for q in np.linspace(0.05, 1.0, count)]
    size = reference.shape[0] * 2
    pad, top = 6, 18
    img = Image.new("RGB", (pad + (size + pad) * (count + 1), top + size + pad), "white")
    d = ImageDraw.Draw(img)
    tiles = [("reference", reference)] + [(f"frame {i}", frames[i]) for i in picks]
    for c, (label, tile) in enumerate(tiles):
        x = pad + c * (size + pad)
        d.text((x, 3), label, fill="black")
        img.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (x, top))
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--audio", nargs="+", required=True)
    p.add_argument("--out", default="docs")
    p.add_argument("--model", default="default")
    p.add_argument("--frames", type=int, default=250, help="frames per lip-sync run")
    p.add_argument("--drift-frames", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_model(args.model)
    d = bundle.defaults
    sr, fps = d.audio_sample_rate, d.fps
    refs = sample_references(3, d.height)
    box = default_mouth_box(d.height)
    results: dict = {"lip_sync": [], "drift": {}}
    for i, path in enumerate(args.audio):
        audio = load_audio(path, sr)
        for j, ref in enumerate(refs):
            run = run_stream(bundle, ref, audio, args.frames, seed=j)
            n = run.frames.shape[0]
            used = np.tile(audio, 2)[: round(n * sr / fps)]
            env = loudness_envelope(used, sr, fps, num_frames=n)
            opening = mouth_openness(run.frames, box)
            corr = lagged_correlations(opening, env, 2)
            results["lip_sync"].append(
                {
                    "audio": Path(path).name,
                    "reference": j,
                    "best": max(corr.values()),
                    "by_lag": corr,
                    "fps": run.fps,
                }
            )
            if j == 0:
                plot_lip_sync(opening, env, out / f"lipsync_{i}.png", Path(path).name)
            if i == 0 and j == 0:
                output_picture(ref, run.frames, opening, out / "output.png")
    long_audio = load_audio(args.audio[0], sr)
    rows = []
    for label, overrides in DRIFT_SETTINGS:
        run = run_stream(bundle, refs[0], long_audio, args.drift_frames, seed=0, **overrides)
        results["drift"][label] = {**drift_summary(run.frames, refs[0]), "fps": run.fps}
        rows.append((label, run.frames))
        print(label, results["drift"][label], flush=True)
    n = args.drift_frames
    strip(rows, [0, n // 4, n // 2, 3 * n // 4, n - 1], out / "strip.png")
    Image.fromarray(refs[0]).save(out / "strip_reference.png")
    (out / "default_model_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "lip_sync"}, indent=2))
    print("lip sync:", [round(r["best"], 3) for r in results["lip_sync"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

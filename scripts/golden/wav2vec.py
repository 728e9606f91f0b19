"""Golden fixtures for Live Avatar's wav2vec2 audio features (models/wav2vec.py).

Runs upstream's AudioEncoder (Wan2.2-S2V's wav2vec2 wrapper, as the Live Avatar pipeline loads
it) on a tiny random folder written by `models.wav2vec.write_tiny_wav2vec`, and saves:

- file mode: the pipeline's `encode_audio` on a 2 s synthetic speech-like clip (float32);
- per block: upstream's per-chunk computation on exactly the buffers Wav2VecFeatures builds for
  blocks 0, 1, 2 of that clip (block 0 shows 9 video frames, later ones 12; the features cover
  the 12 frames ending at the block's end, after `context` frames of left context; silence
  before the stream start), for context 0 and 25, in float32 and bfloat16.

bfloat16 uses the pipeline's streaming call itself (`_streaming_encode_next_audio_block_or_random`
with a callback returning the buffer; `block_frames` = context + 12 and the last 12 kept).
Upstream's `extract_audio_feat_from_array` casts the input to bfloat16 whatever the model's dtype,
so a float32 model cannot run it; float32 instead runs the pipeline's `encode_audio` on a float32
wav file holding exactly the buffer, the same steps in the model's dtype (the file round trip is
checked to be bit-exact).

Run it with transformers 4.49-4.51.3, the range upstream's requirements.txt pins: transformers
5.x returns the last hidden state WITHOUT the encoder's final LayerNorm, a different 25th layer.

    cd /tmp/up/LiveAvatar && PYTHONPATH=<transformers 4.51.3 site>:scripts/golden:/work/main:. \
        /tmp/upenv/bin/python /work/main/scripts/golden/wav2vec.py --upstream /tmp/up/LiveAvatar
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

UPSTREAM = "Alibaba-Quark/LiveAvatar@9c2c38de1715e553127b42c82cb959f756b02595"
SAMPLE_RATE = 16000
FPS = 25
PER_FRAME = SAMPLE_RATE // FPS
FIRST_BLOCK, BLOCK, FEATURE_FRAMES = 9, 12, 12
CONTEXTS = (0, 25)
SAVED_BLOCKS = 3
MEASURED_BLOCKS = 4  # blocks 0..3 end at frame 45, inside the 2 s clip
FILE_INFER_FRAMES = 48  # the release scripts' --infer_frames
FILE_FRAMES = 50  # 2 s at 25 fps; encode_audio pads the bucket with zeros past these


def speech_like(seconds: float = 2.0, seed: int = 1234) -> np.ndarray:
    """Deterministic voiced/unvoiced syllables: a gliding harmonic source shaped by two formant
    bumps, a 4 Hz syllable envelope with a pause, and noise bursts; peak about 0.5."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 125 + 25 * np.sin(2 * np.pi * 1.3 * t) + 8 * np.sin(2 * np.pi * 5.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    f1 = 600 + 250 * np.sin(2 * np.pi * 2.1 * t)
    voiced = np.zeros(n)
    for k in range(1, 25):
        hz = k * f0
        gain = np.exp(-(((hz - f1) / 180) ** 2)) + 0.6 * np.exp(-(((hz - 1700) / 300) ** 2)) + 0.03
        voiced += gain * np.sin(k * phase) / k
    syllables = np.sin(np.pi * 4.0 * t) ** 2
    syllables[(t > 0.9) & (t < 1.15)] = 0.0
    fricative = np.clip(np.sin(2 * np.pi * 1.7 * t + 1.0), 0, None) ** 8
    noise = np.convolve(rng.standard_normal(n), np.ones(3) / 3, mode="same")
    x = 0.35 * voiced * syllables + 0.08 * noise * fricative + 0.002 * rng.standard_normal(n)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def block_buffer(audio: np.ndarray, block: int, context: int) -> tuple[np.ndarray, int]:
    """The samples Wav2VecFeatures encodes for `block`: context + 12 frames ending at the block's
    last frame, zeros before the stream start. Computed here independently of the project."""
    end = FIRST_BLOCK + BLOCK * block
    start = end - FEATURE_FRAMES - context
    padded = np.concatenate([np.zeros(max(0, -start) * PER_FRAME, np.float32), audio])
    offset = max(0, -start) * PER_FRAME
    s0, s1 = offset + start * PER_FRAME, offset + end * PER_FRAME
    assert s1 <= padded.shape[0], "block past the end of the clip"
    return padded[s0:s1].copy(), end


def run(upstream: Path, out: Path) -> dict:
    import transformers  # before _shim: 4.x probes find_spec("decord"), which the stub lacks

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(
            f"transformers {transformers.__version__}: run with 4.49-4.51.3 (upstream's pin); "
            "5.x drops the final LayerNorm from the last hidden state"
        )
    import _shim  # noqa: F401  (CUDA -> CPU, stubs decord)
    import soundfile
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(upstream))
    from liveavatar.models.wan.causal_audio_encoder import AudioEncoder
    from liveavatar.models.wan.causal_s2v_pipeline_tpp_blockwise import WanS2V

    from models.wav2vec import FOLDER_NAME, write_tiny_wav2vec

    part = out / "wav2vec"
    folder = write_tiny_wav2vec(part / FOLDER_NAME, seed=0)
    encoder = AudioEncoder(device="cpu", model_id=str(folder))
    encoder.model.eval()
    audio = speech_like()
    tmp = Path(tempfile.mkdtemp())

    def pipeline(dtype: torch.dtype, chunk: np.ndarray | None = None) -> types.SimpleNamespace:
        """The attributes of WanS2V its audio methods read."""
        ns = types.SimpleNamespace(
            is_training=False, audio_encoder=encoder, fps=FPS, audio_sample_m=0,
            device=torch.device("cpu"), param_dtype=dtype,
        )  # fmt: skip
        ns.encode_audio_from_array = types.MethodType(WanS2V.encode_audio_from_array, ns)
        ns.get_audio_callback = lambda: chunk
        return ns

    def wav(samples: np.ndarray, name: str) -> str:
        path = tmp / name
        soundfile.write(path, samples, SAMPLE_RATE, subtype="FLOAT")
        import librosa

        back, _ = librosa.load(path, sr=SAMPLE_RATE)
        assert np.array_equal(back, samples), "float wav round trip changed the samples"
        return str(path)

    def upstream_block(buffer: np.ndarray, context: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, layers, dim, 12]: upstream's features of the buffer's last 12 frames."""
        frames = context + FEATURE_FRAMES
        with torch.no_grad():
            if dtype == torch.float32:
                path = wav(buffer, "buffer.wav")
                emb, _ = WanS2V.encode_audio(pipeline(dtype), path, infer_frames=frames)
                emb = emb[..., :frames]
            else:
                emb = WanS2V._streaming_encode_next_audio_block_or_random(
                    pipeline(dtype, buffer), block_frames=frames
                )
        return emb[..., context:].contiguous()

    tensors: dict[str, torch.Tensor] = {"audio": torch.from_numpy(audio)}
    meta: dict = {
        "upstream": UPSTREAM,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sample_rate": SAMPLE_RATE,
        "fps": FPS,
        "first_block_frames": FIRST_BLOCK,
        "block_frames": BLOCK,
        "feature_frames": FEATURE_FRAMES,
        "contexts": list(CONTEXTS),
        "blocks": SAVED_BLOCKS,
        "layout": "upstream [1, layers, dim, frames]",
        "file_infer_frames": FILE_INFER_FRAMES,
        "zero_frames": {},
        "windowed_vs_file": {},
    }

    # (a) file mode, as the pipeline's encode_audio
    encoder.model.to(torch.float32)
    with torch.no_grad():
        file_emb, _ = WanS2V.encode_audio(
            pipeline(torch.float32), wav(audio, "clip.wav"), infer_frames=FILE_INFER_FRAMES
        )
    tensors["file_f32"] = file_emb[..., :FILE_FRAMES].contiguous()

    # (b) per block, both contexts, both dtypes
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        encoder.model.to(dtype)
        for context in CONTEXTS:
            for block in range(SAVED_BLOCKS if tag == "bf16" else MEASURED_BLOCKS):
                buffer, end = block_buffer(audio, block, context)
                emb = upstream_block(buffer, context, dtype)
                zero = [j for j in range(FEATURE_FRAMES) if not emb[..., j].any()]
                meta["zero_frames"][f"{tag}_c{context}_b{block}"] = zero
                if block < SAVED_BLOCKS:
                    tensors[f"block_{tag}_c{context}_b{block}"] = emb
                if tag == "f32":  # how far windowing moves the features from file mode
                    first = end - FEATURE_FRAMES
                    lo = max(0, first)
                    ref = file_emb[..., lo:end]
                    got = emb[..., lo - first :]
                    live = [j for j in range(got.shape[-1]) if got[..., j].any()]
                    diff = (got - ref)[..., live]
                    meta["windowed_vs_file"].setdefault(f"context_{context}", []).append(
                        {
                            "block": block,
                            "max_abs": float(diff.abs().max()),
                            "rel_rms": float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
                            "per_layer_rel_rms": [
                                round(float(d.pow(2).mean().sqrt() / r.pow(2).mean().sqrt()), 4)
                                for d, r in zip(diff[0], ref[0][..., live], strict=True)
                            ],
                        }
                    )
    encoder.model.to(torch.float32)

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(part / "golden.safetensors"))
    (part / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=Path, default=Path("/tmp/up/LiveAvatar"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "tests/fixtures/liveavatar",
    )
    args = parser.parse_args()
    meta = run(args.upstream, args.out)
    print(json.dumps({k: meta[k] for k in ("transformers", "zero_frames")}, indent=1))
    for context, rows in meta["windowed_vs_file"].items():
        for row in rows:
            print(
                context, row["block"], f"max_abs={row['max_abs']:.4g}", f"rel={row['rel_rms']:.4g}"
            )


if __name__ == "__main__":
    main()

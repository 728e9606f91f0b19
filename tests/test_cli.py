"""The CLI: render writes a playable MP4 + frames; bad input gets one clear line, exit 2."""

import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stream.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.new("RGB", (200, 160), (180, 120, 90)).save(path)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int = 22050) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def audio(tmp_path) -> Path:
    t = np.arange(int(0.7 * 22050)) / 22050
    return write_wav(tmp_path / "speech.wav", 0.4 * np.sin(2 * np.pi * 220 * t) * (t % 0.25 < 0.15))


def huge_png(path: Path, w: int, h: int) -> Path:
    """A valid PNG header declaring w x h (no need to allocate the pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def test_render_writes_mp4_with_audio_and_frames(tmp_path, image, audio):
    out = tmp_path / "out"
    rc = main(
        [
            "render",
            "--image",
            str(image),
            "--audio",
            str(audio),
            "-o",
            str(out),
            "--model",
            "tiny",
            "--seed",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    frames = np.load(out.with_suffix(".npy"))
    assert frames.dtype == np.uint8 and frames.shape[1:] == (128, 128, 3)
    # 0.7 s at 25 fps = 17.5 frames, rounded up to whole 3-frame blocks
    assert frames.shape[0] == 18
    with av.open(str(out.with_suffix(".mp4"))) as c:
        kinds = {s.type: s.codec_context.name for s in c.streams}
        assert kinds == {"video": "h264", "audio": "aac"}
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == frames.shape[0]
    # same seed, same frames
    out2 = tmp_path / "again"
    main(
        [
            "render",
            "--image",
            str(image),
            "--audio",
            str(audio),
            "-o",
            str(out2),
            "--model",
            "tiny",
            "--seed",
            "3",
            "--quiet",
        ]
    )
    np.testing.assert_array_equal(np.load(out2.with_suffix(".npy")), frames)


@pytest.mark.distributed
def test_render_across_tpp_ranks_gives_the_local_frames(tmp_path, image, audio):
    """`render --executor tpp --devices cpu:3` (two step ranks, one decode rank, gloo) writes
    the frames the one-process render writes in the same cache mode with the same seed."""
    common = ["--image", str(image), "--audio", str(audio), "--model", "tiny", "--seed", "5"]
    common += ["--cache-mode", "timestep_forcing", "--quiet"]
    local = run_cli("render", *common, "-o", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    tpp = run_cli(
        "render", *common, "-o", str(tmp_path / "tpp"), "--executor", "tpp", "--devices", "cpu:3"
    )
    assert tpp.returncode == 0, tpp.stderr
    assert "rank 2" in tpp.stderr and "VAE decode" in tpp.stderr  # placement printed
    a, b = np.load(tmp_path / "local.npy"), np.load(tmp_path / "tpp.npy")
    assert a.shape == b.shape and a.shape[0] == 18
    assert np.abs(a.astype(np.int16) - b).max() <= 1
    assert (tmp_path / "tpp.mp4").stat().st_size > 1000


@pytest.mark.parametrize(
    "case, expect",
    [
        ("not-an-image", "not an image"),
        ("huge-image", "the limit is"),
        ("missing-image", "does not exist"),
        ("undecodable-audio", "cannot decode"),
        ("empty-audio", "empty"),
        ("missing-model", "neither a known name"),
        ("bad-config", "patch"),
        ("indivisible-height", "not divisible"),
        ("indivisible-window", "multiple of"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, image, audio, case, expect):
    img, aud, model = str(image), str(audio), "tiny"
    if case == "not-an-image":
        (tmp_path / "x.png").write_text("this is text, not pixels")
        img = str(tmp_path / "x.png")
    elif case == "huge-image":
        img = str(huge_png(tmp_path / "huge.png", 100_000, 100_000))
    elif case == "missing-image":
        img = str(tmp_path / "nope.png")
    elif case == "undecodable-audio":
        (tmp_path / "a.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
        aud = str(tmp_path / "a.wav")
    elif case == "empty-audio":
        aud = str(write_wav(tmp_path / "empty.wav", np.zeros(0)))
    elif case == "missing-model":
        model = str(tmp_path / "no-such-model")
    elif case == "bad-config":
        from models.config import tiny_config
        from models.registry import build_tiny

        bundle = build_tiny()
        bundle.dit.config = tiny_config(in_channels=8, out_channels=8)
        bundle.save(tmp_path / "m")
        meta = (
            (tmp_path / "m" / "model.json")
            .read_text()
            .replace(
                '"patch_size": [\n      1,\n      2,\n      2\n    ]', '"patch_size": [1, 0, 2]'
            )
        )
        (tmp_path / "m" / "model.json").write_text(meta)
        model = str(tmp_path / "m")
    elif case.startswith("indivisible"):
        import json

        from models.registry import build_tiny

        build_tiny().save(tmp_path / "m")
        meta = json.loads((tmp_path / "m" / "model.json").read_text())
        # 100 rows do not divide into the autoencoder's 8-pixel cells; a 4-frame history
        # window does not divide into 3-frame blocks.
        key, value = ("height", 100) if case.endswith("height") else ("window_frames", 4)
        meta["defaults"][key] = value
        (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
        model = str(tmp_path / "m")
    r = run_cli(
        "render",
        "--image",
        img,
        "--audio",
        aud,
        "-o",
        str(tmp_path / "o"),
        "--model",
        model,
        "--quiet",
    )
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_saved_bundle_roundtrip(tmp_path):
    from models.registry import build_tiny, load_model

    a = build_tiny(seed=4)
    a.save(tmp_path / "m")
    b = load_model(str(tmp_path / "m"))
    for (ka, va), (kb, vb) in zip(
        a.dit.state_dict().items(), b.dit.state_dict().items(), strict=True
    ):
        assert ka == kb and np.array_equal(va.numpy(), vb.numpy())
    assert b.dit.config == a.dit.config


def test_bench_json_reports_stages():
    """The stage times tile the block and fit in the run, in seconds. One measured block, so
    its medians are that block's own times and the stages must add up to it exactly. (It used
    to assert only that the times were positive.) Fails if the block's total misses a stage
    (tried: generate_block's total = t3 - t0, without the decode), if per-step times overlap
    (tried: each step timed from the start of the denoise stage), or if a time is not in
    seconds (tried: time_to_first_frame_s * 1000)."""
    import json
    import time

    start = time.perf_counter()
    r = run_cli("bench", "--model", "tiny", "--blocks", "1", "--warmup", "1", "--json")
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["steps"] == len(data["denoise_step_s"]) == 4
    stages = ("features_s", "denoise_s", "cache_update_s", "decode_s")
    for key in (*stages, "block_s", "time_to_first_frame_s", "load_s", "peak_memory_mb"):
        assert data[key] > 0, key
    assert sum(data[k] for k in stages) == pytest.approx(data["block_s"], rel=1e-9)
    assert sum(data["denoise_step_s"]) <= data["denoise_s"]
    # Loading, the first block of a fresh session and the measured block ran one after another.
    assert data["load_s"] + data["time_to_first_frame_s"] + data["block_s"] < wall
    assert data["fps"] == pytest.approx(data["frames_per_block"] / data["block_s"])

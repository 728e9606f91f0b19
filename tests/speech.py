"""Real speech for tests: espeak-ng renders a sentence to a WAV (22050 Hz mono s16).

Missing espeak-ng is a failure, not a skip (scripts/install-browser.sh installs it, as in CI).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np


def espeak(text: str, *, speed: int = 160) -> tuple[np.ndarray, int]:
    """(int16 mono samples, sample rate) of `text` spoken by espeak-ng."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([binary, "-s", str(speed), "-w", str(path), text], check=True, timeout=60)
        with wave.open(str(path)) as wav:
            rate, channels = wav.getframerate(), wav.getnchannels()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    if channels != 1:
        pcm = pcm.reshape(-1, channels)[:, 0]
    return pcm.copy(), rate


def loud_spans(pcm: np.ndarray, rate: int, *, frame_s: float = 0.02) -> np.ndarray:
    """Per `frame_s` window, whether the speech is audible (rms over 1 % of full scale)."""
    n = int(rate * frame_s)
    frames = pcm[: len(pcm) // n * n].astype(np.float32).reshape(-1, n) / 32768.0
    return np.sqrt((frames**2).mean(axis=1)) > 0.01

"""What `diffstream eval` reports, measured from pixels only so it works on generated frames.

- `mouth_openness`: how much of the mouth box is dark mouth interior, relative to the skin
  around it (no renderer parameters involved).
- `lip_sync_correlation`: Pearson correlation of that openness with the audio's loudness
  envelope, best over a small lag window.
- `identity_drift`: how far each frame's appearance is from the reference, outside the mouth.
"""

from __future__ import annotations

import numpy as np

from models.errors import InvalidImageError

from .speech import loudness_envelope

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive), frame pixels

_CHUNK = 128  # frames per step of identity_drift
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_frames(frames: np.ndarray) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidImageError(f"expected frames shaped [T, H, W, 3], got {arr.shape}")
    return arr


def _crop(frames: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise InvalidImageError(f"mouth box {box} lies outside {w}x{h} frames")
    return frames[:, y0:y1, x0:x1]


def mouth_openness(frames: np.ndarray, box: Box) -> np.ndarray:
    """Share of the mouth box that is dark mouth interior, per frame (float32 [T], 0..1).

    Each frame's skin brightness is the median luminance of the top third of its own box, the
    skin between nose and mouth (so it follows lighting and skin tone, and a bright background
    at the box's lower corners cannot pose as skin). A pixel counts as open mouth by how much
    darker than that it is: fully below 35 % of it, not at all above 60 % (lips and shading
    stay above). The soft ramp keeps the measure smooth on blurry generated frames instead of
    flickering at a hard threshold. Only dark pixels enclosed by brighter ones on all four sides
    (lips, skin) count, so dark background or hair reaching into a corner of the box does not.
    """
    crop = _crop(_as_frames(frames), box).astype(np.float32)
    luma = crop @ _LUMA
    top = max(2, luma.shape[1] // 3)
    skin = np.median(luma[:, :top].reshape(luma.shape[0], -1), axis=1)[:, None]
    skin = np.maximum(skin, 8.0)
    skin = skin[:, :, None]
    dark = np.clip((0.6 * skin - luma) / (0.25 * skin), 0.0, 1.0)
    bright = luma >= 0.6 * skin
    enclosed = np.ones_like(bright)
    for axis in (1, 2):
        enclosed &= np.logical_or.accumulate(bright, axis=axis)
        enclosed &= np.flip(np.logical_or.accumulate(np.flip(bright, axis), axis=axis), axis)
    return (dark * enclosed).mean(axis=(1, 2)).astype(np.float32)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / denom) if denom > 1e-12 else 0.0


def lagged_correlations(
    openness: np.ndarray, envelope: np.ndarray, max_lag_frames: int = 2
) -> dict[int, float]:
    """Pearson correlation for each lag; lag k pairs mouth frame t with audio frame t - k.

    Positive k means the mouth follows the audio by k frames (a model may answer a little late),
    negative k that it anticipates it.
    """
    n = min(openness.size, envelope.size)
    o, e = openness[:n].astype(np.float64), envelope[:n].astype(np.float64)
    out = {}
    for lag in range(-max_lag_frames, max_lag_frames + 1):
        if lag >= 0:
            a, b = o[lag:], e[: n - lag]
        else:
            a, b = o[: n + lag], e[-lag:]
        out[lag] = _pearson(a, b) if a.size >= 3 else 0.0
    return out


def lip_sync_correlation(
    frames: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    box: Box,
    max_lag_frames: int = 2,
) -> float:
    """Lip sync: Pearson correlation of measured mouth openness with the loudness envelope.

    The envelope is `speech.loudness_envelope` (dB relative to loud speech, 40 dB range) over
    the same frame windows as the video. The best correlation over lags of -max_lag_frames..
    +max_lag_frames frames (80 ms each way at 25 fps) is reported, so a constant small delay is
    not punished; with so few lags, unrelated audio still scores near zero. A mouth that never
    moves, or silent audio, scores 0.
    """
    openness = mouth_openness(frames, box)
    env = loudness_envelope(audio, sample_rate, fps, num_frames=openness.size)
    return max(lagged_correlations(openness, env, max_lag_frames).values())


def _downsample(frames: np.ndarray, factor: int) -> np.ndarray:
    """Area-average uint8 [T, H, W, 3] by `factor` (cropped to a multiple), float32 in 0..1."""
    t, h, w, _ = frames.shape
    h2, w2 = h // factor, w // factor
    acc = np.zeros((t, h2, w2, 3), dtype=np.uint32)
    for dy in range(factor):  # strided integer sums: far cheaper than a float reshape-mean
        for dx in range(factor):
            acc += frames[:, dy : h2 * factor : factor, dx : w2 * factor : factor]
    return acc.astype(np.float32) * (1.0 / (255.0 * factor * factor))


def appearance_distance(frames: np.ndarray, reference: np.ndarray, box: Box) -> np.ndarray:
    """Mean absolute colour difference (0..1) outside the mouth box, on a ~32-pixel-wide image.

    Downsampling first makes the small head motion and blinks of a faithful clip cost little,
    while a changed face, hair, clothing or background colour costs in proportion.
    """
    f = _as_frames(frames)
    r = _as_frames(reference)
    size = f.shape[1]
    factor = max(1, min(f.shape[1], f.shape[2]) // 32)
    fd, rd = _downsample(f, factor), _downsample(r, factor)
    keep = np.ones(fd.shape[1:3], dtype=bool)
    x0, y0, x1, y1 = box
    scale = fd.shape[1] / size
    keep[
        int(np.floor(y0 * scale)) : int(np.ceil(y1 * scale)),
        int(np.floor(x0 * scale)) : int(np.ceil(x1 * scale)),
    ] = False
    diff = np.abs(fd - rd)[:, keep]
    return diff.mean(axis=(1, 2)).astype(np.float32)


def histogram_distance(
    frames: np.ndarray, reference: np.ndarray, box: Box, bins: int = 8
) -> np.ndarray:
    """Total-variation distance (0..1) of joint RGB histograms outside the mouth box.

    Position-free, so it does not care where the head is, only whether the palette (skin, hair,
    clothes, background) has shifted: the colour drift long generated streams tend to show.
    """
    f = _as_frames(frames)
    r = _as_frames(reference)
    if bins not in (2, 4, 8, 16, 32):
        raise ValueError("bins must be a power of two from 2 to 32")
    keep = np.ones(f.shape[1:3], dtype=bool)
    x0, y0, x1, y1 = box
    keep[max(0, y0) : y1, max(0, x0) : x1] = False
    shift = 8 - int(np.log2(bins))

    def hist(x: np.ndarray) -> np.ndarray:
        q = (x >> shift).astype(np.uint16)
        idx = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2])[:, keep].astype(np.int32)
        idx += (np.arange(x.shape[0], dtype=np.int32) * bins**3)[:, None]
        counts = np.bincount(idx.reshape(-1), minlength=x.shape[0] * bins**3)
        counts = counts.reshape(x.shape[0], bins**3).astype(np.float64)
        return counts / counts.sum(axis=1, keepdims=True)

    return (0.5 * np.abs(hist(f) - hist(r)).sum(axis=1)).astype(np.float32)


def identity_drift(frames: np.ndarray, reference: np.ndarray, box: Box | None = None) -> np.ndarray:
    """Distance of each frame's appearance from the reference, ignoring the mouth (float32 [T]).

    The mean of `appearance_distance` (where things are: face, hair, clothes, background) and
    `histogram_distance` (which colours there are), both in 0..1 and both computed outside the
    mouth box so that talking costs nothing. A faithful clip scores about 0.01-0.05; drifted
    colours or a different identity score several times more. `box` defaults to
    `avatar.default_mouth_box` for the frame size.
    """
    f = _as_frames(frames)
    r = _as_frames(reference)
    if r.shape[1:] != f.shape[1:]:
        raise InvalidImageError(f"reference {r.shape[1:]} and frames {f.shape[1:]} differ in size")
    if box is None:
        from .avatar import default_mouth_box

        box = default_mouth_box(f.shape[1])
    out = np.empty(f.shape[0], dtype=np.float32)
    for start in range(0, f.shape[0], _CHUNK):  # bounded memory on long streams
        part = f[start : start + _CHUNK]
        out[start : start + part.shape[0]] = 0.5 * (
            appearance_distance(part, r, box) + histogram_distance(part, r, box)
        )
    return out


# --------------------------------------------------------------------------------------------
# Fidelity against ground truth (the renderer's frames for the same identity and speech)

PSNR_CAP_DB = 100.0  # what identical frames score (their PSNR is infinite)
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11-tap window: int(3.5 * sigma + 0.5), as scikit-image's default truncate
_SSIM_C1 = (0.01 * 255.0) ** 2  # (K1 L)^2
_SSIM_C2 = (0.03 * 255.0) ** 2  # (K2 L)^2


def _pair(a: np.ndarray, b: np.ndarray, box: Box | None) -> tuple[np.ndarray, np.ndarray]:
    fa, fb = _as_frames(a), _as_frames(b)
    if fa.shape != fb.shape:
        raise InvalidImageError(f"frame stacks differ in shape: {fa.shape} and {fb.shape}")
    if fa.shape[0] == 0:
        raise InvalidImageError("no frames to compare")
    if box is not None:
        fa, fb = _crop(fa, box), _crop(fb, box)
    return fa, fb


def psnr(a: np.ndarray, b: np.ndarray, box: Box | None = None) -> float:
    """Peak signal-to-noise ratio in dB of uint8 frames [N, H, W, 3] (or one [H, W, 3]).

    Per frame, 10 log10(255^2 / MSE) with the MSE over all pixels and channels inside `box`
    (x0, y0, x1, y1, end-exclusive; the whole frame when None); the result is the mean over
    frames. Identical frames have an infinite PSNR: each frame is capped at `PSNR_CAP_DB`
    (100 dB, an MSE of 6.5e-6, far below one grey level in one pixel), so a mean stays finite.
    """
    fa, fb = _pair(a, b, box)
    diff = fa.astype(np.float64) - fb.astype(np.float64)
    mse = (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(255.0**2 / mse)
    return float(np.minimum(db, PSNR_CAP_DB).mean())


def _gaussian_taps() -> np.ndarray:
    x = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-(x * x) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _blur_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over axes 1 and 2 of [N, H, W, C], keeping only full windows."""
    k = taps.size
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(taps[i] * x[:, i : i + h] for i in range(k))
    return sum(taps[i] * rows[:, :, i : i + w] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, box: Box | None = None) -> float:
    """Structural similarity (Wang et al. 2004) of uint8 frames [N, H, W, 3], mean over frames.

    Gaussian-weighted local statistics (11x11 window, sigma 1.5), K1 = 0.01, K2 = 0.03,
    L = 255, population (not sample) variances; computed on each RGB channel separately and
    averaged over channels, so a colour shift counts even where brightness is unchanged. Only
    windows that lie wholly inside the frame (or `box`) are averaged, the same numbers as
    scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`. 1 for identical frames; the
    region must be at least 11 pixels on each side.
    """
    fa, fb = _pair(a, b, box)
    k = 2 * _SSIM_RADIUS + 1
    if fa.shape[1] < k or fa.shape[2] < k:
        raise InvalidImageError(
            f"SSIM needs at least {k}x{k} pixels, got {fa.shape[2]}x{fa.shape[1]}"
        )
    taps = _gaussian_taps()
    total = 0.0
    for start in range(0, fa.shape[0], 16):  # bounded memory on long clips
        x = fa[start : start + 16].astype(np.float64)
        y = fb[start : start + 16].astype(np.float64)
        mx, my = _blur_valid(x, taps), _blur_valid(y, taps)
        vx = _blur_valid(x * x, taps) - mx * mx
        vy = _blur_valid(y * y, taps) - my * my
        cxy = _blur_valid(x * y, taps) - mx * my
        s = ((2 * mx * my + _SSIM_C1) * (2 * cxy + _SSIM_C2)) / (
            (mx * mx + my * my + _SSIM_C1) * (vx + vy + _SSIM_C2)
        )
        total += float(s.mean(axis=(1, 2, 3)).sum())
    return total / fa.shape[0]

"""A procedural talking avatar, rendered with numpy fast enough to make training sets on a CPU.

Every identity (face shape, skin, hair, eyes, background, clothing) is drawn once into float
layers with soft, anti-aliased edges (an `AvatarRig`); a frame then only repaints the mouth and
eyelid patches and moves the head with a bilinear sub-pixel shift over the background. The mouth
always sits in a known box (`mouth_box`), so metrics can measure it from pixels alone.

The mouth is driven by audio the way a face moves: openness follows loudness, width/roundness
follows the spectral shape (rounded vowels have little energy above ~1.2 kHz), eyes blink every
few seconds and the head drifts slowly (`drive_from_audio`).
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .speech import loudness_envelope, num_video_frames

Color = tuple[int, int, int]

MAX_HEAD_SHIFT = 0.025  # largest head offset in either direction, as a fraction of frame size
NEUTRAL_ROUND = 0.3  # mouth roundness at rest (reference image, silence)
MOUTH_CENTER_Y = 0.6  # every face is placed so its mouth sits here (fraction of frame height)
HAIR_STYLES = ("short", "long", "buzz", "bun", "side_part", "afro", "bob")
BACKGROUND_STYLES = ("vertical", "horizontal", "radial", "blobs")
NECKLINES = ("round", "v", "collar")

# Parameter ranges of `sample_identity`; `default_mouth_box` covers all of them.
_FACE_WIDTH = (0.175, 0.205)  # face half-width, fraction of frame size
_FACE_ASPECT = (1.22, 1.40)  # face half-height / half-width
_MOUTH_WIDTH = (0.36, 0.46)  # mouth half-width / face half-width
_MOUTH_BELOW_CENTRE = 0.58  # mouth height below the face centre / face half-height
_SKIN_TONES = np.array(
    [
        (255, 226, 204),
        (241, 198, 165),
        (226, 175, 136),
        (200, 140, 100),
        (165, 108, 74),
        (126, 82, 56),
        (92, 60, 42),
    ],
    dtype=np.float64,
)
_HAIR_COLOURS = (
    (28, 24, 24),
    (58, 40, 30),
    (105, 72, 44),
    (140, 66, 36),
    (205, 170, 110),
    (165, 163, 160),
    (228, 226, 220),
)
_IRIS_COLOURS = (
    (70, 45, 30),
    (40, 28, 22),
    (70, 110, 165),
    (80, 120, 80),
    (120, 100, 60),
    (110, 120, 130),
)


@dataclass(frozen=True)
class Identity:
    """Everything that makes one avatar look like itself; hashable so its rig can be cached."""

    face_width: float  # face half-width, fraction of frame size
    face_aspect: float  # face half-height / half-width
    chin_taper: float  # 0: an ellipse; larger: a narrower jaw
    skin: Color
    hair_style: int  # index into HAIR_STYLES
    hair: Color
    hairline: float  # hairline height above the face centre, fraction of face half-height
    eye_width: float  # eye half-width / face half-width
    eye_aspect: float  # eye half-height / eye half-width
    eye_spacing: float  # eye centre offset from the midline / face half-width
    iris: Color
    brow_weight: float
    lips: Color
    mouth_width: float  # mouth half-width / face half-width
    background: Color
    background2: Color
    background_style: int  # index into BACKGROUND_STYLES
    clothing: Color
    neckline: int  # index into NECKLINES
    texture_seed: int  # hair streaks, background blobs


def _hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _luma(c: Color) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw an identity from a large space of faces, hair, eyes, clothes and backgrounds."""
    pos = rng.uniform(0, len(_SKIN_TONES) - 1)
    i = int(pos)
    skin_f = _SKIN_TONES[i] + (pos - i) * (
        _SKIN_TONES[min(i + 1, len(_SKIN_TONES) - 1)] - _SKIN_TONES[i]
    )
    skin_f = np.clip(skin_f * rng.uniform(0.95, 1.04) + rng.normal(0, 4, 3), 0, 255)
    skin = tuple(int(v) for v in skin_f)

    if rng.random() < 0.1:  # dyed
        hair = _hsv(rng.random(), rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.85))
    else:
        base = np.array(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], dtype=np.float64)
        hair = tuple(int(v) for v in np.clip(base * rng.uniform(0.85, 1.15), 0, 255))

    lips_f = np.clip(skin_f * np.array([0.86, 0.6, 0.62]) + np.array([14, 0, 4]), 0, 255)
    lips = tuple(int(v) for v in lips_f)

    # Backgrounds keep some contrast with the face so the head stays clearly visible.
    hue = rng.random()
    sat = rng.uniform(0.08, 0.65)
    val = rng.uniform(0.3, 0.95)
    if abs(val * 255 - _luma(skin)) < 50:
        val = val + 0.35 if val < 0.6 else val - 0.35
    background = _hsv(hue, sat, val)
    background2 = _hsv(
        hue + rng.uniform(-0.12, 0.12), sat * rng.uniform(0.6, 1.3), val * rng.uniform(0.55, 0.95)
    )
    clothing = _hsv(rng.random(), rng.uniform(0.1, 0.85), rng.uniform(0.2, 0.9))

    return Identity(
        face_width=float(rng.uniform(*_FACE_WIDTH)),
        face_aspect=float(rng.uniform(*_FACE_ASPECT)),
        chin_taper=float(rng.uniform(0.05, 0.3)),
        skin=skin,
        hair_style=int(rng.integers(len(HAIR_STYLES))),
        hair=hair,
        hairline=float(rng.uniform(0.45, 0.62)),
        eye_width=float(rng.uniform(0.17, 0.23)),
        eye_aspect=float(rng.uniform(0.45, 0.62)),
        eye_spacing=float(rng.uniform(0.38, 0.46)),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
        brow_weight=float(rng.uniform(0.6, 1.2)),
        lips=lips,
        mouth_width=float(rng.uniform(*_MOUTH_WIDTH)),
        background=background,
        background2=background2,
        background_style=int(rng.integers(len(BACKGROUND_STYLES))),
        clothing=clothing,
        neckline=int(rng.integers(len(NECKLINES))),
        texture_seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class FaceLayout:
    """Feature positions in frame pixels for an identity at one size (head centred).

    Faces differ in size and shape, but the mouth is always at the same place (centred at
    MOUTH_CENTER_Y), so one mouth box fits every identity tightly.
    """

    size: int
    cx: float
    cy: float
    a: float  # face half-width
    b: float  # face half-height
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    mouth_y: float
    mouth_w: float  # mouth half-width at rest

    @property
    def max_open_h(self) -> float:
        return _open_height(1.0, 1.0, self.mouth_w)

    @property
    def lip_up(self) -> float:
        return 0.2 * self.mouth_w

    @property
    def lip_lo(self) -> float:
        return 0.26 * self.mouth_w


def _layout(
    face_width: float, face_aspect: float, mouth_width: float, identity: Identity | None, size: int
) -> FaceLayout:
    a = face_width * size
    b = a * face_aspect
    cy = MOUTH_CENTER_Y * size - _MOUTH_BELOW_CENTRE * b
    eye_w = (identity.eye_width if identity else 0.2) * a
    return FaceLayout(
        size=size,
        cx=0.5 * size,
        cy=cy,
        a=a,
        b=b,
        eye_y=cy - 0.08 * b,
        eye_dx=(identity.eye_spacing if identity else 0.42) * a,
        eye_w=eye_w,
        eye_h=eye_w * (identity.eye_aspect if identity else 0.5),
        mouth_y=MOUTH_CENTER_Y * size,
        mouth_w=mouth_width * a,
    )


def face_layout(identity: Identity, size: int = 128) -> FaceLayout:
    """Where an identity's face, eyes and mouth are drawn at `size` (before head motion)."""
    return _layout(identity.face_width, identity.face_aspect, identity.mouth_width, identity, size)


def _open_width(mouth_open: float, mouth_round: float, mouth_w: float) -> float:
    return mouth_w * (1.1 - 0.35 * mouth_round) * (1.0 + 0.06 * mouth_open)


def _open_height(mouth_open: float, mouth_round: float, mouth_w: float) -> float:
    return mouth_w * (0.03 + 0.45 * mouth_open) * (0.85 + 0.3 * mouth_round)


def _mouth_extent(lay: FaceLayout) -> tuple[float, float, float, float]:
    """Box around the mouth at its widest and most open, with the head centred."""
    half_w = _open_width(1.0, 0.0, lay.mouth_w) + 0.08 * lay.mouth_w
    h = lay.max_open_h
    top = lay.mouth_y - 0.4 * h - lay.lip_up
    bottom = lay.mouth_y + 1.6 * h + lay.lip_lo
    return lay.cx - half_w, top, lay.cx + half_w, bottom


def _box_with_margin(
    extent: tuple[float, float, float, float], size: int
) -> tuple[int, int, int, int]:
    margin = MAX_HEAD_SHIFT * size + 2.0  # + anti-aliasing and bilinear spread
    x0, y0, x1, y1 = extent
    return (
        max(0, math.floor(x0 - margin)),
        max(0, math.floor(y0 - margin)),
        min(size, math.ceil(x1 + margin)),
        min(size, math.ceil(y1 + margin)),
    )


def mouth_box(identity: Identity, size: int = 128) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive: where this identity's mouth can be in any frame.

    Covers the widest, most open mouth at the largest head offset, so pixel metrics can crop it
    without knowing the head motion.
    """
    return _box_with_margin(_mouth_extent(face_layout(identity, size)), size)


def default_mouth_box(size: int = 128) -> tuple[int, int, int, int]:
    """A mouth box valid for every identity `sample_identity` can draw (for unknown references)."""
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for fw in _FACE_WIDTH:
        for fa in _FACE_ASPECT:
            for mw in _MOUTH_WIDTH:
                ex0, ey0, ex1, ey1 = _mouth_extent(_layout(fw, fa, mw, None, size))
                x0, y0, x1, y1 = min(x0, ex0), min(y0, ey0), max(x1, ex1), max(y1, ey1)
    return _box_with_margin((x0, y0, x1, y1), size)


# --------------------------------------------------------------------------------------------
# drawing primitives (premultiplied RGBA float32 layers, colours in [0, 1])


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    """Anti-aliased ellipse coverage: 0.5 minus the (first-order) signed distance in pixels."""
    u = (x - cx) / rx
    v = (y - cy) / ry
    r = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / np.maximum(r, 1e-6)
    dist = (r - 1.0) / np.maximum(grad, 1e-6)
    # The first-order estimate bleeds past the tips of thin ellipses; the bounding box cannot.
    dist = np.maximum(dist, np.maximum(np.abs(x - cx) - rx, np.abs(y - cy) - ry))
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)


def _superellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, p: float
) -> np.ndarray:
    """Boxier ellipse (|u|^p + |v|^p = 1) with approximately one-pixel soft edges."""
    r = (np.abs((x - cx) / rx) ** p + np.abs((y - cy) / ry) ** p) ** (1.0 / p)
    return np.clip(0.5 - (r - 1.0) * min(rx, ry), 0.0, 1.0).astype(np.float32)


def _over(layer: np.ndarray, alpha: np.ndarray, colour: np.ndarray | Color | tuple) -> None:
    """Paint `colour` with coverage `alpha` over a premultiplied RGBA layer, in place."""
    c = np.asarray(colour, dtype=np.float32)
    if c.ndim == 1 and c.max() > 1.0:
        c = c / 255.0
    a = alpha[..., None]
    layer[..., :3] *= 1.0 - a
    layer[..., :3] += c * a
    layer[..., 3] += alpha * (1.0 - layer[..., 3])


def _rgb(c: Color) -> np.ndarray:
    return np.asarray(c, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# the rig


class AvatarRig:
    """One identity's precomputed layers at one size; `frame` renders in well under 1 ms.

    Static parts are drawn once onto a head layer slightly larger than the frame (room for head
    motion); each frame repaints only the mouth and eyelid patches, then shifts the head layer
    by a sub-pixel offset over the static background.
    """

    def __init__(self, identity: Identity, size: int = 128) -> None:
        if size < 32:
            raise ValueError("avatar frames must be at least 32 pixels")
        self.identity = identity
        self.size = size
        self.layout = face_layout(identity, size)
        self.margin = int(math.ceil(MAX_HEAD_SHIFT * size)) + 2
        canvas = size + 2 * self.margin
        coords = np.arange(canvas, dtype=np.float32) - self.margin + 0.5
        self._x, self._y = np.meshgrid(coords, coords)
        self.background = self._draw_background()
        self.head = np.zeros((canvas, canvas, 4), dtype=np.float32)
        self._draw_head()
        self._prepare_eyes()
        self._prepare_mouth()
        self._scratch = np.empty((size, size, 4), dtype=np.float32)
        self._rgb = np.empty((size, size, 3), dtype=np.float32)

    # ---- static layers

    def _draw_background(self) -> np.ndarray:
        ident, s = self.identity, self.size
        c1, c2 = _rgb(ident.background), _rgb(ident.background2)
        v = (np.arange(s, dtype=np.float32) + 0.5) / s
        x, y = np.meshgrid(v, v)
        style = BACKGROUND_STYLES[ident.background_style]
        if style == "vertical":
            t = y
        elif style == "horizontal":
            t = x
        elif style == "radial":
            t = np.clip(np.sqrt((x - 0.5) ** 2 + (y - 0.4) ** 2) * 1.5, 0, 1)
        else:
            rng = np.random.default_rng(ident.texture_seed)
            t = np.zeros_like(x)
            for _ in range(5):
                bx, by, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
                t = np.maximum(t, np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * r * r)))
            t = 1.0 - t
        bg = c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]
        return np.clip(bg, 0.0, 1.0).astype(np.float32)

    def _skin_field(self, shade: float = 1.0) -> np.ndarray:
        """Skin colour with soft lighting: darker towards the face edge, lit from the upper left."""
        lay = self.layout
        u = (self._x - lay.cx) / lay.a
        v = (self._y - lay.cy) / lay.b
        light = (
            1.0 - 0.2 * np.clip(u * u + v * v, 0.0, 1.6) ** 1.5 + 0.05 * np.clip(-u - v, -1.0, 1.0)
        )
        return np.clip(
            _rgb(self.identity.skin)[None, None, :] * (shade * light)[..., None], 0.0, 1.0
        )

    def _draw_head(self) -> None:
        ident, lay, s = self.identity, self.layout, self.size
        x, y, layer = self._x, self._y, self.head
        cx, cy, a, b = lay.cx, lay.cy, lay.a, lay.b
        skin = _rgb(ident.skin)
        style = HAIR_STYLES[ident.hair_style]
        rng = np.random.default_rng(ident.texture_seed)
        hair_col = self._hair_field(rng)

        # Hair behind the head.
        if style == "long":
            _over(layer, _superellipse(x, y, cx, cy + 0.3 * b, 1.22 * a, 1.4 * b, 3.5), hair_col)
        elif style == "bob":
            _over(layer, _superellipse(x, y, cx, cy - 0.05 * b, 1.25 * a, 1.08 * b, 3.0), hair_col)
        elif style == "afro":
            theta = np.arctan2(y - (cy - 0.2 * b), x - cx)
            bumps = 1.0 + 0.04 * np.sin(9 * theta + rng.uniform(0, 6.3))
            r = np.sqrt((x - cx) ** 2 + (y - (cy - 0.2 * b)) ** 2) / (1.5 * a * bumps)
            _over(layer, np.clip(0.5 - (r - 1.0) * 1.5 * a, 0, 1).astype(np.float32), hair_col)
        elif style == "bun":
            by = cy - 1.05 * b
            lx, ly, ll = self._region(
                layer, cx - 0.5 * a, by - 0.45 * a, cx + 0.5 * a, by + 0.45 * a
            )
            _over(
                ll,
                _ellipse(lx, ly, cx, by, 0.42 * a, 0.36 * a),
                hair_col[self._patch(cx - 0.5 * a, by - 0.45 * a, cx + 0.5 * a, by + 0.45 * a)],
            )

        # Neck, body and neckline.
        neck = np.clip(0.5 - (np.abs(x - cx) - 0.5 * a), 0, 1) * np.clip(y - cy, 0, 1)
        under_chin = np.clip(0.8 + 0.2 * (y - (cy + b)) / (0.08 * s), 0.8, 1.0)
        side = 1.0 - 0.12 * np.clip(np.abs(x - cx) / (0.5 * a), 0, 1) ** 2
        neck_col = skin[None, None, :] * (0.9 * under_chin * side)[..., None]
        _over(layer, neck.astype(np.float32), neck_col)
        body_top = 0.8 * s
        body = _superellipse(x, y, cx, body_top + 0.3 * s, 0.47 * s, 0.3 * s, 3.0)
        cloth = (
            _rgb(ident.clothing)[None, None, :]
            * (1.0 - 0.25 * np.clip(np.abs(x - cx) / (0.47 * s), 0, 1) ** 2)[..., None]
        )
        _over(layer, body, cloth)
        neckline = NECKLINES[ident.neckline]
        if neckline == "v":
            vshape = np.clip(0.5 - (np.abs(x - cx) - 0.45 * (body_top + 0.12 * s - y)), 0, 1)
            vshape *= np.clip(y - (body_top - 0.03 * s), 0, 1)
            _over(layer, vshape.astype(np.float32), neck_col)
        else:
            _over(layer, _ellipse(x, y, cx, body_top, 0.6 * a, 0.05 * s), neck_col)
            if neckline == "collar":
                ring = _ellipse(x, y, cx, body_top, 0.85 * a, 0.08 * s) - _ellipse(
                    x, y, cx, body_top - 0.01 * s, 0.62 * a, 0.055 * s
                )
                _over(layer, np.clip(ring, 0, 1) * body, (236, 236, 230))

        # Ears, then the face: an egg, narrower towards the chin.
        for side in (-1.0, 1.0):
            ex, ey = cx + side * 0.97 * a, lay.eye_y + 0.12 * b
            lx, ly, ll = self._region(
                layer, ex - 0.2 * a, ey - 0.25 * b, ex + 0.2 * a, ey + 0.25 * b
            )
            _over(ll, _ellipse(lx, ly, ex, ey, 0.16 * a, 0.19 * b), skin * 0.86)
            _over(
                ll, 0.6 * _ellipse(lx, ly, ex + side * 0.03 * a, ey, 0.07 * a, 0.11 * b), skin * 0.7
            )
        below = np.clip((y - cy) / b, 0.0, 1.0)
        half_w = a * (1.0 - ident.chin_taper * below * below)
        u = (x - cx) / half_w
        v = (y - cy) / b
        r = np.sqrt(u * u + v * v)
        grad = np.sqrt((u / half_w) ** 2 + (v / b) ** 2) / np.maximum(r, 1e-6)
        face = np.clip(0.5 - (r - 1.0) / np.maximum(grad, 1e-6), 0, 1).astype(np.float32)
        self._face_col = self._skin_field()
        _over(layer, face, self._face_col)

        # Cheeks, nose, chin shadow (each drawn only in its own neighbourhood).
        lx, ly, ll = self._region(layer, cx - a, cy, cx + a, cy + b)
        lface = face[self._patch(cx - a, cy, cx + a, cy + b)]
        for side in (-1.0, 1.0):
            blush = np.exp(
                -(
                    ((lx - cx - side * 0.55 * a) / (0.2 * a)) ** 2
                    + ((ly - cy - 0.25 * b) / (0.15 * b)) ** 2
                )
            )
            _over(ll, (0.12 * blush * lface).astype(np.float32), _rgb(ident.lips))
        chin = np.exp(-(((lx - cx) / (0.3 * a)) ** 2 + ((ly - cy - 0.86 * b) / (0.07 * b)) ** 2))
        _over(ll, (0.15 * chin * lface).astype(np.float32), skin * 0.7)
        nose_y = cy + 0.3 * b
        lx, ly, ll = self._region(layer, cx - 0.3 * a, lay.eye_y, cx + 0.3 * a, nose_y + 0.1 * b)
        ridge = np.exp(-(((lx - cx - 0.1 * a) / (0.05 * a)) ** 2)) * np.clip(
            (ly - lay.eye_y) / (nose_y - lay.eye_y), 0, 1
        )
        _over(ll, (0.18 * ridge * (ly < nose_y)).astype(np.float32), skin * 0.75)
        _over(ll, 0.45 * _ellipse(lx, ly, cx, nose_y + 0.03 * b, 0.17 * a, 0.045 * b), skin * 0.78)
        for side in (-1.0, 1.0):
            _over(
                ll,
                0.8 * _ellipse(lx, ly, cx + side * 0.09 * a, nose_y + 0.01 * b, 0.05 * a, 0.03 * b),
                skin * 0.45,
            )

        # Eyes (open) and brows.
        for side in (-1.0, 1.0):
            self._draw_eye(layer, cx + side * lay.eye_dx)
        brow_col = _rgb(ident.hair) * 0.75 if _luma(ident.hair) < 150 else skin * 0.45
        for side in (-1.0, 1.0):
            bx = cx + side * (lay.eye_dx + 0.1 * lay.eye_w)
            by = lay.eye_y - lay.eye_h - 0.06 * b - 0.012 * s
            bw = 1.25 * lay.eye_w
            lx, ly, ll = self._region(
                layer, bx - bw, by - lay.eye_h - 0.03 * s, bx + bw, by + 0.03 * s
            )
            t = np.clip(1.0 - ((lx - bx) / bw) ** 2, 0.0, 1.0)
            centre = by - 0.35 * lay.eye_h * t - side * 0.1 * lay.eye_h * (lx - bx) / bw
            thick = (0.006 + 0.008 * ident.brow_weight) * s * np.sqrt(t)
            brow = np.clip(0.5 + thick - np.abs(ly - centre), 0, 1) * (t > 0)
            _over(ll, (0.9 * brow).astype(np.float32), brow_col)

        # Hair in front: a cap above a hairline that drops at the temples.
        cap = _ellipse(x, y, cx, cy - 0.06 * b, 1.08 * a, 1.07 * b)
        du = (x - cx) / a
        hl = ident.hairline
        wave = 0.03 * b * np.sin(du * 7.0 + rng.uniform(0, 6.3))
        if style == "side_part":
            hairline = cy - b * (hl - 0.38 * du * du) + 0.12 * b * du + wave
        elif style == "buzz":
            hairline = cy - b * (hl + 0.1 - 0.3 * du * du)
        else:
            hairline = cy - b * (hl - 0.4 * du * du) + wave
        front = cap * np.clip(hairline - y + 0.5, 0, 1).astype(np.float32)
        if style == "buzz":
            front *= 0.7
        _over(layer, front, hair_col)
        if style == "side_part":
            bulge = _ellipse(x, y, cx - 0.45 * a, cy - 0.72 * b, 0.65 * a, 0.32 * b) * (cap > 0)
            _over(layer, bulge, hair_col)

    def _hair_field(self, rng: np.random.Generator) -> np.ndarray:
        """Hair colour with streaks and a highlight, so hair reads as hair and not a flat blob."""
        lay = self.layout
        base = _rgb(self.identity.hair)
        freq = rng.uniform(0.8, 1.6) / max(1.0, 0.02 * self.size)
        streak = np.sin((self._x + 0.3 * self._y) * freq * 2 * np.pi + rng.uniform(0, 6.3))
        streak += 0.5 * np.sin((self._x - 0.2 * self._y) * freq * 5.1 + rng.uniform(0, 6.3))
        top = np.exp(
            -(
                ((self._x - lay.cx + 0.3 * lay.a) / lay.a) ** 2
                + ((self._y - lay.cy + 0.85 * lay.b) / (0.3 * lay.b)) ** 2
            )
        )
        field = (
            base[None, None, :] * (1.0 + 0.07 * streak + 0.25 * top)[..., None]
            + 0.04 * top[..., None]
        )
        return np.clip(field, 0.0, 1.0).astype(np.float32)

    def _eye_shape(self, x: np.ndarray, y: np.ndarray, ex: float, grow: float = 0.0) -> np.ndarray:
        """Almond eye coverage; `grow` pixels larger for the outline."""
        lay = self.layout
        w, h = lay.eye_w + grow, lay.eye_h + grow
        t = np.clip(1.0 - ((x - ex) / w) ** 2, 0.0, 1.0)
        half = h * t**0.75
        return np.clip(half - np.abs(y - lay.eye_y) + 0.5, 0, 1).astype(np.float32) * (t > 0)

    def _region(
        self, layer: np.ndarray, x0: float, y0: float, x1: float, y1: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (x, y, layer) of a frame-coordinate box, so small features cost little."""
        rows, cols = self._patch(x0, y0, x1, y1)
        return self._x[rows, cols], self._y[rows, cols], layer[rows, cols]

    def _draw_eye(self, layer: np.ndarray, ex: float) -> None:
        lay, s = self.layout, self.size
        reach = 2.0 * lay.eye_h + 0.02 * s + 1.0
        x, y, layer = self._region(
            layer, ex - 1.4 * lay.eye_w, lay.eye_y - reach, ex + 1.4 * lay.eye_w, lay.eye_y + reach
        )
        socket = _ellipse(x, y, ex, lay.eye_y - 0.2 * lay.eye_h, 1.3 * lay.eye_w, 1.6 * lay.eye_h)
        _over(layer, 0.18 * socket, _rgb(self.identity.skin) * 0.7)
        outline = self._eye_shape(x, y, ex, grow=0.011 * s)
        outline *= np.where(y < lay.eye_y, 0.95, 0.45).astype(np.float32)
        _over(layer, outline, (30, 22, 22))
        eye = self._eye_shape(x, y, ex)
        _over(layer, eye, (242, 238, 232))
        ri = 0.5 * lay.eye_w
        iy = lay.eye_y + 0.08 * lay.eye_h
        iris_col = _rgb(self.identity.iris)
        rim = np.clip(np.sqrt((x - ex) ** 2 + (y - iy) ** 2) / ri, 0, 1)
        iris_field = iris_col[None, None, :] * (1.0 - 0.45 * rim**3)[..., None]
        _over(layer, _ellipse(x, y, ex, iy, ri, ri) * eye, iris_field)
        _over(layer, _ellipse(x, y, ex, iy, 0.45 * ri, 0.45 * ri) * eye, (12, 10, 10))
        glint = _ellipse(x, y, ex - 0.35 * ri, iy - 0.35 * ri, 0.2 * ri + 0.3, 0.2 * ri + 0.3)
        _over(layer, 0.9 * glint * eye, (255, 255, 255))

    # ---- dynamic patches

    def _patch(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Canvas slices covering a frame-coordinate box."""
        m, c = self.margin, self.head.shape[0]
        r0 = max(0, int(math.floor(y0)) + m)
        r1 = min(c, int(math.ceil(y1)) + m)
        c0 = max(0, int(math.floor(x0)) + m)
        c1 = min(c, int(math.ceil(x1)) + m)
        return slice(r0, r1), slice(c0, c1)

    def _prepare_eyes(self) -> None:
        lay, s = self.layout, self.size
        grow = 0.011 * s + 1.0
        self._eyes = []
        for side in (-1.0, 1.0):
            ex = lay.cx + side * lay.eye_dx
            rows, cols = self._patch(
                ex - lay.eye_w - grow,
                lay.eye_y - lay.eye_h - grow,
                ex + lay.eye_w + grow,
                lay.eye_y + lay.eye_h + grow,
            )
            x, y = self._x[rows, cols], self._y[rows, cols]
            t = np.clip(1.0 - ((x - ex) / (lay.eye_w + 0.5)) ** 2, 0.0, 1.0)
            self._eyes.append(
                {
                    "rows": rows,
                    "cols": cols,
                    "static": self.head[rows, cols].copy(),
                    "y": y,
                    "half": (lay.eye_h + 0.5) * t**0.75,
                    "cover": self._eye_shape(x, y, ex, grow=0.011 * s),
                    "inside": (t > 0).astype(np.float32),
                    "lid": self._face_col[rows, cols] * 0.9,
                }
            )

    def _paint_lids(self, blink: float) -> None:
        lay = self.layout
        lash_w = max(0.6, 0.008 * self.size)
        for eye in self._eyes:
            patch = eye["static"].copy()
            if blink > 0.02:
                edge = lay.eye_y + (2.0 * blink - 1.0) * eye["half"]
                lid = eye["cover"] * np.clip(edge - eye["y"] + 0.5, 0, 1)
                _over(patch, lid, eye["lid"])
                lash = np.clip(lash_w + 0.5 - np.abs(eye["y"] - edge), 0, 1) * eye["inside"]
                _over(patch, 0.9 * lash.astype(np.float32), (30, 22, 22))
            self.head[eye["rows"], eye["cols"]] = patch

    def _prepare_mouth(self) -> None:
        lay = self.layout
        x0, y0, x1, y1 = _mouth_extent(lay)
        rows, cols = self._patch(x0 - 2, y0 - 2, x1 + 2, y1 + 2)
        self._mouth_rows, self._mouth_cols = rows, cols
        self._mouth_static = self.head[rows, cols].copy()
        self._mouth_dx = self._x[rows, cols] - lay.cx
        self._mouth_y = self._y[rows, cols]
        lips = _rgb(self.identity.lips)
        self._lip_col = lips
        self._lip_light = np.clip(lips * 1.18 + 0.03, 0, 1)
        self._inside_col = np.array([0.11, 0.03, 0.045], dtype=np.float32)
        self._teeth_col = np.array([0.93, 0.9, 0.85], dtype=np.float32)
        self._tongue_col = np.array([0.42, 0.14, 0.17], dtype=np.float32)

    def _paint_mouth(self, mouth_open: float, mouth_round: float) -> None:
        lay = self.layout
        mw = lay.mouth_w
        w = _open_width(mouth_open, mouth_round, mw)
        h = _open_height(mouth_open, mouth_round, mw)
        yc = lay.mouth_y + 0.6 * h
        dx = self._mouth_dx
        dy = self._mouth_y - yc
        patch = self._mouth_static.copy()

        # Lips: an outer shape thicker below than above, the lower lip a little lighter.
        lip_w = w + 0.08 * mw
        lip_h = np.where(dy < 0, h + lay.lip_up, h + lay.lip_lo).astype(np.float32)
        u, v = dx / lip_w, dy / lip_h
        r = np.sqrt(u * u + v * v)
        grad = np.sqrt((u / lip_w) ** 2 + (v / lip_h) ** 2) / np.maximum(r, 1e-6)
        lips = np.clip(
            0.5 - np.maximum((r - 1.0) / np.maximum(grad, 1e-6), np.abs(dx) - lip_w), 0, 1
        )
        _over(patch, lips, self._lip_col)
        shine = _ellipse(dx, dy, 0.0, h + 0.5 * lay.lip_lo, 0.5 * w, 0.28 * lay.lip_lo + 0.3)
        _over(patch, 0.5 * shine * lips, self._lip_light)

        # Opening, upper teeth and tongue.
        opening = _ellipse(dx, dy, 0.0, 0.0, w, max(h, 0.35))
        _over(patch, opening, self._inside_col)
        if h > 0.12 * mw:
            teeth_h = min(0.3 * h, 0.12 * mw)
            teeth = (
                opening
                * np.clip(teeth_h - h - dy + 0.5, 0, 1)
                * np.clip(0.8 * w - np.abs(dx) + 0.5, 0, 1)
            )
            _over(patch, teeth.astype(np.float32), self._teeth_col)
            tongue = _ellipse(dx, dy, 0.0, 0.8 * h, 0.6 * w, 0.4 * h) * opening
            _over(patch, 0.8 * tongue, self._tongue_col)
        self.head[self._mouth_rows, self._mouth_cols] = patch

    def frame(
        self,
        mouth_open: float,
        mouth_round: float,
        blink: float,
        head_dx: float,
        head_dy: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Render one frame (uint8 [H, W, 3]); head offsets are fractions of the frame size."""
        s, m = self.size, self.margin
        self._paint_mouth(float(np.clip(mouth_open, 0, 1)), float(np.clip(mouth_round, 0, 1)))
        self._paint_lids(float(np.clip(blink, 0, 1)))
        lim = MAX_HEAD_SHIFT * s
        sx = float(np.clip(head_dx * s, -lim, lim))
        sy = float(np.clip(head_dy * s, -lim, lim))
        # Frame pixel (r, c) shows canvas position (r + m - sy, c + m - sx): bilinear sample.
        px, py = m - sx, m - sy
        ix, iy = int(math.floor(px)), int(math.floor(py))
        fx, fy = px - ix, py - iy
        h = self.head
        acc = self._scratch
        np.multiply(h[iy : iy + s, ix : ix + s], (1 - fx) * (1 - fy), out=acc)
        acc += h[iy : iy + s, ix + 1 : ix + 1 + s] * (fx * (1 - fy))
        acc += h[iy + 1 : iy + 1 + s, ix : ix + s] * ((1 - fx) * fy)
        acc += h[iy + 1 : iy + 1 + s, ix + 1 : ix + 1 + s] * (fx * fy)
        rgb = self._rgb
        np.subtract(1.0, acc[..., 3:4], out=rgb[..., :1])
        np.multiply(self.background, rgb[..., :1], out=rgb)
        rgb += acc[..., :3]
        rgb *= 255.0
        rgb += 0.5
        if out is None:
            out = np.empty((s, s, 3), dtype=np.uint8)
        np.copyto(out, rgb, casting="unsafe")
        return out

    def render(self, track: FaceTrack) -> np.ndarray:
        """Render every frame of a track (uint8 [T, H, W, 3])."""
        n = len(track.mouth_open)
        frames = np.empty((n, self.size, self.size, 3), dtype=np.uint8)
        for i in range(n):
            self.frame(
                track.mouth_open[i],
                track.mouth_round[i],
                track.blink[i],
                track.head_dx[i],
                track.head_dy[i],
                out=frames[i],
            )
        return frames


@functools.lru_cache(maxsize=32)
def avatar_rig(identity: Identity, size: int = 128) -> AvatarRig:
    """The cached rig of an identity at a size (drawing the static layers costs a few ms)."""
    return AvatarRig(identity, size)


def render_frame(
    identity: Identity,
    mouth_open: float,
    mouth_round: float,
    blink: float,
    head_dx: float,
    head_dy: float,
    size: int = 128,
) -> np.ndarray:
    """One frame (uint8 [H, W, 3]); mouth/blink in [0, 1], head offsets as fractions of `size`.

    Not reentrant for one identity and size across threads (the cached rig repaints patches).
    """
    return avatar_rig(identity, size).frame(mouth_open, mouth_round, blink, head_dx, head_dy)


def reference_image(identity: Identity, size: int = 128) -> np.ndarray:
    """The identity as the model sees it before speaking: mouth closed, eyes open, centred."""
    return render_frame(identity, 0.0, NEUTRAL_ROUND, 0.0, 0.0, 0.0, size)


# --------------------------------------------------------------------------------------------
# driving the face from audio


class FaceTrack(NamedTuple):
    """Per-video-frame face controls (float32 [T] each), as `render_frame` takes them."""

    mouth_open: np.ndarray
    mouth_round: np.ndarray
    blink: np.ndarray
    head_dx: np.ndarray
    head_dy: np.ndarray


def _smooth3(x: np.ndarray, side: float = 0.2) -> np.ndarray:
    """Zero-phase three-tap smoothing (no lag, unlike a causal filter)."""
    if x.size < 3:
        return x.copy()
    padded = np.pad(x, 1, mode="edge")
    return side * padded[:-2] + (1 - 2 * side) * padded[1:-1] + side * padded[2:]


def mouth_openness_from_loudness(envelope: np.ndarray, release: float = 0.5) -> np.ndarray:
    """Map the loudness envelope to mouth openness: instant attack, a short release.

    Quiet frames (below ~0.15 of the envelope: about 34 dB under loud speech) keep the mouth
    closed; a little centred smoothing and a decay of `release` per frame avoid a jittery mouth
    without delaying its opening.
    """
    target = np.clip((envelope - 0.15) / 0.8, 0.0, 1.0)
    target = _smooth3(target, 0.15)
    out = np.empty_like(target)
    level = 0.0
    for i, value in enumerate(target):
        level = max(float(value), level * release)
        out[i] = level
    return out.astype(np.float32)


def spectral_roundness(
    audio: np.ndarray, sample_rate: int, fps: float, envelope: np.ndarray
) -> np.ndarray:
    """Mouth roundness per frame from how much voiced energy lies below ~1.2 kHz.

    Rounded vowels (o, u) have a low second formant, spread ones (i, e) a high one, so the ratio
    of 300-1200 Hz to 1200-3500 Hz energy, normalised over the clip's voiced frames, tracks lip
    rounding. Quiet frames relax to the neutral roundness.
    """
    n = envelope.size
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    win = int(math.ceil(sample_rate / fps))
    starts = np.floor(np.arange(n) * (sample_rate / fps) + 0.5).astype(np.int64)
    x = np.pad(x, (0, max(0, int(starts[-1]) + win - x.size)))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[starts] * np.hanning(win).astype(
        np.float32
    )
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(win, 1.0 / sample_rate)
    low = power[:, (freqs >= 300) & (freqs < 1200)].sum(axis=1)
    high = power[:, (freqs >= 1200) & (freqs < 3500)].sum(axis=1)
    ratio = 10.0 * np.log10((low + 1e-10) / (high + 1e-10))
    voiced = envelope > 0.35
    if voiced.sum() < 3:
        return np.full(n, NEUTRAL_ROUND, dtype=np.float32)
    lo, hi = np.percentile(ratio[voiced], [15.0, 85.0])
    raw = np.clip((ratio - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    weight = np.clip((envelope - 0.2) / 0.3, 0.0, 1.0)
    return _smooth3(weight * raw + (1.0 - weight) * NEUTRAL_ROUND).astype(np.float32)


def blink_track(num_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Blinks every ~3-5 s, each 3-4 frames at 25 fps (about 0.12-0.16 s)."""
    blink = np.zeros(num_frames, dtype=np.float32)
    t = rng.uniform(0.3, 4.0)
    while True:
        start = int(round(t * fps))
        if start >= num_frames:
            break
        length = max(3, int(round(rng.uniform(0.11, 0.165) * fps)))
        shape = np.sin(np.pi * (np.arange(length) + 1) / (length + 1)) ** 0.6
        shape = np.minimum(shape / shape.max(), 1.0)
        end = min(num_frames, start + length)
        blink[start:end] = shape[: end - start]
        t += rng.uniform(2.8, 5.2)
    return blink


def head_motion(
    num_frames: int, fps: float, rng: np.random.Generator, envelope: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Slow, small head drift (sums of 0.05-0.4 Hz sinusoids), with a slight nod on loud speech."""
    t = np.arange(num_frames) / fps
    out = []
    for axis in range(2):
        wave = np.zeros(num_frames)
        for _ in range(3):
            wave += rng.uniform(0.3, 1.0) * np.sin(
                2 * np.pi * rng.uniform(0.05, 0.4) * t + rng.uniform(0, 2 * np.pi)
            )
        peak = np.max(np.abs(wave)) if num_frames else 1.0
        wave *= rng.uniform(0.3, 0.8) * MAX_HEAD_SHIFT / max(peak, 1e-6)
        if axis == 1 and envelope is not None and envelope.size == num_frames:
            wave += 0.15 * MAX_HEAD_SHIFT * np.convolve(envelope, np.ones(5) / 5, mode="same")
        out.append(np.clip(wave, -MAX_HEAD_SHIFT, MAX_HEAD_SHIFT).astype(np.float32))
    return out[0], out[1]


def drive_from_audio(
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    rng: np.random.Generator | None = None,
    num_frames: int | None = None,
) -> FaceTrack:
    """Face controls for every video frame of `audio` (frame i covers samples round(i*sr/fps)...).

    Openness follows the loudness envelope, roundness the spectral shape; blinks and head motion
    are random (from `rng`) and independent of the audio apart from a slight nod.
    """
    rng = rng if rng is not None else np.random.default_rng()
    if num_frames is None:
        num_frames = num_video_frames(np.asarray(audio).size, sample_rate, fps)
    env = loudness_envelope(audio, sample_rate, fps, num_frames=num_frames)
    mouth_open = mouth_openness_from_loudness(env)
    mouth_round = spectral_roundness(audio, sample_rate, fps, env)
    blink = blink_track(num_frames, fps, rng)
    dx, dy = head_motion(num_frames, fps, rng, env)
    return FaceTrack(mouth_open, mouth_round, blink, dx, dy)


def render_track(identity: Identity, track: FaceTrack, size: int = 128) -> np.ndarray:
    """Frames (uint8 [T, H, W, 3]) of an identity following a face track."""
    return avatar_rig(identity, size).render(track)


def render_clip(
    identity: Identity,
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    size: int = 128,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frames (uint8 [T, H, W, 3]) of an identity saying `audio`; one frame per 1/fps of audio."""
    return render_track(identity, drive_from_audio(audio, sample_rate, fps, rng), size)

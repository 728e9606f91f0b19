"""Who the avatar is and where its features sit: identities and face geometry.

An `Identity` is a small frozen record (face shape, skin, hair, eyes, background, clothing)
drawn from a large procedural space by `sample_identity`. Whatever the face, the mouth is
placed at the same point of the frame, so `default_mouth_box` fits every identity tightly and
metrics can find the mouth in generated frames without knowing who it is.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from .face_track import MAX_HEAD_SHIFT

Color = tuple[int, int, int]

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


def luma(c: Color) -> float:
    """Perceived brightness (Rec. 601) of an 8-bit colour, for keeping features visible."""
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
    if abs(val * 255 - luma(skin)) < 50:
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
        return mouth_opening_height(1.0, 1.0, self.mouth_w)

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


def mouth_opening_width(mouth_open: float, mouth_round: float, mouth_w: float) -> float:
    """Half-width of the opening in pixels: rounding narrows it, opening widens it a little.

    Width and height trade off (`mouth_opening_height` grows with roundness) so the dark area
    depends on openness far more than on roundness: that area is what lip sync measures.
    """
    return mouth_w * (1.1 - 0.35 * mouth_round) * (1.0 + 0.06 * mouth_open)


def mouth_opening_height(mouth_open: float, mouth_round: float, mouth_w: float) -> float:
    """Half-height of the opening in pixels; a thin dark line remains when closed."""
    return mouth_w * (0.03 + 0.45 * mouth_open) * (0.85 + 0.3 * mouth_round)


def mouth_extent(lay: FaceLayout) -> tuple[float, float, float, float]:
    """Box around the mouth at its widest and most open, with the head centred."""
    half_w = mouth_opening_width(1.0, 0.0, lay.mouth_w) + 0.08 * lay.mouth_w
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
    return _box_with_margin(mouth_extent(face_layout(identity, size)), size)


def default_mouth_box(size: int = 128) -> tuple[int, int, int, int]:
    """A mouth box valid for every identity `sample_identity` can draw (for unknown references)."""
    x0 = y0 = math.inf
    x1 = y1 = -math.inf
    for fw in _FACE_WIDTH:
        for fa in _FACE_ASPECT:
            for mw in _MOUTH_WIDTH:
                ex0, ey0, ex1, ey1 = mouth_extent(_layout(fw, fa, mw, None, size))
                x0, y0, x1, y1 = min(x0, ex0), min(y0, ey0), max(x1, ex1), max(y1, ey1)
    return _box_with_margin((x0, y0, x1, y1), size)

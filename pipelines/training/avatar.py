"""A procedural talking avatar, rendered with numpy fast enough to make training sets on a CPU.

Every identity (`identity.Identity`) is drawn once into float layers with soft, anti-aliased
edges (an `AvatarRig`); a frame then only repaints the mouth and eyelid patches and moves the
head with a bilinear sub-pixel shift over the background. The mouth always sits in a known box
(`mouth_box`), so metrics can measure it from pixels alone. Face controls come from audio
(`face_track.drive_from_audio`); this module re-exports both neighbours' public names so that
`avatar` is the one place to import from.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .face_track import (
    MAX_HEAD_SHIFT,
    NEUTRAL_ROUND,
    FaceTrack,
    blink_track,
    drive_from_audio,
    head_motion,
    mouth_openness_from_loudness,
    spectral_roundness,
)
from .identity import (
    BACKGROUND_STYLES,
    HAIR_STYLES,
    MOUTH_CENTER_Y,
    NECKLINES,
    Color,
    FaceLayout,
    Identity,
    default_mouth_box,
    face_layout,
    luma,
    mouth_box,
    mouth_extent,
    mouth_opening_height,
    mouth_opening_width,
    sample_identity,
)

__all__ = [
    "BACKGROUND_STYLES",
    "HAIR_STYLES",
    "MAX_HEAD_SHIFT",
    "MOUTH_CENTER_Y",
    "NECKLINES",
    "NEUTRAL_ROUND",
    "AvatarRig",
    "FaceLayout",
    "FaceTrack",
    "Identity",
    "avatar_rig",
    "blink_track",
    "default_mouth_box",
    "drive_from_audio",
    "face_layout",
    "head_motion",
    "mouth_box",
    "mouth_openness_from_loudness",
    "reference_image",
    "render_clip",
    "render_frame",
    "render_track",
    "sample_identity",
    "spectral_roundness",
]

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
        brow_col = _rgb(ident.hair) * 0.75 if luma(ident.hair) < 150 else skin * 0.45
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
        x0, y0, x1, y1 = mouth_extent(lay)
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
        w = mouth_opening_width(mouth_open, mouth_round, mw)
        h = mouth_opening_height(mouth_open, mouth_round, mw)
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

"""Reference images: read, validate and fit to the model's resolution.

Every entry point (CLI, HTTP upload, base64 JSON) goes through `load_reference_image`, so a file
that is not an image or has an absurd size gets the same clear error everywhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from models.errors import InvalidImageError

MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 16


def _open(source: bytes | str | Path) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(
                f"reference image {str(path)!r} does not exist or is not a file"
            )
        data = path.read_bytes()
        name = str(path)
    else:
        data, name = bytes(source), "uploaded data"
    if not data:
        raise InvalidImageError(f"reference image ({name}) is empty")
    # Refuse decompression bombs before decoding: PIL reads the size from the header only.
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImageError(
            f"reference ({name}) is not an image PIL can read; send a PNG, JPEG or WebP file"
        ) from None
    _check_size(w, h, name)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError):
        raise InvalidImageError(f"reference image ({name}) is truncated or corrupt") from None
    return img


def _check_size(w: int, h: int, name: str) -> None:
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise InvalidImageError(
            f"reference image ({name}) is {w}x{h}; each side must be at least {MIN_IMAGE_SIDE} px"
        )
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"reference image ({name}) is {w}x{h}; the limit is {MAX_IMAGE_SIDE} px a side and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels"
        )


def fit_image(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize: uint8 [height, width, 3]."""
    img = img.convert("RGB")
    w, h = img.size
    target = width / height
    if w / h > target:
        cw = round(h * target)
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:
        ch = round(w / target)
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    img = img.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def load_reference_image(
    source: bytes | str | Path | np.ndarray, height: int, width: int
) -> np.ndarray:
    """Read a reference image from a path, encoded bytes or an array; uint8 [height, width, 3]."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise InvalidImageError(
                f"reference array must be [H, W, 3] or [H, W, 4], got shape {tuple(arr.shape)}"
            )
        _check_size(arr.shape[1], arr.shape[0], "array")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return fit_image(Image.fromarray(np.ascontiguousarray(arr[..., :3])), height, width)
    return fit_image(_open(source), height, width)


def default_reference(height: int, width: int) -> np.ndarray:
    """The reference used when a session brings none: a shipped sample if present, else a face
    drawn here (so the service starts with nothing downloaded)."""
    shipped = Path(__file__).resolve().parent.parent / "models" / "default" / "refs"
    if shipped.is_dir():
        for path in sorted(shipped.glob("*.png")):
            return load_reference_image(path, height, width)
    img = Image.new("RGB", (256, 256), (70, 110, 150))
    d = ImageDraw.Draw(img)
    d.rectangle((60, 200, 196, 256), fill=(60, 60, 90))  # shoulders
    d.ellipse((78, 50, 178, 180), fill=(224, 180, 150))  # face
    d.pieslice((74, 40, 182, 130), 180, 360, fill=(60, 40, 30))  # hair
    d.ellipse((104, 98, 118, 108), fill=(40, 40, 40))
    d.ellipse((138, 98, 152, 108), fill=(40, 40, 40))
    d.line((112, 150, 144, 150), fill=(150, 60, 60), width=4)  # closed mouth
    return fit_image(img, height, width)

"""Is a reference image like the faces the loaded model was trained on? A per-model check.

The embedded default model was trained only on procedurally drawn cartoon faces
(pipelines/training/avatar.py); handed a photograph it returns a smeared blob. Rather than fail
silently, a session reports when its reference is outside what the model knows. The check is
per model: `reference_check_for(name)` gives one for the models that have one and None for the
rest (tiny, wan-1.3b/14b with random weights, Live Avatar, which was trained on real faces):
those report nothing.

The default model's check: encode the reference with the model's own autoencoder and decode it.
The autoencoder learned to reproduce drawn faces (flat fills, clean outlines, drawn hair), so
their reconstruction is close; a photograph's skin, hair and background texture is detail it
never learned, and its reconstruction is poor. The score is the reconstruction PSNR in dB at the
model's trained resolution (128x128, the image centre-cropped and resized as a session does).
Measured with models/default/vae.safetensors:

  drawn faces (in distribution)
    shipped references models/default/refs/ref0-3.png       31.42, 30.41, 30.05, 28.24
    300 training identities' reference images, 300 talking  min 26.28, 1st percentile 27.30,
      frames (random mouth/blink/head offset), 40 of them   median 30.46 (3 of 640 below 27.0:
      drawn at 256 px, saved as JPEG q75 and fitted back   26.28, 26.59, 26.71; JPEG min 27.28)
  photographs and other non-drawn images (out)
    14 photographs (portraits from the Live Avatar and Wan  19.97 - 26.42 (13 of 14 below 25.9;
      examples, two sklearn sample photos), all fitted     the highest, 26.42, a face against a
      to 128x128                                           smooth sky)
    1/f ("pink") colour noise, the spectrum of natural      19.1 - 20.0 (tests' photograph-like
      images (tests/test_reference_check.py)               image)
    uniform noise                                          10.73
    a rust book photo, a diagram                           16.87, 27.71

The threshold, 27.0 dB, sits 1.24 dB under the lowest shipped reference and 0.58 dB over the
highest photograph: it flags every photograph measured, at the price of a warning on about 0.5 %
of random drawn identities (a warning, never a refusal). What the score does not see: images
with little detail of any kind reconstruct well whatever they show (a flat grey image 51.2 dB,
a colour gradient 30.3, blurred noise 30.2), so those pass; the check is about photographs.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_THRESHOLD_DB = 27.0
PHOTO_HINT = (
    "photographs need a model trained on real faces, e.g. Live Avatar "
    "(--model liveavatar:DIR, see README)"
)


@dataclass(frozen=True)
class ReferenceVerdict:
    """One reference image scored against what a model was trained on."""

    score: float  # the check's score (for the default model: reconstruction PSNR in dB)
    threshold: float  # scores below it are out of distribution
    warning: str | None  # a sentence for the user when out of distribution, else None

    @property
    def in_distribution(self) -> bool:
        return self.warning is None


class ReconstructionCheck:
    """Scores a reference by how well a model's own autoencoder reproduces it (PSNR, dB)."""

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        height: int,
        width: int,
        threshold: float,
        trained_on: str,
        model: str,
    ) -> None:
        self.vae = vae.eval()
        self.height, self.width = height, width
        self.threshold = threshold
        self.trained_on = trained_on
        self.model = model

    def score(self, image: np.ndarray) -> float:
        """Reconstruction PSNR (dB) of a uint8 [H, W, 3] image at the model's resolution."""
        from pipelines.reference import load_reference_image

        arr = load_reference_image(image, self.height, self.width)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.inference_mode():
            z = self.vae.encode_frames(x)
            y = self.vae.decode_frames(z.unsqueeze(2), None)[0][:, :, 0].clamp(-1.0, 1.0)
        mse = float((y - x).pow(2).mean())
        return 10.0 * math.log10(4.0 / max(mse, 1e-10))  # peak-to-peak range of [-1, 1] is 2

    def __call__(self, image: np.ndarray) -> ReferenceVerdict:
        score = self.score(image)
        warning = None
        if score < self.threshold:
            warning = (
                f"this image is unlike the faces the {self.model} model was trained on "
                f"({self.trained_on}): its autoencoder reproduces it at {score:.1f} dB PSNR, "
                f"under the {self.threshold:.0f} dB threshold (its drawn faces score about "
                f"28-31), so expect a smeared picture; {PHOTO_HINT}"
            )
        return ReferenceVerdict(score=round(score, 2), threshold=self.threshold, warning=warning)


def _is_default(name_or_path: str) -> bool:
    from models.registry import DEFAULT_DIR

    if name_or_path == "default":
        return True
    try:
        return Path(name_or_path).expanduser().resolve() == DEFAULT_DIR
    except (OSError, RuntimeError):
        return False


@functools.lru_cache(maxsize=4)
def _default_check(threshold: float) -> ReconstructionCheck | None:
    from safetensors.torch import load_file

    from models.registry import DEFAULT_DIR
    from models.vae import TinyAutoencoder

    meta_path = DEFAULT_DIR / "model.json"
    if not meta_path.is_file():  # no trained weights shipped: the default is the tiny random one
        return None
    meta = json.loads(meta_path.read_text())
    vae = TinyAutoencoder(**meta.get("vae", {}))
    vae.load_state_dict(load_file(DEFAULT_DIR / "vae.safetensors"))
    defaults = meta.get("defaults", {})
    return ReconstructionCheck(
        vae,
        height=int(defaults.get("height", 128)),
        width=int(defaults.get("width", 128)),
        threshold=threshold,
        trained_on="drawn cartoon faces",
        model="default",
    )


def reference_check_for(
    name_or_path: str, threshold: float = DEFAULT_THRESHOLD_DB
) -> ReconstructionCheck | None:
    """The reference check of a model (a name or folder as `load_model` takes), or None for a
    model without one. Loads only what the check needs (the default's autoencoder, ~1 MB)."""
    if _is_default(name_or_path):
        return _default_check(float(threshold))
    return None

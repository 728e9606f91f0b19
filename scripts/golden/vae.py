"""Golden fixtures for the Wan 2.1 VAE as Live Avatar uses it (encode, stream_decode).

Runs the upstream code in the scratch environment (see _shim.py) on a tiny random VAE with the
released key layout, and writes what the project's tests compare against:

  Wan2.1_VAE.pth          the tiny VAE's state dict, saved by torch.save like the released file
  wan21_released_keys.json  key -> shape of the released Wan 2.1 VAE (built on the meta device)
  inputs.safetensors      the reference image (uint8) and three decode blocks of latents
  float32.safetensors     upstream outputs with the VAE in float32
  bfloat16.safetensors    the same with the VAE in bfloat16 (Live Avatar's param_dtype)
  meta.json               upstream commit, config, seeds, sizes, what each tensor is

The calls mirror causal_s2v_pipeline_tpp_blockwise.py: the image repeated 5 frames and 73 frames
is encoded with WanVAE.encode; then stream_decode(first 7 motion latents) primes the causal cache
and stream_decode(3 latent frames) runs once per block. Decoded frames are stored on a 7-pixel
grid (rows and columns 0, 7, 14, ...; 7 is prime to the 8x upsampling, so every phase of it is
sampled) to keep the fixtures small; the latents are stored whole.

Usage (scratch env):
  cd /tmp/up/LiveAvatar && PYTHONPATH=/work/main/scripts/golden:/work/main:/tmp/up/LiveAvatar \
    /tmp/upenv/bin/python /work/main/scripts/golden/vae.py --upstream /tmp/up/LiveAvatar
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import _shim  # noqa: F401  (CUDA -> CPU, before any upstream import)
import torch
from safetensors.torch import save_file

# Released: dim 96, dim_mult [1, 2, 4, 4], num_res_blocks 2. Eight channels everywhere and one
# residual block per stage keep the file small; narrower stages (2 channels) make RMS norm so
# ill-conditioned that float32 rounding differences grow to 1e-2 in the decoded frames.
TINY = {
    "dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
HEIGHT, WIDTH = 64, 128  # latent 8 x 16
REF_FRAMES, MOTION_FRAMES = 5, 73  # as the pipeline: ref repeated 5, motion_frames = 73
PRIME_LATENTS, BLOCKS, BLOCK_LATENTS = 7, 3, 3
GRID = 7
MOVING_FRAMES, SHIFT = 9, 5
SEED = 0


def _commit(upstream: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(upstream), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "9c2c38de1715e553127b42c82cb959f756b02595"


def _random_tiny(vs) -> torch.nn.Module:
    """Upstream WanVAE_ at the tiny config. Upstream zeroes the attention output projections and
    sets every norm scale to 1; random values there make a misplaced tensor visible. meta.json
    records the fraction of decoded pixels that clip at +-1 (clipped pixels compare nothing)."""
    torch.manual_seed(SEED)
    model = vs.WanVAE_(**TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.25 * torch.randn_like(p))
            elif name.endswith("proj.weight"):
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def _moving(pixels: torch.Tensor) -> torch.Tensor:
    """9 frames of the image sliding right by 5 pixels a frame (wrapping around)."""
    return torch.cat([torch.roll(pixels, SHIFT * i, dims=-1) for i in range(MOVING_FRAMES)], 2)


def _grid(video: torch.Tensor) -> torch.Tensor:
    return video[..., ::GRID, ::GRID].contiguous()


def _run_upstream(vs, pth: Path, dtype: torch.dtype, image: torch.Tensor, inputs: dict) -> dict:
    """One upstream WanVAE (loaded from `pth` by its own loader) through Live Avatar's calls.

    `inputs["prime"]` (7 latent frames) and `inputs["blocks"]` are decoded; for the float32 run
    the prime latents are its own motion latents, and the bfloat16 run decodes the same float32
    latents cast to bfloat16, so both runs decode the same numbers."""
    vae = vs.WanVAE(z_dim=16, vae_pth=str(pth), dtype=dtype, device="cpu")
    # Pipeline: ToTensor (/255) * 2 - 1, cast to the VAE dtype, repeated in time.
    pixels = (image.permute(2, 0, 1).float() / 255.0 * 2 - 1)[None, :, None].to(dtype)
    ref = torch.stack(vae.encode(pixels.repeat(1, 1, REF_FRAMES, 1, 1)))
    motion = torch.stack(vae.encode(pixels.repeat(1, 1, MOTION_FRAMES, 1, 1)))
    # Repeated frames cannot tell how the clip is cut into chunks; a moving one can.
    moving = torch.stack(vae.encode(_moving(pixels)))
    prime_in = inputs.get("prime", motion[:, :, :PRIME_LATENTS])
    # On CPU, CUDA autocast is off, so decode inputs must already be in the VAE dtype.
    prime = torch.stack(vae.stream_decode(prime_in.to(dtype)))
    decoded = torch.stack(
        [torch.stack(vae.stream_decode(b[None].to(dtype)))[0] for b in inputs["blocks"]]
    )
    return {
        "encode_5": ref,
        "encode_73": motion,
        "encode_moving": moving,
        "prime_grid": _grid(prime),
        "blocks_grid": _grid(decoded),
        "_prime_full": prime,
        "_blocks_full": decoded,
        "_mean": vae.mean.float(),
        "_inv_std": vae.scale[1].float(),
    }


def _clipped(video: torch.Tensor) -> float:
    return float((video.abs() >= 1).float().mean())


def run(upstream: Path, out: Path) -> dict:
    sys.path.insert(0, str(upstream))
    import liveavatar.models.wan.wan_2_2.modules.vae_streaming as vs

    folder = out / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    model = _random_tiny(vs)
    pth = folder / "Wan2.1_VAE.pth"
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, pth)

    # Key names and shapes of the released file: _video_vae's cfg, built without memory.
    released_cfg = {**TINY, "dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    with torch.device("meta"):
        released = vs.WanVAE_(**released_cfg)
    keys = {k: list(v.shape) for k, v in released.state_dict().items()}
    (folder / "wan21_released_keys.json").write_text(json.dumps(keys) + "\n")

    # Upstream's WanVAE hard-codes the released config in _video_vae; hand it the tiny one.
    tiny_kwargs = {k: v for k, v in TINY.items() if k != "z_dim"}
    vs._video_vae = functools.partial(vs._video_vae, **tiny_kwargs)

    gen = torch.Generator().manual_seed(SEED + 1)
    image = torch.randint(0, 256, (HEIGHT, WIDTH, 3), generator=gen, dtype=torch.uint8)
    blocks = torch.randn(BLOCKS, 16, BLOCK_LATENTS, HEIGHT // 8, WIDTH // 8, generator=gen)

    with torch.no_grad():
        f32 = _run_upstream(vs, pth, torch.float32, image, {"blocks": blocks})
        prime32 = f32["encode_73"][:, :, :PRIME_LATENTS]
        bf16 = _run_upstream(vs, pth, torch.bfloat16, image, {"prime": prime32, "blocks": blocks})

    save_file({"image": image, "blocks": blocks.contiguous()}, str(folder / "inputs.safetensors"))
    for name, result, dtype in (
        ("float32", f32, torch.float32),
        ("bfloat16", bf16, torch.bfloat16),
    ):
        tensors = {k: v.to(dtype).contiguous() for k, v in result.items() if not k.startswith("_")}
        save_file(tensors, str(folder / f"{name}.safetensors"))

    meta = {
        "upstream": f"Alibaba-Quark/LiveAvatar@{_commit(upstream)}",
        "module": "liveavatar/models/wan/wan_2_2/modules/vae_streaming.py (WanVAE, WanVAE_)",
        "config": TINY,
        "released_config": released_cfg,
        "seed": SEED,
        "image_size": [HEIGHT, WIDTH],
        "grid": GRID,
        "calls": {
            "encode_5": "WanVAE.encode(image repeated 5 frames) -> [1,16,2,h,w]; ref = [:, :, 1:]",
            "encode_73": "WanVAE.encode(image repeated 73 frames) -> [1,16,19,h,w]",
            "encode_moving": f"WanVAE.encode of {MOVING_FRAMES} frames, frame i = image rolled "
            f"right by {SHIFT}*i pixels (torch.roll on the width) -> [1,16,3,h,w]",
            "prime_grid": "stream_decode(encode_73[:, :, :7]) on a fresh model, [..., ::7, ::7]",
            "blocks_grid": "stream_decode(blocks[i][None]) for i in 0..2 after the prime",
        },
        "bfloat16": "weights and inputs in bfloat16 on CPU (CUDA autocast is a no-op there); "
        "decode inputs are the float32 run's latents cast to bfloat16",
        "latents_mean": f32["_mean"].tolist(),
        "latents_inv_std": f32["_inv_std"].tolist(),
        "clipped_fraction": {
            "float32_prime": _clipped(f32["_prime_full"]),
            "float32_blocks": _clipped(f32["_blocks_full"]),
        },
        "sizes": {
            p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != "meta.json"
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
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
    print(json.dumps({"sizes": meta["sizes"], "clipped": meta["clipped_fraction"]}, indent=2))


if __name__ == "__main__":
    main()

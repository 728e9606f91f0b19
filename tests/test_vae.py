"""Streaming VAEs: block-wise decode equals whole-sequence decode, and sessions never share state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from models.errors import ConfigError, InvalidImageError, ModelNotFoundError
from models.vae import StreamingVAE, TinyAutoencoder, WanStreamingVAE, load_wan_vae

Z = 4
MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.5, 0.5, 2.0, 1.0]


def _tiny_wan(is_residual: bool = False) -> Any:
    """4x spatial, 4x temporal, a mid attention block: every cached layer kind in a few ms.
    is_residual adds the Wan 2.2-style shortcut whose first chunk is cut differently."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=Z,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=MEAN,
        latents_std=STD,
        is_residual=is_residual,
    ).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["wan21", "residual"])
def wan(request: pytest.FixtureRequest) -> WanStreamingVAE:
    return WanStreamingVAE(_tiny_wan(is_residual=request.param))


def _reference_decode(vae: WanStreamingVAE, normalised: torch.Tensor) -> torch.Tensor:
    """diffusers' own whole-sequence decode, after the Wan pipelines' de-normalisation."""
    mean = torch.tensor(MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.vae.decode(normalised * std + mean).sample


def _decode_in_blocks(vae: StreamingVAE, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    state, outs, start = vae.new_state(), [], 0
    for size in sizes:
        outs.append(vae.decode_block(latents[:, :, start : start + size], state))
        start += size
    assert start == latents.shape[2]
    return torch.cat(outs, dim=2)


# ------------------------------------------------------------------------------------ Wan VAE


def test_wan_factors(wan: WanStreamingVAE) -> None:
    assert (wan.latent_channels, wan.spatial_factor, wan.temporal_factor) == (Z, 4, 4)
    assert wan.frames_for(3, first=True) == 9
    assert wan.frames_for(3, first=False) == 12
    assert wan.frames_for(1, first=True) == 1


@pytest.mark.parametrize("sizes", [[1, 3, 3], [3, 3, 1], [2, 2, 2, 1], [7]])
def test_wan_blockwise_decode_equals_whole(wan: WanStreamingVAE, sizes: list[int]) -> None:
    torch.manual_seed(1)
    latents = torch.randn(1, Z, 7, 4, 4)
    reference = _reference_decode(wan, latents)
    assert reference.shape == (1, 3, 1 + 4 * 6, 16, 16)
    video = _decode_in_blocks(wan, latents, sizes)
    torch.testing.assert_close(video, reference, rtol=1e-5, atol=1e-5)
    assert [wan.frames_for(s, i == 0) for i, s in enumerate(sizes)] == [
        1 + 4 * (sizes[0] - 1),
        *[4 * s for s in sizes[1:]],
    ]


def test_wan_cache_is_what_makes_it_equal(wan: WanStreamingVAE) -> None:
    """Control: resuming from another stream's cache gives a different video, so the equality
    above really depends on carrying this stream's cache."""
    torch.manual_seed(2)
    latents, other = torch.randn(1, Z, 4, 4, 4), torch.randn(1, Z, 1, 4, 4)
    reference = _reference_decode(wan, latents)
    state = wan.new_state()
    wan.decode_block(other, state)
    resumed = wan.decode_block(latents[:, :, 1:], state)
    assert resumed.shape == reference[:, :, 1:].shape
    assert (resumed - reference[:, :, 1:]).abs().max() > 1e-3


def test_wan_interleaved_sessions_are_independent(wan: WanStreamingVAE) -> None:
    torch.manual_seed(3)
    a, b = torch.randn(1, Z, 7, 4, 4), torch.randn(1, Z, 7, 4, 4)
    alone_a = _decode_in_blocks(wan, a, [1, 3, 3])
    alone_b = _decode_in_blocks(wan, b, [1, 3, 3])
    sa, sb = wan.new_state(), wan.new_state()
    assert sa.feat_cache is not sb.feat_cache
    outs_a, outs_b = [], []
    for lo, hi in [(0, 1), (1, 4), (4, 7)]:
        outs_a.append(wan.decode_block(a[:, :, lo:hi], sa))
        outs_b.append(wan.decode_block(b[:, :, lo:hi], sb))
    torch.testing.assert_close(torch.cat(outs_a, 2), alone_a, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(outs_b, 2), alone_b, rtol=0, atol=0)
    assert not torch.allclose(alone_a, alone_b)


def test_wan_encode_image_matches_diffusers(wan: WanStreamingVAE) -> None:
    torch.manual_seed(4)
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    latent = wan.encode_image(image)
    assert latent.shape == (1, Z, 1, 4, 6)
    with torch.no_grad():
        raw = wan.vae.encode(image.unsqueeze(2)).latent_dist.mode()
    expected = (raw - torch.tensor(MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(STD).view(
        1, -1, 1, 1, 1
    )
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_wan_bad_inputs(wan: WanStreamingVAE) -> None:
    with pytest.raises(InvalidImageError, match="not a multiple of 4"):
        wan.encode_image(torch.zeros(1, 3, 18, 16))
    with pytest.raises(InvalidImageError, match=r"\[1, 3, H, W\]"):
        wan.encode_image(torch.zeros(3, 16, 16))
    with pytest.raises(ConfigError, match=f"latents \\[B, {Z}, F>=1"):
        wan.decode_block(torch.zeros(1, Z + 1, 2, 4, 4), wan.new_state())
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        WanStreamingVAE(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_load_wan_vae_roundtrip(tmp_path: Path) -> None:
    original = _tiny_wan()
    original.save_pretrained(tmp_path / "vae")
    loaded = load_wan_vae(tmp_path / "vae")
    assert loaded.latent_channels == Z
    torch.manual_seed(5)
    latents = torch.randn(1, Z, 4, 4, 4)
    expected = _decode_in_blocks(WanStreamingVAE(original), latents, [1, 3])
    torch.testing.assert_close(_decode_in_blocks(loaded, latents, [1, 3]), expected)
    # A whole pipeline folder: the VAE is found in its vae/ subfolder.
    assert load_wan_vae(tmp_path).latent_channels == Z


def test_load_wan_vae_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found.*nowhere"):
        load_wan_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_wan_vae(tmp_path / "empty")


# ---------------------------------------------------------------------------- TinyAutoencoder


@pytest.fixture(scope="module")
def tiny() -> TinyAutoencoder:
    torch.manual_seed(0)
    return TinyAutoencoder(latent_channels=4, channels=(8, 12, 16)).eval()


def test_tiny_shapes(tiny: TinyAutoencoder) -> None:
    assert (tiny.latent_channels, tiny.spatial_factor, tiny.temporal_factor) == (4, 8, 1)
    assert tiny.frames_for(3, first=True) == tiny.frames_for(3, first=False) == 3
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    latent = tiny.encode_image(image)
    assert latent.shape == (1, 4, 1, 4, 6)
    video = tiny.decode_block(torch.randn(1, 4, 3, 4, 6), tiny.new_state())
    assert video.shape == (1, 3, 3, 32, 48)
    assert video.min() >= -1 and video.max() <= 1


def test_tiny_blockwise_decode_equals_whole(tiny: TinyAutoencoder) -> None:
    torch.manual_seed(6)
    latents = torch.randn(1, 4, 7, 4, 4)
    whole = tiny.decode_block(latents, tiny.new_state())
    torch.testing.assert_close(_decode_in_blocks(tiny, latents, [1, 3, 3]), whole)
    torch.testing.assert_close(_decode_in_blocks(tiny, latents, [2, 1, 4]), whole)
    # Control: the smoothing really couples frames, so a fresh state per block differs.
    restarted = tiny.decode_block(latents[:, :, 3:], tiny.new_state())
    assert (restarted[:, :, 0] - whole[:, :, 3]).abs().max() > 1e-4


def test_tiny_sessions_are_independent(tiny: TinyAutoencoder) -> None:
    torch.manual_seed(7)
    a, b = torch.randn(1, 4, 6, 4, 4), torch.randn(1, 4, 6, 4, 4)
    alone_a = tiny.decode_block(a, tiny.new_state())
    alone_b = tiny.decode_block(b, tiny.new_state())
    sa, sb = tiny.new_state(), tiny.new_state()
    out_a, out_b = [], []
    for lo in range(0, 6, 2):
        out_a.append(tiny.decode_block(a[:, :, lo : lo + 2], sa))
        out_b.append(tiny.decode_block(b[:, :, lo : lo + 2], sb))
    torch.testing.assert_close(torch.cat(out_a, 2), alone_a)
    torch.testing.assert_close(torch.cat(out_b, 2), alone_b)
    assert sa.frames_decoded == sb.frames_decoded == 6


def test_tiny_forward_is_differentiable(tiny: TinyAutoencoder) -> None:
    clip = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    model = TinyAutoencoder(latent_channels=4, channels=(8, 12, 16))
    loss = (model(clip) - clip).square().mean()
    loss.backward()
    assert model.temporal_smooth.weight.grad is not None
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_to_uint8() -> None:
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 2)
    frames = StreamingVAE.to_uint8(video)
    assert frames.dtype == np.uint8 and frames.shape == (4, 1, 2, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(ConfigError, match=r"\[1, 3, N, H, W\]"):
        StreamingVAE.to_uint8(torch.zeros(3, 4, 1, 1))


def test_tiny_save_load_roundtrip(tiny: TinyAutoencoder, tmp_path: Path) -> None:
    tiny.save(tmp_path / "tiny")
    loaded = TinyAutoencoder.load(tmp_path / "tiny")
    assert loaded.config == tiny.config
    latents = torch.randn(1, 4, 2, 4, 4)
    torch.testing.assert_close(
        loaded.decode_block(latents, loaded.new_state()),
        tiny.decode_block(latents, tiny.new_state()),
        rtol=0,
        atol=0,
    )


def test_tiny_load_errors(tiny: TinyAutoencoder, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found.*config.json"):
        TinyAutoencoder.load(tmp_path / "absent")
    folder = tmp_path / "tiny"
    tiny.save(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "channels": [8, 12, 20]}))
    with pytest.raises(ConfigError, match="has shape .* the config needs"):
        TinyAutoencoder.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "channels": [8, 12]}))
    with pytest.raises(ConfigError, match="do not match the config: missing"):
        TinyAutoencoder.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "width": 3}))
    with pytest.raises(ConfigError, match="bad TinyAutoencoder config"):
        TinyAutoencoder.load(folder)


def test_tiny_bad_inputs(tiny: TinyAutoencoder) -> None:
    with pytest.raises(InvalidImageError, match="30x32 is not a multiple of 8"):
        tiny.encode_image(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ConfigError, match="latents"):
        tiny.decode_block(torch.zeros(1, 8, 1, 4, 4), tiny.new_state())
    with pytest.raises(ConfigError, match="positive sizes"):
        TinyAutoencoder(latent_channels=0)

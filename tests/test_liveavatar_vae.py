"""Live Avatar's VAE: the released `Wan2.1_VAE.pth` layout loaded into diffusers' AutoencoderKLWan
through our key map, and encode / stream decode equal to upstream's WanVAE.

Fixtures (tests/fixtures/liveavatar/vae, written by scripts/golden/vae.py from upstream
LiveAvatar@9c2c38d) hold a tiny random VAE saved by upstream's own module, the released file's key
names and shapes, and upstream's outputs for the calls the pipeline makes: encode of the image
repeated 5 and 73 frames, stream_decode of 7 motion latents (priming the causal cache), then
stream_decode of three 3-latent blocks. Decoded frames are stored on a 7-pixel grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from models.errors import ConfigError, ModelNotFoundError
from models.vae import TinyAutoencoder, WanStreamingVAE
from models.wan_vae_checkpoint import (
    diffusers_to_original,
    infer_wan21_vae_config,
    load_wan21_vae,
    original_to_diffusers,
    to_diffusers_key,
    to_original_key,
    write_tiny_wan21_vae,
)

FIXTURES = Path(__file__).parent / "fixtures" / "liveavatar" / "vae"
PTH = FIXTURES / "Wan2.1_VAE.pth"
GRID = 7
RELEASED = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


def _released_keys() -> dict[str, list[int]]:
    return json.loads((FIXTURES / "wan21_released_keys.json").read_text())


def _meta_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((FIXTURES / "meta.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "inputs.safetensors"))


@pytest.fixture(scope="module")
def vae32() -> WanStreamingVAE:
    return load_wan21_vae(PTH)


@pytest.fixture(scope="module")
def vae16() -> WanStreamingVAE:
    return load_wan21_vae(PTH, dtype=torch.bfloat16)


def _pixels(inputs: dict[str, torch.Tensor], frames: int) -> torch.Tensor:
    """The pipeline's image preparation: ToTensor (/255) * 2 - 1, repeated in time."""
    image = inputs["image"].permute(2, 0, 1).float() / 255.0 * 2 - 1
    return image[None, :, None].repeat(1, 1, frames, 1, 1)


def _moving(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The golden's moving clip: 9 frames, frame i the image rolled right by 5*i pixels."""
    pixels = _pixels(inputs, 1)
    return torch.cat([torch.roll(pixels, 5 * i, dims=-1) for i in range(9)], dim=2)


def _stream(vae: WanStreamingVAE, prime: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype):
    """Live Avatar's decode rank: prime with 7 motion latents, then one call per block."""
    state = vae.new_state()
    primed = vae.decode_block(prime.to(dtype), state)
    outs = [vae.decode_block(b[None].to(dtype), state) for b in blocks]
    return primed, outs


# ------------------------------------------------------------------------------ key map


def test_key_map_covers_the_released_layout_both_ways() -> None:
    """Every key of the released Wan2.1_VAE.pth maps to exactly one AutoencoderKLWan key of the
    released config with the same shape, no key is left over either side, and both directions
    invert each other. Fails if a rule is dropped (e.g. `residual.3` -> `norm2`) or the decoder's
    flat index is split wrongly (e.g. stages of R+1 instead of R+2 entries)."""
    shapes = _released_keys()
    assert len(shapes) == 194
    with torch.device("meta"):
        model = AutoencoderKLWan()  # its defaults are the released config
    target = model.state_dict()
    mapped = {k: to_diffusers_key(k) for k in shapes}
    assert None not in mapped.values(), [k for k, v in mapped.items() if v is None][:3]
    assert sorted(mapped.values()) == sorted(target)
    for original, new in mapped.items():
        assert list(target[new].shape) == shapes[original], original
        assert to_original_key(new) == original
    for key in target:
        assert to_diffusers_key(to_original_key(key)) == key


def test_key_map_dict_round_trip_and_unknown_keys() -> None:
    """original_to_diffusers / diffusers_to_original are inverse on a whole state dict; keys of no
    known block (including diffusers-layout keys in an original-layout file) are set aside, never
    matched by name, and refused the other way. Fails if unknown keys were kept under their own
    name (a diffusers key would then load as if mapped) or silently dropped."""
    state = _meta_state(_released_keys())
    renamed, unmapped = original_to_diffusers(state)
    assert unmapped == []
    assert diffusers_to_original(renamed) == state
    odd = {"encoder.mystery.weight": 1, "encoder.conv_in.weight": 2, "encoder.conv1.weight": 3}
    renamed, unmapped = original_to_diffusers(odd)
    assert renamed == {"encoder.conv_in.weight": 3}
    assert unmapped == ["encoder.mystery.weight", "encoder.conv_in.weight"]
    assert to_diffusers_key("decoder.downsamples.0.residual.2.weight") is None
    assert to_original_key("decoder.up_blocks.0.resnets.3.conv1.weight") is None
    with pytest.raises(ConfigError, match="mid_block.resnets.7"):
        diffusers_to_original({"encoder.mid_block.resnets.7.conv1.weight": 0})


def test_config_inferred_from_released_shapes() -> None:
    """The released shapes give the released config, which is also AutoencoderKLWan's default.
    Fails if temporal flags are read in the wrong order or a stage's resample is counted as one
    of its residual blocks."""
    config = infer_wan21_vae_config(_meta_state(_released_keys()))
    assert config == RELEASED
    with torch.device("meta"):
        model = AutoencoderKLWan()
    assert {k: model.config[k] for k in RELEASED} == RELEASED


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"base_dim": 4, "dim_mult": (1, 2, 2, 2), "num_res_blocks": 2},
        {
            "base_dim": 4,
            "dim_mult": (1, 2, 2),
            "num_res_blocks": 3,
            "temperal_downsample": (True, False),
        },
    ],
    ids=["default", "wider", "three-stages"],
)
def test_tiny_writer_loads_with_no_key_left(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    """write_tiny_wan21_vae's file is an original-layout state dict whose config reads back from
    its shapes and which loads strictly (zero missing or unexpected keys). Fails if the writer
    saved diffusers keys, or if inference ignored num_res_blocks (the decoder index would shift)."""
    path = write_tiny_wan21_vae(tmp_path / "Wan2.1_VAE.pth", seed=3, **kwargs)
    assert path.stat().st_size < 400_000
    state = torch.load(path, weights_only=True)
    assert all(k.startswith(("encoder.", "decoder.", "conv1.", "conv2.")) for k in state)
    config = infer_wan21_vae_config(state)
    expected = {
        "base_dim": kwargs.get("base_dim", 8),
        "z_dim": 16,
        "dim_mult": list(kwargs.get("dim_mult", (1, 1, 1, 1))),
        "num_res_blocks": kwargs.get("num_res_blocks", 1),
        "attn_scales": [],
        "temperal_downsample": list(kwargs.get("temperal_downsample", (False, True, True))),
    }
    assert config == expected
    vae = load_wan21_vae(tmp_path)  # the folder form finds Wan2.1_VAE.pth in it
    loaded = diffusers_to_original(vae.vae.state_dict(), config["num_res_blocks"])
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_tiny_writer_matches_upstream_layout(tmp_path: Path) -> None:
    """The writer's default file has the same keys and shapes as the fixture upstream's WanVAE_
    saved at the same config. Fails if the writer's config drifts from the golden one."""
    ours = torch.load(write_tiny_wan21_vae(tmp_path / "w.pth"), weights_only=True)
    upstream = torch.load(PTH, weights_only=True)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in upstream.items()}


# --------------------------------------------------------------------------- vs upstream


def test_latent_statistics_are_upstreams(vae32: WanStreamingVAE, meta: dict[str, Any]) -> None:
    """Latents are normalised with the same mean and std as upstream's WanVAE (it stores 1/std).
    Fails if a channel of latents_mean or latents_std differs."""
    torch.testing.assert_close(vae32._mean.flatten(), torch.tensor(meta["latents_mean"]))
    torch.testing.assert_close(1.0 / vae32._std.flatten(), torch.tensor(meta["latents_inv_std"]))


def test_encode_video_equals_upstream_float32(
    vae32: WanStreamingVAE, inputs: dict[str, torch.Tensor]
) -> None:
    """encode_video of the image repeated 5 and 73 frames (the pipeline's ref and motion clips)
    and of a 9-frame moving clip equals upstream WanVAE.encode (2, 19 and 3 latent frames) to
    float32 rounding. Fails if the normalisation is skipped, if the map swaps the mid block's two
    residual blocks (same shapes, so only the numbers catch it), or, on the moving clip only, if
    the clip is cut into chunks of 4 from frame 0 instead of 1 then 4s."""
    golden = load_file(str(FIXTURES / "float32.safetensors"))
    clips = {
        "encode_5": _pixels(inputs, 5),
        "encode_73": _pixels(inputs, 73),
        "encode_moving": _moving(inputs),
    }
    for name, clip in clips.items():
        latents = vae32.encode_video(clip)
        assert latents.dtype == torch.float32
        assert latents.shape == (1, 16, 1 + (clip.shape[2] - 1) // 4, 8, 16)
        torch.testing.assert_close(latents, golden[name], rtol=1e-5, atol=1e-5)


def test_stream_decode_equals_upstream_float32(
    vae32: WanStreamingVAE, inputs: dict[str, torch.Tensor]
) -> None:
    """Priming with 7 motion latents (25 frames) and then three 3-latent blocks (12 frames each)
    equals upstream's stream_decode frame for frame. Fails if the cache is reset between blocks
    (a fresh state per call) or the first block is decoded as a stream start (9 frames)."""
    golden = load_file(str(FIXTURES / "float32.safetensors"))
    primed, blocks = _stream(vae32, golden["encode_73"][:, :, :7], inputs["blocks"], torch.float32)
    assert primed.shape == (1, 3, 25, 64, 128)
    assert [b.shape for b in blocks] == [(1, 3, 12, 64, 128)] * 3
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(primed[..., ::GRID, ::GRID], golden["prime_grid"], **tol)
    for i, block in enumerate(blocks):
        torch.testing.assert_close(block[0, ..., ::GRID, ::GRID], golden["blocks_grid"][i], **tol)


def _within_bf16_noise(ours: torch.Tensor, upstream16: torch.Tensor, upstream32: torch.Tensor):
    """Ours (bf16) may differ from upstream (bf16) by at most twice what bf16 itself moves
    upstream away from float32, in mean and in max. Both sides round differently (diffusers
    normalises in float32, upstream in bf16), so equality to bf16 rounding is not expected."""
    ours, upstream16 = ours.float(), upstream16.float()
    noise = (upstream16 - upstream32).abs()
    error = (ours - upstream16).abs()
    assert error.mean() <= 2 * noise.mean(), (float(error.mean()), float(noise.mean()))
    assert error.max() <= 2 * noise.max(), (float(error.max()), float(noise.max()))


def test_bfloat16_encode_and_decode_within_bf16_noise(
    vae16: WanStreamingVAE, inputs: dict[str, torch.Tensor]
) -> None:
    """Live Avatar runs the VAE in bfloat16. Our bf16 encode and stream decode stay within twice
    upstream's own bf16-vs-float32 difference (measured: latents mean 1.1e-3 / max 8e-3 for both;
    frames mean 5e-3 / max 0.14 for both). Fails if the decode cache is reset between blocks, or
    if the latent normalisation is skipped."""
    golden16 = load_file(str(FIXTURES / "bfloat16.safetensors"))
    golden32 = load_file(str(FIXTURES / "float32.safetensors"))
    assert vae16._param().dtype == torch.bfloat16
    clips = {"encode_5": _pixels(inputs, 5), "encode_73": _pixels(inputs, 73)}
    for name, clip in {**clips, "encode_moving": _moving(inputs)}.items():
        latents = vae16.encode_video(clip.bfloat16())
        _within_bf16_noise(latents, golden16[name], golden32[name])
    primed, blocks = _stream(
        vae16, golden32["encode_73"][:, :, :7], inputs["blocks"], torch.bfloat16
    )
    _within_bf16_noise(primed[..., ::GRID, ::GRID], golden16["prime_grid"], golden32["prime_grid"])
    grid = torch.stack([b[0, ..., ::GRID, ::GRID] for b in blocks])
    _within_bf16_noise(grid, golden16["blocks_grid"], golden32["blocks_grid"])


def test_encode_video_refuses_partial_chunks(vae32: WanStreamingVAE) -> None:
    """Upstream silently drops frames past the last whole chunk of 4; we refuse. Fails if a
    72-frame clip encodes."""
    with pytest.raises(ConfigError, match="72 frames"):
        vae32.encode_video(torch.zeros(1, 3, 72, 64, 128))
    with pytest.raises(ConfigError, match=r"\[1, 3, T, H, W\]"):
        vae32.encode_video(torch.zeros(3, 5, 64, 128))


# --------------------------------------------------------------------------- bad files


def test_missing_file_and_folder(tmp_path: Path) -> None:
    """A path that does not exist, or a folder without Wan2.1_VAE.pth, names the file it looked
    for. Fails if the raw FileNotFoundError of torch.load escapes."""
    with pytest.raises(ModelNotFoundError, match="nope.pth"):
        load_wan21_vae(tmp_path / "nope.pth")
    with pytest.raises(ModelNotFoundError, match="Wan2.1_VAE.pth"):
        load_wan21_vae(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    """A download cut short (half the file, or only its first bytes) is one ConfigError line
    naming the file. Fails if torch.load's RuntimeError/UnpicklingError is not translated."""
    data = PTH.read_bytes()
    bad = tmp_path / "Wan2.1_VAE.pth"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConfigError, match="Wan2.1_VAE.pth") as info:
        load_wan21_vae(bad)
    assert "\n" not in str(info.value)


class _RunsCode:
    """Unpickling this calls os.makedirs: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return os.makedirs, (str(self.marker),)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    """A text file, a pickle that would run code, or a dict of non-tensors is a ConfigError naming
    the file, and the pickle's code never runs. Fails if weights_only is off (the marker folder
    appears) or the error is not translated."""
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match="notes.pth"):
        load_wan21_vae(text)
    marker = tmp_path / "code-ran"
    obj = tmp_path / "object.pth"
    torch.save({"encoder.conv1.weight": _RunsCode(marker)}, obj)
    with pytest.raises(ConfigError, match="object.pth"):
        load_wan21_vae(obj)
    assert not marker.exists()
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(ConfigError, match="nested.pth.*plain state dict"):
        load_wan21_vae(nested)


def test_state_dict_of_another_model(tmp_path: Path) -> None:
    """The default model's TinyAutoencoder weights saved as a .pth are refused with the counts and
    a few names of missing and unexpected keys. Fails if the key check is skipped (diffusers would
    raise its own multi-line error) or strictness is lost."""
    other = tmp_path / "other.pth"
    torch.save(TinyAutoencoder().state_dict(), other)
    with pytest.raises(ConfigError) as info:
        load_wan21_vae(other)
    message = str(info.value)
    assert "other.pth" in message and "\n" not in message
    assert "194 missing keys (conv1.bias, conv1.weight, conv2.bias and 191 more)" in message
    n = len(TinyAutoencoder().state_dict())
    assert f"{n} unexpected keys (decoder.1.bias" in message


def test_extra_and_missing_key(tmp_path: Path) -> None:
    """One key removed and one added to an otherwise good file are both named."""
    state = torch.load(PTH, weights_only=True)
    del state["decoder.middle.1.proj.bias"]
    state["decoder.middle.1.extra"] = torch.zeros(1)
    bad = tmp_path / "edited.pth"
    torch.save(state, bad)
    with pytest.raises(
        ConfigError, match="1 missing keys \\(decoder.middle.1.proj.bias\\)"
    ) as info:
        load_wan21_vae(bad)
    assert "1 unexpected keys (decoder.middle.1.extra)" in str(info.value)


def test_wrong_shape(tmp_path: Path) -> None:
    """A tensor whose shape disagrees with the rest names the tensor (original name) and the file.
    Fails if shapes go unchecked (load_state_dict(assign=True) would raise its own error)."""
    state = torch.load(PTH, weights_only=True)
    state["decoder.upsamples.2.time_conv.weight"] = torch.zeros(16, 8, 2, 1, 1)  # kernel 3 in time
    bad = tmp_path / "shapes.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"shapes.pth: tensor decoder.upsamples.2.time_conv"):
        load_wan21_vae(bad)

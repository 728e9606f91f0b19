"""The causal transformer against diffusers' WanTransformer3DModel, and its loading code."""

import json

import diffusers
import pytest
import torch

from models.config import WanConfig, tiny_config
from models.dit import AttentionPlan, CausalWanTransformer
from models.errors import ConfigError, ModelNotFoundError
from models.registry import load_diffusers_transformer

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**TINY).eval()


def _ours(reference, **audio):
    cfg = WanConfig.from_dict({**dict(reference.config), **audio})
    model = CausalWanTransformer(cfg).eval()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("audio_" in k for k in result.missing_keys)
    return model


@pytest.mark.parametrize("frames", [1, 3])
def test_block_without_history_matches_diffusers(reference, frames):
    model = _ours(reference)
    x = torch.randn(2, 4, frames, 8, 12)
    t = torch.tensor([700.0, 35.0])
    ctx = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = reference(x, t, ctx, return_dict=False)[0]
        got = model(x, t, ctx)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_per_frame_timesteps_match_diffusers_per_token(reference):
    model = _ours(reference)
    x = torch.randn(1, 4, 3, 8, 8)
    t = torch.tensor([[900.0, 400.0, 0.0]])
    ctx = torch.randn(1, 5, 16)
    tokens = 16
    with torch.no_grad():
        expected = reference(x, t.repeat_interleave(tokens, dim=1), ctx, return_dict=False)[0]
        got = model(x, t, ctx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_initialised_audio_layers_leave_video_model_unchanged(reference):
    model = _ours(reference, audio_dim=6, audio_layers=[1])
    x, t, ctx = torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 16)
    audio = torch.randn(1, 2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, audio=audio), reference(x, t, ctx)[0])
        # once the audio path has weights, the audio changes the output
        torch.nn.init.normal_(model.blocks[1].audio_attn.to_out[0].weight)
        assert not torch.allclose(model(x, t, ctx, audio=audio), reference(x, t, ctx)[0])


def test_load_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "transformer")
    model = load_diffusers_transformer(tmp_path / "transformer")
    x, t, ctx = torch.randn(1, 4, 1, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), reference(x, t, ctx)[0])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_diffusers_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "attention_head_dim": 7}))
    with pytest.raises(ConfigError, match="attention_head_dim"):
        load_diffusers_transformer(tmp_path)


def test_rotary_positions_are_relative():
    """Shifting every position by the same amount leaves attention logits unchanged."""
    model = CausalWanTransformer(tiny_config())
    q = torch.randn(1, 2 * 16, 2, 12)
    k = torch.randn(1, 2 * 16, 2, 12)
    a = model.rotary(torch.tensor([0, 1]), 8, 8)
    b = model.rotary(torch.tensor([9000, 9001]), 8, 8)
    la = torch.einsum("bnhd,bmhd->bhnm", a.apply(q), a.apply(k))
    lb = torch.einsum("bnhd,bmhd->bhnm", b.apply(q), b.apply(k))
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_explicit_mask_is_used():
    model = CausalWanTransformer(tiny_config()).eval()
    x, t, ctx = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 2, 16)
    n = 2 * 4
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        full = model(x, t, ctx)
        masked = model(x, t, ctx, plan=AttentionPlan(mask=causal))
    assert not torch.allclose(full, masked)

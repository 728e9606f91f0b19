"""Live Avatar's transformer against upstream's CausalWanModel_S2V (golden fixtures written by
scripts/golden/transformer.py from Alibaba-Quark/LiveAvatar, commit in meta.json).

The fixture is one sink prefill and three streaming blocks sharing one cache whose ring holds
two blocks (the third block wraps), with random weights everywhere (audio injectors, token-type
embedding and pose encoder included, which upstream initialises at zero)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.dit import AttentionPlan
from models.kv_cache import KVCache
from models.s2v import LiveAvatarTransformer, S2VConfig, S2VReference

FIX = Path(__file__).parent / "fixtures" / "liveavatar" / "transformer"


def load_model(dtype: torch.dtype = torch.float32) -> LiveAvatarTransformer:
    data = json.loads((FIX / "config.json").read_text())
    data["text_dim"] = (
        16  # not in a released config.json (diffusers ignores it); the loader infers it
    )
    model = LiveAvatarTransformer(S2VConfig.from_dict(data)).eval()
    result = model.load_state_dict(load_file(FIX / "weights.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return model.to(dtype)


@pytest.fixture(scope="module")
def fixture():
    meta = json.loads((FIX / "meta.json").read_text())
    return meta, load_file(FIX / "inputs.safetensors"), load_file(FIX / "outputs.safetensors")


def stream(model, meta, inputs, dtype=torch.float32, capture=None):
    """The fixture's calls through our model: sink, then three blocks on one ring cache."""
    h, w = meta["latent_hw"]
    cfg = model.config
    fpb = 3
    cache = KVCache.allocate(
        layers=cfg.num_layers,
        batch=1,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        tokens_per_frame=model.tokens_per_frame(h, w),
        window_frames=meta["ring_frames"] - fpb,  # upstream's ring includes the current block
        sink_tokens=model.sink_tokens(h, w),
        frames_per_block=fpb,
        dtype=dtype,
    )
    ctx = model.prepare_context(inputs["context"][None].to(dtype))
    src = S2VReference(inputs["ref_latents"], inputs["motion_latents"]).to("cpu", dtype)
    out = {}
    with torch.no_grad():
        model.sink_forward(src, ctx, AttentionPlan(cache=cache, store_sink=True))
        for b in range(3):
            start = b * fpb
            position = max(model.REFERENCE_POSITION, start + meta["sink_distances"][b])
            audio = model.prepare_audio(inputs["audio"][b : b + 1].permute(0, 3, 1, 2).to(dtype))
            plan = AttentionPlan(
                cache=cache, read_history=True, sink_position=position, write_start=start
            )
            if capture is not None:
                capture.clear()
            out[b] = model(
                inputs["latents"][b : b + 1].to(dtype),
                torch.full((1,), meta["timesteps"][b]),
                ctx,
                frame_positions=torch.arange(start, start + fpb),
                audio=audio,
                plan=plan,
            )
            cache.advance(fpb)
            if capture is not None:
                out[("captured", b)] = dict(capture)
    return cache, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_released_key_layout_loads_with_no_missing_or_unexpected_key():
    """Fails if a module is renamed away from the checkpoint's layout or one is missing."""
    load_model()


def test_sink_prefill_equals_upstream(fixture):
    """The sink's keys/values of every layer (reference + packed motion tokens, zero timestep,
    rotary positions 30 and the motion buckets'). Fails if the motion tokens' positions, the
    token-type embedding or the zero-timestep modulation change."""
    meta, inputs, outputs = fixture
    model = load_model()
    cache, _ = stream(model, meta, inputs)
    assert cache.sink_keys.shape[2] == meta["sink_tokens"]
    for i in range(model.config.num_layers):
        torch.testing.assert_close(cache.sink_keys[i], outputs[f"sink_k.{i}"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            cache.sink_values[i], outputs[f"sink_v.{i}"], atol=1e-5, rtol=1e-4
        )


def test_every_block_layer_and_injection_equals_upstream(fixture):
    """Three blocks (ring wrap on the third, the reference rolled to 35 on the third), checked
    layer by layer: block outputs, audio injections, audio encoder tokens and the velocity.
    Fails if the sink position floor (30) or the rolling distance is ignored, if the ring keeps
    a block too many, if audio is injected at the wrong layer or the adaptive norm's shift and
    scale are swapped."""
    meta, inputs, outputs = fixture
    model = load_model()
    captured: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(
            lambda m, a, r, i=i: captured.__setitem__(f"block.{i}", r.detach().clone())
        )
    inject = model._inject

    def record(i, x, audio, frames):
        res = inject(i, x, audio, frames)
        captured[f"after.{i}"] = res.detach().clone()
        return res

    model._inject = record
    _, out = stream(model, meta, inputs, capture=captured)
    for b in range(3):
        got = out[("captured", b)]
        for i in range(model.config.num_layers):
            torch.testing.assert_close(
                got[f"block.{i}"], outputs[f"block.{i}.b{b}"], atol=1e-5, rtol=1e-4
            )
            if f"after.{i}" in got:
                torch.testing.assert_close(
                    got[f"after.{i}"], outputs[f"after.{i}.b{b}"], atol=1e-5, rtol=1e-4
                )
        assert set(k for k in got if k.startswith("after.")) == {"after.0", "after.2"}
        torch.testing.assert_close(out[b][0], outputs[f"velocity.{b}"], atol=1e-5, rtol=1e-4)


def test_audio_encoder_tokens_equal_upstream(fixture):
    """The causal audio encoder over the 73-frame lead-in + the block's 12 frames. Fails if the
    layer weights are not normalised or the lead-in is dropped."""
    meta, inputs, outputs = fixture
    model = load_model()
    feats = inputs["audio"][0:1]
    lead = torch.cat([feats[..., :1].repeat(1, 1, 1, 73), feats], dim=-1)
    with torch.no_grad():
        glob, local = model.casual_audio_encoder(lead)
    torch.testing.assert_close(glob, outputs["audio_global.b0"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(local, outputs["audio_local.b0"], atol=1e-5, rtol=1e-4)


def test_bfloat16_stays_close_to_upstream(fixture):
    """The same stream in bfloat16 against upstream's float32 output: relative error of the
    velocity under 3 % (bfloat16 keeps 8 bits of mantissa; the stream compounds three blocks
    through a shared cache). Fails if something is upcast or downcast in the wrong place badly
    enough to matter (e.g. the cache in the wrong dtype raises an error, a missing cast a NaN)."""
    meta, inputs, outputs = fixture
    model = load_model(torch.bfloat16)
    cache, out = stream(model, meta, inputs, dtype=torch.bfloat16)
    assert cache.keys.dtype == torch.bfloat16
    for b in range(3):
        assert out[b].dtype == torch.bfloat16
        assert torch.isfinite(out[b]).all()
        assert rel(out[b][0], outputs[f"velocity.{b}"]) < 0.03


def test_moving_the_sink_changes_the_output(fixture):
    """Negative control: the rolled reference position matters (block 2 at 35 vs 30)."""
    meta, inputs, outputs = fixture
    model = load_model()
    meta2 = dict(meta, sink_distances=[26, 7, 7])  # block 2's reference stays at 30
    _, out = stream(model, meta2, inputs)
    assert rel(out[2][0], outputs["velocity.2"]) > 1e-3
    torch.testing.assert_close(out[1][0], outputs["velocity.1"], atol=1e-5, rtol=1e-4)

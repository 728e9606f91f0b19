"""Streaming generation: cached = uncached, rolling sink geometry, seeds, session isolation."""

import numpy as np
import pytest
import torch

from models.dit import AttentionPlan
from models.errors import ConfigError, InvalidAudioError
from models.kv_cache import KVCache
from pipelines.generator import PipelineConfig, StreamingGenerator
from pipelines.reference import default_reference
from tests.multidevice_helpers import randomise_audio_layers

F = 3  # latent frames per block


def make_gen(bundle, **cfg) -> StreamingGenerator:
    return StreamingGenerator.from_bundle(bundle, **cfg)


def speech(gen, block, seed=0):
    rng = np.random.default_rng(seed + 1000 * block)
    return (0.3 * rng.standard_normal(gen.block_samples(block))).astype(np.float32)


class Recorder:
    """Records every transformer call (inputs, plan, output) through a forward hook."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls.append(
            dict(
                latent=args[0].clone(),
                t=args[1].clone(),
                plan=kwargs.get("plan"),
                out=output.clone(),
            )
        )

    def close(self):
        self.handle.remove()


def block_causal_mask(blocks: int, tokens: int, window: int) -> torch.Tensor:
    """Token i may see token j if j's block is not later, and j is in i's block or within the
    `window` latent frames before i's block."""
    frame = torch.arange(blocks * F * tokens) // tokens
    block = frame // F
    same = block[:, None] == block[None, :]
    earlier = block[None, :] < block[:, None]
    in_window = frame[None, :] >= block[:, None] * F - window
    return same | (earlier & in_window)


# ---- cached = uncached ----------------------------------------------------------------------
# The engine runs one block at a time against its caches; the reference runs one masked forward
# over the whole sequence. They must agree on every block, with the audio layers switched on,
# the sink on (one copy per block, each rotated to that block's sink position) and windows
# shorter than the history.


@pytest.fixture(scope="module")
def audio_bundle():
    """The tiny model with its audio output projections randomised (they start at zero)."""
    from models.registry import build_tiny

    bundle = build_tiny()
    randomise_audio_layers(bundle.dit)
    return bundle


def sink_kv(gen, state, source):
    """Per-layer unrotated keys/values of a sink frame: its own forward at the context
    timestep, attending only to itself."""
    mc = gen.model.config
    cache = KVCache.allocate(
        layers=mc.num_layers,
        batch=1,
        heads=mc.num_attention_heads,
        head_dim=mc.attention_head_dim,
        tokens_per_frame=gen.tokens_per_frame,
        window_frames=0,
    )
    with torch.inference_mode():
        gen.model(
            source,
            torch.full((1,), gen.config.context_timestep),
            state.context,
            frame_positions=torch.zeros(1, dtype=torch.long),
            plan=AttentionPlan(cache=cache, store_sink=True),
        )
    return cache.sink_keys, cache.sink_values


def uncached(gen, state, blocks, times, audio, sinks, window):
    """One masked forward over `blocks` (one latent block each, at frames 0, F, 2F, ...) with
    timestep `times[j]` for block j, which sees the sink `sinks[j]` rotated to its own sink
    position, itself, and the blocks within `window` frames before it. audio: tokens of every
    frame [1, frames, A, dim], or None. sinks None: no sink."""
    model, n, T = gen.model, len(blocks), gen.tokens_per_frame
    mc = model.config
    copies = KVCache.allocate(  # the sink copies, already rotated, read as "history"
        layers=mc.num_layers,
        batch=1,
        heads=mc.num_attention_heads,
        head_dim=mc.attention_head_dim,
        tokens_per_frame=T,
        window_frames=n if sinks else 0,
    )
    for j, (keys, values) in enumerate((sinks or [])[:n]):
        rope = model.rotary(torch.full((1,), gen.sink_position(j * F)), gen.latent_h, gen.latent_w)
        for layer in range(mc.num_layers):
            copies.keys[layer, :, j * T : (j + 1) * T] = rope.apply(keys[layer])
            copies.values[layer, :, j * T : (j + 1) * T] = values[layer]
    copies.filled_frames = n if sinks else 0
    query_block = torch.arange(n * F * T) // (F * T)
    own_sink = query_block[:, None] == (torch.arange(copies.filled_frames * T) // T)[None, :]
    mask = torch.cat([own_sink, block_causal_mask(n, T, window)], dim=1)
    t = torch.tensor([[float(times[j])] * F for j in range(n)]).reshape(1, -1)
    with torch.inference_mode():
        return model(
            torch.cat(blocks, dim=2),
            t,
            state.context,
            audio=None if audio is None else audio[:, : n * F],
            plan=AttentionPlan(cache=copies, read_history=True, mask=mask),
        )


def run_stream(gen, blocks, seed, sink_refresh):
    """Generate `blocks` blocks; returns the state, the transformer calls other than sink
    passes, the audio tokens of every frame (from an encoder state of its own) and the
    encoded reference."""
    image = default_reference(gen.height, gen.width)
    source = gen.encode_reference(image)
    state = gen.new_session(image, seed=seed, sink_refresh=sink_refresh)
    enc = gen.audio_encoder.new_state()
    tokens = []
    rec = Recorder(gen.model)
    try:
        for b in range(blocks):
            a = speech(gen, b)
            tokens.append(gen.audio_encoder.encode(a, gen.block_video_frames(b), F, enc)[None])
            gen.generate_block(state, a)
    finally:
        rec.close()
    calls = [c for c in rec.calls if not c["plan"].store_sink]
    return state, calls, torch.cat(tokens, dim=1), source


def sink_sources(gen, source, first_clean, blocks, refresh):
    """Each block's sink source: the reference, or, with the refresh, block 0's first clean
    frame from the refresh block on."""
    at = gen.config.sink_refresh_block
    return [first_clean[:, :, :1] if refresh and b >= at else source for b in range(blocks)]


BLOCKS_PAST = 6  # blocks per stream: with a 3- or 6-frame window, several blocks past it
EQUIVALENCE = [
    pytest.param(3, False, id="window-1-block"),
    pytest.param(6, True, id="window-2-blocks-sink-refresh"),
]


@pytest.mark.parametrize(("window", "refresh"), EQUIVALENCE)
def test_reencode_cached_equals_uncached(audio_bundle, window, refresh):
    """Every step of every block equals one masked forward over the clean earlier blocks (at the
    context timestep) and this block's input; audio and sink on, window shorter than the
    history.

    Fails if the re-encode pass drops the audio (tried: audio=None in finish_block's
    re-encode), if the ring is one block too long (tried: window_frames + F in new_session),
    if the sink is skipped (tried: sink_position=None in finish_block's re-encode; tried: no
    _store_sink in new_session) and, with the refresh, if the refreshed sink is never built
    (tried: refresh_sink returning at once)."""
    gen = make_gen(audio_bundle, window_frames=window, sink=True, cache_mode="reencode")
    state, calls, audio, source = run_stream(gen, BLOCKS_PAST, seed=3, sink_refresh=refresh)
    steps, per_block = state.steps, state.steps + 1  # S denoise steps, then the re-encode
    assert len(calls) == BLOCKS_PAST * per_block
    clean = [calls[b * per_block + steps]["latent"] for b in range(BLOCKS_PAST)]
    sinks = [
        sink_kv(gen, state, s) for s in sink_sources(gen, source, clean[0], BLOCKS_PAST, refresh)
    ]
    t_ctx = gen.config.context_timestep
    for b in range(BLOCKS_PAST):
        for step in range(steps):
            call = calls[b * per_block + step]
            times = [t_ctx] * b + [call["t"][0]]
            ref = uncached(gen, state, [*clean[:b], call["latent"]], times, audio, sinks, window)
            torch.testing.assert_close(call["out"], ref[:, :, b * F :], rtol=1e-4, atol=1e-4)
    # Controls on the last block: its output depends on the audio, the sink and the window.
    b, call = BLOCKS_PAST - 1, calls[(BLOCKS_PAST - 1) * per_block]
    seq, times = [*clean[:b], call["latent"]], [t_ctx] * b + [call["t"][0]]
    for variant in (
        uncached(gen, state, seq, times, None, sinks, window),
        uncached(gen, state, seq, times, audio, None, window),
        uncached(gen, state, seq, times, audio, sinks, window + F),
    ):
        assert (variant[:, :, b * F :] - call["out"]).abs().max() > 1e-3


@pytest.mark.parametrize(("window", "refresh"), EQUIVALENCE)
def test_timestep_forcing_cached_equals_uncached(audio_bundle, window, refresh):
    """Cache s holds earlier blocks' step-s inputs: step s of every block equals one masked
    forward over all blocks' step-s inputs; audio and sink on, window shorter than the history.

    Fails if a step's ring is one block too long (tried: window_frames + F in new_session),
    if the sink is skipped (tried: sink_position=None in denoise_step), if the block's audio is
    lost (tried: audio=None in denoise_step) and, with the refresh, if the refreshed sink is
    never built (tried: refresh_sink returning at once)."""
    gen = make_gen(audio_bundle, window_frames=window, sink=True, cache_mode="timestep_forcing")
    state, calls, audio, source = run_stream(gen, BLOCKS_PAST, seed=4, sink_refresh=refresh)
    steps = state.steps
    assert len(state.caches) == steps
    assert len(calls) == BLOCKS_PAST * steps  # no extra pass in this mode
    last = calls[steps - 1]  # block 0's last step: its clean latent is one Euler step away
    first_clean = gen.schedule(steps).euler(last["latent"], last["out"], steps - 1)
    sinks = [
        sink_kv(gen, state, s) for s in sink_sources(gen, source, first_clean, BLOCKS_PAST, refresh)
    ]
    for step in range(steps):
        inputs = [calls[b * steps + step]["latent"] for b in range(BLOCKS_PAST)]
        times = [calls[step]["t"][0]] * BLOCKS_PAST
        ref = uncached(gen, state, inputs, times, audio, sinks, window)
        got = torch.cat([calls[b * steps + step]["out"] for b in range(BLOCKS_PAST)], dim=2)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Controls: the outputs depend on the audio, the sink and the window.
    inputs = [calls[b * steps]["latent"] for b in range(BLOCKS_PAST)]
    times = [calls[0]["t"][0]] * BLOCKS_PAST
    got = torch.cat([calls[b * steps]["out"] for b in range(BLOCKS_PAST)], dim=2)
    for variant in (
        uncached(gen, state, inputs, times, None, sinks, window),
        uncached(gen, state, inputs, times, audio, None, window),
        uncached(gen, state, inputs, times, audio, sinks, window + F),
    ):
        assert (variant - got).abs().max() > 1e-3


def _first_step_output(gen, state, block_index):
    """Velocity of the first denoising step of a block placed at `block_index`."""
    state.block_index = block_index
    state.next_frame = block_index * F
    inputs = gen.prepare_block(state, np.zeros(gen.block_samples(block_index), np.float32))
    rec = Recorder(gen.model)
    try:
        gen.denoise_step(state, inputs, 0, torch.ones_like(inputs.noise))
    finally:
        rec.close()
    return rec.calls[0]["out"]


def test_rolling_sink_keeps_its_relative_position(tiny_bundle):
    gen = make_gen(tiny_bundle, window_frames=0, sink=True, sink_distance=5)
    ref = default_reference(gen.height, gen.width)
    assert gen.sink_position(3 * F) - 3 * F == gen.sink_position(3000 * F) - 3000 * F == 5
    a = _first_step_output(gen, gen.new_session(ref), 3)
    b = _first_step_output(gen, gen.new_session(ref), 3000)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Control: the sink really is attended to, and its distance matters.
    other = make_gen(tiny_bundle, window_frames=0, sink=True, sink_distance=40)
    c = _first_step_output(other, other.new_session(ref), 3)
    assert (a - c).abs().max() > 1e-3
    nosink = make_gen(tiny_bundle, window_frames=0, sink=False)
    d = _first_step_output(nosink, nosink.new_session(ref), 3)
    assert (a - d).abs().max() > 1e-3


def test_sink_refresh_replaces_sink_with_first_generated_frame(tiny_bundle):
    gen = make_gen(tiny_bundle, sink_refresh=True)
    state = gen.new_session(default_reference(gen.height, gen.width), seed=1)
    before = state.caches[0].sink_keys.clone()
    gen.generate_block(state, speech(gen, 0))
    after = state.caches[0].sink_keys.clone()
    assert not torch.allclose(before, after)
    gen.generate_block(state, speech(gen, 1))
    torch.testing.assert_close(state.caches[0].sink_keys, after)  # only after the first block


@pytest.mark.parametrize("mode", ["reencode", "timestep_forcing"])
def test_same_seed_same_frames_different_seed_different(tiny_bundle, mode):
    gen = make_gen(tiny_bundle, cache_mode=mode)
    ref = default_reference(gen.height, gen.width)

    def run(seed):
        s = gen.new_session(ref, seed=seed)
        return np.concatenate([gen.generate_block(s, speech(gen, b))[0] for b in range(3)])

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    # The random tiny decoder maps everything near grey, so count differing values.
    assert (a != c).mean() > 0.05


def test_interleaved_sessions_do_not_affect_each_other(tiny_bundle):
    gen = make_gen(tiny_bundle)
    ref = default_reference(gen.height, gen.width)
    alone = gen.new_session(ref, seed=5)
    expected = [gen.generate_block(alone, speech(gen, b))[0] for b in range(3)]
    s1, s2 = gen.new_session(ref, seed=5), gen.new_session(ref, seed=6)
    for b in range(3):
        got = gen.generate_block(s1, speech(gen, b))[0]
        gen.generate_block(s2, speech(gen, b, seed=9))
        np.testing.assert_array_equal(got, expected[b])


def test_coordinated_noise_permutes_one_template(tiny_bundle):
    gen = make_gen(tiny_bundle, coordinated_noise=True)
    state = gen.new_session(default_reference(gen.height, gen.width), seed=2)
    n1, n2 = state.noise.next(), state.noise.next()
    assert not torch.equal(n1, n2) or F == 1
    key = lambda n: sorted(float(n[0, :, f].sum()) for f in range(F))  # noqa: E731
    assert key(n1) == pytest.approx(key(n2))


def test_audio_changes_the_frames(tiny_bundle):
    gen = make_gen(tiny_bundle)
    ref = default_reference(gen.height, gen.width)
    quiet = gen.generate_block(
        gen.new_session(ref, seed=1), np.zeros(gen.block_samples(0), np.float32)
    )[0]
    # The tiny model's audio layers are zero-initialised; give them weights to see the path work.
    model = gen.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for blk in model.blocks:
                torch.nn.init.normal_(blk.audio_attn.to_out[0].weight, std=0.5)
        silent = gen.generate_block(
            gen.new_session(ref, seed=1), np.zeros(gen.block_samples(0), np.float32)
        )[0]
        loud = gen.generate_block(gen.new_session(ref, seed=1), speech(gen, 0))[0]
    finally:
        model.load_state_dict(saved)
    assert quiet.shape == loud.shape
    assert (silent != loud).mean() > 0.02


def test_pipeline_config_errors_name_the_problem(tiny_bundle):
    with pytest.raises(ConfigError, match="window_frames"):
        PipelineConfig(frames_per_block=3, window_frames=4).validate()
    with pytest.raises(ConfigError, match="cache mode"):
        PipelineConfig(cache_mode="magic").validate()
    with pytest.raises(ConfigError, match="steps"):
        PipelineConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="divisible"):
        make_gen(tiny_bundle, height=100)
    with pytest.raises(ConfigError, match="unknown pipeline option"):
        make_gen(tiny_bundle, stepz=3)
    gen = make_gen(tiny_bundle)
    state = gen.new_session(default_reference(gen.height, gen.width))
    with pytest.raises(InvalidAudioError, match="audio samples"):
        gen.generate_block(state, np.zeros(17, np.float32))

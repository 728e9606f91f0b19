"""Training the default model: the loss falls, and training runs the generator's own passes."""

import numpy as np
import pytest
import torch

from models.dit import CausalWanTransformer
from pipelines.generator import StreamingGenerator
from pipelines.training.clips import make_clip
from pipelines.training.train import (
    DitTrainer,
    LatentSet,
    Streamer,
    TrainConfig,
    dit_config,
    encode_clips,
    fold_audio_normalisation,
)


@pytest.fixture(scope="module")
def small():
    from models.vae import TinyAutoencoder

    cfg = TrainConfig.quick()
    rng = np.random.default_rng(0)
    clips = [make_clip(rng, cfg.clip_frames) for _ in range(2)]
    torch.manual_seed(0)
    vae = TinyAutoencoder(latent_channels=8, channels=(32, 64, 96)).eval()
    data = encode_clips(vae, clips, cfg, lambda d, n: _NoBar())
    return cfg, vae, clips, data


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _trainer(cfg, data: LatentSet, seed=0):
    torch.manual_seed(seed)
    model = CausalWanTransformer(dit_config(cfg, data.audio.shape[-1]))
    ctx = torch.nn.Parameter(torch.randn(1, 4, model.config.text_dim) * 0.5)
    flat = data.audio.reshape(-1, data.audio.shape[-1])
    return DitTrainer(
        model, ctx, data, cfg, flat.mean(0), flat.std(0).clamp_min(1e-3), np.random.default_rng(0)
    )


def test_dit_loss_falls_on_a_tiny_batch(small):
    cfg, _, _, data = small
    trainer = _trainer(cfg, data)
    params = [*trainer.model.parameters(), trainer.context]
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(25):
        trainer.rng = np.random.default_rng(1)  # the same batch, noise levels and noise each step
        torch.manual_seed(1)
        loss = trainer.loss(self_forced=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


def test_self_forced_loss_has_gradients(small):
    cfg, _, _, data = small
    trainer = _trainer(cfg, data)
    trainer.rng = np.random.default_rng(5)  # draws two history blocks with this seed
    loss = trainer.loss(self_forced=True)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and len(grads) > 0
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_training_passes_equal_the_streaming_generator(small):
    """The differentiable passes (sink, history re-encode, denoise) give the generator's output."""
    cfg, vae, clips, data = small
    trainer = _trainer(cfg, data)
    model = trainer.model.eval()
    fold_audio_normalisation(model, trainer.audio_mean, trainer.audio_std)
    from models.audio import LogMelFeatures
    from models.registry import ModelBundle

    bundle = ModelBundle(
        "t",
        model,
        vae,
        LogMelFeatures(n_mels=40, tokens_per_latent_frame=4),
        trainer.context.detach(),
        cfg.defaults,
    )
    gen = StreamingGenerator.from_bundle(bundle)
    state = gen.new_session(clips[0].reference, seed=3)
    audio = clips[0].audio
    outs = []
    pos = 0
    for _ in range(3):
        n = gen.block_samples(state.block_index)
        inputs = gen.prepare_block(state, audio[pos : pos + n])
        pos += n
        x = inputs.noise
        noise = x.clone()
        for step in range(state.steps):
            x = gen.denoise_step(state, inputs, step, x)
        gen.finish_block(state, inputs, x)
        outs.append((noise, x))

    streamer = Streamer(model, cfg.defaults)
    enc = LogMelFeatures(n_mels=40, tokens_per_latent_frame=4)
    feats = enc.for_block(audio[:pos], 9, 9)[None]
    ref = vae.encode_image(torch.from_numpy(clips[0].reference).permute(2, 0, 1)[None] / 127.5 - 1)
    from pipelines.schedule import FlowMatchSchedule

    sched = FlowMatchSchedule(cfg.defaults.steps, cfg.defaults.shift)
    with torch.no_grad():
        ctx = model.prepare_context(trainer.context)
        cache = streamer.new_cache(16, 16)
        streamer.sink(cache, ctx, ref)
        for j, (noise, expected) in enumerate(outs):
            a = feats[:, 3 * j : 3 * j + 3]
            x = noise
            for step, ts in enumerate(sched.timesteps):
                v = streamer.block(cache, ctx, x, torch.full((1,), ts), 3 * j, a, write=False)
                x = sched.euler(x, v, step)
            torch.testing.assert_close(x, expected, atol=2e-4, rtol=1e-3)
            streamer.block(cache, ctx, x, torch.zeros(1), 3 * j, a, write=True)

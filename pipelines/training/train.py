"""Train the embedded default model from scratch on generated clips (CPU in under an hour).

    clips → autoencoder (L1 + edges) → latents → causal DiT (flow matching, teacher forcing)
          → DiT on its own rolled-out history (self-forcing style) → ModelBundle.save

The DiT is trained through the same attention path the streaming generator runs: the reference
frame is written as the sink at the context timestep and rotated `sink_distance` frames ahead of
the block, history blocks are written clean (the re-encode pass) with their audio, and the block
is denoised at the few-step schedule's own noise levels. `TrainingKVCache` keeps those keys as
autograd tensors instead of in-place ring writes, so gradients reach the sink and history passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.audio import LogMelFeatures
from models.config import WanConfig
from models.dit import AttentionPlan, CausalWanTransformer, PreparedContext
from models.kv_cache import KVCache
from models.registry import ModelBundle, StreamDefaults
from models.vae import TinyAutoencoder
from pipelines.schedule import FlowMatchSchedule

from .clips import Clip, make_clip

AUDIO_CONFIG: dict[str, Any] = {"name": "logmel", "n_mels": 40, "tokens_per_latent_frame": 4}
VAE_CONFIG: dict[str, Any] = {"latent_channels": 8, "channels": [32, 64, 128]}


@dataclass
class TrainConfig:
    """Everything that decides the result; the defaults are the shipped model's recipe."""

    seed: int = 0
    clips: int = 160
    clip_frames: int = 100
    vae_steps: int = 5000
    vae_crop: int = 64  # square crop side in pixels (a multiple of 8)
    vae_batch: int = 8
    dit_steps: int = 4500
    dit_minutes: float | None = None  # cap the DiT phase's wall time (steps are re-planned)
    self_forcing_from: float = 0.55  # fraction of DiT steps after which history is self-made
    batch: int = 8
    lr: float = 1e-3
    heads: int = 4
    head_dim: int = 32
    layers: int = 4
    ffn: int = 384
    mouth_weight: float = 4.0
    threads: int = 2
    defaults: StreamDefaults = field(default_factory=StreamDefaults)

    @classmethod
    def quick(cls) -> TrainConfig:
        """A few steps on a tiny data set: for tests and smoke runs, not a usable model."""
        return cls(clips=4, clip_frames=24, vae_steps=20, dit_steps=20, batch=2, layers=2, ffn=128)


def dit_config(cfg: TrainConfig, audio_dim: int) -> WanConfig:
    return WanConfig(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=VAE_CONFIG["latent_channels"],
        out_channels=VAE_CONFIG["latent_channels"],
        text_dim=32,
        freq_dim=64,
        ffn_dim=cfg.ffn,
        num_layers=cfg.layers,
        audio_dim=audio_dim,
        audio_layers=tuple(range(cfg.layers)),
    ).validate()


# ---- cache with autograd ------------------------------------------------------------------
class TrainingKVCache(KVCache):
    """A KVCache whose writes keep the autograd graph (lists of tensors, no in-place ring).

    The model's attention only reads `history(layer)`, `sink_keys[layer]`, `sink_values[layer]`,
    `filled_frames` and `has_sink`, so this drop-in keeps training on the generator's own path.
    """

    @classmethod
    def create(cls, layers: int, tokens_per_frame: int, window_frames: int) -> TrainingKVCache:
        empty = torch.zeros(0)
        cache = cls(
            keys=empty,
            values=empty,
            sink_keys=[None] * layers,  # type: ignore[arg-type]
            sink_values=[None] * layers,  # type: ignore[arg-type]
            tokens_per_frame=tokens_per_frame,
            window_frames=window_frames,
            sink_frames=1,
        )
        cache._blocks = []
        cache._pending = [None] * layers
        return cache

    def history(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.window_frames * self.tokens_per_frame
        ks = torch.cat([b[layer][0] for b in self._blocks], dim=1)[:, -n:]
        vs = torch.cat([b[layer][1] for b in self._blocks], dim=1)[:, -n:]
        return ks, vs

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._pending[layer] = (k, v)

    def advance(self, frames: int) -> None:
        self._blocks.append(self._pending)
        self._pending = [None] * len(self._pending)
        self.filled_frames = min(self.window_frames, self.filled_frames + frames)

    def write_sink(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.sink_keys[layer] = k
        self.sink_values[layer] = v
        self.has_sink = True


# ---- the generator's passes, differentiable ------------------------------------------------
@dataclass
class Streamer:
    """The streaming generator's sink / denoise / re-encode passes on a batch, with autograd."""

    model: CausalWanTransformer
    defaults: StreamDefaults

    def new_cache(self, latent_h: int, latent_w: int) -> TrainingKVCache:
        mc = self.model.config
        tpf = self.model.tokens_per_frame(latent_h, latent_w)
        return TrainingKVCache.create(mc.num_layers, tpf, self.defaults.window_frames)

    def sink(self, cache: TrainingKVCache, ctx: PreparedContext, ref: torch.Tensor) -> None:
        t = torch.full((ref.shape[0],), self.defaults.context_timestep)
        self.model(
            ref,
            t,
            ctx,
            frame_positions=torch.zeros(1, dtype=torch.long),
            plan=AttentionPlan(cache=cache, store_sink=True),
        )

    def block(
        self,
        cache: TrainingKVCache,
        ctx: PreparedContext,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        start: int,
        audio: torch.Tensor,
        write: bool,
        sink: bool = True,
    ) -> torch.Tensor:
        f = latent.shape[2]
        plan = AttentionPlan(
            cache=cache,
            read_history=True,
            sink_position=start + self.defaults.sink_distance if sink else None,
            write_start=start if write else None,
        )
        pos = torch.arange(start, start + f)
        v = self.model(latent, timestep, ctx, frame_positions=pos, audio=audio, plan=plan)
        if write:
            cache.advance(f)
        return v

    @torch.no_grad()
    def rollout(
        self, ctx: PreparedContext, ref: torch.Tensor, audio: list[torch.Tensor], noise_shape: tuple
    ) -> list[torch.Tensor]:
        """Generate blocks with the model's own few-step sampler (what it will see at run time)."""
        sched = FlowMatchSchedule(self.defaults.steps, self.defaults.shift)
        cache = self.new_cache(ref.shape[-2], ref.shape[-1])
        self.sink(cache, ctx, ref)
        out = []
        b = ref.shape[0]
        for j, a in enumerate(audio):
            start = j * self.defaults.frames_per_block
            x = torch.randn(noise_shape)
            for step, ts in enumerate(sched.timesteps):
                v = self.block(cache, ctx, x, torch.full((b,), ts), start, a, write=False)
                x = sched.euler(x, v, step)
            self.block(
                cache, ctx, x, torch.full((b,), self.defaults.context_timestep), start, a, True
            )
            out.append(x)
        return out


# ---- data ---------------------------------------------------------------------------------
@dataclass
class LatentSet:
    """Encoded clips: latents [N, T, C, h, w], references [N, C, h, w], audio [N, T, A, D]."""

    latents: torch.Tensor
    refs: torch.Tensor
    audio: torch.Tensor
    mouth_weight: torch.Tensor  # [N, h, w]


def generate_clips(cfg: TrainConfig, progress: Callable[[str, int], Any]) -> list[Clip]:
    rng = np.random.default_rng(cfg.seed)
    bar = progress("render clips", cfg.clips)
    clips = []
    for _ in range(cfg.clips):
        clips.append(make_clip(rng, cfg.clip_frames, cfg.defaults.height))
        bar.update(1)
    bar.close()
    return clips


def _to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float [..., 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.movedim(-1, -3)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(
    clips: list[Clip], cfg: TrainConfig, progress: Callable[[str, int], Any]
) -> tuple[TinyAutoencoder, list[float]]:
    """L1 + edge loss on 3-frame snippets (so the decoder's temporal smoothing learns too), the
    mouth weighted up; latent noise in the second half makes the decoder forgive DiT errors."""
    torch.manual_seed(cfg.seed)
    vae = TinyAutoencoder(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=cfg.vae_steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed + 1)
    size = cfg.defaults.height
    losses = []
    bar = progress("autoencoder", cfg.vae_steps)
    for step in range(cfg.vae_steps):
        idx = rng.integers(0, len(clips), cfg.vae_batch)
        snips, weights = [], []
        crop = cfg.vae_crop
        for i in idx:
            c = clips[i]
            t0 = int(rng.integers(0, c.frames.shape[0] - 3))
            # Random crops on the latent grid: the networks are convolutional, so a crop trains
            # the same filters at a fraction of the cost of a whole frame.
            y, x = (int(v) * 8 for v in rng.integers(0, (size - crop) // 8 + 1, 2))
            snips.append(_to_unit(c.frames[t0 : t0 + 3, y : y + crop, x : x + crop]))
            w = torch.ones(size, size)
            x0, y0, x1, y1 = c.mouth
            w[y0:y1, x0:x1] = cfg.mouth_weight
            weights.append(w[y : y + crop, x : x + crop])
        video = torch.stack(snips).transpose(1, 2)  # [B, 3, F, H, W]
        wmap = torch.stack(weights)[:, None, None]
        b, _, f, h, w = video.shape
        z = vae.encode_frames(video.transpose(1, 2).reshape(b * f, 3, h, w))
        if step >= cfg.vae_steps // 2:
            z = z + 0.1 * z.detach().std() * torch.randn_like(z)
        z = z.view(b, f, *z.shape[1:]).transpose(1, 2)
        rec = vae.decode_frames(z, None)[0]
        loss = ((rec - video).abs() * wmap).mean()
        for er, ev in zip(_edges(rec), _edges(video), strict=True):
            loss = loss + 0.5 * (er - ev).abs().mean()
        loss = loss + 1e-4 * z.pow(2).mean()  # keeps the latent scale bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    return vae.eval(), losses


@torch.no_grad()
def normalise_latents(vae: TinyAutoencoder, clips: list[Clip]) -> None:
    """Fold a per-channel scale into the encoder's last and the decoder's first convolution so
    latents have unit spread (what flow matching's unit noise expects); exact, since scaling
    commutes with zero padding."""
    sample = torch.cat([_to_unit(c.frames[::10]) for c in clips[:32]])
    z = vae.encode_frames(sample)
    std = z.transpose(0, 1).flatten(1).std(dim=1).clamp_min(1e-3)
    enc = vae.encoder[-1]
    enc.weight.div_(std[:, None, None, None])
    enc.bias.div_(std)
    vae.decoder_in.weight.mul_(std[None, :, None, None])


@torch.no_grad()
def encode_clips(
    vae: TinyAutoencoder, clips: list[Clip], cfg: TrainConfig, progress: Callable[[str, int], Any]
) -> LatentSet:
    audio_enc = LogMelFeatures(**{k: v for k, v in AUDIO_CONFIG.items() if k != "name"})
    factor = vae.spatial_factor
    lat, refs, auds, masks = [], [], [], []
    bar = progress("encode clips", len(clips))
    for c in clips:
        lat.append(vae.encode_frames(_to_unit(c.frames)))
        refs.append(vae.encode_frames(_to_unit(c.reference[None]))[0])
        t = c.frames.shape[0]
        auds.append(audio_enc.for_block(c.audio, t, t))
        h = cfg.defaults.height // factor
        m = torch.ones(h, h)
        x0, y0, x1, y1 = c.mouth
        m[y0 // factor : -(-y1 // factor), x0 // factor : -(-x1 // factor)] = cfg.mouth_weight
        masks.append(m)
        bar.update(1)
    bar.close()
    return LatentSet(torch.stack(lat), torch.stack(refs), torch.stack(auds), torch.stack(masks))


# ---- DiT ----------------------------------------------------------------------------------
@dataclass
class DitTrainer:
    """Flow matching on one block given the sink and 0-2 history blocks (teacher forced or
    self-generated), at the few-step schedule's noise levels."""

    model: CausalWanTransformer
    context: torch.nn.Parameter
    data: LatentSet
    cfg: TrainConfig
    audio_mean: torch.Tensor
    audio_std: torch.Tensor
    rng: np.random.Generator

    def __post_init__(self) -> None:
        self.streamer = Streamer(self.model, self.cfg.defaults)
        d = self.cfg.defaults
        self.sigmas = torch.tensor(FlowMatchSchedule(d.steps, d.shift).sigmas[:-1])

    def _audio(self, idx: np.ndarray, start: np.ndarray, frames: int) -> torch.Tensor:
        a = torch.stack(
            [self.data.audio[i, s : s + frames] for i, s in zip(idx, start, strict=True)]
        )
        return (a - self.audio_mean) / self.audio_std

    def loss(self, self_forced: bool) -> torch.Tensor:
        cfg, d, data = self.cfg, self.cfg.defaults, self.data
        fpb = d.frames_per_block
        b = cfg.batch
        n_hist = int(self.rng.choice(3, p=[0.15, 0.15, 0.7]))
        t_total = data.latents.shape[1]
        idx = self.rng.integers(0, data.latents.shape[0], b)
        start = self.rng.integers(0, t_total - fpb * (n_hist + 1) + 1, b)
        clip = torch.stack(
            [data.latents[i, s : s + fpb * (n_hist + 1)] for i, s in zip(idx, start, strict=True)]
        ).transpose(1, 2)  # [B, C, T, h, w]
        audio = self._audio(idx, start, fpb * (n_hist + 1))
        audio_blocks = [audio[:, j * fpb : (j + 1) * fpb] for j in range(n_hist + 1)]
        ref = data.refs[idx][:, :, None]
        ctx = self.model.prepare_context(self.context)
        history = [clip[:, :, j * fpb : (j + 1) * fpb] for j in range(n_hist)]
        if self_forced and n_hist:
            history = self.streamer.rollout(
                ctx, ref, audio_blocks[:n_hist], tuple(history[0].shape)
            )
        cache = self.streamer.new_cache(ref.shape[-2], ref.shape[-1])
        self.streamer.sink(cache, ctx, ref)
        zeros = torch.full((b,), d.context_timestep)
        for j, h in enumerate(history):
            self.streamer.block(cache, ctx, h, zeros, j * fpb, audio_blocks[j], write=True)
        x0 = clip[:, :, n_hist * fpb :]
        sigma = self.sigmas[torch.from_numpy(self.rng.integers(0, len(self.sigmas), b))]
        mixed = torch.from_numpy(self.rng.random(b) < 0.2)
        sigma = torch.where(mixed, torch.from_numpy(self.rng.random(b)).float(), sigma)
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        v = self.streamer.block(cache, ctx, xt, sigma * 1000, n_hist * fpb, audio_blocks[-1], False)
        return mouth_weighted_mse(v, noise - x0, data.mouth_weight[idx])


def mouth_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, mouth: torch.Tensor
) -> torch.Tensor:
    """Squared error of [B, C, F, h, w] latents, each position weighted by the mouth map
    [B, h, w] (the mouth counts `mouth_weight` times), normalised by the mean weight."""
    w = mouth[:, None, None]
    return ((pred - target).pow(2) * w).mean() / w.mean()


def fold_audio_normalisation(
    model: CausalWanTransformer, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Training fed (features - mean) / std; fold that into the audio embedder's first layer so
    the shipped model takes the raw log-mel tokens the generator gives it."""
    lin = model.audio_embedder.linear_1
    with torch.no_grad():
        w = lin.weight / std[None, :]
        lin.bias.sub_(w @ mean)
        lin.weight.copy_(w)


def train_dit(
    data: LatentSet, cfg: TrainConfig, progress: Callable[[str, int], Any]
) -> tuple[CausalWanTransformer, torch.Tensor, list[float]]:
    torch.manual_seed(cfg.seed)
    audio_dim = data.audio.shape[-1]
    model = CausalWanTransformer(dit_config(cfg, audio_dim))
    context = torch.nn.Parameter(torch.randn(1, 4, model.config.text_dim) * 0.5)
    flat = data.audio.reshape(-1, audio_dim)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
    trainer = DitTrainer(model, context, data, cfg, mean, std, np.random.default_rng(cfg.seed + 2))
    params = [*model.parameters(), context]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    total = cfg.dit_steps
    warm = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    bar = progress("transformer", total)
    sf_start = int(total * cfg.self_forcing_from)
    model.train()
    t_start = time.perf_counter()
    step = 0
    while step < total:
        if cfg.dit_minutes is not None and step >= 10 and step % 25 == 10 and step < sf_start:
            # Re-plan the step count to the time budget from the pace so far (self-forced
            # steps cost ~1.6x); only before self-forcing starts, so its share stays put.
            per = (time.perf_counter() - t_start) / step
            est = per * (cfg.self_forcing_from + (1 - cfg.self_forcing_from) * 1.6)
            total = max(step + 10, min(cfg.dit_steps, int(cfg.dit_minutes * 60 / est)))
            bar.total = total
        sf_start = int(total * cfg.self_forcing_from)
        self_forced = step >= sf_start and trainer.rng.random() < 0.5
        loss = trainer.loss(self_forced)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        avg = float(np.mean(losses[-50:]))
        bar.set_postfix(loss=f"{avg:.4f}", sf=int(self_forced))
        bar.update(1)
        step += 1
    bar.close()
    model.eval()
    fold_audio_normalisation(model, mean, std)
    return model, context.detach().clone(), losses


@dataclass
class TrainResult:
    bundle: ModelBundle
    vae_losses: list[float]
    dit_losses: list[float]
    seconds: float
    clips: list[Clip]


def _tqdm_progress(enabled: bool) -> Callable[[str, int], Any]:
    from tqdm import tqdm

    return lambda desc, total: tqdm(total=total, desc=desc, disable=not enabled, mininterval=2.0)


def train(
    cfg: TrainConfig,
    output: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train everything from scratch; save a bundle to `output` when given."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    bar = _tqdm_progress(progress)
    clips = generate_clips(cfg, bar)
    vae, vae_losses = train_vae(clips, cfg, bar)
    normalise_latents(vae, clips)
    data = encode_clips(vae, clips, cfg, bar)
    log(
        f"autoencoder done: loss {np.mean(vae_losses[-50:]):.4f}; latents {tuple(data.latents.shape)}"
    )
    dit, context, dit_losses = train_dit(data, cfg, bar)
    audio = LogMelFeatures(**{k: v for k, v in AUDIO_CONFIG.items() if k != "name"})
    bundle = ModelBundle(
        name="default",
        dit=dit,
        vae=vae,
        audio_encoder=audio,
        context=context,
        defaults=cfg.defaults,
        audio_config=dict(AUDIO_CONFIG),
        vae_config=dict(VAE_CONFIG),
        trained=True,
    )
    seconds = time.perf_counter() - t0
    if output is not None:
        bundle.save(output)
        log(f"saved {output} after {seconds / 60:.1f} min")
    return TrainResult(bundle, vae_losses, dit_losses, seconds, clips)

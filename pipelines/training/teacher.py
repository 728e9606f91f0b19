"""The bidirectional teacher that few-step students are distilled from (`diffstream train --teacher`).

The teacher is the project's transformer run on a whole clip of several blocks at once: every
frame of the clip attends to every other one and to the reference, written as the sink exactly as
the streaming generator writes it, rotated ahead of the clip's last block. It is trained with flow
matching over the whole noise range (shifted-uniform levels, one per clip), so it samples well at
many steps, and with the audio and the reference each dropped for a share of the clips, so it can
be guided:

    v = v(ref, audio) + (g_audio - 1) (v(ref, audio) - v(ref, -))
                      + (g_ref - 1)   (v(ref, -) - v(-, -))

where "-" is the null condition (zero audio tokens; a zero reference latent). The audio scale is
chosen by the lip sync it measures on held-out speech (`choose_guidance`). A teacher starts from a
bundle's transformer (by default the shipped causal model, which already knows the faces), so it
shares the bundle's autoencoder and audio features and a student can be initialised from either.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.dit import AttentionPlan, CausalWanTransformer
from models.registry import ModelBundle, StreamDefaults, load_model

from .train import (
    LatentSet,
    TrainConfig,
    TrainingKVCache,
    _tqdm_progress,
    encode_clips,
    generate_clips,
    mouth_weighted_mse,
)

TEACHER_FILE = "teacher.json"


def optimise(
    opt: torch.optim.Optimizer, loss: torch.Tensor, params: Any, clip: float = 1.0
) -> None:
    """One update: gradients of `loss`, clipped to `clip` in norm, applied by `opt`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def resolve_device(name: str) -> torch.device:
    """ "auto" → CUDA when available, else the CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's level warp σ = s·u / (1 + (s - 1)·u) applied to uniform draws."""
    return shift * u / (1 + (shift - 1) * u)


def new_cache(model: CausalWanTransformer, defaults: StreamDefaults, lh: int, lw: int):
    tpf = model.tokens_per_frame(lh, lw)
    return TrainingKVCache.create(model.config.num_layers, tpf, defaults.window_frames)


def write_sink(
    model: CausalWanTransformer,
    cache: TrainingKVCache,
    context: torch.Tensor,
    ref: torch.Tensor,
    defaults: StreamDefaults,
) -> None:
    """The sink pass of the streaming generator: the reference latent [B, C, 1, h, w] at the
    context timestep, its unrotated keys/values kept."""
    t = torch.full((ref.shape[0],), defaults.context_timestep, device=ref.device)
    model(
        ref,
        t,
        context.expand(ref.shape[0], -1, -1),
        frame_positions=torch.zeros(1, dtype=torch.long, device=ref.device),
        plan=AttentionPlan(cache=cache, store_sink=True),
    )


def clip_velocity(
    model: CausalWanTransformer,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context: torch.Tensor,
    sink: TrainingKVCache,
    audio: torch.Tensor,
    defaults: StreamDefaults,
) -> torch.Tensor:
    """One bidirectional forward of a whole clip x [B, C, F, h, w] at levels sigma [B] over the
    sink in `sink` (no history): full attention inside the clip."""
    f = x.shape[2]
    plan = AttentionPlan(
        cache=sink,
        read_history=False,
        sink_position=f - defaults.frames_per_block + defaults.sink_distance,
    )
    pos = torch.arange(f, device=x.device)
    ctx = context.expand(x.shape[0], -1, -1)
    return model(x, sigma * 1000, ctx, frame_positions=pos, audio=audio, plan=plan)


@dataclass
class Guidance:
    audio: float = 1.0
    reference: float = 1.0


class Teacher:
    """A bidirectional model with guidance: the score DMD distils from."""

    def __init__(
        self,
        model: CausalWanTransformer,
        context: torch.Tensor,
        defaults: StreamDefaults,
        clip_blocks: int = 3,
        guidance: Guidance | None = None,
        sample_steps: int = 24,
    ) -> None:
        self.model = model
        self.context = context
        self.defaults = defaults
        self.clip_blocks = clip_blocks
        self.guidance = guidance or Guidance()
        self.sample_steps = sample_steps

    @property
    def clip_frames(self) -> int:
        return self.clip_blocks * self.defaults.frames_per_block

    def sinks(self, ref: torch.Tensor) -> tuple[TrainingKVCache, TrainingKVCache | None]:
        """Sink caches for the reference and, when reference guidance is on, the null one."""
        lh, lw = ref.shape[-2:]
        cond = new_cache(self.model, self.defaults, lh, lw)
        write_sink(self.model, cond, self.context, ref, self.defaults)
        null = None
        if self.guidance.reference != 1.0:
            null = new_cache(self.model, self.defaults, lh, lw)
            write_sink(self.model, null, self.context, torch.zeros_like(ref), self.defaults)
        return cond, null

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        sinks: tuple[TrainingKVCache, TrainingKVCache | None],
        audio: torch.Tensor,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        g = guidance or self.guidance
        cond, null = sinks
        d, m, c = self.defaults, self.model, self.context
        v = clip_velocity(m, x, sigma, c, cond, audio, d)
        if g.audio == 1.0 and g.reference == 1.0:
            return v
        silent = torch.zeros_like(audio)
        v_ref = clip_velocity(m, x, sigma, c, cond, silent, d)
        out = v + (g.audio - 1.0) * (v - v_ref)
        if g.reference != 1.0:
            if null is None:
                null = new_cache(m, d, *x.shape[-2:])
                write_sink(m, null, c, torch.zeros_like(x[:, :, :1]), d)
            out = out + (g.reference - 1.0) * (
                v_ref - clip_velocity(m, x, sigma, c, null, silent, d)
            )
        return out

    @torch.no_grad()
    def sample(
        self,
        ref: torch.Tensor,
        audio: torch.Tensor,
        noise: torch.Tensor,
        steps: int | None = None,
        guidance: Guidance | None = None,
        trajectory_at: list[float] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Euler-sample clips from `noise` [B, C, F, h, w]; with `trajectory_at`, also return
        the sample at each of those levels (the Euler step that crosses a level stopped at it)."""
        steps = steps or self.sample_steps
        sig = shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.defaults.shift)
        sinks = self.sinks(ref)
        g = guidance or self.guidance
        if g.reference != 1.0 and sinks[1] is None:
            null = new_cache(self.model, self.defaults, *ref.shape[-2:])
            write_sink(self.model, null, self.context, torch.zeros_like(ref), self.defaults)
            sinks = (sinks[0], null)
        x = noise
        marks = sorted(trajectory_at or [], reverse=True)
        traj: list[torch.Tensor] = []
        b = x.shape[0]
        for i in range(steps):
            s, s_next = float(sig[i]), float(sig[i + 1])
            v = self.velocity(x, torch.full((b,), s, device=x.device), sinks, audio, g)
            while marks and marks[0] > s_next:
                # a level inside this step: the same Euler step, stopped there
                traj.append(x + (min(marks.pop(0), s) - s) * v)
            x = x + (s_next - s) * v
        traj.extend(x.clone() for _ in marks)
        return x, traj

    @torch.no_grad()
    def generate(
        self,
        bundle: ModelBundle,
        reference: np.ndarray,
        audio: np.ndarray,
        frames: int,
        seed: int = 0,
        guidance: Guidance | None = None,
        steps: int | None = None,
    ) -> np.ndarray:
        """Frames for an utterance, clip after clip (each clip sees only the reference): the
        same `generate(reference, audio, frames)` shape the evaluation measures students by."""
        d = self.defaults
        dev = next(self.model.parameters()).device
        vae_dev = next(bundle.vae.parameters()).device
        image = torch.from_numpy(np.ascontiguousarray(reference)).permute(2, 0, 1)[None]
        image = image.to(vae_dev).float() / 127.5 - 1.0
        ref = bundle.vae.encode_image(image).float().to(dev)
        n_clips = -(-frames // self.clip_frames)
        total = n_clips * self.clip_frames
        sr, fps = d.audio_sample_rate, d.fps
        need = round(total * sr / fps)
        wav = np.tile(np.asarray(audio, np.float32), -(-need // max(1, audio.size)))[:need]
        tokens = bundle.audio_encoder.for_block(wav, total, total)[None].float().to(dev)
        gen = torch.Generator().manual_seed(seed)
        lh, lw = ref.shape[-2:]
        state = bundle.vae.new_state()
        out = []
        for j in range(n_clips):
            sl = slice(j * self.clip_frames, (j + 1) * self.clip_frames)
            noise = torch.randn((1, ref.shape[1], self.clip_frames, lh, lw), generator=gen)
            noise = noise.to(dev)
            x, _ = self.sample(ref, tokens[:, sl], noise, steps, guidance)
            video = bundle.vae.decode_block(x.to(vae_dev), state).cpu()
            out.append(((video[0].float().clamp(-1, 1) + 1) * 127.5).round().byte())
        video = torch.cat(out, dim=1).permute(1, 2, 3, 0).numpy()
        return np.ascontiguousarray(video[:frames])


# ---- training ------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    """The teacher recipe; the defaults are what the shipped teacher was trained with."""

    base: str = "default"  # bundle whose transformer, autoencoder and audio the teacher starts from
    seed: int = 0
    clips: int = 160
    clip_frames: int = 100
    clip_blocks: int = 3
    steps: int = 4000  # upper bound; `minutes` stops earlier
    minutes: float | None = None
    batch: int = 4
    lr: float = 3e-4
    drop_audio: float = 0.1
    drop_reference: float = 0.1
    mouth_weight: float = 4.0
    sample_steps: int = 24
    guidance_candidates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5)
    guidance_frames: int = 75
    guidance_utterances: int = 2
    threads: int = 2
    device: str = "auto"  # "auto": CUDA when there is one

    @classmethod
    def quick(cls) -> TeacherConfig:
        return cls(
            clips=3,
            clip_frames=18,
            steps=4,
            batch=2,
            sample_steps=3,
            guidance_candidates=(1.0, 2.0),
            guidance_frames=9,
            guidance_utterances=1,
        )


def load_latents(
    bundle: ModelBundle,
    clips: int,
    clip_frames: int,
    seed: int,
    mouth_weight: float,
    progress: Callable[[str, int], Any],
    cache_dir: str | Path | None = None,
) -> LatentSet:
    """Render `clips` procedural clips and encode them with the bundle's autoencoder (raw log-mel
    audio tokens: the shipped transformers take them unnormalised). With `cache_dir`, the encoded
    set is kept there (keyed by seed, size and the autoencoder's weights) and reused."""
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for k, v in sorted(bundle.vae.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().float().numpy().tobytes())
        key = f"{seed}-{clips}-{clip_frames}-{mouth_weight:g}-{digest.hexdigest()[:12]}"
        cached = Path(cache_dir) / f"latents-{key}.pt"
        if cached.is_file():
            return LatentSet(**torch.load(cached, weights_only=True))
    tc = TrainConfig(seed=seed, clips=clips, clip_frames=clip_frames, mouth_weight=mouth_weight)
    tc.defaults = bundle.defaults
    rendered = generate_clips(tc, progress)
    data = encode_clips(bundle.vae, rendered, tc, progress)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(asdict(data), cached)
    return data


def sample_clip_batch(
    data: LatentSet,
    frames: int,
    gens: list[torch.Generator],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A window of `frames` latent frames from a random clip per sample, each drawn from its own
    generator: latents [B, C, F, h, w], refs [B, C, 1, h, w], audio [B, F, A, D], mouth [B, h, w]."""
    n, t = data.latents.shape[:2]
    lat, refs, aud, mouth = [], [], [], []
    for g in gens:
        i = int(torch.randint(0, n, (1,), generator=g))
        s = int(torch.randint(0, t - frames + 1, (1,), generator=g))
        lat.append(data.latents[i, s : s + frames])
        refs.append(data.refs[i])
        aud.append(data.audio[i, s : s + frames])
        mouth.append(data.mouth_weight[i])
    return (
        torch.stack(lat).transpose(1, 2).to(device),
        torch.stack(refs)[:, :, None].to(device),
        torch.stack(aud).to(device),
        torch.stack(mouth).to(device),
    )


def per_sample_randn(
    shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One draw per sample from its own CPU generator (the same numbers on any device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def per_sample_rand(
    gens: list[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in gens]).to(device)


def flow_matching_loss(
    model: CausalWanTransformer,
    context: torch.Tensor,
    defaults: StreamDefaults,
    x0: torch.Tensor,
    ref: torch.Tensor,
    audio: torch.Tensor,
    mouth: torch.Tensor,
    gens: list[torch.Generator],
    drop_audio: float = 0.0,
    drop_reference: float = 0.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    sink_grad: bool = True,
) -> torch.Tensor:
    """Mouth-weighted flow matching of whole clips at one shifted-uniform level per clip, with
    the audio / the reference replaced by the null condition for a share of the clips.
    sink_grad=False: the sink pass keeps no graph (the keys reach the loss only through the
    cache, a path FSDP's hooks cannot see; the fake score is trained that way)."""
    lo, hi = sigma_range
    dev = x0.device
    sigma = shifted(lo + (hi - lo) * per_sample_rand(gens, dev), defaults.shift)
    noise = per_sample_randn(tuple(x0.shape[1:]), gens, dev)
    keep_a = (per_sample_rand(gens, dev) >= drop_audio).float()
    keep_r = (per_sample_rand(gens, dev) >= drop_reference).float()
    s = sigma[:, None, None, None, None]
    xt = (1 - s) * x0 + s * noise
    sink = new_cache(model, defaults, *x0.shape[-2:])
    with torch.set_grad_enabled(torch.is_grad_enabled() and sink_grad):
        write_sink(model, sink, context, ref * keep_r[:, None, None, None, None], defaults)
    v = clip_velocity(
        model, xt, sigma, context, sink, audio * keep_a[:, None, None, None], defaults
    )
    return mouth_weighted_mse(v, noise - x0, mouth)


@dataclass
class TeacherResult:
    teacher: Teacher
    losses: list[float]
    seconds: float
    lip_sync: dict[str, float] = field(default_factory=dict)


def choose_guidance(
    teacher: Teacher,
    bundle: ModelBundle,
    candidates: tuple[float, ...],
    frames: int,
    utterances: int,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The audio guidance scale whose samples have the best lip sync on held-out speech and
    faces (mean over `utterances` clips), and every candidate's score."""
    from .avatar import default_mouth_box
    from .dataset import ClipSampler
    from .metrics import lip_sync_correlation

    sampler = ClipSampler(
        size=bundle.defaults.height, clip_frames=frames, seed=seed + 77, split="eval"
    )
    clips = [sampler.sample() for _ in range(utterances)]
    scores: dict[str, float] = {}
    for g in candidates:
        vals = []
        for c in clips:
            video = teacher.generate(
                bundle, c.reference, c.audio, frames, seed, Guidance(audio=g), steps=None
            )
            box = default_mouth_box(video.shape[1])
            r = lip_sync_correlation(
                video, c.audio, bundle.defaults.audio_sample_rate, bundle.defaults.fps, box
            )
            vals.append(0.0 if math.isnan(r) else float(r))
        scores[f"{g:g}"] = float(np.mean(vals))
    best = max(candidates, key=lambda g: scores[f"{g:g}"])
    return best, scores


def train_teacher(
    cfg: TeacherConfig,
    output: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    base: ModelBundle | None = None,
    cache_dir: str | Path | None = None,
) -> TeacherResult:
    """Fine-tune the base bundle's transformer into a guided bidirectional clip model."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    bar = _tqdm_progress(progress)
    base = base or load_model(cfg.base)
    device = resolve_device(cfg.device)
    model = copy.deepcopy(base.dit).float().to(device).train()
    context = base.context.detach().float().to(device)
    d = base.defaults
    data = load_latents(
        base, cfg.clips, cfg.clip_frames, cfg.seed, cfg.mouth_weight, bar, cache_dir
    )
    t_train = time.perf_counter()
    frames = cfg.clip_blocks * d.frames_per_block
    if data.latents.shape[1] < frames:
        raise ValueError(f"clip_frames {cfg.clip_frames} is shorter than a teacher clip ({frames})")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, min(100, cfg.steps // 20))
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + i) for i in range(cfg.batch)]
    losses: list[float] = []
    b = bar("teacher", cfg.steps)
    for step in range(cfg.steps):
        if cfg.minutes is not None and time.perf_counter() - t_train > cfg.minutes * 60:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / warm)
        x0, ref, audio, mouth = sample_clip_batch(data, frames, gens, device)
        loss = flow_matching_loss(
            model, context, d, x0, ref, audio, mouth, gens, cfg.drop_audio, cfg.drop_reference
        )
        optimise(opt, loss, model.parameters())
        losses.append(float(loss.detach()))
        b.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        b.update(1)
    b.close()
    model.eval()
    teacher = Teacher(model, context, d, cfg.clip_blocks, Guidance(), cfg.sample_steps)
    base.vae.to(device)
    g, scores = choose_guidance(
        teacher, base, cfg.guidance_candidates, cfg.guidance_frames, cfg.guidance_utterances
    )
    teacher.guidance = Guidance(audio=g)
    log(f"teacher: {len(losses)} steps; lip sync by audio guidance {scores}; chose {g:g}")
    seconds = time.perf_counter() - t0
    result = TeacherResult(teacher, losses, seconds, scores)
    if output is not None:
        save_teacher(result, base, cfg, output)
        log(f"saved teacher {output} after {seconds / 60:.1f} min")
    return result


def save_teacher(
    result: TeacherResult, base: ModelBundle, cfg: TeacherConfig, output: str | Path
) -> None:
    t = result.teacher
    base.vae.cpu()
    bundle = replace(
        base,
        name="teacher",
        dit=copy.deepcopy(t.model).cpu(),
        context=t.context.cpu(),
        defaults=replace(base.defaults, steps=t.sample_steps),
        trained=True,
    )
    bundle.save(output)
    meta = {
        "kind": "bidirectional-teacher",
        "clip_blocks": t.clip_blocks,
        "sample_steps": t.sample_steps,
        "guidance": asdict(t.guidance),
        "lip_sync_by_audio_guidance": result.lip_sync,
        "train_steps": len(result.losses),
        "loss_first50_last50": [
            float(np.mean(result.losses[:50])) if result.losses else None,
            float(np.mean(result.losses[-50:])) if result.losses else None,
        ],
        "seconds": round(result.seconds, 1),
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    (Path(output) / TEACHER_FILE).write_text(json.dumps(meta, indent=2))


def load_teacher(path: str | Path) -> tuple[Teacher, ModelBundle]:
    """A teacher folder written by `save_teacher` → (Teacher, its bundle)."""
    path = Path(path)
    meta_file = path / TEACHER_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a teacher (no {TEACHER_FILE}); make one with `diffstream train --teacher`"
        )
    meta = json.loads(meta_file.read_text())
    bundle = load_model(str(path))
    model = bundle.dit.float().eval()
    teacher = Teacher(
        model,
        bundle.context.float(),
        bundle.defaults,
        int(meta["clip_blocks"]),
        Guidance(**meta["guidance"]),
        int(meta["sample_steps"]),
    )
    return teacher, bundle

"""Few-step causal students by self-forcing with distribution matching (`diffstream distill`).

    teacher (bidirectional, guided)  ─┐
    fake score (a copy, trained online on the student's samples) ─┤→ DMD gradient on the sample
    student (causal, S steps) rolls out a clip block by block ────┘

1. Optional ODE warm start: the teacher samples clips at many steps; the student, fed the
   teacher's own trajectory (its blocks at the student's levels, history from the same
   trajectory), regresses the teacher's clean blocks.
2. Self-forcing: the student generates each training clip block by block exactly as the
   streaming generator does (sink rotated ahead, history window, re-encode or timestep-forcing
   caches), from its own history. Each block stops at an exit step drawn at random (the same on
   every rank); only that step's forward keeps its graph, the cache holds detached keys.
3. DMD: at a random level the clip is noised; the teacher's guided prediction and the fake
   score's prediction of the clean clip differ by the gradient of the KL between the student's
   and the teacher's distributions. The student takes 0.5·||x - sg(x - ∇)||²; the fake score
   takes `critic_steps` flow-matching steps on the student's samples per student step.
4. Optional ground truth (`regression` > 0): the procedural data knows the true latents of each
   training clip (the renderer's frames for that audio and identity), so the student also takes
   `regression`·(mouth-weighted MSE of its rollout against them). DMD alone moves the student
   towards the teacher's guided distribution, colours included; the term holds it to the frames.

Randomness is drawn per sample from generators seeded by (seed, sample index), so a run is
reproducible, and a run on N processes (torchrun; FSDP shards student and fake score) computes
what one process computes on the same global batch. Checkpoints hold both models, both
optimisers and the step; `--resume` continues bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.dit import AttentionPlan, CausalWanTransformer
from models.registry import ModelBundle, StreamDefaults, load_model
from pipelines.schedule import FlowMatchSchedule

from .teacher import (
    Teacher,
    clip_velocity,
    flow_matching_loss,
    load_latents,
    load_teacher,
    new_cache,
    optimise,
    per_sample_rand,
    per_sample_randn,
    resolve_device,
    sample_clip_batch,
    shifted,
    write_sink,
)
from .train import LatentSet, TrainingKVCache, _tqdm_progress, mouth_weighted_mse

CACHE_MODES = ("reencode", "timestep_forcing")
CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    teacher: str = ""
    student: str = "default"
    steps: int = 2  # the student's denoising steps
    shift: float = 2.0  # the student's schedule shift
    cache_mode: str = "timestep_forcing"
    seed: int = 0
    clips: int = 160
    clip_frames: int = 100
    clip_blocks: int = 3
    iterations: int = 4000  # student updates (upper bound; `minutes` stops earlier)
    minutes: float | None = None
    batch: int = 4  # global batch (split over processes)
    lr: float = 5e-5
    fake_lr: float = 2e-4
    critic_steps: int = 1  # fake-score updates per student update (two-time-scale)
    dmd_levels: tuple[float, float] = (0.02, 0.98)
    regression: float = 0.0  # weight of the ground-truth term (0: DMD alone)
    colour: float = 0.0  # weight of the regional colour term against the true frames (0: none)
    ode_iterations: int = 0  # ODE-regression warm start (0: start from the student bundle)
    ode_pairs: int = 16  # teacher trajectories for the warm start
    checkpoint_every: int = 100
    guidance: float | None = None  # the teacher's audio guidance scale (None: the teacher's own)
    threads: int = 2
    device: str = "auto"  # "auto": this process's CUDA device when there is one

    @classmethod
    def quick(cls) -> DistillConfig:
        return cls(clips=3, clip_frames=18, iterations=3, batch=2, ode_pairs=2, checkpoint_every=2)


# ---- a colour term in pixels ------------------------------------------------------------
COLOUR_CELL = 16  # pixels per side of the regions whose mean colour the colour term compares


def regional_colour_error(
    vae: torch.nn.Module, pred: torch.Tensor, truth: torch.Tensor, cell: int = COLOUR_CELL
) -> torch.Tensor:
    """Mean squared difference, in 8-bit levels, between the mean colours of `cell`-pixel squares
    of the decoded `pred` and the decoded `truth` latents ([B, C, F, h, w] each).

    A shift of two levels in a flat background or in the skin hardly moves a latent squared
    error, but it moves every pixel of the region across a colour bin, which is what the
    identity-drift measure's histogram sees. Averaging over squares leaves the fine detail
    (the mouth, edges) to the other terms. Gradients reach `pred` only (the decoder is fixed).
    """
    pv = vae.decode_frames(pred, None)[0]
    with torch.no_grad():
        tv = vae.decode_frames(truth, None)[0]

    def cells(v: torch.Tensor) -> torch.Tensor:
        b, c, f, hh, ww = v.shape
        flat = v.transpose(1, 2).reshape(b * f, c, hh, ww)
        return torch.nn.functional.avg_pool2d(flat, cell, ceil_mode=True) * 127.5

    return (cells(pv) - cells(tv)).pow(2).mean()


# ---- the student's rollout ---------------------------------------------------------------
class DetachedCache(TrainingKVCache):
    """A training cache that keeps no graph: the history a block reads is data, as at run time."""

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write(layer, start_frame, k.detach(), v.detach())

    def write_sink(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write_sink(layer, k.detach(), v.detach())


def student_caches(
    model: CausalWanTransformer,
    context: torch.Tensor,
    defaults: StreamDefaults,
    ref: torch.Tensor,
    mode: str,
    steps: int,
) -> list[DetachedCache]:
    """One cache (re-encode) or one per step (timestep forcing) sharing one sink, as
    StreamingGenerator.new_session allocates them."""
    lh, lw = ref.shape[-2:]
    tpf = model.tokens_per_frame(lh, lw)
    n = steps if mode == "timestep_forcing" else 1
    caches = [DetachedCache.create(model.config.num_layers, tpf, defaults.window_frames)]
    with torch.no_grad():
        write_sink(model, caches[0], context, ref, defaults)
    for _ in range(1, n):
        c = DetachedCache.create(model.config.num_layers, tpf, defaults.window_frames)
        c.sink_keys, c.sink_values, c.has_sink = caches[0].sink_keys, caches[0].sink_values, True
        caches.append(c)
    return caches


def block_velocity(
    model: CausalWanTransformer,
    context: torch.Tensor,
    defaults: StreamDefaults,
    cache: TrainingKVCache,
    x: torch.Tensor,
    t: float,
    start: int,
    audio: torch.Tensor,
    write: bool,
) -> torch.Tensor:
    f = x.shape[2]
    plan = AttentionPlan(
        cache=cache,
        read_history=True,
        sink_position=start + defaults.sink_distance,
        write_start=start if write else None,
    )
    pos = torch.arange(start, start + f, device=x.device)
    ts = torch.full((x.shape[0],), float(t), device=x.device)
    v = model(
        x, ts, context.expand(x.shape[0], -1, -1), frame_positions=pos, audio=audio, plan=plan
    )
    if write:
        cache.advance(f)
    return v


def rollout(
    model: CausalWanTransformer,
    context: torch.Tensor,
    defaults: StreamDefaults,
    ref: torch.Tensor,
    audio: torch.Tensor,
    noise: torch.Tensor,
    mode: str,
    sigmas: list[float],
    exits: list[int],
    renoise: torch.Tensor,
) -> torch.Tensor:
    """Self-forcing: generate a clip block by block from the student's own history.

    noise: [B, C, F, h, w] (a block's worth per block); exits[j]: the step at which block j
    stops, its x0 prediction there being the block; only that forward keeps a graph. In timestep
    forcing, the steps after the exit still write their cache at their own level (the block
    re-noised with `renoise`), as the run-time steps would have.
    """
    fpb = defaults.frames_per_block
    steps = len(sigmas) - 1
    caches = student_caches(model, context, defaults, ref, mode, steps)
    tf = mode == "timestep_forcing"
    blocks = []
    for j, exit_step in enumerate(exits):
        sl = slice(j * fpb, (j + 1) * fpb)
        start = j * fpb
        x = noise[:, :, sl]
        a = audio[:, sl]
        for s in range(exit_step + 1):
            cache = caches[s] if tf else caches[0]
            t = sigmas[s] * 1000
            if s < exit_step:
                with torch.no_grad():
                    v = block_velocity(model, context, defaults, cache, x, t, start, a, tf)
                    x = x + (sigmas[s + 1] - sigmas[s]) * v
            else:
                v = block_velocity(model, context, defaults, cache, x, t, start, a, tf)
                x0 = x - sigmas[s] * v
        with torch.no_grad():
            clean = x0.detach()
            if tf:
                for s in range(exit_step + 1, steps):
                    xs = (1 - sigmas[s]) * clean + sigmas[s] * renoise[:, :, sl]
                    block_velocity(
                        model, context, defaults, caches[s], xs, sigmas[s] * 1000, start, a, True
                    )
            else:
                block_velocity(
                    model,
                    context,
                    defaults,
                    caches[0],
                    clean,
                    defaults.context_timestep,
                    start,
                    a,
                    True,
                )
        blocks.append(x0)
    return torch.cat(blocks, dim=2)


def student_sigmas(cfg: DistillConfig) -> list[float]:
    return list(FlowMatchSchedule(cfg.steps, cfg.shift).sigmas)


# ---- DMD ---------------------------------------------------------------------------------
def dmd_loss(
    teacher: Teacher,
    fake: CausalWanTransformer,
    x0: torch.Tensor,
    ref: torch.Tensor,
    audio: torch.Tensor,
    gens: list[torch.Generator],
    levels: tuple[float, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5·||x0 - sg(x0 - ∇)||² with ∇ = (fake's x0 - teacher's guided x0) / mean|x0 - teacher's|
    at one random level per sample."""
    d = teacher.defaults
    lo, hi = levels
    sigma = shifted(lo + (hi - lo) * per_sample_rand(gens, x0.device), d.shift)
    noise = per_sample_randn(tuple(x0.shape[1:]), gens, x0.device)
    s = sigma[:, None, None, None, None]
    x = x0.detach()
    xt = (1 - s) * x + s * noise
    with torch.no_grad():
        real = xt - s * teacher.velocity(xt, sigma, teacher.sinks(ref), audio)
        sink = new_cache(fake, d, *x.shape[-2:])
        write_sink(fake, sink, teacher.context, ref, d)
        fake_x0 = xt - s * clip_velocity(fake, xt, sigma, teacher.context, sink, audio, d)
        norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-4)
        grad = (fake_x0 - real) / norm
        target = x - grad
    loss = 0.5 * (x0 - target).pow(2).mean()
    return loss, {"grad": float(grad.pow(2).mean().sqrt())}


# ---- processes ---------------------------------------------------------------------------
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed() -> tuple[int, int]:
    """torchrun sets WORLD_SIZE/RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP (fully_shard) over processes. The root is the one sharding unit: the transformer
    computes its per-layer condition keys (context, audio) inside its forward, which needs all
    its parameters gathered at once."""
    if distributed():
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, opt, options=opts)


def load_full_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, msd: dict, osd: dict
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        opt,
        model_state_dict=msd,
        optim_state_dict=osd,
        options=StateDictOptions(full_state_dict=True),
    )


def _agree_stop(stop: bool) -> bool:
    """Every rank stops at the same step (rank 0's clock decides)."""
    if not distributed():
        return stop
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.broadcast(flag, 0)
    return bool(flag.item())


# ---- the run -------------------------------------------------------------------------------
@dataclass
class DistillResult:
    student: CausalWanTransformer | None  # on rank 0
    bundle: ModelBundle | None
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    iterations: int = 0


def _gens(seed: int, step: int, stream: int, indices: range) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, step, stream, i]).generate_state(1)[0])
        )
        for i in indices
    ]


def ode_warm_start(
    student: CausalWanTransformer,
    opt: torch.optim.Optimizer,
    teacher: Teacher,
    data: LatentSet,
    cfg: DistillConfig,
    defaults: StreamDefaults,
    local: range,
    bar: Any,
) -> list[float]:
    """Regress the teacher's clean blocks from its own trajectory at the student's levels."""
    fpb = defaults.frames_per_block
    frames = cfg.clip_blocks * fpb
    sig = student_sigmas(cfg)
    device = teacher.context.device
    pairs = []
    for p in range(cfg.ode_pairs):
        gens = _gens(cfg.seed, p, 7, local)
        _, ref, audio, _ = sample_clip_batch(data, frames, gens, device)
        shape = (data.latents.shape[2], frames, *data.latents.shape[-2:])
        noise = per_sample_randn(shape, gens, device)
        clean, traj = teacher.sample(ref, audio, noise, trajectory_at=sig[:-1])
        pairs.append((ref, audio, clean, traj))
    losses = []
    tf = cfg.cache_mode == "timestep_forcing"
    for it in range(cfg.ode_iterations):
        ref, audio, clean, traj = pairs[it % len(pairs)]
        caches = student_caches(student, teacher.context, defaults, ref, cfg.cache_mode, cfg.steps)
        loss = torch.zeros((), device=device)
        for j in range(cfg.clip_blocks):
            sl = slice(j * fpb, (j + 1) * fpb)
            a = audio[:, sl]
            for s in range(cfg.steps):
                cache = caches[s] if tf else caches[0]
                xs = traj[s][:, :, sl]
                v = block_velocity(
                    student, teacher.context, defaults, cache, xs, sig[s] * 1000, j * fpb, a, tf
                )
                loss = loss + (xs - sig[s] * v - clean[:, :, sl]).pow(2).mean()
            if not tf:
                with torch.no_grad():
                    block_velocity(
                        student,
                        teacher.context,
                        defaults,
                        caches[0],
                        clean[:, :, sl],
                        defaults.context_timestep,
                        j * fpb,
                        a,
                        True,
                    )
        loss = loss / (cfg.clip_blocks * cfg.steps)
        optimise(opt, loss, student.parameters())
        losses.append(float(loss.detach()))
        bar.set_postfix(ode=f"{np.mean(losses[-20:]):.4f}")
        bar.update(1)
    return losses


def distill(
    cfg: DistillConfig,
    output: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    log: Callable[[str], None] = print,
    teacher: tuple[Teacher, ModelBundle] | None = None,
    student_bundle: ModelBundle | None = None,
    cache_dir: str | Path | None = None,
) -> DistillResult:
    """Distil `cfg.student` (a causal bundle) against `cfg.teacher` into a few-step student."""
    rank, world = init_distributed()
    torch.set_num_threads(cfg.threads)
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} does not split over {world} processes")
    if cfg.cache_mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}")
    local = range(rank * cfg.batch // world, (rank + 1) * cfg.batch // world)
    t0 = time.perf_counter()
    bar_of = _tqdm_progress(progress and rank == 0)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and distributed():
        device = torch.device("cuda", torch.cuda.current_device())
    teach, teacher_bundle = teacher or load_teacher(cfg.teacher)
    teach.model.to(device)
    if cfg.guidance is not None:
        teach.guidance = replace(teach.guidance, audio=cfg.guidance)
    teach.context = teach.context.to(device)
    for p in teach.model.parameters():
        p.requires_grad_(False)
    base = student_bundle or load_model(cfg.student)
    defaults = replace(
        base.defaults,
        steps=cfg.steps,
        shift=cfg.shift,
        pipeline={**base.defaults.pipeline, "cache_mode": cfg.cache_mode},
    )
    torch.manual_seed(cfg.seed)
    student = shard(copy.deepcopy(base.dit).float().to(device).train())
    fake = shard(copy.deepcopy(teach.model).float().to(device).train())
    for p in fake.parameters():
        p.requires_grad_(True)
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.0, 0.999), weight_decay=0.0)
    opt_f = torch.optim.AdamW(
        fake.parameters(), lr=cfg.fake_lr, betas=(0.0, 0.999), weight_decay=0.0
    )
    fpb = defaults.frames_per_block
    frames = cfg.clip_blocks * fpb
    if cfg.clip_frames < frames:
        raise ValueError(
            f"clips of {cfg.clip_frames} frames are shorter than a training rollout "
            f"({cfg.clip_blocks} blocks of {fpb} frames = {frames})"
        )
    data = load_latents(
        teacher_bundle, cfg.clips, cfg.clip_frames, cfg.seed, 4.0, bar_of, cache_dir
    )
    t_train = time.perf_counter()
    sig = student_sigmas(cfg)
    losses: dict[str, list[float]] = {
        "ode": [],
        "dmd": [],
        "fake": [],
        "grad": [],
        "reg": [],
        "colour": [],
    }
    start = 0
    ckpt = Path(output) / CHECKPOINT if output is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        load_full_state(student, opt_g, state["student"], state["opt_student"])
        load_full_state(fake, opt_f, state["fake"], state["opt_fake"])
        start, losses = state["iteration"], {**losses, **state["losses"]}
        log(f"resumed at iteration {start} from {ckpt}")
    elif cfg.ode_iterations:
        bar = bar_of("ODE warm start", cfg.ode_iterations)
        losses["ode"] = ode_warm_start(student, opt_g, teach, data, cfg, defaults, local, bar)
        bar.close()
        for group in opt_g.param_groups:  # the warm start's moments are not DMD's
            opt_g.state.clear()
            group["lr"] = cfg.lr
    colour_vae = None
    if cfg.colour:
        colour_vae = copy.deepcopy(teacher_bundle.vae).float().to(device).eval()
        colour_vae.requires_grad_(False)
    bar = bar_of("distill", cfg.iterations)
    bar.update(start)
    it = start
    context = teach.context
    while it < cfg.iterations:
        elapsed = time.perf_counter() - t_train
        if _agree_stop(cfg.minutes is not None and elapsed > cfg.minutes * 60):
            break
        gens = _gens(cfg.seed, it, 1, local)
        control = np.random.default_rng([cfg.seed, it, 2])  # the same on every rank
        exits = [int(control.integers(0, cfg.steps)) for _ in range(cfg.clip_blocks)]
        truth, ref, audio, mouth_map = sample_clip_batch(data, frames, gens, device)
        shape = (data.latents.shape[2], frames, *data.latents.shape[-2:])
        noise = per_sample_randn(shape, gens, device)
        renoise = per_sample_randn(shape, gens, device)
        x0 = rollout(
            student, context, defaults, ref, audio, noise, cfg.cache_mode, sig, exits, renoise
        )
        for c in range(cfg.critic_steps):
            cg = _gens(cfg.seed, it, 10 + c, local)
            mouth = torch.ones(x0.shape[0], *x0.shape[-2:], device=device)
            lf = flow_matching_loss(
                fake,
                context,
                teach.defaults,
                x0.detach(),
                ref,
                audio,
                mouth,
                cg,
                sink_grad=False,
            )
            optimise(opt_f, lf, fake.parameters())
        loss, info = dmd_loss(
            teach, fake, x0, ref, audio, _gens(cfg.seed, it, 3, local), cfg.dmd_levels
        )
        losses["dmd"].append(float(loss.detach()))
        if cfg.regression:
            reg = mouth_weighted_mse(x0, truth, mouth_map)
            losses["reg"].append(float(reg.detach()))
            loss = loss + cfg.regression * reg
        if cfg.colour:
            col = regional_colour_error(colour_vae, x0, truth)
            losses["colour"].append(float(col.detach()))
            loss = loss + cfg.colour * col
        optimise(opt_g, loss, student.parameters())
        losses["fake"].append(float(lf.detach()))
        losses["grad"].append(info["grad"])
        it += 1
        shown = {
            k: f"{np.mean(losses[k][-20:]):.4f}"
            for k in ("dmd", "fake", "reg", "colour")
            if losses[k]
        }
        bar.set_postfix(**shown)
        bar.update(1)
        if ckpt is not None and (it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            save_checkpoint(ckpt, student, opt_g, fake, opt_f, it, losses, rank)
    bar.close()
    if ckpt is not None:
        save_checkpoint(ckpt, student, opt_g, fake, opt_f, it, losses, rank)
    msd, _ = full_state(student, opt_g)  # gathered on rank 0 only
    seconds = time.perf_counter() - t0
    bundle = plain = None
    if rank == 0:
        plain = copy.deepcopy(base.dit).float()
        plain.load_state_dict(msd)
        plain.eval()
        bundle = replace(
            base, name=f"student-{cfg.steps}step", dit=plain, defaults=defaults, trained=True
        )
        if output is not None:
            bundle.save(output)
            log_meta = {
                "kind": "distilled-student",
                "iterations": it,
                "seconds": round(seconds, 1),
                "processes": world,
                "config": asdict(cfg),
                "losses_first20_last20": {
                    k: [float(np.mean(v[:20])), float(np.mean(v[-20:]))]
                    for k, v in losses.items()
                    if v
                },
            }
            (Path(output) / "distill_log.json").write_text(json.dumps(log_meta, indent=2))
            log(f"saved student {output} after {seconds / 60:.1f} min, {it} iterations")
    return DistillResult(plain, bundle, losses, seconds, it)


def save_checkpoint(
    path: Path,
    student: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    fake: torch.nn.Module,
    opt_f: torch.optim.Optimizer,
    iteration: int,
    losses: dict[str, list[float]],
    rank: int,
) -> None:
    s_msd, s_osd = full_state(student, opt_g)
    f_msd, f_osd = full_state(fake, opt_f)
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "student": s_msd,
            "opt_student": s_osd,
            "fake": f_msd,
            "opt_fake": f_osd,
            "iteration": iteration,
            "losses": losses,
        },
        tmp,
    )
    tmp.replace(path)

"""The streaming generator: one block of video at a time, constant cost per block.

    prepare_block → for step in steps: denoise_step → finish_block → decode

Each block of F latent frames starts from noise and is denoised in S flow-matching Euler steps,
attending to the rolling sink, the last W latent frames of history and itself. Two cache modes:

* ``reencode`` (Self-Forcing): one cache; after the block is clean it is run once more at a
  small context timestep and that pass writes its keys/values.
* ``timestep_forcing`` (Live Avatar): one cache per step; step s writes the block's keys/values
  from its own noisy input into cache s during the step itself, so no extra pass is needed and
  the step can live on its own device (see executors/tpp.py).

The steps are public methods so the multi-device executors can run them on different ranks; the
single-device path is `generate_block`, which just runs them in order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from models.dit import AttentionPlan, CausalWanTransformer, PreparedContext, RotaryEmbedding
from models.errors import ConfigError, InvalidAudioError
from models.kv_cache import KVCache
from pipelines.messages import BlockTimings
from pipelines.noise import BlockNoise
from pipelines.schedule import FlowMatchSchedule

CacheMode = Literal["reencode", "timestep_forcing"]
CACHE_MODES: tuple[str, ...] = ("reencode", "timestep_forcing")


@dataclass(frozen=True)
class PipelineConfig:
    frames_per_block: int = 3  # latent frames per block
    steps: int = 4
    shift: float = 5.0
    window_frames: int = 6  # latent frames of history attended to (a multiple of the block)
    cache_mode: CacheMode = "reencode"
    context_timestep: float = 0.0  # timestep of the clean re-encode and sink passes
    sink: bool = True
    sink_distance: int = 3  # latent frames between the current block's start and the sink
    sink_refresh: bool = False  # replace the sink by the first generated latent frame
    coordinated_noise: bool = False

    def validate(self) -> PipelineConfig:
        if self.frames_per_block < 1:
            raise ConfigError(f"frames_per_block must be positive, got {self.frames_per_block}")
        if self.window_frames < 0 or self.window_frames % self.frames_per_block:
            raise ConfigError(
                f"window_frames ({self.window_frames}) must be a non-negative multiple of "
                f"frames_per_block ({self.frames_per_block})"
            )
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(
                f"unknown cache mode {self.cache_mode!r}; choose one of {', '.join(CACHE_MODES)}"
            )
        FlowMatchSchedule(self.steps, self.shift)  # validates steps and shift
        return self


@dataclass
class BlockInputs:
    """Everything a block's steps need besides the latent; shared by all steps of the block."""

    block_index: int
    start_frame: int
    frame_positions: torch.Tensor
    rope: RotaryEmbedding
    audio_kv: list | None
    noise: torch.Tensor
    video_frames: int


@dataclass
class SessionState:
    """All per-session state in one place: caches, sink, positions, decode cache, noise."""

    session_id: str
    caches: list[KVCache]  # 1 (reencode) or one per step (timestep forcing)
    context: PreparedContext
    noise: BlockNoise
    reference_latent: torch.Tensor  # [1, C, 1, h, w]
    vae_state: Any
    audio_state: Any
    steps: int
    sink_refresh: bool
    cache_mode: CacheMode
    block_index: int = 0
    next_frame: int = 0  # absolute latent-frame index of the next block's first frame

    def cache_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for c in self.caches:
            for t in c.tensors():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamingGenerator:
    """Block-wise causal generation with a rolling sink; one instance serves many sessions."""

    def __init__(
        self,
        model: CausalWanTransformer,
        vae: Any,
        *,
        config: PipelineConfig,
        context: torch.Tensor,
        audio_encoder: Any | None = None,
        fps: float = 25.0,
        height: int = 128,
        width: int = 128,
        audio_sample_rate: int = 16000,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        profile: bool = False,
    ) -> None:
        self.config = config.validate()
        self.model = model
        self.vae = vae
        self.audio_encoder = audio_encoder
        self.fps = float(fps)
        self.height, self.width = int(height), int(width)
        self.audio_sample_rate = int(audio_sample_rate)
        self.device = torch.device(device)
        self.dtype = dtype
        self.profile = profile
        f = vae.spatial_factor
        if self.height % f or self.width % f:
            raise ConfigError(
                f"resolution {self.width}x{self.height} is not divisible by the autoencoder's "
                f"spatial factor {f}"
            )
        self.latent_h, self.latent_w = self.height // f, self.width // f
        self.tokens_per_frame = model.tokens_per_frame(self.latent_h, self.latent_w)
        if model.config.in_channels != vae.latent_channels:
            raise ConfigError(
                f"the transformer takes {model.config.in_channels} latent channels but the "
                f"autoencoder makes {vae.latent_channels}"
            )
        if model.config.audio_layers and audio_encoder is None:
            raise ConfigError("the model has audio layers but no audio encoder was given")
        if (
            audio_encoder is not None
            and model.config.audio_layers
            and audio_encoder.feature_dim != model.config.audio_dim
        ):
            raise ConfigError(
                f"audio encoder makes {audio_encoder.feature_dim}-dim features, the model "
                f"expects audio_dim={model.config.audio_dim}"
            )
        self._context_tokens = context
        self._prepared_context: PreparedContext | None = None
        self._schedules: dict[int, FlowMatchSchedule] = {}

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        profile: bool = False,
        **overrides: Any,
    ) -> StreamingGenerator:
        """Build from a models.registry.ModelBundle; `overrides` replace PipelineConfig fields
        (steps, cache_mode, sink_refresh, ...) or the resolution (height, width)."""
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        d = bundle.defaults
        fields = {f.name for f in dataclasses.fields(PipelineConfig)}
        unknown = set(overrides) - fields - {"height", "width"}
        if unknown:
            raise ConfigError(f"unknown pipeline option(s): {', '.join(sorted(unknown))}")
        base = dict(
            frames_per_block=d.frames_per_block,
            steps=d.steps,
            shift=d.shift,
            window_frames=d.window_frames,
            sink_distance=d.sink_distance,
            context_timestep=d.context_timestep,
        )
        base.update({k: v for k, v in overrides.items() if k in fields and v is not None})
        bundle.to(device, dtype)
        return cls(
            bundle.dit,
            bundle.vae,
            config=PipelineConfig(**base),
            context=bundle.context,
            audio_encoder=bundle.audio_encoder,
            fps=d.fps,
            height=overrides.get("height") or d.height,
            width=overrides.get("width") or d.width,
            audio_sample_rate=d.audio_sample_rate,
            device=device,
            dtype=dtype,
            profile=profile,
        )

    # ---- sessions ------------------------------------------------------------------------
    def schedule(self, steps: int | None = None) -> FlowMatchSchedule:
        steps = steps or self.config.steps
        if steps not in self._schedules:
            self._schedules[steps] = FlowMatchSchedule(steps, self.config.shift)
        return self._schedules[steps]

    def block_video_frames(self, block_index: int) -> int:
        return self.vae.frames_for(self.config.frames_per_block, block_index == 0)

    def block_samples(self, block_index: int) -> int:
        """Audio samples driving block `block_index`, without rounding drift across blocks."""
        start = self._video_frame_start(block_index)
        end = start + self.block_video_frames(block_index)
        sr, fps = self.audio_sample_rate, self.fps
        return round(end * sr / fps) - round(start * sr / fps)

    def _video_frame_start(self, block_index: int) -> int:
        if block_index == 0:
            return 0
        return self.block_video_frames(0) + (block_index - 1) * self.block_video_frames(1)

    def _context(self) -> PreparedContext:
        if self._prepared_context is None:
            with torch.inference_mode():
                ctx = self._context_tokens.to(self.device, self.dtype)
                self._prepared_context = self.model.prepare_context(ctx)
        return self._prepared_context

    def new_session(
        self,
        reference: np.ndarray,
        *,
        session_id: str = "session",
        seed: int = 0,
        steps: int | None = None,
        sink_refresh: bool | None = None,
        cache_mode: CacheMode | None = None,
        cache_steps: Collection[int] | None = None,
    ) -> SessionState:
        """Encode the reference image into the sink and allocate the session's caches.

        cache_steps (timestep forcing): allocate rings only for these steps; the others get a
        zero-length ring (they still share the sink), so a TPP rank that owns one step holds
        one step's cache, not S of them.
        """
        cfg = self.config
        steps = steps or cfg.steps
        self.schedule(steps)  # validates
        mode = cache_mode or cfg.cache_mode
        if mode not in CACHE_MODES:
            raise ConfigError(
                f"unknown cache mode {mode!r}; choose one of {', '.join(CACHE_MODES)}"
            )
        mc = self.model.config
        n_caches = steps if mode == "timestep_forcing" else 1
        owned = set(range(n_caches)) if cache_steps is None else set(cache_steps)

        def window(step: int) -> int:
            return cfg.window_frames if step in owned else 0

        first = KVCache.allocate(
            layers=mc.num_layers,
            batch=1,
            heads=mc.num_attention_heads,
            head_dim=mc.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame,
            window_frames=window(0),
            sink_frames=1,
            frames_per_block=cfg.frames_per_block,
            device=self.device,
            dtype=self.dtype,
        )
        caches = [first]
        for step in range(1, n_caches):  # the sink is shared; each step has its own ring
            shape = (
                *first.keys.shape[:2],
                window(step) * self.tokens_per_frame,
                *first.keys.shape[3:],
            )
            caches.append(
                dataclasses.replace(
                    first,
                    keys=torch.zeros(shape, device=self.device, dtype=self.dtype),
                    values=torch.zeros(shape, device=self.device, dtype=self.dtype),
                    window_frames=window(step),
                )
            )
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(reference)).to(self.device)
            image = image.permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1.0
            ref_latent = self.vae.encode_image(image).to(self.dtype)
        state = SessionState(
            session_id=session_id,
            caches=caches,
            context=self._context(),
            noise=BlockNoise(
                (1, mc.in_channels, cfg.frames_per_block, self.latent_h, self.latent_w),
                seed,
                cfg.coordinated_noise,
            ),
            reference_latent=ref_latent,
            vae_state=self.vae.new_state(),
            audio_state=self.audio_encoder.new_state() if self.audio_encoder is not None else None,
            steps=steps,
            sink_refresh=cfg.sink_refresh if sink_refresh is None else sink_refresh,
            cache_mode=mode,
        )
        if cfg.sink:
            self._store_sink(state, ref_latent)
        return state

    def _store_sink(self, state: SessionState, latent: torch.Tensor) -> None:
        """Run one frame at the context timestep and keep its unrotated keys/values."""
        cache = state.caches[0]
        t = torch.full((1,), self.config.context_timestep, device=self.device)
        with torch.inference_mode():
            self.model(
                latent,
                t,
                state.context,
                frame_positions=torch.zeros(1, dtype=torch.long, device=self.device),
                plan=AttentionPlan(cache=cache, store_sink=True),
            )
        for c in state.caches:
            c.has_sink = True

    def sink_position(self, start_frame: int) -> int | None:
        return start_frame + self.config.sink_distance if self.config.sink else None

    # ---- one block -----------------------------------------------------------------------
    def audio_features(
        self, state: SessionState, audio: np.ndarray, block_index: int
    ) -> list | None:
        if self.audio_encoder is None or not self.model.config.audio_layers:
            return None
        expected = self.block_samples(block_index)
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.shape[0] != expected:
            raise InvalidAudioError(
                f"block {block_index} needs {expected} audio samples at "
                f"{self.audio_sample_rate} Hz, got {audio.shape[0]}"
            )
        feats = self.audio_encoder.encode(
            audio,
            self.block_video_frames(block_index),
            self.config.frames_per_block,
            state.audio_state,
        )
        with torch.inference_mode():
            return self.model.prepare_audio(feats[None].to(self.device, self.dtype))

    def prepare_block(self, state: SessionState, audio: np.ndarray | None) -> BlockInputs:
        F = self.config.frames_per_block
        start = state.next_frame
        positions = torch.arange(start, start + F, device=self.device)
        if audio is None:
            audio = np.zeros(self.block_samples(state.block_index), dtype=np.float32)
        audio_kv = self.audio_features(state, audio, state.block_index)
        return BlockInputs(
            block_index=state.block_index,
            start_frame=start,
            frame_positions=positions,
            rope=self.model.rotary(positions, self.latent_h, self.latent_w),
            audio_kv=audio_kv,
            noise=state.noise.next().to(self.device, self.dtype),
            video_frames=self.block_video_frames(state.block_index),
        )

    def denoise_step(
        self, state: SessionState, inputs: BlockInputs, step: int, latent: torch.Tensor
    ) -> torch.Tensor:
        """One Euler step of the block; in timestep forcing it also writes cache `step`."""
        sched = self.schedule(state.steps)
        tf = state.cache_mode == "timestep_forcing"
        cache = state.caches[step] if tf else state.caches[0]
        plan = AttentionPlan(
            cache=cache,
            read_history=True,
            sink_position=self.sink_position(inputs.start_frame),
            write_start=inputs.start_frame if tf else None,
        )
        t = torch.full((1,), sched.timesteps[step], device=self.device)
        with torch.inference_mode():
            v = self.model(
                latent,
                t,
                state.context,
                frame_positions=inputs.frame_positions,
                audio=inputs.audio_kv,
                plan=plan,
                rope=inputs.rope,
            )
            out = sched.euler(latent, v, step)
        if tf:
            cache.advance(self.config.frames_per_block)
        return out

    def finish_block(self, state: SessionState, inputs: BlockInputs, clean: torch.Tensor) -> None:
        """Write the clean block into the cache (re-encode mode), refresh the sink, advance."""
        if state.cache_mode == "reencode":
            cache = state.caches[0]
            t = torch.full((1,), self.config.context_timestep, device=self.device)
            with torch.inference_mode():
                self.model(
                    clean,
                    t,
                    state.context,
                    frame_positions=inputs.frame_positions,
                    audio=inputs.audio_kv,
                    plan=AttentionPlan(
                        cache=cache,
                        read_history=True,
                        sink_position=self.sink_position(inputs.start_frame),
                        write_start=inputs.start_frame,
                    ),
                    rope=inputs.rope,
                )
            cache.advance(self.config.frames_per_block)
        if state.sink_refresh and inputs.block_index == 0 and self.config.sink:
            self._store_sink(state, clean[:, :, :1])
        state.block_index += 1
        state.next_frame += self.config.frames_per_block

    def decode(self, state: SessionState, clean: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            video = self.vae.decode_block(clean, state.vae_state)
            frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()

    def generate_block(
        self, state: SessionState, audio: np.ndarray | None
    ) -> tuple[np.ndarray, BlockTimings]:
        """Denoise, cache and decode the session's next block; returns uint8 [N, H, W, 3]."""
        timings = BlockTimings()
        clock = time.perf_counter
        sync = (lambda: _sync(self.device)) if self.profile else (lambda: None)
        t0 = clock()
        inputs = self.prepare_block(state, audio)
        sync()
        t1 = clock()
        timings.features = t1 - t0
        x = inputs.noise
        for step in range(state.steps):
            ts = clock()
            x = self.denoise_step(state, inputs, step, x)
            sync()
            timings.denoise_steps.append(clock() - ts)
        t2 = clock()
        timings.denoise = t2 - t1
        self.finish_block(state, inputs, x)
        sync()
        t3 = clock()
        timings.cache_update = t3 - t2
        frames = self.decode(state, x)
        t4 = clock()
        timings.decode = t4 - t3
        timings.total = t4 - t0
        return frames, timings

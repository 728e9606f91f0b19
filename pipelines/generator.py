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

Inside a block nothing waits for the device until its frames leave for the video encoder
(`decode`'s copy to the host): inputs made on the host (noise, audio features) are copied
non-blocking from pinned memory, positions live in tensors made on the device, and every Python
number the loop needs (timesteps, ring positions, fill levels) is known on the host already.
With `compile`, each transformer forward of a block (every denoise step, and the re-encode pass
that writes the cache) runs as a torch.compile'd graph of static shapes; the ring slots it
writes and the sink's rotation are tensors, so after the ring has filled no block recompiles
(see compile_mode for CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from models.dit import AttentionPlan, CausalWanTransformer, PreparedContext, RotaryEmbedding
from models.errors import ConfigError, InvalidAudioError
from models.kv_cache import KVCache
from models.quant import check_quant, quantize_fp8
from models.transfer import to_device
from pipelines.messages import BlockTimings
from pipelines.noise import BlockNoise, ClipNoise
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
    # Live Avatar draws the distance uniformly in [sink_distance, sink_distance_max] at every
    # forward (here from the session seed, the block and the step, so every executor agrees)
    # and never puts the sink before sink_min_position.
    sink_distance_max: int | None = None
    sink_min_position: int = 0
    sink_refresh: bool = False  # replace the sink by the first generated latent frame
    sink_refresh_block: int = 1  # the first block that attends to the refreshed sink
    coordinated_noise: bool = False
    noise_clip_blocks: int = 0  # >0: Live Avatar's per-clip noise (ClipNoise) of this many blocks
    schedule_spacing: str = "shifted"  # or "diffusers" (FlowMatchEulerDiscreteScheduler's)

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
        if self.sink_distance_max is not None and self.sink_distance_max < self.sink_distance:
            raise ConfigError(
                f"sink_distance_max ({self.sink_distance_max}) is below sink_distance "
                f"({self.sink_distance})"
            )
        if self.sink_refresh_block < 1:
            raise ConfigError(
                f"sink_refresh_block must be at least 1, got {self.sink_refresh_block}"
            )
        FlowMatchSchedule(self.steps, self.shift, spacing=self.schedule_spacing)  # validates
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
    noise: BlockNoise | ClipNoise
    reference_latent: Any  # [1, C, 1, h, w], or the model's own sink source (S2VReference)
    vae_state: Any
    audio_state: Any
    steps: int
    sink_refresh: bool
    cache_mode: CacheMode
    seed: int = 0
    block_index: int = 0
    next_frame: int = 0  # absolute latent-frame index of the next block's first frame
    pending_sink: torch.Tensor | None = None  # block 0's first clean frame, until refresh time

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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str, device: torch.device) -> str | None:
    """torch.compile's mode for `compile` on `device`, None for eager. True picks
    "reduce-overhead" (CUDA graphs: one launch per forward instead of hundreds of kernels) on
    a GPU and "default" on the CPU, where CUDA graphs do not exist."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    if compile not in COMPILE_MODES:
        raise ConfigError(
            f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}"
        )
    return str(compile)


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
        compile: bool | str = False,
        quant: str | None = None,
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
        self._prompt_contexts: OrderedDict[str, PreparedContext] = OrderedDict()
        self.prompt_encoder: Any | None = None  # PromptEncoder: sessions may bring a prompt
        self._schedules: dict[int, FlowMatchSchedule] = {}
        # FP8 first (it swaps the linears' weights), then compile what is left to run.
        self.quant = check_quant(quant)
        self.fp8_layers = quantize_fp8(model, self.quant, self.device)
        self.compile_mode = compile_mode(compile, self.device)
        self._forward: Any = model
        if self.compile_mode is not None:
            # dynamic=False: every shape is static (the ring is preallocated, positions are
            # tensors), so a shape that changes is a bug to see, not a graph to generalise.
            self._forward = torch.compile(model, mode=self.compile_mode, dynamic=False)
            # Graphs per forward: with and without the cache write, at each fill level of the
            # ring until it is full (0, F, 2F, ... frames); room for all of them.
            fills = self.config.window_frames // self.config.frames_per_block + 1
            limit = max(torch._dynamo.config.recompile_limit, 2 * fills + 2)
            torch._dynamo.config.recompile_limit = limit

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
        unknown = set(overrides) - fields - {"height", "width", "compile", "quant"}
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
        base.update(getattr(d, "pipeline", None) or {})  # model-specific pipeline settings
        base.update({k: v for k, v in overrides.items() if k in fields and v is not None})
        bundle.to(device, dtype)
        gen = cls(
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
            compile=overrides.get("compile") or False,
            quant=overrides.get("quant"),
        )
        gen.prompt_encoder = getattr(bundle, "text_encoder", None)
        return gen

    # ---- sessions ------------------------------------------------------------------------
    def schedule(self, steps: int | None = None) -> FlowMatchSchedule:
        steps = steps or self.config.steps
        if steps not in self._schedules:
            sched = FlowMatchSchedule(
                steps, self.config.shift, spacing=self.config.schedule_spacing
            )
            _ = sched.timesteps  # the levels as Python floats now, not inside a block
            self._schedules[steps] = sched
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

    PROMPT_CACHE = 8  # prepared prompts kept per generator (each is every layer's K/V)

    def prompt_tokens(self, prompt: str) -> torch.Tensor:
        """A prompt's embeddings [1, L, text_dim] from the model's prompt encoder."""
        if self.prompt_encoder is None:
            raise ConfigError(
                "this model takes no text prompt (it has no text encoder); leave the prompt out"
            )
        return self.prompt_encoder.encode(prompt)

    def context_for(
        self, prompt: str | None = None, tokens: torch.Tensor | None = None
    ) -> PreparedContext:
        """Cross-attention keys/values of a session's prompt: the model's default context when
        no prompt is given, else computed once per distinct prompt (`tokens` when another rank
        already encoded it) and kept in a small LRU."""
        if prompt is None:
            return self._context()
        cached = self._prompt_contexts.get(prompt)
        if cached is not None:
            self._prompt_contexts.move_to_end(prompt)
            return cached
        if tokens is None:
            tokens = self.prompt_tokens(prompt)
        with torch.inference_mode():
            prepared = self.model.prepare_context(tokens.to(self.device, self.dtype))
        self._prompt_contexts[prompt] = prepared
        while len(self._prompt_contexts) > self.PROMPT_CACHE:
            self._prompt_contexts.popitem(last=False)
        return prepared

    @property
    def can_encode(self) -> bool:
        """False on a pipeline rank that holds no VAE (it gets the encoded reference instead)."""
        return hasattr(self.vae, "encode_reference") or hasattr(self.vae, "encode_image")

    def new_session(
        self,
        reference: np.ndarray | None,
        *,
        session_id: str = "session",
        seed: int = 0,
        steps: int | None = None,
        sink_refresh: bool | None = None,
        cache_mode: CacheMode | None = None,
        cache_steps: Collection[int] | None = None,
        prompt: str | None = None,
        prompt_tokens: torch.Tensor | None = None,
        source: Any | None = None,
    ) -> SessionState:
        """Encode the reference image into the sink and allocate the session's caches.

        cache_steps (timestep forcing): allocate rings only for these steps; the others get a
        zero-length ring (they still share the sink), so a TPP rank that owns one step holds
        one step's cache, not S of them. source: the already encoded reference (a rank without
        a VAE gets it from the decode rank); with neither, the sink waits for `set_source`.
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

        context = self.context_for(prompt, prompt_tokens)  # first: a bad prompt fails early
        sink_tokens = getattr(self.model, "sink_tokens", None)
        first = KVCache.allocate(
            layers=mc.num_layers,
            batch=1,
            heads=mc.num_attention_heads,
            head_dim=mc.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame,
            window_frames=window(0),
            sink_frames=1,
            sink_tokens=sink_tokens(self.latent_h, self.latent_w) if sink_tokens else None,
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
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            # CUDA graphs read and write the rings in place: static addresses, not inputs to
            # copy in at every replay (guard=False: another session's rings re-record, no
            # recompile).
            for c in caches:
                for t in c.tensors():
                    torch._dynamo.mark_static_address(t, guard=False)
        if source is None and reference is not None and self.can_encode:
            source = self.encode_reference(reference)
        state = SessionState(
            session_id=session_id,
            caches=caches,
            context=context,
            noise=self._noise(seed),
            reference_latent=source,
            vae_state=self.new_decode_state(source) if self.can_encode else None,
            audio_state=self.audio_encoder.new_state() if self.audio_encoder is not None else None,
            steps=steps,
            sink_refresh=cfg.sink_refresh if sink_refresh is None else sink_refresh,
            cache_mode=mode,
            seed=int(seed),
        )
        if cfg.sink and source is not None:
            self._store_sink(state, source)
        return state

    def source_from_message(self, tensors: dict[str, torch.Tensor]) -> Any:
        """The reference as the decode rank sent it (see Executor 'reference' messages)."""
        make = getattr(self.model, "source_from_message", None)
        source = make(tensors) if make is not None else tensors["reference"]
        return source.to(self.device, self.dtype)

    def set_source(self, state: SessionState, source: Any) -> None:
        """The encoded reference of a session opened without one: store its sink now."""
        state.reference_latent = source
        if self.config.sink:
            self._store_sink(state, source)

    def encode_reference(self, reference: np.ndarray) -> Any:
        """The reference image (uint8 [H, W, 3]) -> what the sink is made of: one latent frame,
        or the model's own source (Live Avatar's VAE also encodes motion latents)."""
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(reference)).to(self.device)
            image = image.permute(2, 0, 1)[None].to(self.dtype) / 127.5 - 1.0
            if hasattr(self.vae, "encode_reference"):
                return self.vae.encode_reference(image).to(self.device, self.dtype)
            return self.vae.encode_image(image).to(self.dtype)

    def new_decode_state(self, source: Any) -> Any:
        """A session's decode cache; Live Avatar's VAE primes it from the reference."""
        if hasattr(self.vae, "encode_reference"):
            with torch.inference_mode():
                return self.vae.new_state(source)
        return self.vae.new_state()

    def _noise(self, seed: int) -> BlockNoise | ClipNoise:
        cfg = self.config
        shape = (
            1,
            self.model.config.in_channels,
            cfg.frames_per_block,
            self.latent_h,
            self.latent_w,
        )
        if cfg.noise_clip_blocks > 0:
            return ClipNoise(shape, seed, cfg.noise_clip_blocks, self.device, self.dtype)
        return BlockNoise(shape, seed, cfg.coordinated_noise)

    def _store_sink(self, state: SessionState, source: Any) -> None:
        """Run the sink's tokens once (at the context timestep) and keep their unrotated
        keys/values; a model with its own sink pass (Live Avatar) runs that instead."""
        cache = state.caches[0]
        plan = AttentionPlan(cache=cache, store_sink=True)
        with torch.inference_mode():
            if hasattr(self.model, "sink_forward"):
                self.model.sink_forward(source, state.context, plan)
            else:
                t = torch.full((1,), self.config.context_timestep, device=self.device)
                self.model(
                    source,
                    t,
                    state.context,
                    frame_positions=torch.zeros(1, dtype=torch.long, device=self.device),
                    plan=plan,
                )
        for c in state.caches:
            c.has_sink = True

    def sink_position(self, start_frame: int, state: SessionState | None = None, step: int = 0):
        """Temporal position of the sink for one forward of the block starting at start_frame."""
        cfg = self.config
        if not cfg.sink:
            return None
        distance = cfg.sink_distance
        if cfg.sink_distance_max is not None and cfg.sink_distance_max > cfg.sink_distance:
            seed = state.seed if state is not None else 0
            rng = np.random.default_rng([seed, start_frame, step])
            distance = int(rng.integers(cfg.sink_distance, cfg.sink_distance_max + 1))
        return max(cfg.sink_min_position, start_frame + distance)

    def refresh_sink(self, state: SessionState) -> None:
        """Replace the sink by block 0's first clean frame (kept in state.pending_sink)."""
        frame, state.pending_sink = state.pending_sink, None
        source = state.reference_latent
        source = source.with_reference(frame) if hasattr(source, "with_reference") else frame
        state.reference_latent = source
        self._store_sink(state, source)

    # ---- one block -----------------------------------------------------------------------
    def audio_features(
        self, state: SessionState, audio: np.ndarray, block_index: int
    ) -> list | None:
        if not self.model.config.audio_layers:
            return None
        if self.audio_encoder is None:
            raise ConfigError("the model has audio layers but no audio encoder was loaded")
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
            return self.model.prepare_audio(to_device(feats[None], self.device, self.dtype))

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
            noise=to_device(state.noise.next(), self.device, self.dtype),
            video_frames=self.block_video_frames(state.block_index),
        )

    def sink_rope(self, start_frame: int, state: SessionState, step: int = 0):
        """The sink's rotation for one forward (None without a sink), made outside the
        transformer so that a compiled forward takes it as data."""
        position = self.sink_position(start_frame, state, step)
        if position is None:
            return None
        return self.model.sink_rotary(position, self.latent_h, self.latent_w, self.device)

    def block_forward(
        self,
        state: SessionState,
        inputs: BlockInputs,
        latent: torch.Tensor,
        timestep: float,
        cache: KVCache,
        *,
        write: bool,
        step: int = 0,
    ) -> torch.Tensor:
        """One transformer forward of the block over the sink, the ring and itself, writing the
        block's keys/values into `cache` when `write`: the unit that is compiled. Its positions
        (ring slots, the sink's rotation) arrive as tensors, its numbers (timestep) as a
        tensor made on the device."""
        plan = AttentionPlan(
            cache=cache,
            read_history=True,
            write_index=(
                cache.ring_index(inputs.start_frame, self.config.frames_per_block, self.device)
                if write
                else None
            ),
        )
        if not latent.is_inference():
            # The noise and a latent received from another rank are ordinary tensors, every
            # later step's input an inference tensor: one kind, or a compiled step compiles
            # twice.
            latent = latent.clone()
        t = torch.full((1,), timestep, device=self.device)
        return self._forward(
            latent,
            t,
            state.context,
            audio=inputs.audio_kv,
            plan=plan,
            rope=inputs.rope,
            sink_rope=self.sink_rope(inputs.start_frame, state, step),
        )

    def denoise_step(
        self, state: SessionState, inputs: BlockInputs, step: int, latent: torch.Tensor
    ) -> torch.Tensor:
        """One Euler step of the block; in timestep forcing it also writes cache `step`."""
        sched = self.schedule(state.steps)
        tf = state.cache_mode == "timestep_forcing"
        cache = state.caches[step] if tf else state.caches[0]
        with torch.inference_mode():
            v = self.block_forward(
                state, inputs, latent, sched.timesteps[step], cache, write=tf, step=step
            )
            out = sched.euler(latent, v, step)
        if tf:
            cache.advance(self.config.frames_per_block)
        return out

    def finish_block(
        self, state: SessionState, inputs: BlockInputs, clean: torch.Tensor | None
    ) -> None:
        """Write the clean block into the cache (re-encode mode), keep block 0's first frame for
        the sink refresh, advance, and refresh the sink once the refresh block is next. `clean`
        is None on a TPP rank that never sees the clean latent (timestep forcing only)."""
        if clean is None:
            if state.cache_mode == "reencode":
                raise ConfigError("re-encode mode needs the clean block to finish it")
        elif state.cache_mode == "reencode":
            cache = state.caches[0]
            with torch.inference_mode():
                self.block_forward(
                    state, inputs, clean, self.config.context_timestep, cache, write=True
                )
            cache.advance(self.config.frames_per_block)
        if (
            state.sink_refresh
            and inputs.block_index == 0
            and self.config.sink
            and clean is not None
        ):
            state.pending_sink = clean[:, :, :1]
        state.block_index += 1
        state.next_frame += self.config.frames_per_block
        if state.pending_sink is not None and state.block_index >= self.config.sink_refresh_block:
            self.refresh_sink(state)

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

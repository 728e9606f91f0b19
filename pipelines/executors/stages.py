"""Pieces every multi-device worker shares: loading its part of the model, block conditions
computed once and shipped, and the decode rank (the last worker of both strategies).

The generator's own `prepare_block` computes audio features and projects them for every layer
in one go. Across ranks those two halves separate: the first rank encodes the audio window once
(the encoder is stateful per session, so it must run in one place, in order), the tokens travel
with the latent, and each rank projects them for the layers it runs. `encode_audio` and
`block_inputs` are exactly those two halves, so a block's conditions are bit-identical to the
single-process engine's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from models.errors import ConfigError, DiffstreamError, InvalidAudioError
from models.transfer import to_device
from pipelines.executors.launch import WorkerContext
from pipelines.executors.wire import LinkError, Message
from pipelines.generator import BlockInputs, PipelineConfig, StreamingGenerator

log = logging.getLogger(__name__)

EXECUTOR_OPTIONS = (
    "timeout_s",
    "startup_timeout_s",
    "heartbeat_s",
    "max_inflight",
    "max_restarts",
    "threads",
    "verbose",
    "keep_latents",
    "cpu_affinity",
)
# Options of the model's loading (models.registry.LOAD_OPTIONS: lora, lora_mode, ...); they
# travel to the workers with the pipeline options and each worker loads with them.
MODEL_OPTIONS = ("lora", "lora_mode", "lora_alpha", "text_encoder", "audio_context_frames")
PIPELINE_OPTIONS = (
    tuple(f.name for f in dataclasses.fields(PipelineConfig))
    + ("height", "width", "dtype", "compile", "quant")
    + MODEL_OPTIONS
)


def check_model(model: str) -> None:
    """A model that cannot exist fails here, once, instead of in every worker."""
    from models.errors import ModelNotFoundError
    from models.registry import NAMES, model_exists

    if not model_exists(model):
        raise ModelNotFoundError(
            f"model {model!r} is neither a known name ({', '.join(NAMES)}) nor an existing folder"
        )


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(executor options, pipeline overrides); unknown names are a ConfigError up front, before
    any process starts, rather than a traceback from every worker."""
    options = dict(options)
    if "max_queue" in options:  # the local executor's name for the same bound
        options.setdefault("max_inflight", options.pop("max_queue"))
    unknown = set(options) - set(EXECUTOR_OPTIONS) - set(PIPELINE_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown executor option(s): {', '.join(sorted(unknown))}; pipeline options are "
            f"{', '.join(PIPELINE_OPTIONS)}"
        )
    executor = {k: v for k, v in options.items() if k in EXECUTOR_OPTIONS}
    pipeline = {k: v for k, v in options.items() if k in PIPELINE_OPTIONS and v is not None}
    dtype = pipeline.get("dtype")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype (try float32 or bfloat16)")
    return executor, pipeline


def model_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in MODEL_OPTIONS and v is not None}


def load_bundle(
    ctx: WorkerContext, parts: tuple[str, ...] | None = None, layers: range | None = None
) -> Any:
    """This rank's share of the model, loaded straight onto its device where the model allows
    (Live Avatar: only `parts`, only `layers`; the small models load whole on the CPU)."""
    from models.registry import load_model

    return load_model(
        ctx.spec.model,
        device=ctx.device,
        dtype=ctx.dtype,
        parts=parts,
        layers=layers,
        **model_options(ctx.spec.options),
    )


def load_generator(
    ctx: WorkerContext,
    bundle: Any | None = None,
    parts: tuple[str, ...] | None = None,
    **fixed: Any,
) -> StreamingGenerator:
    """This rank's generator on its device (the whole transformer: a TPP step needs every
    layer; `parts` leaves out what the rank does not run, e.g. the VAE)."""
    from pipelines.executors.local import model_info

    bundle = bundle or load_bundle(ctx, parts)
    overrides = {
        k: v
        for k, v in ctx.spec.options.items()
        if k in PIPELINE_OPTIONS and k != "dtype" and k not in MODEL_OPTIONS
    }
    overrides.update(fixed)
    gen = StreamingGenerator.from_bundle(bundle, device=ctx.device, dtype=ctx.dtype, **overrides)
    ctx.model_info = {"info": asdict(model_info(gen, bundle.name))}
    return gen


def held_params(*parts: Any) -> dict[str, int]:
    """Parameters this rank holds, by part (a generator counts as its transformer, VAE, audio
    and prompt encoders): what a test reads to see that a rank loaded only its share."""

    def count(module: Any) -> int:
        if isinstance(module, torch.nn.Module):
            return sum(p.numel() for p in module.parameters())
        inner = getattr(module, "inner", None) or getattr(module, "vae", None)
        inner = inner or getattr(module, "_model", None)
        return count(inner) if inner is not None and inner is not module else 0

    out: dict[str, int] = {}
    for part in parts:
        if isinstance(part, StreamingGenerator):
            out["transformer"] = count(part.model)
            out["vae"] = count(part.vae)
            out["audio"] = count(part.audio_encoder)
            out["text"] = count(part.prompt_encoder)
        else:
            out["vae"] = count(part)
    return out


def load_decoder(ctx: WorkerContext) -> Any:
    """The decode rank holds only the autoencoder, never the transformer."""
    bundle = load_bundle(ctx, parts=("vae",))
    vae = bundle.vae
    bundle.dit = None  # let the transformer's weights go before anything reaches the device
    if isinstance(vae, torch.nn.Module) or hasattr(vae, "to"):
        vae.to(device=ctx.device, dtype=ctx.dtype)
    return vae


def encode_audio(
    gen: StreamingGenerator, state: Any, audio: np.ndarray | None, block_index: int
) -> torch.Tensor | None:
    """A block's audio tokens [1, F, A, D] on the device (None when the model has no audio).
    Mirrors StreamingGenerator.audio_features up to (not including) the per-layer projection."""
    if gen.audio_encoder is None or not gen.model.config.audio_layers:
        return None
    expected = gen.block_samples(block_index)
    if audio is None:
        audio = np.zeros(expected, dtype=np.float32)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.shape[0] != expected:
        raise InvalidAudioError(
            f"block {block_index} needs {expected} audio samples at "
            f"{gen.audio_sample_rate} Hz, got {audio.shape[0]}"
        )
    feats = gen.audio_encoder.encode(
        audio, gen.block_video_frames(block_index), gen.config.frames_per_block, state.audio_state
    )
    return to_device(feats[None], gen.device, gen.dtype)


def block_inputs(
    gen: StreamingGenerator,
    block_index: int,
    start_frame: int,
    features: torch.Tensor | None,
    noise: torch.Tensor,
) -> BlockInputs:
    """The BlockInputs prepare_block would have built, from shipped tokens (any rank)."""
    f = gen.config.frames_per_block
    positions = torch.arange(start_frame, start_frame + f, device=gen.device)
    audio_kv = None
    if features is not None:
        with torch.inference_mode():
            audio_kv = gen.model.prepare_audio(features)
    return BlockInputs(
        block_index=block_index,
        start_frame=start_frame,
        frame_positions=positions,
        rope=gen.model.rotary(positions, gen.latent_h, gen.latent_w),
        audio_kv=audio_kv,
        noise=noise,
        video_frames=gen.block_video_frames(block_index),
    )


def error_message(
    session_id: str,
    block_index: int | None,
    exc: BaseException | str,
    *,
    drop: bool,
    what: str = "block",
) -> Message:
    """An in-band error: it travels the rest of the pipeline (each rank drops the session when
    `drop`) and the decode rank turns it into the block's or the open's answer."""
    text = str(exc)
    kind = type(exc).__name__ if isinstance(exc, DiffstreamError) else "ExecutorError"
    return Message(
        "error",
        {
            "session_id": session_id,
            "block_index": block_index,
            "error": text,
            "error_type": kind,
            "drop": drop,
            "what": what,
        },
    )


def guarded(rank: int, msg: Message, handler: Any, drop: Any, send: Any) -> None:
    """Run one session's message handler so that an unexpected error (a bug, an input no check
    anticipated, CUDA out of memory) ends that session only: the rank drops it and sends an
    in-band error on, as the local executor fails one block and keeps serving. A broken link
    is not the session's fault and still ends the worker."""
    try:
        handler(msg)
    except LinkError:
        raise
    except Exception as exc:
        sid = msg.meta.get("session_id")
        if sid is None:
            raise
        log.exception("rank %d: %s of session %s failed", rank, msg.kind, sid)
        drop(sid)
        opening = msg.kind == "open" or msg.meta.get("what") == "open"
        send(
            error_message(
                sid,
                msg.meta.get("block_index"),
                f"internal error on worker rank {rank}: {type(exc).__name__}: {exc}",
                drop=True,
                what="open" if opening else "block",
            )
        )


def new_decode_state(
    vae: Any, reference: np.ndarray | None, ctx: WorkerContext
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A session's decode cache on the decode rank, and what the denoise ranks need of the
    reference when they hold no VAE: Live Avatar's VAE encodes the reference here (the only
    rank with a VAE), primes its decoder with it, and the latents go back through the driver
    (the 'reference' message) to the ranks that build the sink from them."""
    if not getattr(vae, "needs_reference", False):
        return vae.new_state(), {}
    if reference is None:
        raise ConfigError("this model's decoder needs the reference image to open a session")
    with torch.inference_mode():
        image = torch.from_numpy(np.ascontiguousarray(reference)).to(ctx.device)
        image = image.permute(2, 0, 1)[None].to(ctx.dtype) / 127.5 - 1.0
        source = vae.encode_reference(image)
        state = vae.new_state(source)
    return state, source.to_message()


def run_decoder(ctx: WorkerContext, vae: Any) -> int:
    """The last worker: streaming VAE decode of clean latents, frames back to the driver."""
    import time

    inbound = ctx.link_in()
    to_driver = ctx.link_out()
    ctx.listen(inbound, "up")
    states: dict[str, Any] = {}
    keep_latents = bool(ctx.spec.options.get("keep_latents"))
    while True:
        got = ctx.next_message()
        if got is None:
            continue
        _, msg = got
        m = msg.meta
        kind = msg.kind
        if kind == "block":
            start = time.perf_counter()
            sid = m["session_id"]
            state = states.get(sid)
            timings = dict(m.get("timings", {}))
            reply: dict[str, Any] = {"session_id": sid, "block_index": m["block_index"]}
            if state is None:
                reply["error"] = f"session {sid!r} is not open on the decode rank"
            else:
                try:
                    with torch.inference_mode():
                        video = vae.decode_block(msg.tensors["latent"], state)
                        reply["frames"] = vae.to_uint8(video)
                    if keep_latents:  # a debugging tap: equivalence tests compare latents
                        reply["latent"] = msg.tensors["latent"].float().cpu().numpy()
                except DiffstreamError as exc:
                    states.pop(sid, None)
                    reply.update(error=str(exc), error_kind="session")
                end = time.perf_counter()
                timings["decode"] = end - start
                timings["total"] = end - m.get("started", start)
            reply["timings"] = timings
            to_driver.send(Message("result", reply))
            ctx.record("decode", sid, m["block_index"], start)
        elif kind == "open":
            sid = m["session_id"]
            try:
                states[sid], tensors = new_decode_state(vae, m.get("reference"), ctx)
            except DiffstreamError as exc:
                meta = {"session_id": sid, "error": str(exc), "error_type": type(exc).__name__}
                to_driver.send(Message("opened", meta))
                continue
            to_driver.send(Message("opened", {"session_id": sid}, tensors))
        elif kind == "error":
            if m.get("drop"):
                states.pop(m["session_id"], None)
            if m.get("what") == "open":
                to_driver.send(Message("opened", m))
            else:
                err_kind = (
                    "session"
                    if m.get("error_type") not in ("ExecutorError", "") and m.get("drop")
                    else ""
                )
                to_driver.send(
                    Message(
                        "result",
                        {
                            "session_id": m["session_id"],
                            "block_index": m["block_index"],
                            "error": m["error"],
                            "error_kind": err_kind,
                            "dropped": bool(m.get("drop")),
                        },
                    )
                )
        elif kind == "close":
            states.pop(m["session_id"], None)
        elif kind == "ping":
            to_driver.send(Message("pong", m))
        elif kind == "stats":
            ranks = [
                *m["ranks"],
                dict(
                    ctx.stats(m.get("events", True)),
                    role="decode",
                    sessions=len(states),
                    params=held_params(vae),
                ),
            ]
            to_driver.send(Message("stats", {"request": m["request"], "ranks": ranks}))
        elif kind == "stop":
            to_driver.send(Message("stop"))
            return 0
        else:
            raise LinkError(f"decode rank: unexpected message {kind!r}")

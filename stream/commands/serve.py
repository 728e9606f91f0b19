"""`diffstream serve`: start the real-time service on the embedded default model.

Flags override DIFFSTREAM_* environment variables, which override the defaults; both end up in
one `Settings`, so `serve --max-sessions 2` and `DIFFSTREAM_MAX_SESSIONS=2 serve` are the same.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

# Flag name → settings field; every flag defaults to None so the environment can fill it.
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "interface to listen on (default 127.0.0.1; 0.0.0.0 for all)"),
    ("--port", "port", int, "TCP port (default 8000)"),
    (
        "--replica-id",
        "replica_id",
        str,
        "this replica's id behind a load balancer: its session ids start with it (r1-<hex>); "
        "auto: the host name (docs/service.md, Scaling out)",
    ),
    ("--model", "model", str, "model name or path (default: the embedded default model)"),
    (
        "--lora",
        "lora",
        Path,
        "LoRA folder merged into the model (Live Avatar's liveavatar.safetensors)",
    ),
    ("--lora-mode", "lora_mode", str, "merged (default) or unmerged"),
    ("--prompt", "prompt", str, "default text prompt of every session (Live Avatar)"),
    ("--text-encoder", "text_encoder", str, "keep (default), cpu, offload or free"),
    ("--audio-context", "audio_context_frames", int, "video frames of left audio context"),
    ("--executor", "executor", str, "local, tpp or dualparal (default local)"),
    ("--devices", "devices", str, "cpu, cuda, cuda:0,cuda:1, cpu:N or auto (default cpu)"),
    ("--steps", "steps", int, "denoising steps per block (default: the model's)"),
    ("--shift", "shift", float, "the denoising schedule's shift (default: the model's)"),
    (
        "--cache-mode",
        "cache_mode",
        str,
        "reencode or timestep_forcing: the local executor's KV cache (default: the model's)",
    ),
    ("--block-frames", "block_frames", int, "latent frames per block (default: the model's)"),
    ("--height", "height", int, "video height (default: the model's)"),
    ("--width", "width", int, "video width (default: the model's)"),
    ("--threads", "threads", int, "torch CPU threads (default: all cores but one)"),
    ("--quant", "quant", str, "none (default), fp8 or fp8-weight: FP8 linears (Ada/Hopper GPUs)"),
    ("--max-sessions", "max_sessions", int, "concurrent sessions before refusing (default 4)"),
    ("--auth-token", "auth_token", str, "require this bearer token on the API"),
    ("--recording-dir", "recording_dir", Path, "write each session to an MP4 here"),
    ("--degrade", "degrade", str, "drop (default) or none: what to do when behind real time"),
    ("--max-message-bytes", "max_message_bytes", int, "largest websocket message (default 1 MiB)"),
    ("--idle-timeout", "idle_timeout_s", float, "end sessions with no viewer and no audio after"),
    ("--viewer-timeout", "viewer_timeout_s", float, "end sessions whose viewer went silent after"),
    (
        "--idle-no-viewer-seconds",
        "idle_no_viewer_s",
        float,
        "end sessions that never got a viewer nor an audio socket after (default 10)",
    ),
    (
        "--max-sessions-per-client",
        "max_sessions_per_client",
        int,
        "sessions one client (its token, else its address) may hold (default 2)",
    ),
    (
        "--session-rate",
        "session_rate",
        float,
        "sessions one client may create per minute (default 60; 0: no limit)",
    ),
    (
        "--session-burst",
        "session_burst",
        int,
        "sessions one client may create at once before --session-rate applies (default 20)",
    ),
    (
        "--drain-seconds",
        "drain_s",
        float,
        "on SIGTERM, let running sessions play out for up to this long, then exit (default 30)",
    ),
    ("--turn-username", "turn_username", str, "username for the TURN servers"),
    ("--turn-password", "turn_password", str, "password for the TURN servers"),
    (
        "--turn-secret",
        "turn_secret",
        str,
        "coturn's static-auth-secret (use-auth-secret): short-lived TURN credentials per "
        "session instead of --turn-username/--turn-password",
    ),
    (
        "--turn-ttl-seconds",
        "turn_ttl_s",
        int,
        "how long a session's TURN credentials work, from its creation (default 3600)",
    ),
    ("--log-level", "log_level", str, "debug, info, warning or error"),
]
_LISTS: list[tuple[str, str, str]] = [
    ("--stun", "stun_servers", "STUN server URL, e.g. stun:stun.l.google.com:19302 (repeatable)"),
    ("--turn", "turn_servers", "TURN server URL, e.g. turn:turn.example.com:3478 (repeatable)"),
    ("--allowed-origin", "allowed_origins", "origin allowed to call the API (repeatable)"),
]


_SWITCHES: list[tuple[str, str, str]] = [
    (
        "--compile",
        "compile",
        "torch.compile the block step and warm it up before listening (default; "
        "--no-compile: eager, no compile time at start-up)",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; unset flags fall back to DIFFSTREAM_* variables."""
    for flag, dest, kind, help_text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)
    for flag, dest, help_text in _SWITCHES:
        parser.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    for flag, dest, help_text in _LISTS:
        parser.add_argument(flag, dest=dest, action="append", default=None, help=help_text)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment with the flags that were given on top."""
    from stream.settings import load_settings

    names = [dest for _, dest, _, _ in _FLAGS] + [dest for _, dest, _ in _LISTS + _SWITCHES]
    return load_settings(**{name: getattr(args, name, None) for name in names})


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from stream.app import load_engine
    from stream.server import build_server

    # Load before the server starts: a model that cannot load is a one-line error (exit 2).
    executor = load_engine(settings)
    server = build_server(settings, executor)
    try:
        server.run()
    finally:
        executor.close()  # idempotent; the app already closed it unless startup failed
    return 0 if server.started else 1

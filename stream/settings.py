"""Every knob of the service in one validated object, read from DIFFSTREAM_* variables and flags.

The app factory takes a `Settings` and nothing else, so a test, the CLI and a container build
identical services from different sources; nothing is read from the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.errors import ConfigError
from stream.protocol import MAX_SIDE, MIN_SIDE
from stream.replicas import check_replica_id, derived_replica_id

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Configuration of one `diffstream serve` process (env prefix DIFFSTREAM_)."""

    model_config = SettingsConfigDict(env_prefix="DIFFSTREAM_", extra="ignore")

    # Network.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replica_id: str | None = Field(
        None,
        description="this replica's id, the prefix of its session ids (r1-<hex>) that a load "
        "balancer routes by (stream/replicas.py); auto: the host name (a StatefulSet's pod name)",
    )

    # Engine: which model, on what, behind which executor.
    model: str = "default"
    executor: Literal["local", "tpp", "dualparal"] = "local"
    devices: str = Field("cpu", description="cpu, cuda, cuda:0,cuda:1, cpu:N, or auto")
    steps: int | None = Field(None, ge=1, le=64, description="denoising steps per block")
    shift: float | None = Field(
        None, gt=0, le=100, description="the denoising schedule's shift (None: the model's)"
    )
    cache_mode: Literal["reencode", "timestep_forcing"] | None = Field(
        None, description="KV cache mode of the local executor (None: the model's)"
    )
    block_frames: int | None = Field(
        None, ge=1, le=64, description="latent frames per block (None: the model's default)"
    )
    height: int | None = Field(
        None, ge=MIN_SIDE, le=MAX_SIDE, description="video height (model's default)"
    )
    width: int | None = Field(
        None, ge=MIN_SIDE, le=MAX_SIDE, description="video width (model's default)"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads (None: all cores but one, leaving one for WebRTC)",
    )
    lora: Path | None = Field(None, description="LoRA folder merged into the model (Live Avatar)")
    lora_mode: Literal["merged", "unmerged"] = "merged"
    prompt: str | None = Field(
        None, max_length=4000, description="default prompt of every session (models with text)"
    )
    text_encoder: Literal["keep", "cpu", "offload", "free"] = Field(
        "keep",
        description="where the prompt encoder lives after loading: keep (on the device), cpu, "
        "offload (moved to the device per new prompt) or free (only the default prompt)",
    )
    audio_context_frames: int | None = Field(
        None, ge=0, le=250, description="video frames of left audio context (wav2vec2 models)"
    )
    compile: bool = Field(
        True,
        description="torch.compile the block step and warm it up before listening (False: "
        "eager, no compile time at start-up)",
    )
    quant: Literal["none", "fp8", "fp8-weight"] = Field(
        "none",
        description="the transformer's block linears in FP8 (torchao; GPUs with FP8 tensor "
        "cores: Ada, Hopper); refused on any other device",
    )
    engine_process: bool = Field(
        True,
        description="run the local executor's engine in a worker process of its own, so the "
        "service's Python threads never hold it up (False: a thread of the service's process)",
    )

    # Admission and limits.
    max_sessions: int = Field(4, ge=1)
    max_message_bytes: int = Field(1 << 20, ge=1024, description="largest websocket message")
    max_image_bytes: int = Field(16 << 20, ge=1024, description="largest reference upload")
    max_audio_buffer_s: float = Field(
        20.0, gt=0, description="audio a client may send ahead of real time before backpressure"
    )
    idle_timeout_s: float = Field(
        60.0, gt=0, description="end a session with no viewer and no audio socket after this long"
    )

    viewer_timeout_s: float = Field(
        10.0, gt=0, description="end a session whose viewer sent no RTCP report for this long"
    )
    idle_no_viewer_s: float = Field(
        10.0,
        gt=0,
        description="end a session that never got a viewer (no WebRTC offer) nor an audio socket "
        "after this long; one that had either idles out after idle_timeout_s instead",
    )

    # Per-client quotas: a client is its bearer token when auth is on, else its address.
    max_sessions_per_client: int = Field(
        2, ge=1, description="sessions one client may hold at once (429 beyond)"
    )
    session_rate: float = Field(
        60.0,
        ge=0,
        description="sessions one client may create per minute, a token bucket of "
        "session_burst (429 beyond; 0: no limit)",
    )
    session_burst: int = Field(
        20, ge=1, description="sessions one client may create at once before session_rate applies"
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, stop admitting and let running sessions play out for up to this "
        "long before ending them and exiting",
    )

    # Real-time behaviour.
    degrade: Literal["drop", "none"] = "drop"
    max_backlog_s: float = Field(
        1.5, gt=0, description="audio waiting while video lags before blocks are dropped"
    )
    jitter_buffer_ms: float = Field(
        80.0, ge=0, description="audio held back at speech onset to absorb network jitter"
    )
    max_blocks_in_flight: int = Field(2, ge=1, le=8)
    stats_interval_s: float = Field(1.0, gt=0)

    # WebRTC.
    stun_servers: CommaList = Field(default_factory=list)
    turn_servers: CommaList = Field(default_factory=list)
    turn_username: str | None = None
    turn_password: SecretStr | None = None
    turn_secret: SecretStr | None = Field(
        None,
        description="coturn's static-auth-secret (use-auth-secret): each session gets its own "
        "short-lived TURN credentials (stream/turn.py) instead of the static username/password",
    )
    turn_ttl_s: int = Field(
        3600,
        ge=60,
        le=7 * 86400,
        description="how long a session's TURN credentials work, from its creation (turn_secret)",
    )

    # Access.
    auth_token: SecretStr | None = None
    allowed_origins: CommaList = Field(default_factory=list)

    # Output.
    recording_dir: Path | None = None
    web_dir: Path = Path(__file__).resolve().parent.parent / "web"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("stun_servers", "turn_servers", "allowed_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("replica_id")
    @classmethod
    def _check_replica_id(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return derived_replica_id() if value == "auto" else check_replica_id(value)

    @field_validator("stun_servers")
    @classmethod
    def _check_stun(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("stun:", "stuns:")):
                raise ValueError(f"STUN server {url!r} must start with stun: or stuns:")
        return value

    @field_validator("turn_servers")
    @classmethod
    def _check_turn(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("turn:", "turns:")):
                raise ValueError(f"TURN server {url!r} must start with turn: or turns:")
        return value

    @model_validator(mode="after")
    def _turn_needs_credentials(self) -> Settings:
        if self.turn_secret is not None:
            if not self.turn_servers:
                raise ValueError(
                    "turn_secret needs TURN servers (--turn / DIFFSTREAM_TURN_SERVERS)"
                )
            if self.turn_username or self.turn_password:
                raise ValueError(
                    "turn_secret (per-session credentials) and turn_username/turn_password "
                    "(static ones) exclude each other; give only one"
                )
            return self
        if self.turn_servers and not (self.turn_username and self.turn_password):
            raise ValueError("TURN servers need turn_username and turn_password (or turn_secret)")
        return self

    def ice_servers(self) -> list[dict[str, object]]:
        """ICE servers in the browser's RTCIceServer shape (also what aiortc is given).

        With `turn_secret` the TURN entry is left out: its credentials are per session
        (`stream.turn.session_ice_servers`), and the secret never leaves the service.
        """
        servers: list[dict[str, object]] = []
        if self.stun_servers:
            servers.append({"urls": list(self.stun_servers)})
        if self.turn_servers and self.turn_secret is None:
            servers.append(
                {
                    "urls": list(self.turn_servers),
                    "username": self.turn_username,
                    "credential": self.turn_password.get_secret_value()
                    if self.turn_password
                    else None,
                }
            )
        return servers

    def resolved_devices(self) -> str:
        """`auto` is cuda when torch sees a GPU, else cpu (the container image's default)."""
        if self.devices.strip().lower() != "auto":
            return self.devices
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_threads(self) -> int:
        """Threads for torch on CPU; oversubscribing a busy machine stalls every block."""
        import os

        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 2) - 1)

    def executor_options(self) -> dict[str, object]:
        """Options passed to build_executor; only what the user set, so engine defaults win."""
        options: dict[str, object] = {}
        if self.steps is not None:
            options["steps"] = self.steps
        if self.shift is not None:
            options["shift"] = self.shift
        if self.cache_mode is not None:
            options["cache_mode"] = self.cache_mode
        if self.block_frames is not None:
            options["frames_per_block"] = self.block_frames
        if self.height is not None:
            options["height"] = self.height
        if self.width is not None:
            options["width"] = self.width
        if self.lora is not None:
            options["lora"] = str(self.lora)
            options["lora_mode"] = self.lora_mode
        if self.text_encoder != "keep":
            options["text_encoder"] = self.text_encoder
        if self.audio_context_frames is not None:
            options["audio_context_frames"] = self.audio_context_frames
        if self.compile:
            options["compile"] = True
        if self.quant != "none":
            options["quant"] = self.quant
        if self.executor == "local":
            options["process"] = self.engine_process
            if self.engine_process:
                options["threads"] = self.torch_threads()  # the worker's torch threads
        elif self.threads is not None:
            options["threads"] = self.threads  # torch threads of each CPU worker process
        return options


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment plus explicit overrides, as a project error on failure."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid service settings: {problems}") from None

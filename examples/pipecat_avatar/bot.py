"""A voice agent with a face: pipecat's small WebRTC transport, any STT/LLM/TTS you have keys for,
and a diffstream avatar that speaks the TTS audio.

    .venv/bin/diffstream serve                                   # the avatar service
    pip install -r examples/pipecat_avatar/requirements.txt
    OPENAI_API_KEY=... python examples/pipecat_avatar/bot.py     # the agent
    open http://localhost:7860/client                            # talk to it

The services are chosen by the keys in the environment (the first that is set, in the order
below), or by name with AVATAR_STT / AVATAR_LLM / AVATAR_TTS:

    STT  deepgram (DEEPGRAM_API_KEY)   openai (OPENAI_API_KEY)
    LLM  openai (OPENAI_API_KEY)       anthropic (ANTHROPIC_API_KEY)   google (GOOGLE_API_KEY)
    TTS  cartesia (CARTESIA_API_KEY)   elevenlabs (ELEVENLABS_API_KEY)  openai (OPENAI_API_KEY)

    DIFFSTREAM_URL (http://127.0.0.1:8000), DIFFSTREAM_TOKEN, AVATAR_IMAGE (a PNG/JPEG path),
    AVATAR_PROMPT, AVATAR_SYSTEM_PROMPT, CARTESIA_VOICE_ID, ELEVENLABS_VOICE_ID

A missing key stops the agent before it starts, with one line naming the variable to set.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROVIDERS: dict[str, dict[str, str]] = {
    "stt": {"deepgram": "DEEPGRAM_API_KEY", "openai": "OPENAI_API_KEY"},
    "llm": {
        "openai": "OPENAI_API_KEY",
        "anthropic": "ANTHROPIC_API_KEY",
        "google": "GOOGLE_API_KEY",
    },
    "tts": {
        "cartesia": "CARTESIA_API_KEY",
        "elevenlabs": "ELEVENLABS_API_KEY",
        "openai": "OPENAI_API_KEY",
    },
}
SYSTEM_PROMPT = (
    "You are a friendly assistant with a face, talking to someone over a video call. Your "
    "words are spoken aloud, so answer briefly, in plain sentences, without lists or symbols."
)


class ConfigError(Exception):
    """The environment does not say which service to use, or lacks its key."""


@dataclass(frozen=True)
class Choice:
    provider: str
    api_key: str


def choose(role: str, env: Mapping[str, str]) -> Choice:
    """The provider for one role (stt, llm, tts): named by AVATAR_<ROLE>, else the first whose
    key is set. Raises ConfigError naming the variable to set."""
    options = PROVIDERS[role]
    selector = f"AVATAR_{role.upper()}"
    named = env.get(selector, "").strip().lower()
    if named:
        if named not in options:
            raise ConfigError(f"{selector}={named!r} is not one of: {', '.join(options)}")
        variable = options[named]
        if not env.get(variable):
            raise ConfigError(f"{selector}={named} needs {variable}: set {variable}")
        return Choice(named, env[variable])
    for provider, variable in options.items():
        if env.get(variable):
            return Choice(provider, env[variable])
    wanted = " or ".join(dict.fromkeys(options.values()))
    raise ConfigError(f"no {role.upper()} service: set {wanted} (or {selector} to pick one)")


def check_config(env: Mapping[str, str]) -> dict[str, Choice]:
    """All three choices, or ConfigError listing every missing variable."""
    choices, problems = {}, []
    for role in PROVIDERS:
        try:
            choices[role] = choose(role, env)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    return choices


def make_services(choices: dict[str, Choice], env: Mapping[str, str]) -> tuple[Any, Any, Any]:
    """STT, LLM and TTS services for the choices (their modules are imported only if chosen)."""
    stt_choice, llm_choice, tts_choice = choices["stt"], choices["llm"], choices["tts"]
    if stt_choice.provider == "deepgram":
        from pipecat.services.deepgram.stt import DeepgramSTTService

        stt = DeepgramSTTService(api_key=stt_choice.api_key)
    else:
        from pipecat.services.openai.stt import OpenAISTTService

        stt = OpenAISTTService(api_key=stt_choice.api_key)

    if llm_choice.provider == "anthropic":
        from pipecat.services.anthropic.llm import AnthropicLLMService

        llm = AnthropicLLMService(api_key=llm_choice.api_key)
    elif llm_choice.provider == "google":
        from pipecat.services.google.llm import GoogleLLMService

        llm = GoogleLLMService(api_key=llm_choice.api_key)
    else:
        from pipecat.services.openai.llm import OpenAILLMService

        llm = OpenAILLMService(api_key=llm_choice.api_key)

    if tts_choice.provider == "cartesia":
        from pipecat.services.cartesia.tts import CartesiaTTSService

        voice = env.get("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121")
        tts = CartesiaTTSService(api_key=tts_choice.api_key, voice_id=voice)
    elif tts_choice.provider == "elevenlabs":
        from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

        voice = env.get("ELEVENLABS_VOICE_ID", "21m00Tcm4TlvDq8ikWAM")
        tts = ElevenLabsTTSService(api_key=tts_choice.api_key, voice_id=voice)
    else:
        from pipecat.services.openai.tts import OpenAITTSService

        tts = OpenAITTSService(api_key=tts_choice.api_key)
    return stt, llm, tts


def make_avatar(env: Mapping[str, str]) -> Any:
    from stream.integrations.pipecat import DiffstreamVideoService

    return DiffstreamVideoService(
        env.get("DIFFSTREAM_URL", "http://127.0.0.1:8000"),
        token=env.get("DIFFSTREAM_TOKEN") or None,
        image=env.get("AVATAR_IMAGE") or None,
        prompt=env.get("AVATAR_PROMPT") or None,
    )


def avatar_size(env: Mapping[str, str]) -> tuple[int, int]:
    """The avatar's (width, height) from the service, so the transport sends it unscaled."""
    url = env.get("DIFFSTREAM_URL", "http://127.0.0.1:8000").rstrip("/") + "/v1/config"
    request = urllib.request.Request(url)
    if env.get("DIFFSTREAM_TOKEN"):
        request.add_header("Authorization", f"Bearer {env['DIFFSTREAM_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            config = json.load(response)
    except OSError as exc:
        raise ConfigError(
            f"cannot reach diffstream at {url} ({exc}): start it with `diffstream serve` "
            "or set DIFFSTREAM_URL"
        ) from None
    return int(config["width"]), int(config["height"])


def build_pipeline(
    transport: Any, services: tuple[Any, Any, Any], avatar: Any, env: Mapping[str, str]
) -> Any:
    """transport in → STT → user turn → LLM → TTS → avatar → transport out → assistant turn."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )

    stt, llm, tts = services
    context = LLMContext(
        [{"role": "system", "content": env.get("AVATAR_SYSTEM_PROMPT", SYSTEM_PROMPT)}]
    )
    turns = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    return Pipeline(
        [
            transport.input(),
            stt,
            turns.user(),
            llm,
            tts,
            avatar,  # consumes the TTS audio, sends the avatar's frames and audio on
            transport.output(),
            turns.assistant(),
        ]
    ), context


async def bot(runner_args: Any) -> None:
    """Entry point of pipecat's development runner: one call per connected browser."""
    from pipecat.frames.frames import LLMMessagesAppendFrame, LLMRunFrame
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.runner.utils import create_transport
    from pipecat.transports.base_transport import TransportParams
    from pipecat.workers.runner import WorkerRunner

    env = os.environ
    choices = check_config(env)
    width, height = avatar_size(env)
    transport = await create_transport(
        runner_args,
        {
            "webrtc": lambda: TransportParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                video_out_enabled=True,
                video_out_is_live=True,
                video_out_width=width,
                video_out_height=height,
            )
        },
    )
    pipeline, _context = build_pipeline(
        transport, make_services(choices, env), make_avatar(env), env
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))

    @transport.event_handler("on_client_connected")
    async def _on_connected(_transport: Any, _client: Any) -> None:
        greeting = {"role": "user", "content": "Say hello and introduce yourself in one sentence."}
        await worker.queue_frames([LLMMessagesAppendFrame([greeting]), LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def _on_disconnected(_transport: Any, _client: Any) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=getattr(runner_args, "handle_sigint", False))
    await runner.add_workers(worker)
    await runner.run()


def main() -> None:
    try:
        check_config(os.environ)
        avatar_size(os.environ)
    except ConfigError as exc:
        print(f"pipecat_avatar: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from pipecat.runner.run import main as run_pipecat

    run_pipecat()


if __name__ == "__main__":
    main()

"""examples/pipecat_avatar: the agent picks its services from the keys in the environment, says
which variable is missing before it starts, and its pipeline builds with the installed pipecat
(services built with placeholder keys connect to nothing until a pipeline starts them)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameProcessor

from stream.integrations.pipecat import DiffstreamVideoService

ROOT = Path(__file__).resolve().parent.parent
BOT = ROOT / "examples" / "pipecat_avatar" / "bot.py"
KEYS = ("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY")
KEYS += ("CARTESIA_API_KEY", "ELEVENLABS_API_KEY", "AVATAR_STT", "AVATAR_LLM", "AVATAR_TTS")


def _bot():
    spec = importlib.util.spec_from_file_location("pipecat_avatar_bot", BOT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in KEYS}
    return subprocess.run(
        [sys.executable, str(BOT)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_agent_names_the_missing_variable() -> None:
    """Started without keys, or with a service named but its key missing, the agent exits with
    status 2 and one line naming the variable to set. Fails if a missing key surfaces as a
    traceback from inside a service (e.g. choose() returning None for an unset key)."""
    bare = _run({})
    assert bare.returncode == 2, bare.stderr[-2000:]
    assert "Traceback" not in bare.stderr
    line = bare.stderr.strip().splitlines()[-1]
    for variable in ("DEEPGRAM_API_KEY or OPENAI_API_KEY", "CARTESIA_API_KEY"):
        assert variable in line, line

    named = _run({"OPENAI_API_KEY": "sk-placeholder", "AVATAR_TTS": "cartesia"})
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert "AVATAR_TTS=cartesia needs CARTESIA_API_KEY" in named.stderr, named.stderr[-500:]


def test_keys_choose_the_services() -> None:
    """The first key set wins per role, AVATAR_<ROLE> overrides it. Fails if one key is not
    enough for all three roles (OpenAI), or if a named provider is ignored."""
    bot = _bot()
    choices = bot.check_config({"OPENAI_API_KEY": "o"})
    assert {role: c.provider for role, c in choices.items()} == {
        "stt": "openai",
        "llm": "openai",
        "tts": "openai",
    }
    env = {"OPENAI_API_KEY": "o", "DEEPGRAM_API_KEY": "d", "ANTHROPIC_API_KEY": "a"}
    env["AVATAR_LLM"] = "anthropic"
    choices = bot.check_config(env)
    assert (choices["stt"].provider, choices["llm"].provider) == ("deepgram", "anthropic")
    with pytest.raises(bot.ConfigError, match="is not one of"):
        bot.check_config({**env, "AVATAR_STT": "whisperx"})


class _Transport:
    """Stands in for the small WebRTC transport: an input and an output processor."""

    def __init__(self) -> None:
        self._in, self._out = FrameProcessor(), FrameProcessor()

    def input(self) -> FrameProcessor:
        return self._in

    def output(self) -> FrameProcessor:
        return self._out


def test_the_pipeline_builds_with_the_installed_pipecat() -> None:
    """The example's services, aggregators and VAD exist under the names it uses in the
    pipecat the extra installs, and the avatar sits between the TTS and the output. Fails if
    pipecat renamed something the example imports or calls."""
    bot = _bot()
    env = {"OPENAI_API_KEY": "sk-placeholder"}
    services = bot.make_services(bot.check_config(env), env)
    avatar = bot.make_avatar({"DIFFSTREAM_URL": "http://127.0.0.1:9"})
    assert isinstance(avatar, DiffstreamVideoService)
    transport = _Transport()
    pipeline, context = bot.build_pipeline(transport, services, avatar, env)
    assert isinstance(pipeline, Pipeline)
    order = pipeline.processors
    assert (
        order.index(services[2]) + 1 == order.index(avatar) == order.index(transport.output()) - 1
    )
    assert context.get_messages()[0]["role"] == "system"

"""`diffstream` command line: one sub-command per module under stream/commands.

Each module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when its
sub-command is chosen, so `diffstream render` never imports the web stack and `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from models.errors import DiffstreamError

COMMANDS: dict[str, str] = {
    "serve": "Start the real-time service (websocket audio in, WebRTC video out).",
    "render": "Generate a video offline from a reference image and an audio file.",
    "bench": "Measure per-stage time, fps, time to first frame and peak memory.",
    "plan": "Predict fps, latency and memory of each multi-device strategy.",
    "eval": "Measure lip sync, identity drift, speed and fidelity to ground truth of a model.",
    "train": "Train the embedded default model from scratch (or, --teacher, a teacher).",
    "distill": "Distil a few-step causal student from a teacher (self-forcing + DMD).",
}


def _module(name: str):
    return importlib.import_module(f"stream.commands.{name}")


def chosen_command(argv: list[str] | None) -> str | None:
    """The sub-command named on the command line (no global option takes a value)."""
    return next((a for a in (argv or []) if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = chosen_command(argv)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen sub-command's module is imported (and so its dependencies).
        if name == chosen:
            _module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(_module(args.command).run(args) or 0)
    except DiffstreamError as exc:
        print(f"diffstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The process entry point (the `diffstream` script and `python -m stream.cli`).

    After `serve` has shut down cleanly (sessions ended, viewers told, the engine's workers
    joined), the process leaves with os._exit instead of the interpreter's teardown: a native
    library's thread torn down there aborted the process now and then ("terminate called
    without an active exception", SIGABRT) after a clean drain, turning exit 0 into -6."""
    argv = sys.argv[1:]
    code = main(argv)
    if chosen_command(argv) == "serve":
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

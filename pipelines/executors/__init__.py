"""Executors behind one interface; each strategy is imported only when chosen."""

from __future__ import annotations

from typing import Any

import torch

from models.errors import ConfigError
from pipelines.executors.base import Executor, ExecutorBusy, ModelInfo

EXECUTORS = ("local", "tpp", "dualparal")

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorBusy",
    "ModelInfo",
    "build_executor",
    "one_device",
    "parse_devices",
]


def parse_devices(devices: str) -> list[torch.device]:
    """'cpu', 'cuda', 'cuda:0,cuda:1' or 'cpu:N' (N gloo processes on the CPU)."""
    devices = (devices or "cpu").strip()
    if devices.startswith("cpu:"):
        try:
            n = int(devices[4:])
        except ValueError:
            raise ConfigError(f"--devices {devices!r}: expected cpu:N with N a number") from None
        if n < 1:
            raise ConfigError(f"--devices {devices!r}: N must be at least 1")
        return [torch.device("cpu")] * n
    out = []
    for part in devices.split(","):
        try:
            dev = torch.device(part.strip())
        except RuntimeError:
            raise ConfigError(
                f"--devices: {part!r} is not a device (try cpu, cuda, cuda:1)"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--devices {part!r}: CUDA is not available on this machine")
        out.append(dev)
    return out


def one_device(devices: str) -> torch.device:
    """The single device of the local executor (in a thread or in its worker process)."""
    dev = parse_devices(devices)
    if len(dev) != 1:
        raise ConfigError("the local executor runs on one device; use --executor tpp or dualparal")
    return dev[0]


def build_executor(
    kind: str = "local",
    model: str = "default",
    devices: str = "cpu",
    **options: Any,
) -> Executor:
    """Load `model` and start the chosen executor. `options` are pipeline overrides
    (steps, cache_mode, sink_refresh, frames_per_block, ...) plus executor options.
    `process=True` runs the local executor's engine in a worker process of its own (what the
    service does) instead of a thread of this process."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind == "local" and options.pop("process", False):
        from pipelines.executors.process import ProcessExecutor

        return ProcessExecutor.launch(model=model, devices=devices, **options)
    if kind == "local":
        options.pop("threads", None)  # the caller's process sets its own torch threads
        from models.registry import load_model
        from pipelines.executors.local import LocalExecutor
        from pipelines.executors.stages import MODEL_OPTIONS
        from pipelines.generator import StreamingGenerator

        max_queue = int(options.pop("max_queue", 32))
        dev = one_device(devices)
        load = {k: options.pop(k) for k in MODEL_OPTIONS if k in options}
        dtype = options.pop("dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        bundle = load_model(model, device=dev, dtype=dtype, **load)
        gen = StreamingGenerator.from_bundle(bundle, device=dev, dtype=dtype, **options)
        return LocalExecutor(gen, name=bundle.name, max_queue=max_queue)
    if kind == "tpp":
        from pipelines.executors.tpp import TPPExecutor

        return TPPExecutor.launch(model=model, devices=devices, **options)
    from pipelines.executors.dualparal import DualParalExecutor

    return DualParalExecutor.launch(model=model, devices=devices, **options)

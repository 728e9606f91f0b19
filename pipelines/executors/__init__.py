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
    "warm_up",
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


def check_quant_devices(quant: str | None, devices: str) -> None:
    """Refuse --quant fp8 up front, in one line, when a device cannot run it (before any
    model loads or worker starts)."""
    from models.quant import check_quant, fp8_unsupported

    if check_quant(quant) == "none":
        return
    from pipelines.executors.torchrun import parse_external

    if parse_external(devices):
        return  # torchrun's workers see their own devices and refuse there
    for dev in parse_devices(devices):
        reason = fp8_unsupported(dev)
        if reason is not None:
            raise ConfigError(reason)


def warm_up(executor: Executor) -> float:
    """Run one throwaway session (silence, the default reference) through the executor for
    `info.warmup_blocks` blocks, so a compiled block step has built all its graphs, on every
    rank, before the first real session; returns the seconds it took."""
    import time

    import numpy as np

    from models.errors import ExecutorError
    from pipelines.messages import BlockRequest, SessionSpec
    from pipelines.reference import default_reference

    info = executor.info
    start = time.perf_counter()
    sid = "__warmup__"
    executor.open_session(SessionSpec(sid, default_reference(info.height, info.width)))
    try:
        futures = [
            executor.submit(BlockRequest(sid, i, np.zeros(info.block_samples(i), dtype=np.float32)))
            for i in range(info.warmup_blocks)
        ]
        for f in futures:
            result = f.result(timeout=1800)
            if not result.ok:
                raise ExecutorError(f"warm-up block failed: {result.error}")
    finally:
        executor.close_session(sid)
    return time.perf_counter() - start


def build_executor(
    kind: str = "local",
    model: str = "default",
    devices: str = "cpu",
    **options: Any,
) -> Executor:
    """Load `model` and start the chosen executor. `options` are pipeline overrides
    (steps, cache_mode, sink_refresh, frames_per_block, ...) plus executor options.
    `process=True` runs the local executor's engine in a worker process of its own (what the
    service does) instead of a thread of this process. `compile=True` compiles the block step
    and warms it up (one throwaway session) before returning, unless `warm_up=False` (a
    one-off render's own first blocks compile the same graphs: a throwaway session before
    them would only add blocks); `quant="fp8"` is refused here, before anything loads, on a
    device without FP8."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    warm = options.pop("warm_up", True)
    check_quant_devices(options.get("quant"), devices)
    executor = _start(kind, model, devices, options)
    if options.get("compile") and warm:
        try:
            warm_up(executor)
        except BaseException:
            executor.close()
            raise
    return executor


def _start(kind: str, model: str, devices: str, options: dict[str, Any]) -> Executor:
    options = dict(options)
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

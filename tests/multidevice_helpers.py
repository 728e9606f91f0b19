"""Shared by the multi-device executor tests: single-process references, audio, process checks."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future

import numpy as np
import torch

from pipelines.executors.base import ModelInfo
from pipelines.generator import StreamingGenerator
from pipelines.messages import BlockRequest, BlockResult


def randomise_audio_layers(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every audio cross-attention a random output projection. A fresh model starts with
    them at zero, so the audio would change nothing and code that lost the audio on the way
    (an executor rank, a re-encode pass) would still pass its equivalence test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            if blk.audio_attn is not None:
                w = blk.audio_attn.to_out[0].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)


def save_test_model(path, num_layers: int = 2) -> str:
    """The tiny model with audio cross-attention at every layer, switched on (see
    randomise_audio_layers), so every layer rank of a split model injects audio. Saved to
    `path` for the worker processes."""
    from models.registry import build_tiny

    bundle = build_tiny(num_layers=num_layers)
    randomise_audio_layers(bundle.dit)
    bundle.save(path)
    return str(path)


def audio_blocks(info: ModelInfo, n: int, seed: int) -> list[np.ndarray]:
    """Random speech-level audio windows of the exact length each block needs."""
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(info.block_samples(i))).astype(np.float32) for i in range(n)]


def reference_blocks(
    gen: StreamingGenerator,
    reference: np.ndarray,
    audio: list[np.ndarray],
    *,
    seed: int,
    sink_refresh: bool = False,
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(clean latent, frames) of each block from the single-process engine, step by step
    exactly as generate_block runs them (which returns frames only)."""
    state = gen.new_session(reference, seed=seed, sink_refresh=sink_refresh)
    out = []
    for a in audio:
        inputs = gen.prepare_block(state, a)
        x = inputs.noise
        for step in range(state.steps):
            x = gen.denoise_step(state, inputs, step, x)
        gen.finish_block(state, inputs, x)
        out.append((x.float().clone(), gen.decode(state, x)))
    return out


def submit_all(executor, requests: list[BlockRequest]) -> dict[tuple[str, int], Future]:
    return {(r.session_id, r.block_index): executor.submit(r) for r in requests}


def results(
    futures: dict[tuple[str, int], Future], timeout: float
) -> dict[tuple[str, int], BlockResult]:
    return {k: f.result(timeout=timeout) for k, f in futures.items()}


def request(session_id: str, index: int, audio: np.ndarray) -> BlockRequest:
    return BlockRequest(session_id, index, audio, submitted_at=time.perf_counter())


_SPIN = (
    "import time\n"
    "end = time.perf_counter() + {seconds}\n"
    "n = 0\n"
    "while time.perf_counter() < end:\n"
    "    n += 1\n"
    "print(n)\n"
)


def available_cores(seconds: float = 0.4) -> float:
    """How many cores' worth of CPU this machine gives us right now (others share it): busy
    loops in as many processes as there are cores, their work against one loop's alone."""
    import subprocess
    import sys

    def spin(k: int) -> list[int]:
        code = _SPIN.format(seconds=seconds)
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(k)
        ]
        return [int(p.communicate()[0]) for p in procs]

    solo = spin(1)[0]
    together = sum(spin(os.cpu_count() or 1))
    return max(1.0, min(float(os.cpu_count() or 1), together / max(1, solo)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie is dead, just not yet reaped)."""
    try:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:  # /proc fallback
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False


def children_of(pid: int) -> list[int]:
    """Live descendants of `pid` (psutil, or /proc when psutil is missing)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True) if pid_alive(c.pid)]
    except ImportError:
        parents: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
        out, frontier = [], [pid]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parents.items() if pp == p]
            out += kids
            frontier += kids
        return [c for c in out if pid_alive(c)]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


# ---- measurements shared by the planner check and benchmarks/executors.py --------------------
def measure_local(gen: StreamingGenerator, blocks: int) -> dict[str, float]:
    """One process: seconds per block (after 2 warm-up blocks), median step and decode."""
    import statistics

    from pipelines.executors.local import model_info
    from pipelines.reference import default_reference

    gen.profile = True
    state = gen.new_session(default_reference(gen.height, gen.width), seed=0)
    audio = audio_blocks(model_info(gen, "tiny"), blocks + 2, seed=0)
    for i in range(2):
        gen.generate_block(state, audio[i])
    t0 = time.perf_counter()
    timings = [gen.generate_block(state, audio[i])[1] for i in range(2, blocks + 2)]
    period = (time.perf_counter() - t0) / blocks
    return {
        "period": period,
        "step": statistics.median(s for t in timings for s in t.denoise_steps),
        "decode": statistics.median(t.decode for t in timings),
    }


def pipeline_throughput(executor, blocks: int, steady: range) -> tuple[float, list[dict]]:
    """Seconds per block while the pipeline is full: two sessions interleaved, completions of
    blocks in `steady` only (not the fill, nor DualParal's drain after the last block)."""
    from pipelines.messages import SessionSpec
    from pipelines.reference import default_reference

    info = executor.info
    ref = default_reference(info.height, info.width)
    sessions = ("p1", "p2")
    for sid in sessions:
        executor.open_session(SessionSpec(sid, ref, seed=1))
    audio = audio_blocks(info, blocks, seed=2)
    futs = submit_all(executor, [request(s, i, audio[i]) for i in range(blocks) for s in sessions])
    done = {}
    pending = dict(futs)
    while pending:  # completion times, taken as they happen
        for key, f in list(pending.items()):
            if f.done():
                r = f.result()
                assert r.ok, r.error
                done[key] = time.perf_counter()
                del pending[key]
        time.sleep(0.0005)
    stats = executor.worker_stats()
    for sid in sessions:
        executor.close_session(sid)
    times = sorted(t for (_, i), t in done.items() if i in steady)
    return (times[-1] - times[0]) / (len(times) - 1), stats


def measured_link(stats: list[dict]):
    """The gloo hop as the workers measured it: wall time per message (two sends each) and the
    CPU a message costs at both ends, as the planner's LinkModel."""
    from pipelines import planner

    messages = sum(s["messages_sent"] for s in stats)
    per_message = sum(s["send_seconds"] for s in stats) / messages
    cpu = sum(s["link_cpu_seconds"] for s in stats) / messages
    return planner.LinkModel(gbps=10.0, latency_s=per_message / 2, cpu_s=cpu)

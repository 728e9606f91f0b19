"""Shared by the multi-device executor tests: single-process references, audio, process checks."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

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


def engine_cpu(gen: StreamingGenerator, blocks: int) -> dict[str, float]:
    """One process running the engine's block loop (prepare, S denoise steps, finish, decode:
    what generate_block runs), timed in this thread's CPU time, as the profiler times on the
    CPU: median step and decode, and seconds per block (CPU and wall) after 2 warm-up blocks.
    CPU time is what one device at full speed takes, however often the machine's other work
    took the core away meanwhile."""
    import statistics

    from pipelines.executors.local import model_info
    from pipelines.reference import default_reference

    state = gen.new_session(default_reference(gen.height, gen.width), seed=0)
    audio = audio_blocks(model_info(gen, "tiny"), blocks + 2, seed=0)
    steps, decodes = [], []
    for i, a in enumerate(audio):
        if i == 2:
            c0, t0 = time.thread_time(), time.perf_counter()
        inputs = gen.prepare_block(state, a)
        x = inputs.noise
        for step in range(state.steps):
            s0 = time.thread_time()
            x = gen.denoise_step(state, inputs, step, x)
            steps.append(time.thread_time() - s0)
        gen.finish_block(state, inputs, x)
        d0 = time.thread_time()
        gen.decode(state, x)
        decodes.append(time.thread_time() - d0)
    return {
        "block_cpu": (time.thread_time() - c0) / blocks,
        "block_wall": (time.perf_counter() - t0) / blocks,
        "step": statistics.median(steps[2 * state.steps :]),
        "decode": statistics.median(decodes[2:]),
    }


# CPU accounting from /proc (Linux): what the worker processes and the machine did in a window.
def process_cpu_seconds(pid: int, thread_name: str | None = None) -> float:
    """CPU seconds of every thread of `pid` (or of its threads named `thread_name`, e.g.
    gloo's "gloo_tcp_loop"), from the scheduler's per-thread run time (ns resolution)."""
    total = 0
    root = f"/proc/{pid}/task"
    for tid in os.listdir(root):
        try:
            if thread_name is not None:
                with open(f"{root}/{tid}/comm") as f:
                    if f.read().strip() != thread_name:
                        continue
            with open(f"{root}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended meanwhile
            continue
    return total / 1e9


def machine_idle_seconds() -> float:
    """Idle CPU seconds of the whole machine so far, summed over its cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[3] + fields[4]) / os.sysconf("SC_CLK_TCK")  # idle + iowait


@dataclass
class SteadyRun:
    """One run of pipeline_run: the steady-state period and what the machine gave it."""

    period_s: float  # seconds per block while every stage is busy
    cores: float  # cores the workers had meanwhile: their CPU share + the machine's idle
    link: Any  # the planner's LinkModel of this run's messages
    stats: list[dict]


def pipeline_run(executor, blocks: int, steady: range, in_flight: int | None = None) -> SteadyRun:
    """Two sessions interleaved, at most `in_flight` blocks submitted and not yet done (default
    2 x (steps + 1), enough for DualParal's queue of both), as a live stream's audio paces
    them. Submitting every block at once would let the first stages race through the backlog
    and leave the last one draining alone: a window of the drain is not the steady state.

    Completion times are taken in the futures' callbacks (no polling loop stealing a core),
    over the blocks in `steady` (not the fill, nor DualParal's drain after the last block).
    Between the first and the last of those completions the workers' CPU seconds (all their
    threads) and the machine's idle seconds give the cores the pipeline had: on a shared
    machine that is what the planner's `cores` must be, measured in the same window, not
    before or after it. The link model counts gloo's transport threads too (see measured_link).
    """
    import threading

    from pipelines.messages import SessionSpec
    from pipelines.reference import default_reference

    info = executor.info
    in_flight = in_flight or 2 * (info.steps + 1)
    ref = default_reference(info.height, info.width)
    sessions = ("p1", "p2")
    for sid in sessions:
        executor.open_session(SessionSpec(sid, ref, seed=1))
    audio = audio_blocks(info, blocks, seed=2)
    pids = executor.pids()
    before = executor.worker_stats(events=False)
    transport = [sum(process_cpu_seconds(p, "gloo_tcp_loop") for p in pids)]
    order = [(sid, i) for i in range(blocks) for sid in sessions]
    n_steady = sum(1 for _, i in order if i in steady)
    done: dict[tuple[str, int], float] = {}
    marks: list[tuple[float, float, float]] = []  # (time, workers' CPU, machine idle)
    errors: list[str] = []
    lock, finished = threading.Lock(), threading.Event()
    slots = threading.Semaphore(in_flight)

    def on_done(fut: Future, key: tuple[str, int]) -> None:
        now = time.perf_counter()
        result = fut.result()
        with lock:
            if not result.ok:
                errors.append(result.error)
            done[key] = now
            if key[1] in steady and len(marks) < 2:
                count = sum(1 for _, i in done if i in steady)
                if count in (1, n_steady):
                    cpu = sum(process_cpu_seconds(p) for p in pids)
                    marks.append((now, cpu, machine_idle_seconds()))
            if len(done) == len(order):
                finished.set()
        slots.release()

    for key in order:
        if not slots.acquire(timeout=60):
            raise TimeoutError("the pipeline stopped completing blocks")
        fut = executor.submit(request(key[0], key[1], audio[key[1]]))
        fut.add_done_callback(lambda f, key=key: on_done(f, key))
    if not finished.wait(60):
        raise TimeoutError("the pipeline stopped completing blocks")
    assert not errors, errors
    transport.append(sum(process_cpu_seconds(p, "gloo_tcp_loop") for p in pids))
    stats = executor.worker_stats()
    for sid in sessions:
        executor.close_session(sid)
    times = sorted(t for (_, i), t in done.items() if i in steady)
    (t0, cpu0, idle0), (t1, cpu1, idle1) = marks
    cores = ((cpu1 - cpu0) + (idle1 - idle0)) / (t1 - t0)
    link = measured_link(stats, before, transport_cpu_s=transport[1] - transport[0])
    return SteadyRun((times[-1] - times[0]) / (len(times) - 1), cores, link, stats)


def pipeline_throughput(executor, blocks: int, steady: range) -> tuple[float, list[dict]]:
    """Seconds per block while the pipeline is full (pipeline_run), and the workers' stats."""
    run = pipeline_run(executor, blocks, steady)
    return run.period_s, run.stats


def measured_link(
    stats: list[dict], before: list[dict] | None = None, transport_cpu_s: float = 0.0
):
    """The gloo hop as the workers measured it (since `before`, a worker_stats() taken
    earlier), as the planner's LinkModel: wall time per message (two sends each), the CPU a
    message costs, and the wall time a posted message stays on its sender's stage.

    The wire time comes from the sends that wait for their peer (results and control
    messages): the hot path's sends are posted without waiting (wire.Link, wait=False), so
    their wall time is only the packing and posting (and the rare wait on the bound of
    pending sends), which is the model's `post_s`. The CPU is the sending and receiving
    threads' time in send and recv plus `transport_cpu_s`, what gloo's own transport threads
    spent meanwhile (the socket work happens there; counting only the callers' threads missed
    two thirds of it)."""
    from pipelines import planner

    def total(key: str) -> float:
        now = sum(s.get(key, 0) for s in stats)
        return now - (sum(s.get(key, 0) for s in before) if before else 0)

    messages = total("messages_sent")
    posted = total("sends_posted")
    waited = messages - posted
    per_message = (total("send_seconds") - total("post_seconds")) / max(1, waited)
    post = total("post_seconds") / posted if posted else 0.0
    cpu = (total("link_cpu_seconds") + transport_cpu_s) / messages
    return planner.LinkModel(gbps=10.0, latency_s=per_message / 2, cpu_s=cpu, post_s=post)

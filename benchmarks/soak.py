"""Soak: K sessions stream for a long time against the real service; does anything drift or grow?

    python benchmarks/soak.py --minutes 60 --sessions 1 [--model av-probe] [--interval-s 60]
        [--warmup-s 60] [--json] [--progress PATH] [--compile] [--serve-arg=--flag]

One `diffstream serve` child process (eager, `--no-compile`, unless `--compile`) and K aiortc
clients in this process. Each client streams a 1.5 s loop of audio in real time for the whole
run, paced on one clock so the loop never drifts against wall time: silence with a 200 ms
1 kHz tone burst (rms 0.3) once per loop. Every `--interval-s` it records:

- the service's process and the engine's worker process (its pid from /healthz): resident
  memory, open file descriptors (/proc/<pid>/fd) and threads (/proc/<pid>/status); the event
  loop's asyncio tasks (/healthz `tasks`). Tasks and fds are the least of three reads 0.3 s
  apart, so a request in flight (our own /healthz scrape among them) is not counted as growth;
- block latency: p50 and p95 from the stats data channel (the service's rolling figures over
  its last 64 blocks, median over the interval's messages), and p99 over every block of the
  interval from the /metrics histogram (its bucket counts' difference, interpolated inside a
  bucket as Prometheus' histogram_quantile does; buckets 20, 50, 100, 200, 300, 500 ms ...);
- delivered fps: video frames that reached each client in the interval, per second;
- the A/V offset at the receiver, two ways:
  * `offset_ms` (av-probe only: its frames' brightness is the loudness of the audio that drove
    them, models/av_probe.py): for each burst, the energy centroid of the frames that show it
    minus that of the received audio that carries it, both by pts on the session's media clock
    (pts plus the service's `media_started` origin; the loudness of a 40 ms frame and of a
    20 ms Opus frame are exact sums of energy over their spans, so the centroids are exact
    whatever the burst's phase against the frames). Positive: the frames show the burst later
    than it is heard. Median over the interval's bursts; bursts cut by a late block (a repeated
    frame, or missing frames) are left out;
  * `arrival_offset_ms` (any model): video's delay minus audio's delay as they reach the
    receiver (arrival time minus media time minus what aiortc's receiver holds back, the
    least-delayed frame of each track in the interval), as AvatarClient.av_offsets measures.

Afterwards the sessions are closed and, once the service and the engine hold none, the service
is sampled once more (`after`) to compare with `baseline`, taken before the first session.

The summary fits a line through the samples after `--warmup-s` (lazily created things: thread
pools, codec contexts, allocator arenas) and reports slopes per hour and start → end: offset
drift (ms), RSS growth (%), fd, thread and task growth. `--json` prints everything as JSON on
stdout (the Markdown table then goes to stderr); `--progress PATH` rewrites PATH as JSON after
every sample, so a run that dies still leaves its samples.

The clients run in this process and share the machine with the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sessions import machine  # noqa: E402
from stream.client import AvatarClient  # noqa: E402
from stream.harness import ServiceProcess  # noqa: E402

SR = 16000
CHUNK_MS = 20
LOOP_S = 1.5  # the audio loop: one burst each
BURST_AT_S = 0.3
BURST_S = 0.2
BURST_RMS = 0.3  # av-probe shows it at brightness 153
TONE_HZ = 1000.0
LOUD = 0.05  # rms (audio) or loudness (probe frames) above this is part of a burst
AUDIO_FRAME_S = 0.020  # aiortc's Opus frames
ANALYSE_LAG_S = 0.8  # a burst is measured once both tracks are this far past its end
KEEP_S = 6.0  # received frames kept after a sample (the rest is measured and dropped)


# Audio ---------------------------------------------------------------------------------------


def loop_audio() -> np.ndarray:
    """One LOOP_S loop of the sent audio: silence with a BURST_S tone burst at BURST_AT_S."""
    audio = np.zeros(int(LOOP_S * SR), np.float32)
    n = int(BURST_S * SR)
    t = np.arange(n) / SR
    start = int(BURST_AT_S * SR)
    audio[start : start + n] = np.sqrt(2) * BURST_RMS * np.sin(2 * np.pi * TONE_HZ * t)
    return audio


async def stream_audio(client: AvatarClient, loop: np.ndarray, stop: asyncio.Event) -> int:
    """Send `loop` over and over in real time until `stop`; chunk i is due at start + i·20 ms,
    so the audio keeps wall-clock pace however late one send was. Returns samples sent."""
    pcm = (np.clip(loop, -1, 1) * 32767).astype("<i2")
    step = SR * CHUNK_MS // 1000
    assert len(pcm) % step == 0
    start = time.monotonic()
    sent = 0
    while not stop.is_set():
        delay = start + sent / SR - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        i = sent % len(pcm)
        await client.ws.send(pcm[i : i + step].tobytes())
        sent += step
    return sent


# What the receiver got -------------------------------------------------------------------------


def _runs(mask: np.ndarray, times: np.ndarray, max_gap: float) -> list[tuple[int, int]]:
    """[first, last] index pairs of runs of True whose neighbours are at most max_gap apart."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    runs, first = [], idx[0]
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        if times[b] - times[a] > max_gap:
            runs.append((first, a))
            first = b
    runs.append((first, idx[-1]))
    return runs


class ReceiverProbe:
    """The per-interval measures of one client; drops what it has measured so that an hour of
    frames does not pile up in memory."""

    def __init__(self, client: AvatarClient, *, content: bool) -> None:
        self.client = client
        self.content = content  # av-probe: frames' brightness carries the loudness
        self.last_burst = -1e9  # media time of the last burst measured

    def _media(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Arrival times and media times (s) of the kept video frames and audio frames, and the
        audio frames' rms. Media time: pts plus the service's `media_started` origin, as
        AvatarClient.video_media_time and audio_media_time put it."""
        rec = self.client.received
        origin = self.client.media_started() or {}
        v0, a0 = origin.get("video_pts") or 0, origin.get("audio_pts") or 0
        n = min(len(rec.video), len(rec.video_means)) if self.content else len(rec.video)
        v_arr = np.array([t for t, _ in rec.video[:n]], float)
        v_mt = (np.array([p for _, p in rec.video[:n]], float) + v0) / 90000.0
        a_arr = np.array([t for t, _, _ in rec.audio], float)
        a_mt = (np.array([p for _, p, _ in rec.audio], float) + a0) / 48000.0
        a_rms = np.array([r for _, _, r in rec.audio], float)
        return v_arr, v_mt, a_arr, a_mt, a_rms

    def measure(self, since: float, until: float) -> dict[str, Any]:
        """Figures for arrivals in [since, until) (time.monotonic()), then forget old frames."""
        rec = self.client.received
        fps = float(self.client.session.get("fps") or 25.0)
        v_arr, v_mt, a_arr, a_mt, a_rms = self._media()
        out: dict[str, Any] = {
            "fps": round(float(np.sum((v_arr >= since) & (v_arr < until))) / (until - since), 2),
            "arrival_offset_ms": None,
            "offset_ms": None,
            "bursts": 0,
            "bursts_left_out": 0,
        }
        hold_v, hold_a = self.client.receiver_holds()
        vi, ai = (v_arr >= since) & (v_arr < until), (a_arr >= since) & (a_arr < until)
        if vi.any() and ai.any():
            video_delay = np.min(v_arr[vi] - hold_v - v_mt[vi])
            audio_delay = np.min(a_arr[ai] - hold_a - a_mt[ai])
            out["arrival_offset_ms"] = round(1000 * float(video_delay - audio_delay), 1)
        if self.content and len(v_mt) and len(a_mt):
            offsets, left_out = self._bursts(v_mt, a_mt, a_rms, fps)
            out["bursts"], out["bursts_left_out"] = len(offsets), left_out
            if offsets:
                out["offset_ms"] = round(1000 * float(np.median(offsets)), 1)
                out["offset_ms_range"] = [
                    round(1000 * min(offsets), 1),
                    round(1000 * max(offsets), 1),
                ]
        # Forget what arrived more than KEEP_S ago (a burst not yet measured is newer than that).
        keep = until - KEEP_S
        nv = int(np.searchsorted(v_arr, keep)) if len(v_arr) else 0
        na = int(np.searchsorted(a_arr, keep)) if len(a_arr) else 0
        del rec.video[:nv]
        if self.content:
            del rec.video_means[:nv]
        del rec.audio[:na]
        return out

    def _bursts(
        self, v_mt: np.ndarray, a_mt: np.ndarray, a_rms: np.ndarray, fps: float
    ) -> tuple[list[float], int]:
        """Offsets (s) of the bursts not yet measured that both tracks are well past."""
        frame_s = 1.0 / fps
        v_level = np.asarray(
            self._loudness(np.array(self.client.received.video_means[: len(v_mt)])), float
        )
        va, aa = np.argsort(v_mt, kind="stable"), np.argsort(a_mt, kind="stable")
        v_mt, v_level, a_mt, a_rms = v_mt[va], v_level[va], a_mt[aa], a_rms[aa]
        v_mid, a_mid = v_mt + frame_s / 2, a_mt + AUDIO_FRAME_S / 2
        limit = min(v_mt[-1], a_mt[-1]) - ANALYSE_LAG_S
        offsets, left_out = [], 0
        for first, last in _runs(a_rms > LOUD, a_mt, 1.5 * AUDIO_FRAME_S):
            start, end = a_mt[first], a_mt[last] + AUDIO_FRAME_S
            if start <= self.last_burst + 0.05 or end > limit or first == 0:
                continue
            self.last_burst = start
            # Heard: the burst's energy centroid on the audio track.
            aw = (a_mt >= start - 0.1) & (a_mt < end + 0.1)
            a_energy = a_rms[aw] ** 2
            # Shown: the frames within a third of a loop (0.5 s) of it, no neighbour burst.
            vw = (v_mt >= start - LOOP_S / 3) & (v_mt < end + LOOP_S / 3)
            loud = _runs(v_level[vw] > LOUD, v_mt[vw], 1.5 * frame_s)
            gaps = np.diff(v_mt[vw])
            duration = (v_mt[vw][loud[0][1]] - v_mt[vw][loud[0][0]] + frame_s) if loud else 0.0
            if (
                not 0.75 * BURST_S <= end - start <= BURST_S + 3 * AUDIO_FRAME_S
                or len(loud) != 1
                or not 0.75 * BURST_S <= duration <= BURST_S + 1.25 * frame_s
                or (len(gaps) and gaps.max() > 1.5 * frame_s)
            ):
                left_out += 1  # cut by a late block, a lost frame or a dropped packet
                continue
            v_energy = v_level[vw] ** 2
            heard = float(np.sum(a_mid[aw] * a_energy) / np.sum(a_energy))
            shown = float(np.sum(v_mid[vw] * v_energy) / np.sum(v_energy))
            offsets.append(shown - heard)
        return offsets, left_out

    @staticmethod
    def _loudness(means: np.ndarray) -> np.ndarray:
        from models.av_probe import loudness_of

        return np.asarray(loudness_of(means), float)

    def block_figures(self) -> tuple[list[float], list[float]]:
        """The stats channel's block p50 and p95 (ms) since the last call."""
        stats, self.client.received.stats[:] = list(self.client.received.stats), []
        p50 = [s["block_ms"] for s in stats if s.get("block_ms") is not None]
        p95 = [s["block_ms_p95"] for s in stats if s.get("block_ms_p95") is not None]
        return p50, p95


# What an operator sees ---------------------------------------------------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def process_sample(svc: ServiceProcess) -> dict[str, Any]:
    """RSS, fds and threads of the service and its engine worker, and the event loop's tasks."""
    assert svc.proc is not None
    health = svc.health_status()[1]
    workers = list(health.get("workers") or [])
    tasks, fds, wfds = [], [], []
    for i in range(3):
        if i:
            time.sleep(0.3)
        tasks.append(int(svc.health_status()[1]["tasks"]))
        fds.append(_fds(svc.proc.pid))
        wfds.append(sum(_fds(w) for w in workers))
    status = _status(svc.proc.pid)
    wstatus = [_status(w) for w in workers]
    rss = status["VmRSS"] / 1024
    worker_rss = sum(s["VmRSS"] for s in wstatus) / 1024
    return {
        "service_rss_mb": round(rss, 1),
        "worker_rss_mb": round(worker_rss, 1),
        "rss_mb": round(rss + worker_rss, 1),
        "service_fds": min(fds),
        "worker_fds": min(wfds),
        "fds": min(fds) + min(wfds),
        "service_threads": status["Threads"],
        "worker_threads": sum(s["Threads"] for s in wstatus),
        "threads": status["Threads"] + sum(s["Threads"] for s in wstatus),
        "tasks": min(tasks),
        "sessions": int(health.get("sessions", 0)),
        "workers": workers,
        "client_rss_mb": round(_status(os.getpid())["VmRSS"] / 1024, 1),
    }


def block_histogram(svc: ServiceProcess) -> dict[float, float]:
    """Cumulative counts of diffstream_block_latency_seconds by upper bound (inf last)."""
    out = {}
    for name, value in svc.metrics().items():
        if name.startswith("diffstream_block_latency_seconds_bucket{"):
            le = name.split('le="')[1].split('"')[0]
            out[float("inf") if le == "+Inf" else float(le)] = value
    return dict(sorted(out.items()))


def histogram_quantile(
    q: float, before: dict[float, float], after: dict[float, float]
) -> float | None:
    """The q-quantile (s) of the observations between two scrapes, as Prometheus interpolates it
    inside a bucket; the highest finite bound when it falls in the +Inf bucket."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    if not cum or cum[-1] <= 0:
        return None
    rank = q * cum[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cum, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# The run -------------------------------------------------------------------------------------------


async def _wait_idle(svc: ServiceProcess, timeout: float = 30.0) -> list[int] | None:
    """Until the service has no session and the engine holds none; the engine's count then."""
    deadline = time.monotonic() + timeout
    held = None
    while time.monotonic() < deadline:
        health = await asyncio.to_thread(svc.health)
        if health["sessions"] == 0:
            held = await asyncio.to_thread(svc.engine_sessions)
            if held is not None and not any(held):
                return held
        await asyncio.sleep(0.2)
    return held


async def soak_service(
    svc: ServiceProcess,
    *,
    sessions: int,
    seconds: float,
    interval_s: float,
    content: bool,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Stream `sessions` clients for `seconds`, sampling every `interval_s`; see the module."""
    baseline = await asyncio.to_thread(process_sample, svc)
    clients = [AvatarClient(svc.base, keep_video_means=content) for _ in range(sessions)]
    probes = [ReceiverProbe(c, content=content) for c in clients]
    stop = asyncio.Event()
    senders: list[asyncio.Task[int]] = []
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        for c in clients:
            await c.create()
            await c.watch()
        await asyncio.wait_for(asyncio.gather(*(c.first_video.wait() for c in clients)), 120)
        audio = loop_audio()
        for c in clients:
            started = await c.open_audio(SR)
            if started.get("type") != "started":
                raise RuntimeError(f"audio socket refused: {started}")
            senders.append(asyncio.ensure_future(stream_audio(c, audio, stop)))
        hist = await asyncio.to_thread(block_histogram, svc)
        t0 = last = time.monotonic()
        for k in range(1, int(seconds // interval_s) + 1):
            due = t0 + k * interval_s
            while time.monotonic() < due and not any(s.done() for s in senders):
                await asyncio.sleep(min(0.5, max(0.0, due - time.monotonic())))
            if broken := [s for s in senders if s.done()]:
                exc = broken[0].exception()
                errors.append(f"audio sender stopped at {time.monotonic() - t0:.0f} s: {exc!r}")
                break
            now = time.monotonic()
            per_session = [p.measure(last, now) for p in probes]
            p50s, p95s = zip(*(p.block_figures() for p in probes), strict=True)
            p50 = [v for vs in p50s for v in vs]
            p95 = [v for vs in p95s for v in vs]
            proc = await asyncio.to_thread(process_sample, svc)
            new_hist = await asyncio.to_thread(block_histogram, svc)
            p99 = histogram_quantile(0.99, hist, new_hist)
            blocks = new_hist.get(float("inf"), 0.0) - hist.get(float("inf"), 0.0)
            hist, last = new_hist, now
            offsets = [s["offset_ms"] for s in per_session if s["offset_ms"] is not None]
            arrivals = [
                s["arrival_offset_ms"] for s in per_session if s["arrival_offset_ms"] is not None
            ]
            sample = {
                "t_s": round(now - t0, 1),
                **proc,
                "blocks": int(blocks),
                "block_ms_p50": round(float(np.median(p50)), 1) if p50 else None,
                "block_ms_p95": round(float(np.median(p95)), 1) if p95 else None,
                "block_ms_p99": round(1000 * p99, 1) if p99 is not None else None,
                "fps": round(float(np.mean([s["fps"] for s in per_session])), 2),
                "fps_min": min(s["fps"] for s in per_session),
                "offset_ms": round(float(np.mean(offsets)), 1) if offsets else None,
                "arrival_offset_ms": round(float(np.mean(arrivals)), 1) if arrivals else None,
                "bursts": sum(s["bursts"] for s in per_session),
                "bursts_left_out": sum(s["bursts_left_out"] for s in per_session),
                "load_1m": round(os.getloadavg()[0], 2),
                "per_session": per_session,
            }
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
    finally:
        stop.set()
        sent = await asyncio.gather(*senders, return_exceptions=True)
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    held = await _wait_idle(svc)
    await asyncio.sleep(1.0)  # closing tasks finish, the encoder pool goes quiet
    after = await asyncio.to_thread(process_sample, svc)
    return {
        "baseline": baseline,
        "samples": samples,
        "after": after,
        "engine_sessions_after": held,
        "audio_seconds_sent": [s / SR if isinstance(s, int) else repr(s) for s in sent],
        "errors": errors,
    }


def _fit(samples: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """start, end, end - start, and the fitted line's slope per hour and change over the run."""
    pts = [(s["t_s"] / 3600.0, float(s[key])) for s in samples if s.get(key) is not None]
    if not pts:
        return None
    t, y = np.array(pts).T
    slope, icpt = np.polyfit(t, y, 1) if len(pts) >= 2 else (0.0, y[0])
    return {
        "start": round(float(y[0]), 2),
        "end": round(float(y[-1]), 2),
        "change": round(float(y[-1] - y[0]), 2),
        "min": round(float(y.min()), 2),
        "max": round(float(y.max()), 2),
        "slope_per_h": round(float(slope), 3),
        "fitted_change": round(float(slope * (t[-1] - t[0])), 2),
        "samples": len(pts),
    }


def summarize(result: dict[str, Any], warmup_s: float) -> dict[str, Any]:
    """Slopes and start → end over the samples after `warmup_s` (all of them if none are)."""
    samples = [s for s in result["samples"] if s["t_s"] >= warmup_s] or result["samples"]
    out: dict[str, Any] = {"warmup_s": warmup_s, "samples_used": len(samples)}
    for key in (
        "offset_ms",
        "arrival_offset_ms",
        "rss_mb",
        "service_rss_mb",
        "worker_rss_mb",
        "fds",
        "threads",
        "tasks",
        "block_ms_p50",
        "block_ms_p95",
        "block_ms_p99",
        "fps",
        "client_rss_mb",
    ):
        out[key] = _fit(samples, key)
    rss = out["rss_mb"]
    if rss:
        out["rss_growth_pct"] = round(100 * rss["change"] / rss["start"], 2)
        out["rss_slope_pct_per_h"] = round(100 * rss["slope_per_h"] / rss["start"], 2)
    off = out["offset_ms"]
    if off:
        out["offset_drift_ms"] = off["fitted_change"]
        out["offset_drift_ms_per_h"] = off["slope_per_h"]
    base, after = result["baseline"], result["after"]
    out["after_vs_baseline"] = {k: after[k] - base[k] for k in ("fds", "threads", "tasks")}
    out["after_vs_baseline"]["rss_mb"] = round(after["rss_mb"] - base["rss_mb"], 1)
    out["bursts"] = sum(s["bursts"] for s in result["samples"])
    out["bursts_left_out"] = sum(s["bursts_left_out"] for s in result["samples"])
    return out


def run_soak(
    *,
    seconds: float,
    sessions: int = 1,
    model: str = "av-probe",
    interval_s: float = 60.0,
    warmup_s: float = 60.0,
    compile: bool = False,
    serve_args: tuple[str, ...] = (),
    log_path: Path | None = None,
    progress: Path | None = None,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start the service, soak it, stop it; the JSON-ready result with its summary."""
    k = str(sessions)
    flags = ["--max-sessions", k, "--max-sessions-per-client", k, *serve_args]
    if not compile:
        flags.append("--no-compile")
    info = {
        **machine(),
        "model": model,
        "sessions": sessions,
        "seconds": seconds,
        "interval_s": interval_s,
        "serve_flags": flags,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    log = log_path or Path(tempfile.gettempdir()) / f"diffstream-soak-{os.getpid()}.log"
    done: list[dict[str, Any]] = []

    def sampled(sample: dict[str, Any]) -> None:
        done.append(sample)
        if progress is not None:
            progress.write_text(json.dumps({"machine": info, "samples": done}, indent=1))
        if on_sample is not None:
            on_sample(sample)

    with ServiceProcess(*flags, model=model, log_path=log) as svc:
        result = asyncio.run(
            soak_service(
                svc,
                sessions=sessions,
                seconds=seconds,
                interval_s=interval_s,
                content=model == "av-probe",
                on_sample=sampled,
            )
        )
        if result["errors"]:
            result["serve_log_tail"] = svc.log_tail()
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    info["ended_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"machine": info, **result, "summary": summarize(result, warmup_s)}


# Output ---------------------------------------------------------------------------------------------

COLUMNS = (
    ("t min", "t_s", lambda v: f"{v / 60:.1f}"),
    ("RSS MB svc+wrk", "rss_mb", None),
    ("fds", "fds", None),
    ("threads", "threads", None),
    ("tasks", "tasks", None),
    ("block p50/p95/p99 ms", None, None),
    ("fps", "fps", None),
    ("offset ms", "offset_ms", None),
    ("arrival offset ms", "arrival_offset_ms", None),
    ("bursts (left out)", None, None),
    ("load", "load_1m", None),
)


def markdown(result: dict[str, Any]) -> str:
    """The samples as a Markdown table, then the summary's headline figures."""
    lines = [
        "| " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]

    def row(s: dict[str, Any]) -> str:
        cells = []
        for name, key, fmt in COLUMNS:
            if name.startswith("block"):
                cells.append(f"{s['block_ms_p50']} / {s['block_ms_p95']} / {s['block_ms_p99']}")
            elif name.startswith("bursts"):
                cells.append(f"{s['bursts']} ({s['bursts_left_out']})")
            else:
                v = s.get(key)
                cells.append(fmt(v) if fmt and v is not None else str(v))
        return "| " + " | ".join(cells) + " |"

    lines += [row(s) for s in result["samples"]]
    m, sm = result["machine"], result["summary"]
    b, a = result["baseline"], result["after"]
    lines.append("")
    lines.append(
        f"{m['cpu']}, {m['cores']} cores, load {m['load_avg_1m_at_start']} → "
        f"{m.get('load_avg_1m_at_end')}; model {m['model']}, {m['sessions']} session(s), "
        f"{m['seconds'] / 60:.0f} min, sampled every {m['interval_s']:.0f} s"
    )

    def fig(key: str, unit: str = "") -> str:
        f = sm.get(key)
        if not f:
            return f"{key}: n/a"
        return (
            f"{key}: {f['start']} → {f['end']}{unit} (fitted {f['fitted_change']:+}{unit}, "
            f"{f['slope_per_h']:+}{unit}/h)"
        )

    lines.append(f"after the first {sm['warmup_s']:.0f} s ({sm['samples_used']} samples):")
    for key, unit in (("offset_ms", " ms"), ("arrival_offset_ms", " ms"), ("rss_mb", " MB")):
        lines.append(f"- {fig(key, unit)}")
    if "rss_growth_pct" in sm:
        lines.append(
            f"- RSS growth {sm['rss_growth_pct']:+} % ({sm['rss_slope_pct_per_h']:+} %/h fitted)"
        )
    for key in ("fds", "threads", "tasks"):
        lines.append(f"- {fig(key)}")
    lines.append(
        f"- baseline → after the sessions: fds {b['fds']} → {a['fds']}, threads {b['threads']} → "
        f"{a['threads']}, tasks {b['tasks']} → {a['tasks']}, RSS {b['rss_mb']} → {a['rss_mb']} MB"
    )
    lines.append(f"- bursts measured {sm['bursts']}, left out {sm['bursts_left_out']}")
    if result["errors"]:
        lines.append(f"- errors: {result['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument(
        "--model", default="av-probe", help="av-probe (offset by content), tiny, default"
    )
    parser.add_argument("--interval-s", type=float, default=60.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of the slopes")
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra serve flag, e.g. --serve-arg=--steps=2",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--progress", type=Path, help="rewrite this JSON file after every sample")
    parser.add_argument("--log", type=Path, help="the service's log (default: a temp file)")
    parser.add_argument("--note", default="", help="kept in the JSON, e.g. what else ran")
    args = parser.parse_args(argv)

    def progress_line(s: dict[str, Any]) -> None:
        print(
            f"[soak] {s['t_s'] / 60:5.1f} min rss {s['rss_mb']} MB fds {s['fds']} threads "
            f"{s['threads']} tasks {s['tasks']} block {s['block_ms_p50']}/{s['block_ms_p99']} ms "
            f"fps {s['fps']} offset {s['offset_ms']} ms arrival {s['arrival_offset_ms']} ms "
            f"bursts {s['bursts']} ({s['bursts_left_out']})",
            file=sys.stderr,
            flush=True,
        )

    result = run_soak(
        seconds=args.minutes * 60,
        sessions=args.sessions,
        model=args.model,
        interval_s=args.interval_s,
        warmup_s=args.warmup_s,
        compile=args.compile,
        serve_args=tuple(args.serve_arg),
        log_path=args.log,
        progress=args.progress,
        on_sample=progress_line,
    )
    if args.note:
        result["machine"]["note"] = args.note
    table = markdown(result)
    if args.json:
        print(json.dumps(result, indent=2))
        print(table, file=sys.stderr)
    else:
        print(table)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

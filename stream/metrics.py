"""Prometheus metrics of one app, on a registry of its own so several apps can live in one process.

Everything here is aggregated over sessions (no session id labels): the number of sessions is
unbounded, and a label per session would grow the registry without end.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServiceMetrics:
    """The service's counters; sessions and tracks update them, GET /metrics renders them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_sessions = Gauge(
            "diffstream_active_sessions", "Sessions currently open", registry=r
        )
        self.sessions = Counter(
            "diffstream_sessions",
            "Sessions ended, by how they ended",
            ["outcome"],
            registry=r,
        )
        self.sessions_rejected = Counter(
            "diffstream_sessions_rejected",
            "Session requests refused by admission control, by reason: capacity (503, the "
            "server's max_sessions), engine_busy (503), client_sessions and client_rate (429, "
            "one client's quota), draining (503, shutting down)",
            ["reason"],
            registry=r,
        )
        self.frames_sent = Counter(
            "diffstream_frames_sent",
            "Video frames handed to WebRTC, fresh or repeated",
            registry=r,
        )
        self.frames_generated = Counter(
            "diffstream_frames_generated",
            "Frames the engine produced and that reached the playout queue",
            registry=r,
        )
        self.frames_repeated = Counter(
            "diffstream_frames_repeated",
            "Slots where the last frame was shown again because no new frame was ready",
            registry=r,
        )
        self.frames_dropped = Counter(
            "diffstream_frames_dropped",
            "Frames never shown, by reason",
            ["reason"],
            registry=r,
        )
        self.blocks_dropped = Counter(
            "diffstream_blocks_dropped",
            "Blocks not generated or discarded, by reason",
            ["reason"],
            registry=r,
        )
        self.blocks = Counter("diffstream_blocks", "Blocks generated and delivered", registry=r)
        self.block_latency = Histogram(
            "diffstream_block_latency_seconds",
            "Submit to result of one block, queueing in the executor included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "diffstream_end_to_end_latency_seconds",
            "Audio received on the websocket to the frame it drove being sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fps = Gauge(
            "diffstream_fps",
            "Video frames sent per second, summed over sessions (last stats interval)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "diffstream_queue_depth",
            "Items waiting, summed over sessions",
            ["queue"],
            registry=r,
        )
        self.audio_bytes = Counter(
            "diffstream_audio_bytes_received", "Audio payload bytes received", registry=r
        )
        self.client_errors = Counter(
            "diffstream_client_errors",
            "Bad client input answered with an error, by kind",
            ["kind"],
            registry=r,
        )
        self.engine_sessions = Gauge(
            "diffstream_engine_sessions",
            "Sessions whose state each engine rank holds, as the rank counts them (read at "
            "scrape time); above diffstream_active_sessions for long means leaked engine state",
            ["rank"],
            registry=r,
        )
        for queue in ("audio_seconds", "frames", "blocks_in_flight"):
            self.queue_depth.labels(queue=queue).set(0)

    def set_engine_sessions(self, held: list[int] | None) -> None:
        """One sample per engine rank; none when the engine did not answer in time."""
        self.engine_sessions.clear()
        for rank, count in enumerate(held or []):
            self.engine_sessions.labels(rank=str(rank)).set(count)

    def render(self) -> bytes:
        """The text exposition format of this app's registry."""
        return generate_latest(self.registry)

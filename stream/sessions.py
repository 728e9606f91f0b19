"""Sessions: one avatar stream each, and the registry that admits, finds and ends them.

A session owns everything that lives as long as the stream: the executor's per-session state, the
audio ingest, the scheduler task, the timeline and its tracks, the peer connection, the audio
socket, the stats task and the recording. `Session.close` releases all of them, once, whatever
ended the session (DELETE, "stop", the viewer leaving, a failed worker, idleness, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import SessionError
from pipelines.executors.base import Executor, ExecutorBusy
from pipelines.messages import SessionSpec
from stream.ingest import AudioIngest
from stream.metrics import ServiceMetrics
from stream.playback import PlaybackTracker
from stream.protocol import CloseCode, SessionInfo
from stream.quotas import QuotaExceeded, SessionRateLimiter
from stream.recording import SessionRecorder
from stream.replicas import check_session_id, new_session_id
from stream.scheduler import BlockScheduler
from stream.settings import Settings
from stream.timeline import MediaTimeline, Slot
from stream.tracks import AvatarVideoTrack, DrivingAudioTrack

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpSender

    from stream.audio_socket import AudioSocket

log = logging.getLogger(__name__)


class AdmissionError(SessionError):
    """The server is at its session limit."""


class Draining(AdmissionError):
    """The server is shutting down (SIGTERM) and admits no new session."""


class Session:
    """One avatar stream: audio in through `ingest`, frames out through `video`/`audio` tracks."""

    def __init__(
        self,
        spec: SessionSpec,
        executor: Executor,
        settings: Settings,
        metrics: ServiceMetrics,
        on_closed: Callable[[Session], None],
    ) -> None:
        self.id = spec.session_id
        self.spec = spec
        self.executor = executor
        self.info = executor.info
        self.settings = settings
        self.metrics = metrics
        self.created = time.monotonic()
        self.created_at = time.time()  # unix time; its TURN credentials expire turn_ttl_s after
        self.state = "created"
        self.outcome: str | None = None
        self.error: str | None = None
        self._on_closed = on_closed
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.client: str | None = None  # whose quota it counts against (stream.quotas)
        # Whether a viewer (offer) or an audio socket ever attached: a session nobody ever
        # used ends after idle_no_viewer_s, a used one after idle_timeout_s.
        self.watched = False
        self.pc: RTCPeerConnection | None = None
        self.video_sender: RTCRtpSender | None = None
        self.viewer_connected_at: float | None = None
        self.stats_channel: RTCDataChannel | None = None
        self.audio_socket: AudioSocket | None = None
        self.viewer_audio = False  # whether the viewer's offer asked for the audio track
        self._last_contact = time.monotonic()
        self.recorder: SessionRecorder | None = None
        if settings.recording_dir is not None:
            path = Path(settings.recording_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.id}.mp4"
            self.recorder = SessionRecorder(path, self.info.fps, self.info.width, self.info.height)
        # Room for the blocks in flight plus the lead the scheduler keeps for slow blocks; the
        # scheduler's credit keeps it below this, the bound only guards against a bug upstream.
        queue_bound = max(
            self.info.frames_per_block * (settings.max_blocks_in_flight + 3),
            int(2 * self.info.fps),
        )
        self.timeline = MediaTimeline(
            self.info.fps,
            self.info.height,
            self.info.width,
            max_queued_frames=queue_bound,
            on_slot=self._on_slot,
        )
        self.ingest = AudioIngest(
            self.info.audio_sample_rate,
            max_buffer_s=settings.max_audio_buffer_s,
            jitter_s=settings.jitter_buffer_ms / 1000.0,
        )
        self.scheduler = BlockScheduler(
            self.id,
            executor,
            self.ingest,
            self.timeline,
            metrics,
            max_in_flight=settings.max_blocks_in_flight,
            degrade=settings.degrade,
            max_backlog_s=settings.max_backlog_s,
            on_error=self._on_generation_error,
            on_drained=self._on_drained,
        )
        self.playback = PlaybackTracker(self.info.audio_sample_rate, self.info.fps, self._post)
        self.ingest.on_audio = self.playback.audio
        self.video = AvatarVideoTrack(
            self.timeline, on_sent=self._on_frame_sent, on_skipped=self._on_frames_skipped
        )
        self.audio = DrivingAudioTrack(self.timeline)
        self.video.on_first = self.audio.on_first = self._on_track_started
        self.latencies: list[float] = []
        self.frames_skipped = 0
        self.last_fps = 0.0

    # Lifecycle --------------------------------------------------------------------------------

    @property
    def pc(self) -> RTCPeerConnection | None:
        return self._pc

    @pc.setter
    def pc(self, value: RTCPeerConnection | None) -> None:
        self._pc = value
        if value is not None:
            self.watched = True

    @property
    def audio_socket(self) -> AudioSocket | None:
        return self._audio_socket

    @audio_socket.setter
    def audio_socket(self, value: AudioSocket | None) -> None:
        self._audio_socket = value
        if value is not None:
            self.watched = True

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A task that belongs to this session and is cancelled when it closes."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_streaming(self) -> None:
        """Start generating: called once a viewer's tracks exist to pull the frames."""
        if self.state == "created":
            self.state = "streaming"
            self.spawn(self.scheduler.run(), "scheduler")
            self.spawn(self._stats_loop(), "stats")

    def touch(self) -> None:
        self._last_contact = time.monotonic()

    async def close(self, outcome: str, message: str | None = None) -> None:
        """Release every resource of the session; safe to call more than once."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.state = "closed"
        self.outcome = outcome
        self.error = message if outcome == "error" else None
        log.info("session %s closed: %s%s", self.id, outcome, f" ({message})" if message else "")
        self.playback.close(self._media_slot())
        self.scheduler.stop()
        self.timeline.close()
        self.ingest.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.scheduler.release()
        if self.audio_socket is not None:
            code, reason = _close_code(outcome, message)
            await self.audio_socket.close(code, reason, message if outcome == "error" else None)
            self.audio_socket = None
        self.video.stop()
        self.audio.stop()
        if self.pc is not None:
            pc, self.pc = self.pc, None
            with contextlib.suppress(Exception):
                await pc.close()
        self.stats_channel = None
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.executor.close_session, self.id)
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)
        self.metrics.sessions.labels(outcome=outcome).inc()
        self._on_closed(self)
        # aiortc's peer connection is a web of reference cycles; collect it now so its memory is
        # reused by the next session instead of piling up until the collector's next full pass.
        started = time.perf_counter()
        gc.collect()
        log.debug(
            "session %s: collected in %.1f ms", self.id, 1000 * (time.perf_counter() - started)
        )

    def announce_closing(self, within_s: float) -> None:
        """Tell the audio socket and the viewer's stats channel that the server is shutting
        down: the session plays on for up to `within_s` seconds, then ends (close code 1001)."""
        event = {
            "type": "closing",
            "message": "server is shutting down",
            "reason": "shutdown",
            "within_s": within_s,
        }
        if self.audio_socket is not None:
            self.audio_socket.post(event)
        channel = self.stats_channel
        if channel is not None and channel.readyState == "open":
            with contextlib.suppress(Exception):
                channel.send(json.dumps(event))

    def _on_generation_error(self, message: str) -> None:
        self.spawn(self.close("error", message), "close")

    def _on_drained(self) -> None:
        self.spawn(self.close("stopped", "all audio played"), "close")

    # Media callbacks --------------------------------------------------------------------------

    def _on_slot(self, slot: Slot) -> None:
        self.playback.slot(slot.index, slot.span)
        if slot.fresh:
            if slot.latency is not None:
                self.latencies.append(slot.latency)
                if len(self.latencies) > 256:
                    del self.latencies[:128]
                self.metrics.e2e_latency.observe(slot.latency)
        else:
            self.metrics.frames_repeated.inc()
        if self.recorder is not None:
            self.recorder.feed(slot)

    def _on_frame_sent(self, slot: Slot) -> None:
        self.metrics.frames_sent.inc()

    def _on_frames_skipped(self, n: int) -> None:
        self.frames_skipped += n
        self.metrics.frames_dropped.labels(reason="sender_late").inc(n)

    # Events to the audio socket ---------------------------------------------------------------

    def _post(self, event: dict[str, Any]) -> None:
        if self.audio_socket is not None:
            self.audio_socket.post(event)

    def _media_slot(self) -> int | None:
        """The first slot not yet decided, or None before the media clock started."""
        return self.timeline.next_slot if self.timeline.started else None

    def media_started_event(self) -> dict[str, Any] | None:
        """Where the viewer's tracks begin: an aiortc-like receiver numbers pts from its first
        frame, so adding these puts what it received on the media clock of the events."""
        video, audio = self.video.first_pts, self.audio.first_pts
        if video is None or (self.viewer_audio and audio is None):
            return None
        return {"type": "media_started", "video_pts": video, "audio_pts": audio}

    def _on_track_started(self) -> None:
        if self.audio_socket is not None:
            self.audio_socket.announce_media(self.media_started_event())

    # Control from the audio socket ------------------------------------------------------------

    def interrupt(self) -> tuple[int, float | None]:
        """Drop the audio and frames not yet shown; returns (frames dropped, media time from
        which nothing of the cut audio is shown, None before the clock started)."""
        self.ingest.interrupt()
        dropped = self.scheduler.interrupt()
        resume = self._media_slot()
        self.playback.interrupt(resume)
        return dropped, None if resume is None else round(resume / self.info.fps, 4)

    def end_segment(self) -> dict[str, Any]:
        """A `segment` marker: the audio so far is one utterance (see PlaybackTracker)."""
        self.ingest.end_segment()
        ended = self.playback.delimit(self.ingest.received_samples, self._media_slot())
        self.scheduler.wake()
        return ended

    def socket_gone(self) -> None:
        """No more audio can come for the open utterance: end it where it is."""
        if not self.closed and self.ingest.started:
            self.ingest.end_segment()
            self.playback.delimit(self.ingest.received_samples, self._media_slot(), bounded=False)

    def stop_audio(self) -> None:
        self.ingest.finish()
        self.playback.delimit(self.ingest.received_samples, self._media_slot(), bounded=False)
        self.scheduler.drain()
        if self.state == "created":
            # Nothing is being shown, so there is nothing to play out.
            self.spawn(self.close("stopped", "stopped before a viewer connected"), "close")

    # Stats ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The figures the data channel and GET /v1/sessions report."""
        lat = self.latencies[-32:]
        return {
            "type": "stats",
            "session_id": self.id,
            "frames_sent": self.video.sent,
            "frames_generated": self.timeline.fresh_slots,
            "frames_repeated": self.timeline.repeated_slots,
            "dropped_frames": self.scheduler.frames_dropped + self.frames_skipped,
            "dropped_blocks": self.scheduler.blocks_dropped,
            "blocks": self.scheduler.blocks_done,
            "latency_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "block_ms": _percentile_ms(self.scheduler.recent_block_latency, 50),
            "block_ms_p95": _percentile_ms(self.scheduler.recent_block_latency, 95),
            "audio_buffer_s": round(self.ingest.buffered_seconds, 3),
            "queued_frames": self.timeline.queued_frames,
        }

    async def _stats_loop(self) -> None:
        interval = self.settings.stats_interval_s
        last_sent, last_fresh, last_t = 0, 0, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dt = max(1e-6, now - last_t)
            stats = self.stats()
            stats["fps"] = round((self.video.sent - last_sent) / dt, 2)
            stats["generated_fps"] = round((self.timeline.fresh_slots - last_fresh) / dt, 2)
            last_sent, last_fresh, last_t = self.video.sent, self.timeline.fresh_slots, now
            self.last_fps = stats["fps"]
            channel = self.stats_channel
            if channel is not None and channel.readyState == "open":
                with contextlib.suppress(Exception):
                    channel.send(json.dumps(stats))
            if self._idle_for() > self.settings.idle_timeout_s:
                self.spawn(self.close("idle", "no viewer and no audio socket"), "close")
                return
            silent = await self._viewer_silent_for()
            if silent > self.settings.viewer_timeout_s:
                self.spawn(
                    self.close("viewer_gone", f"no RTCP from the viewer for {silent:.0f} s"),
                    "close",
                )
                return

    async def _viewer_silent_for(self) -> float:
        """Seconds since the viewer last sent a receiver report about our video.

        A viewer that vanishes (tab killed, network gone) closes nothing; ICE consent takes
        ~30 s to notice. Receiver reports arrive about every second from any live receiver.
        """
        if self.video_sender is None or self.viewer_connected_at is None:
            return 0.0
        last = self.viewer_connected_at
        with contextlib.suppress(Exception):
            report = await self.video_sender.getStats()
            for stat in report.values():
                if stat.type == "remote-inbound-rtp":
                    seen = (
                        time.monotonic()
                        - (
                            datetime.datetime.now(datetime.timezone.utc) - stat.timestamp
                        ).total_seconds()
                    )
                    last = max(last, seen)
        return time.monotonic() - last

    def _idle_for(self) -> float:
        viewer = self.pc is not None and self.pc.connectionState in (
            "connecting",
            "connected",
            "new",
        )
        if viewer or self.audio_socket is not None:
            self.touch()
            return 0.0
        return time.monotonic() - self._last_contact

    def describe(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.id,
            state=self.state,
            age_s=round(time.monotonic() - self.created, 3),
            viewer=self.pc.connectionState if self.pc is not None else None,
            audio_connected=self.audio_socket is not None,
            blocks=self.scheduler.blocks_done,
            frames_sent=self.video.sent,
            dropped_frames=self.scheduler.frames_dropped + self.frames_skipped,
            dropped_blocks=self.scheduler.blocks_dropped,
        )


class SessionManager:
    """Admission control and the registry of live sessions."""

    def __init__(self, executor: Executor, settings: Settings, metrics: ServiceMetrics) -> None:
        self.executor = executor
        self.settings = settings
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._reserved = 0
        self._reserved_by: dict[str, int] = {}  # client -> sessions being opened
        self.rate = SessionRateLimiter(settings.session_rate, settings.session_burst)
        self.draining = False  # SIGTERM: no new sessions (see drain)
        self._reaper: asyncio.Task[None] | None = None
        metrics.active_sessions.set_function(lambda: len(self.sessions))
        depth = metrics.queue_depth
        depth.labels(queue="audio_seconds").set_function(
            lambda: sum(s.ingest.buffered_seconds for s in self.sessions.values())
        )
        depth.labels(queue="frames").set_function(
            lambda: sum(s.timeline.queued_frames for s in self.sessions.values())
        )
        depth.labels(queue="blocks_in_flight").set_function(
            lambda: sum(s.scheduler.in_flight for s in self.sessions.values())
        )
        metrics.fps.set_function(lambda: sum(s.last_fps for s in self.sessions.values()))

    def get(self, session_id: str) -> Session:
        check_session_id(session_id, self.settings.replica_id)  # 404 for another replica's
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            raise SessionError(f"session {session_id!r} not found (it never existed or has ended)")
        return session

    @property
    def in_use(self) -> int:
        return len(self.sessions) + self._reserved

    def held_by(self, client: str) -> int:
        """Sessions `client` holds or is opening."""
        open_ = sum(1 for s in self.sessions.values() if s.client == client and not s.closed)
        return open_ + self._reserved_by.get(client, 0)

    def admit(self, client: str | None = None) -> None:
        """Raise if a new session cannot be admitted now: the server's capacity first (503,
        `AdmissionError`, as before quotas existed), then the client's own quotas (429,
        `QuotaExceeded`). Counted by reason in diffstream_sessions_rejected_total."""
        if self.draining:
            self.metrics.sessions_rejected.labels(reason="draining").inc()
            raise Draining("server is shutting down and admits no new session; use another one")
        if self.in_use >= self.settings.max_sessions:
            self.metrics.sessions_rejected.labels(reason="capacity").inc()
            raise AdmissionError(
                f"server at capacity: {self.in_use} of {self.settings.max_sessions} sessions in "
                "use; retry when one ends"
            )
        limit = self.settings.max_sessions_per_client
        if client is not None and (held := self.held_by(client)) >= limit:
            self.metrics.sessions_rejected.labels(reason="client_sessions").inc()
            raise QuotaExceeded(
                f"too many sessions for this client: it holds {held} of its {limit}; end one "
                "(DELETE /v1/sessions/{id}) or wait until one ends",
                limit="sessions_per_client",
                retry_after_s=5.0,
            )
        if client is not None and (wait := self.rate.wait_s(client)) > 0:
            self.metrics.sessions_rejected.labels(reason="client_rate").inc()
            raise QuotaExceeded(
                f"sessions created too fast by this client: at most "
                f"{self.settings.session_rate:g} per minute (bursts of "
                f"{self.settings.session_burst}); retry in {wait:.1f} s",
                limit="session_rate",
                retry_after_s=wait,
            )

    async def create(
        self,
        reference: Any,
        *,
        seed: int = 0,
        steps: int | None = None,
        sink_refresh: bool | None = None,
        prompt: str | None = None,
        client: str | None = None,
    ) -> Session:
        """Admit and open a session for `client` (see `admit`); raises AdmissionError when the
        server is full, QuotaExceeded when the client is over its own limits."""
        self.admit(client)
        if client is not None:
            self.rate.take(client)
            self._reserved_by[client] = self._reserved_by.get(client, 0) + 1
        self._reserved += 1
        try:
            spec = SessionSpec(
                session_id=new_session_id(self.settings.replica_id),
                reference=reference,
                seed=seed,
                steps=steps,
                sink_refresh=sink_refresh,
                prompt=prompt if prompt is not None else self.settings.prompt,
            )
            try:
                await asyncio.to_thread(self.executor.open_session, spec)
            except ExecutorBusy:
                self.metrics.sessions_rejected.labels(reason="engine_busy").inc()
                raise AdmissionError("the engine's queue is full; retry in a few seconds") from None
            session = Session(spec, self.executor, self.settings, self.metrics, self._forget)
            session.client = client
            self.sessions[session.id] = session
        finally:
            self._reserved -= 1
            if client is not None:
                left = self._reserved_by.get(client, 1) - 1
                if left > 0:
                    self._reserved_by[client] = left
                else:
                    self._reserved_by.pop(client, None)
        log.info(
            "session %s opened (%d of %d)", session.id, self.in_use, self.settings.max_sessions
        )
        return session

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def close_all(self, outcome: str = "shutdown") -> None:
        await asyncio.gather(
            *(s.close(outcome, "server shutting down") for s in list(self.sessions.values())),
            return_exceptions=True,
        )

    async def drain(self, seconds: float) -> None:
        """Stop admitting; tell every session's clients the server is going away; let running
        sessions end by themselves (their audio played out or stopped) for up to `seconds`; end
        the rest (outcome shutdown, close code 1001). Sessions that never started streaming
        have nothing to play out and end at once."""
        self.draining = True
        deadline = time.monotonic() + seconds
        log.info("draining: %d sessions, up to %g s", len(self.sessions), seconds)
        unstarted = []
        for session in list(self.sessions.values()):
            session.announce_closing(seconds)
            if session.state == "created":
                unstarted.append(session.close("shutdown", "server shutting down"))
        await asyncio.gather(*unstarted, return_exceptions=True)
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.sessions:
            log.info("drain deadline: ending %d sessions", len(self.sessions))
        await self.close_all("shutdown")

    def start_reaper(self) -> None:
        """Sessions that never got a viewer have no stats loop; end them when idle too."""
        self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    async def stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    async def _reap(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(
                min(2.0, settings.idle_timeout_s / 2, settings.idle_no_viewer_s / 4)
            )
            for session in list(self.sessions.values()):
                if session.state != "created" or session.closed:
                    continue
                unwatched_for = time.monotonic() - session.created
                if not session.watched and unwatched_for > settings.idle_no_viewer_s:
                    # Created and never used: a script that crashed, a page never opened.
                    await session.close(
                        "no_viewer",
                        f"no viewer and no audio socket within {settings.idle_no_viewer_s:g} s",
                    )
                elif session._idle_for() > settings.idle_timeout_s:
                    await session.close("idle", "no viewer connected")


def _percentile_ms(values: Any, q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.fromiter(values, float), q)) * 1000, 1)


def _close_code(outcome: str, message: str | None) -> tuple[int, str]:
    if outcome == "error":
        return CloseCode.INTERNAL, (message or "generation failed")
    if outcome in ("stopped",):
        return CloseCode.NORMAL, "stopped"
    if outcome == "shutdown":
        return CloseCode.GOING_AWAY, "server shutting down"
    return CloseCode.SESSION_ENDED, f"session ended: {outcome}"

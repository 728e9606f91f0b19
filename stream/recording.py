"""Write what a viewer saw and heard to MP4 (H.264 + AAC) with PyAV, off the event loop.

The recorder is fed the session's slots as they are decided, so the file holds the same frames,
repeats and audio the WebRTC tracks sent, on the same clock. Encoding runs on one thread per
recording behind a bounded queue; if the encoder cannot keep up, slots are dropped and counted
rather than blocking the stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from stream.timeline import AUDIO_RATE, Slot

log = logging.getLogger(__name__)

_STOP = object()


class SessionRecorder:
    """One MP4 per session; `feed` never blocks, `close` flushes and joins the thread."""

    def __init__(
        self, path: Path, fps: float, width: int, height: int, max_queue: int = 200
    ) -> None:
        self.path = path
        self.fps = fps
        self.width = width
        self.height = height
        self.dropped = 0
        self.written = 0
        self.error: str | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name=f"recorder-{path.stem}", daemon=True)
        self._thread.start()

    def feed(self, slot: Slot) -> None:
        try:
            self._queue.put_nowait(slot)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 30.0) -> None:
        """Finish the file; blocking, so callers run it in a worker thread."""
        while True:
            try:
                self._queue.put(_STOP, timeout=0.5)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._encode()
        except Exception as exc:  # a full disk must not take the stream down with it
            self.error = str(exc)
            log.exception("recording %s failed", self.path)
            while self._queue.get() is not _STOP:
                pass

    def _encode(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fps = Fraction(self.fps).limit_denominator(1001)
        with av.open(str(self.path), mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=fps)
            video.width = self.width - self.width % 2
            video.height = self.height - self.height % 2
            video.pix_fmt = "yuv420p"
            video.options = {"preset": "veryfast", "tune": "zerolatency"}
            audio = container.add_stream("aac", rate=AUDIO_RATE)
            audio.layout = "mono"
            audio_fifo = av.AudioFifo()
            first: int | None = None
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                assert isinstance(item, Slot)
                if first is None:
                    first = item.index
                frame = item.frame[: video.height, : video.width]
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                vf.pts = item.index - first
                vf.time_base = Fraction(1) / fps
                container.mux(video.encode(vf))
                af = av.AudioFrame.from_ndarray(
                    item.audio.reshape(1, -1), format="s16", layout="mono"
                )
                af.sample_rate = AUDIO_RATE
                af.pts = None
                audio_fifo.write(af)
                size = audio.codec_context.frame_size or 1024
                while audio_fifo.samples >= size:
                    container.mux(audio.encode(audio_fifo.read(size)))
                self.written += 1
            tail = audio_fifo.read()
            if tail is not None:
                container.mux(audio.encode(tail))
            container.mux(audio.encode(None))
            container.mux(video.encode(None))

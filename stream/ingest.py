"""Websocket PCM in, block-sized windows at the model's audio rate out.

The ingest never decides *when* a block is generated (the session's scheduler does, from the
playout clock); it answers "give me the next n samples" in a way that keeps speech whole:

- while speech flows, windows are cut back to back with no padding;
- when the clock forces a window and nothing has arrived, it is silence, so the avatar idles
  instead of freezing;
- when speech starts after silence, the window is padded at the *front* and a small cushion of
  audio is held back, so network jitter does not punch holes into the following windows;
- when speech runs dry mid-window, the window is padded at the end (end of an utterance).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.audio import StreamingResampler
from models.errors import InvalidAudioError
from stream.protocol import StartMessage


@dataclass
class AudioWindow:
    """The audio that drives one block, and where in it real (not padded) audio begins."""

    audio: np.ndarray  # float32 [n] at the model's audio rate
    real_samples: int
    first_real_offset: int | None  # sample offset of the first real sample in `audio`
    first_real_arrival: float | None  # clock time that sample reached the server
    first_real_index: int | None = None  # that sample's index on the session's sample counter

    @property
    def silent(self) -> bool:
        return self.real_samples == 0


class AudioIngest:
    """Per-session audio buffer: validated start, resampling, bounded buffer, window cutting."""

    def __init__(
        self,
        model_rate: int,
        *,
        max_buffer_s: float,
        jitter_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_rate = model_rate
        self.max_buffer_samples = max(1, int(max_buffer_s * model_rate))
        self.cushion = int(jitter_s * model_rate)
        self.clock = clock
        self.format: StartMessage | None = None
        self._resampler: StreamingResampler | None = None
        self._chunks: deque[tuple[np.ndarray, float]] = deque()
        self._offset = 0  # samples of _chunks[0] already taken
        self._buffered = 0
        self._speaking = False
        self._room = asyncio.Event()
        self._room.set()
        self.received_samples = 0  # also the index the next buffered sample will get
        self.dropped_samples = 0
        self._read_index = 0  # index of the first buffered sample
        self._final_until = 0  # samples before this index end an utterance: no cushion held
        # Called with (first, end) sample indices whenever samples are buffered.
        self.on_audio: Callable[[int, int], None] | None = None

    # Input ------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._resampler is not None

    def start(self, message: StartMessage) -> None:
        """Accept the declared format; a second start may change it (new utterance source)."""
        if self._resampler is not None:
            self._drain_resampler()
        try:
            self._resampler = StreamingResampler(
                message.sample_rate, message.channels, message.format, self.model_rate
            )
        except InvalidAudioError:
            raise
        except Exception as exc:  # PyAV refusing parameters it was given
            raise InvalidAudioError(f"cannot resample this audio: {exc}") from None
        self.format = message

    def push(self, data: bytes) -> int:
        """Resample one binary message into the buffer; returns samples added at the model rate.

        A message may end mid-sample; the resampler keeps the partial frame for the next one.
        """
        if self._resampler is None:
            raise InvalidAudioError('binary audio arrived before the "start" message')
        return self._append(self._resampler.push(data))

    def close(self) -> None:
        """Drop the buffer and the resampler now: PyAV's filter graph holds native threads, and
        waiting for the garbage collector to find the session's reference cycles leaks them."""
        self.interrupt()
        self._resampler = None

    def finish(self) -> int:
        """End of input: push what the resampler still holds."""
        return self.end_segment()

    def end_segment(self) -> int:
        """The audio so far ends an utterance: push what the resampler holds, and let the
        windows take its tail at once instead of holding back a jitter cushion for it."""
        n = self._drain_resampler()
        self._final_until = self.received_samples
        return n

    def _drain_resampler(self) -> int:
        if self._resampler is None:
            return 0
        tail = self._resampler.flush()
        return self._append(tail if tail is not None else np.zeros(0, np.float32))

    def _append(self, samples: np.ndarray) -> int:
        n = int(samples.shape[0])
        if n:
            first = self.received_samples
            self._chunks.append((np.asarray(samples, dtype=np.float32), self.clock()))
            self._buffered += n
            self.received_samples += n
            if self._buffered >= self.max_buffer_samples:
                self._room.clear()
            if self.on_audio is not None:
                self.on_audio(first, self.received_samples)
        return n

    async def wait_for_room(self) -> None:
        """Backpressure: a client sending faster than real time waits here, bounded."""
        await self._room.wait()

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    @property
    def buffered_seconds(self) -> float:
        return self._buffered / self.model_rate

    def interrupt(self) -> int:
        """Drop everything buffered, and the resampler's tail of the cut audio; returns the
        samples dropped."""
        n = self._buffered
        self._chunks.clear()
        self._offset = 0
        self._buffered = 0
        self._read_index += n
        self._speaking = False
        self._room.set()
        if self._resampler is not None:
            self._resampler.flush()  # its held-back samples belong to the audio just cut
        return n

    def drop(self, n: int) -> int:
        """Drop up to n of the oldest samples (degradation when video lags real time)."""
        n = min(n, self._buffered)
        self._read(n)
        self.dropped_samples += n
        return n

    # Output -----------------------------------------------------------------------------------

    def take(self, n: int, force: bool) -> AudioWindow | None:
        """The next n-sample window, or None when it is not ready and not yet forced."""
        b = self._buffered
        if self._speaking:
            if b >= n:
                return self._window(front_pad=0, real=n, n=n)
            if not force:
                return None
            self._speaking = False  # utterance ended or the client fell behind
            return self._window(front_pad=0, real=b, n=n)
        # A delimited utterance gets no more audio: nothing to cushion against.
        cushion = self.cushion if self._read_index + b > self._final_until else 0
        if b >= n + cushion:
            self._speaking = True
            return self._window(front_pad=0, real=n, n=n)
        if not force:
            return None
        real = max(0, b - cushion)
        self._speaking = real > 0
        return self._window(front_pad=n - real, real=real, n=n)

    def _window(self, front_pad: int, real: int, n: int) -> AudioWindow:
        arrival = self._chunks[0][1] if real and self._chunks else None
        first_index = self._read_index
        data = self._read(real)
        audio = np.zeros(n, dtype=np.float32)
        audio[front_pad : front_pad + real] = data
        return AudioWindow(
            audio=audio,
            real_samples=real,
            first_real_offset=front_pad if real else None,
            first_real_arrival=arrival,
            first_real_index=first_index if real else None,
        )

    def _read(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            chunk, _ = self._chunks[0]
            take = min(n - filled, chunk.shape[0] - self._offset)
            out[filled : filled + take] = chunk[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == chunk.shape[0]:
                self._chunks.popleft()
                self._offset = 0
        self._buffered -= n
        self._read_index += n
        if self._buffered < self.max_buffer_samples:
            self._room.set()
        return out

"""The local executor's loop in a worker process of its own: one device, the whole generator.

Why a process: the generator runs hundreds of small torch ops per block, and each one takes
Python's GIL back when it returns. In the service's process the event loop, aiortc's encoders
and the websocket handlers want the GIL too, and a thread that keeps losing it slows down many
times over (measured: a block that takes 0.1 s alone took over 20 s beside one busy Python
thread). In its own process the engine only shares the CPU, not the interpreter.

It is a one-worker pipeline behind the same driver as TPP and DualParal (remote.py), so it
inherits their bounded admission, heartbeats, timeouts, restart after a crash and clean
shutdown. The worker is stage 0 and the last stage at once: it receives requests from the
driver and answers it directly. Both cache modes run here, as in the in-thread executor.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from models.errors import DiffstreamError
from pipelines.executors.base import ModelInfo
from pipelines.executors.launch import WorkerContext
from pipelines.executors.remote import PipelineExecutor
from pipelines.executors.stages import check_model, error_message, load_generator, split_options
from pipelines.executors.wire import LinkError, Message
from pipelines.generator import SessionState, StreamingGenerator


class ProcessExecutor(PipelineExecutor):
    """`--executor local` as the service runs it: the engine in one worker process."""

    worker_module = "process"
    strategy = "local"
    min_devices = 1

    @classmethod
    def launch(cls, *, model: str = "default", devices: str = "cpu", **options: Any):
        """Start the worker (torch.multiprocessing, spawn) and wait until its model is loaded."""
        from pipelines.executors import one_device

        check_model(model)
        executor_opts, pipeline = split_options(options)
        device = one_device(devices)
        executor_opts.setdefault("verbose", False)
        return cls(model=model, devices=[device], options=pipeline, **executor_opts)

    def roles(self, info: ModelInfo, ready: list[dict[str, Any]]) -> list[str]:
        return ["the whole generator: audio features, denoise, decode"]


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def load(ctx: WorkerContext) -> StreamingGenerator:
    return load_generator(ctx)


def run_worker(ctx: WorkerContext, gen: StreamingGenerator) -> int:
    return WholeGenerator(ctx, gen).run()


class WholeGenerator:
    """Receive a request from the driver, run the generator's loop, answer the driver."""

    def __init__(self, ctx: WorkerContext, gen: StreamingGenerator) -> None:
        self.ctx = ctx
        self.gen = gen
        self.sessions: dict[str, SessionState] = {}
        self.out = ctx.link_out()

    def run(self) -> int:
        ctx = self.ctx
        ctx.listen(ctx.link_in(), "up")
        while True:
            got = ctx.next_message()
            if got is None:
                continue
            msg = got[1]
            m = msg.meta
            if msg.kind == "block":
                self._answer_block(msg)
            elif msg.kind == "open":
                self._answer_open(msg)
            elif msg.kind == "close":
                self.sessions.pop(m["session_id"], None)
            elif msg.kind == "ping":
                self.out.send(Message("pong", m))
            elif msg.kind == "stats":
                info = dict(
                    ctx.stats(m.get("events", True)),
                    role="whole generator",
                    sessions=len(self.sessions),
                )
                info["cache_bytes"] = sum(s.cache_bytes() for s in self.sessions.values())
                self.out.send(Message("stats", {"request": m["request"], "ranks": [info]}))
            elif msg.kind == "stop":
                self.out.send(Message("stop"))
                return 0
            else:
                raise LinkError(f"local worker: unexpected message {msg.kind!r}")

    def _answer_open(self, msg: Message) -> None:
        m = msg.meta
        sid = m["session_id"]
        try:
            self.sessions[sid] = self.gen.new_session(
                m["reference"],
                session_id=sid,
                seed=m.get("seed", 0),
                steps=m.get("steps"),
                sink_refresh=m.get("sink_refresh"),
                prompt=m.get("prompt"),
            )
        except DiffstreamError as exc:  # a bad reference: this open fails, the worker goes on
            self.out.send(Message("opened", error_message(sid, None, exc, drop=True).meta))
            return
        except Exception as exc:  # a bug: the same, reported as the executor's error
            text = f"internal error in the local worker: {type(exc).__name__}: {exc}"
            self.out.send(Message("opened", error_message(sid, None, text, drop=True).meta))
            return
        self.out.send(Message("opened", {"session_id": sid}))

    def _answer_block(self, msg: Message) -> None:
        start = time.perf_counter()
        m = msg.meta
        sid, index = m["session_id"], m["block_index"]
        reply: dict[str, Any] = {"session_id": sid, "block_index": index}
        state = self.sessions.get(sid)
        if state is None:
            reply["error"] = f"session {sid!r} is not open"
        elif index != state.block_index:
            reply["error"] = f"block {index} submitted out of order (expected {state.block_index})"
        else:
            try:
                frames, timings = self.gen.generate_block(state, m.get("audio"))
            except DiffstreamError as exc:  # the client's fault (e.g. a wrong audio length)
                self.sessions.pop(sid, None)
                reply.update(error=str(exc), error_kind="session")
            except Exception as exc:  # a bug or out of memory: end this session only
                self.sessions.pop(sid, None)
                reply.update(
                    error=f"internal error in the local worker: {type(exc).__name__}: {exc}",
                    dropped=True,
                )
            else:
                reply["frames"] = frames
                reply["timings"] = asdict(timings)
        self.out.send(Message("result", reply))
        self.ctx.record("block", sid, index, start)

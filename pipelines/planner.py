"""Which multi-device strategy fits which hardware: predicted fps, latency and memory per device.

Inputs are measured, not assumed: per-step, per-layer, decode and audio-feature seconds of one
block on one device (from `diffstream bench --json`, or from pipelines/profiler.py, which times
single layers of the model's real sizes on the current device), sizes from the model's config
(pipelines/model_shape.py), and a link model:

    seconds per message = latency + bytes * 8 / (Gb/s * 1e9)    (+ CPU per message, for gloo)

The executors post a block's sends along the pipeline without waiting (wire.Link, wait=False),
so a transfer runs beside the sender's next compute: a stage's period is max(compute + posting,
transfer), not their sum (LinkModel.stage; overlap=False models blocking sends). A block's
latency still pays every hop in full: it cannot go on before it has arrived.

From them, for N devices (each strategy's layout is the executors' own):

* local      one device runs features, S steps (+ the re-encode pass in reencode mode), decode.
* tpp        N-1 step ranks (contiguous step ranges) + 1 decode rank; the slowest stage, its
             overlapped hop included, sets the period; latency is the sum of the stages and
             their hops.
* dualparal  N-1 layer ranks + 1 decode rank; an iteration sends the queue's S blocks through the
             ring of layer ranks: period max(S * slowest stage, one block's trip around the ring);
             a block stays S iterations, and live audio arrives one block per block duration, so
             the first frame waits S-1 extra blocks of audio.
* tpp+layers (prediction only, not implemented) every TPP step stage split by layers too.

Memory per device is pipelines/memory.py's: the parts each device holds in that layout (weights
of its layers and of the encoders at its place, per-session caches, traced working sets), listed
part by part in `memory_parts`. Opening a session (`session_open_s`) encodes the reference
image and runs the sink pass; it happens once per session (Live Avatar runs the sink pass once
more when it refreshes the sink) and is not part of the time to first frame of the audio.

Time to first frame = the first block's audio (it must be heard before it is generated) + the
first block's compute latency (+ the extra audio DualParal's queue needs). `cores` models CPU
"devices" sharing fewer cores (the CPU tests): a block's compute over all devices divided by the
cores bounds the period from below (time on the link is waiting, not compute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.errors import ConfigError
from pipelines.memory import device_memory
from pipelines.model_shape import DECODE, DTYPE_BYTES, FIRST, SINK, ModelShape, model_shape
from pipelines.profiler import Costs, costs_from_bench, layer_flops, probe_shape, profile_costs

__all__ = [
    "DTYPE_BYTES",
    "STRATEGIES",
    "Costs",
    "LinkModel",
    "ModelShape",
    "Prediction",
    "Recommendation",
    "costs_from_bench",
    "layer_flops",
    "model_shape",
    "predict_all",
    "predict_dualparal",
    "predict_local",
    "predict_tpp",
    "predict_tpp_layers",
    "probe_shape",
    "profile_costs",
    "recommend",
]

STRATEGIES = ("local", "tpp", "dualparal", "tpp+layers")


@dataclass(frozen=True)
class LinkModel:
    """Time on the wire per message (latency + bytes / bandwidth), the CPU a message costs its
    two ends (pickling, copies; ~0 for NCCL, measurable for gloo on CPU), and the sender's own
    seconds per message to pack and post it, which stay on its stage when sends overlap."""

    gbps: float = 100.0
    latency_s: float = 10e-6
    cpu_s: float = 0.0
    post_s: float = 0.0
    overlap: bool = True  # sends posted without waiting, as the executors do

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency_s + nbytes * 8 / (self.gbps * 1e9)

    def stage(self, compute_s: float, nbytes: float, messages: int = 2) -> float:
        """Period of a stage that computes for `compute_s`, then sends `nbytes` on (a control
        frame + a tensor buffer: 2 sends). Overlapped, the transfer runs beside the next
        compute: max(compute + posting, transfer); blocking, the stage waits for it: the sum."""
        wire = self.seconds(nbytes, messages)
        if self.overlap:
            return max(compute_s + self.post_s, wire)
        return compute_s + wire

    def trip(self, compute_s: float, nbytes: float, messages: int = 2) -> float:
        """Latency of the same stage for one block: compute, posting and the whole transfer."""
        return compute_s + (self.post_s if self.overlap else 0.0) + self.seconds(nbytes, messages)


@dataclass
class Prediction:
    strategy: str
    devices: int
    layout: str
    fps: float
    period_s: float  # steady state: one block leaves every period
    block_latency_s: float  # compute latency of one block, start to frames
    time_to_first_frame_s: float  # live streaming: first block's audio + extra audio + compute
    memory_gb: list[float]  # per device
    comm_bytes_per_block: float
    stages_s: list[float] = field(default_factory=list)  # busy time per device per block
    runnable: bool = True
    notes: str = ""
    memory_parts: list[dict[str, float]] = field(default_factory=list)  # GiB per part, device
    session_open_s: float = 0.0  # reference encode + sink pass, once per session

    def realtime(self, fps: float) -> bool:
        return self.fps >= fps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gb(nbytes: float) -> float:
    return nbytes / 2**30


def _memory(parts: list[dict[str, int]]) -> dict[str, Any]:
    """Prediction fields for per-device part lists (bytes): totals and parts in GiB."""
    return dict(
        memory_gb=[_gb(sum(p.values())) for p in parts],
        memory_parts=[{k: _gb(v) for k, v in p.items()} for p in parts],
    )


def _open_s(costs: Costs) -> float:
    return costs.reference_s + costs.sink_s


def _bound(compute_s: float, devices: int, period: float, cores: float | None) -> float:
    """Devices that share `cores` CPU cores cannot do more than `cores` seconds of compute per
    second: the period is at least a block's compute over the cores. Link time is not compute
    (a send waits for the peer, another process runs meanwhile), so it is not counted here.
    On a machine others load too, what the devices get can be less than one core."""
    if cores:
        period = max(period, compute_s / min(cores, devices))
    return period


def _compute_s(
    shape: ModelShape, costs: Costs, link: LinkModel, messages: int, forward_calls: int = 1
) -> float:
    """Compute of one block summed over all devices: the same model work for every strategy,
    plus the fixed cost of each extra per-rank forward call and the CPU of each message."""
    extra_calls = shape.steps * (forward_calls - 1) * costs.forward_fixed_s
    return (
        costs.features_s
        + shape.steps * costs.step_s
        + costs.decode_s
        + extra_calls
        + messages * link.cpu_s
    )


def predict_local(
    shape: ModelShape,
    costs: Costs,
    *,
    cores: float | None = None,
    sessions: int = 1,
    memory_device: str | None = None,
) -> Prediction:
    s = shape.steps
    reencode = costs.reencode_s if shape.cache_mode == "reencode" else 0.0
    busy = costs.features_s + s * costs.step_s + reencode + costs.decode_s
    caches = 1 if shape.cache_mode == "reencode" else s
    mem = device_memory(
        shape,
        places={FIRST, SINK, DECODE},
        layers=range(shape.config.num_layers),
        rings=caches,
        device=memory_device or costs.device,
        sessions=sessions,
    )
    return Prediction(
        strategy="local",
        devices=1,
        layout=f"1 device, {shape.cache_mode}",
        fps=shape.video_frames / busy,
        period_s=busy,
        block_latency_s=busy,
        time_to_first_frame_s=shape.first_block_seconds + busy,
        comm_bytes_per_block=0.0,
        stages_s=[busy],
        session_open_s=_open_s(costs),
        **_memory([mem]),
    )


def predict_tpp(
    shape: ModelShape,
    costs: Costs,
    devices: int,
    link: LinkModel,
    *,
    cores: float | None = None,
    sessions: int = 1,
    memory_device: str | None = None,
) -> Prediction:
    from pipelines.executors.tpp import split_steps

    if devices < 2:
        raise ConfigError("tpp needs at least 2 devices")
    ranks = min(devices - 1, shape.steps)
    parts = split_steps(shape.steps, ranks)
    hop_bytes = shape.latent_bytes + shape.audio_bytes  # control frame + tensors: 2 sends
    work = [
        len(r) * costs.step_s + (costs.features_s if i == 0 else 0.0) for i, r in enumerate(parts)
    ]
    stages = [link.stage(w, hop_bytes) for w in work]  # the hop overlaps the next block
    decode = costs.decode_s + link.seconds(shape.latent_bytes, messages=2)  # frames: blocking
    stages.append(decode)
    compute = _compute_s(shape, costs, link, messages=ranks + 1)
    period = _bound(compute, len(stages), max(stages), cores)
    latency = sum(link.trip(w, hop_bytes) for w in work) + decode
    mems = [
        device_memory(
            shape,
            places={SINK, FIRST} if i == 0 else {SINK},
            layers=range(shape.config.num_layers),
            rings=len(r),
            device=memory_device or costs.device,
            sessions=sessions,
        )
        for i, r in enumerate(parts)
    ]
    mems.append(device_memory(shape, places={DECODE}, layers=None, sessions=sessions))
    idle = devices - 1 - ranks
    return Prediction(
        strategy="tpp",
        devices=ranks + 1,
        layout=f"{ranks} step rank{'s' if ranks > 1 else ''} + 1 decode",
        fps=shape.video_frames / period,
        period_s=period,
        block_latency_s=latency,
        time_to_first_frame_s=shape.first_block_seconds + latency,
        comm_bytes_per_block=hop_bytes * ranks,
        stages_s=stages,
        notes=f"{idle} device(s) left idle: at most one rank per step" if idle > 0 else "",
        session_open_s=_open_s(costs),
        **_memory(mems),
    )


def _dualparal_stages(
    shape: ModelShape, costs: Costs, ranks: int, link: LinkModel
) -> tuple[list[float], list[float], list[range]]:
    """Per layer rank, for one forward of one block: its period (the hop on overlapped with
    the next forward), its share of the block's trip around the ring (the hop in full), and
    its layer ranges."""
    from pipelines.executors.staggered import split_layers

    parts = split_layers(shape.config.num_layers, ranks)
    fwd_bytes = shape.hidden_bytes + shape.latent_bytes
    embed_head = costs.overhead_s - costs.forward_fixed_s
    stages, trips = [], []
    for i, r in enumerate(parts):
        # every rank pays the fixed part of a forward call; embedding on the first, head last
        t = costs.layers_s(shape, r) + costs.forward_fixed_s
        t += embed_head * ((i == 0) + (i == ranks - 1)) / 2
        if i < ranks - 1:
            nbytes = fwd_bytes
        elif ranks > 1:
            nbytes = shape.latent_bytes  # the ring's return to rank 0
        else:  # one rank holds every layer: the return is a local hand-over
            stages.append(t)
            trips.append(t)
            continue
        stages.append(link.stage(t, nbytes))
        trips.append(link.trip(t, nbytes))
    return stages, trips, parts


def predict_dualparal(
    shape: ModelShape,
    costs: Costs,
    devices: int,
    link: LinkModel,
    *,
    cores: float | None = None,
    sessions: int = 1,
    memory_device: str | None = None,
) -> Prediction:
    if devices < 2:
        raise ConfigError("dualparal needs at least 2 devices")
    ranks = min(devices - 1, shape.config.num_layers)
    s = shape.steps
    stages, trips, parts = _dualparal_stages(shape, costs, ranks, link)
    around = sum(trips)  # one block's trip through every layer rank and back
    per_block = [s * t for t in stages]
    per_block[0] += costs.features_s
    decode = costs.decode_s + link.seconds(shape.latent_bytes, messages=2)
    busy = [*per_block, decode]
    iteration = max(max(per_block), around, decode)
    messages = s * (ranks if ranks > 1 else 0) + 2  # forwards + ring returns, to decode, out
    compute = _compute_s(shape, costs, link, messages, forward_calls=ranks)
    period = _bound(compute, len(busy), iteration, cores)
    latency = s * iteration + decode
    h_blocks = shape.window_frames // shape.frames_per_block
    stored = (h_blocks + s) * shape.frames_per_block  # frames of keys/values kept per rank
    mems = [
        device_memory(
            shape,
            places={FIRST, SINK} if i == 0 else set(),  # rank 0 starts the sink pass
            layers=r,
            rings=1,
            frames=stored,
            device=memory_device or costs.device,
            sessions=sessions,
        )
        for i, r in enumerate(parts)
    ]
    mems.append(device_memory(shape, places={DECODE}, layers=None, sessions=sessions))
    extra_audio = (s - 1) * shape.block_seconds
    notes = "a block leaves after S iterations: live audio adds (S-1) block durations of latency"
    if around > s * max(stages):
        notes += "; the ring is not full with one session (S < ranks): more sessions fill it"
    return Prediction(
        strategy="dualparal",
        devices=ranks + 1,
        layout=f"{ranks} layer rank{'s' if ranks > 1 else ''} + 1 decode",
        fps=shape.video_frames / period,
        period_s=period,
        block_latency_s=latency,
        time_to_first_frame_s=shape.first_block_seconds + extra_audio + latency,
        comm_bytes_per_block=s
        * ((ranks - 1) * (shape.hidden_bytes + shape.latent_bytes) + shape.latent_bytes),
        stages_s=busy,
        notes=notes,
        session_open_s=_open_s(costs),
        **_memory(mems),
    )


def predict_tpp_layers(
    shape: ModelShape,
    costs: Costs,
    devices: int,
    link: LinkModel,
    *,
    cores: float | None = None,
    sessions: int = 1,
    memory_device: str | None = None,
) -> Prediction | None:
    """TPP whose step stages are each split over several layer ranks (prediction only): with
    timestep forcing every (step, layer range) pair is an independent pipeline stage."""
    from pipelines.executors.tpp import split_steps

    best: Prediction | None = None
    for step_ranks in range(1, min(shape.steps, devices - 1) + 1):
        layer_ranks = (devices - 1) // step_ranks
        if layer_ranks < 2 or layer_ranks > shape.config.num_layers:
            continue
        lstages, _, lparts = _dualparal_stages(shape, costs, layer_ranks, link)
        stages, mems = [], []
        for i, r in enumerate(split_steps(shape.steps, step_ranks)):
            for j, lr in enumerate(lparts):
                t = len(r) * lstages[j] + (costs.features_s if i == j == 0 else 0.0)
                stages.append(t)
                places = ({SINK} if j == 0 else set()) | ({FIRST} if i == j == 0 else set())
                mems.append(
                    device_memory(
                        shape,
                        places=places,
                        layers=lr,
                        rings=len(r),
                        device=memory_device or costs.device,
                        sessions=sessions,
                    )
                )
        stages.append(costs.decode_s)
        mems.append(device_memory(shape, places={DECODE}, layers=None, sessions=sessions))
        messages = shape.steps * layer_ranks + 1
        compute = _compute_s(shape, costs, link, messages, forward_calls=layer_ranks)
        period = _bound(compute, len(stages), max(stages), cores)
        p = Prediction(
            strategy="tpp+layers",
            devices=step_ranks * layer_ranks + 1,
            layout=f"{step_ranks} step x {layer_ranks} layer ranks + 1 decode",
            fps=shape.video_frames / period,
            period_s=period,
            block_latency_s=sum(stages),
            time_to_first_frame_s=shape.first_block_seconds + sum(stages),
            comm_bytes_per_block=shape.steps * (layer_ranks - 1) * shape.hidden_bytes
            + step_ranks * shape.latent_bytes,
            stages_s=stages,
            runnable=False,
            notes="prediction only: not implemented yet",
            session_open_s=_open_s(costs),
            **_memory(mems),
        )
        if best is None or p.fps > best.fps:
            best = p
    return best


def predict_all(
    shape: ModelShape,
    costs: Costs,
    devices: int,
    link: LinkModel,
    *,
    cores: float | None = None,
    sessions: int = 1,
    memory_device: str | None = None,
) -> list[Prediction]:
    """Every strategy that can use `devices` devices (local always, as the baseline); memory
    for `sessions` concurrent sessions on devices of kind `memory_device` ("cuda": no attention
    score matrix; "cpu": SDPA's math path keeps one; default: the kind the costs came from)."""
    kw: dict[str, Any] = dict(cores=cores, sessions=sessions, memory_device=memory_device)
    out = [predict_local(shape, costs, **kw)]
    if devices >= 2:
        out.append(predict_tpp(shape, costs, devices, link, **kw))
        out.append(predict_dualparal(shape, costs, devices, link, **kw))
        mix = predict_tpp_layers(shape, costs, devices, link, **kw)
        if mix is not None:
            out.append(mix)
    return out


@dataclass
class Recommendation:
    choice: Prediction | None
    reason: str


def recommend(
    predictions: list[Prediction],
    *,
    target_fps: float,
    max_latency_s: float | None = None,
    device_memory_gb: float | None = None,
) -> Recommendation:
    """The runnable strategy that fits memory, keeps up with `target_fps` and has the lowest
    time to first frame; if none keeps up, the fastest that fits, said plainly."""

    def fits(p: Prediction) -> bool:
        return device_memory_gb is None or max(p.memory_gb) <= device_memory_gb

    runnable = [p for p in predictions if p.runnable and fits(p)]
    if not runnable:
        return Recommendation(None, "no runnable strategy fits the device memory; add devices")
    ok = [p for p in runnable if p.realtime(target_fps)]
    if max_latency_s is not None:
        ok = [p for p in ok if p.time_to_first_frame_s <= max_latency_s]
    if ok:
        best = min(ok, key=lambda p: (p.time_to_first_frame_s, p.devices))
        return Recommendation(
            best,
            f"{best.strategy} keeps up with {target_fps:g} fps ({best.fps:.3g} fps) with the "
            f"lowest time to first frame ({best.time_to_first_frame_s:.2f} s)",
        )
    best = max(runnable, key=lambda p: p.fps)
    why = f"nothing reaches {target_fps:g} fps"
    if max_latency_s is not None:
        why += f" within {max_latency_s:g} s to first frame"
    return Recommendation(best, f"{why}; the fastest is {best.strategy} at {best.fps:.3g} fps")

"""Overlapped sends (wire.Link, wait=False) between real gloo processes, and in the executors.

The link tests run one sender and one receiver process (two standalone gloo groups, control and
data, as the workers have) through a sequence of phases kept in step by a barrier; each process
stamps its events with perf_counter, the system-wide monotonic clock on Linux, so the two
processes' stamps compare. The assertions are on the order of events (a send returned before
the peer posted its receive, or after); the only durations checked are against the receiver's
1 s sleep, with a wide margin (the machine is shared, 2 cores).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np
import pytest
import torch

from pipelines.executors.launch import LOOPBACK, control_group
from pipelines.executors.wire import Link, LinkError, Message
from pipelines.messages import SessionSpec
from pipelines.reference import default_reference
from tests.multidevice_helpers import (
    audio_blocks,
    free_port,
    reference_blocks,
    request,
    results,
    save_test_model,
    submit_all,
)

pytestmark = pytest.mark.distributed

SLEEP = 1.0  # the receiver's sleep before it posts its receive
BOUND = 2  # Link's default max_pending
BURST = 6  # messages posted at once in the bounded phase
TIMEOUT_S = 10  # the pair's gloo timeout (the failure phase ends well before it)
BARRIER_S = 60


def _msg(i: int) -> Message:
    return Message("block", {"i": i}, {"latent": torch.full((4, 256), float(i))})


def _got(msg: Message) -> tuple[int, float]:
    return msg.meta["i"], float(msg.tensors["latent"].mean())


def _sender(link: Link, barrier) -> dict:
    out: dict = {}
    # A. two posted sends, then a flush
    barrier.wait(BARRIER_S)
    returned = []
    for i in range(2):
        link.send(_msg(i), wait=False)
        returned.append(time.perf_counter())
    out["posted_returned"] = returned
    out["pending_after_posting"] = link.pending
    link.flush()
    out["flush_returned"] = time.perf_counter()
    out["pending_after_flush"] = link.pending
    # B. a burst of posted sends against the bound, then a flush
    barrier.wait(BARRIER_S)
    returned, pending = [], []
    for i in range(2, 2 + BURST):
        link.send(_msg(i), wait=False)
        returned.append(time.perf_counter())
        pending.append(link.pending)
    out["burst_returned"], out["burst_pending"] = returned, pending
    link.flush()
    out["burst_flushed"] = time.perf_counter()
    out["burst_pending_after_flush"] = link.pending
    # C. one blocking send
    barrier.wait(BARRIER_S)
    t0 = time.perf_counter()
    link.send(_msg(100))
    out["blocking_started"], out["blocking_returned"] = t0, time.perf_counter()
    # D. the receiver waits in recv while this side sleeps
    barrier.wait(BARRIER_S)
    time.sleep(SLEEP)
    link.send(_msg(200))
    # E. the receiver leaves without receiving: the posted send fails where it is waited for
    barrier.wait(BARRIER_S)
    t0, left = time.perf_counter(), False
    try:
        link.send(_msg(300), wait=False)
        barrier.wait(BARRIER_S)  # the receiver exits now
        left = True
        link.flush()
        out["failure"] = None
    except LinkError as exc:
        out["failure"] = str(exc)
    out["failure_s"] = time.perf_counter() - t0
    if not left:
        barrier.wait(BARRIER_S)
    out["stats"] = link.stats.__dict__.copy()
    return out


def _receiver(link: Link, barrier) -> dict:
    out: dict = {}
    # A.
    barrier.wait(BARRIER_S)
    time.sleep(SLEEP)
    out["posted_recv"] = time.perf_counter()
    out["got"] = [_got(link.recv()) for _ in range(2)]
    # B.
    barrier.wait(BARRIER_S)
    time.sleep(SLEEP)
    out["burst_recv"] = time.perf_counter()
    received = []
    for _ in range(BURST):
        out["got"].append(_got(link.recv()))
        received.append(time.perf_counter())
    out["burst_received"] = received
    # C.
    barrier.wait(BARRIER_S)
    time.sleep(SLEEP)
    out["blocking_recv"] = time.perf_counter()
    out["got"].append(_got(link.recv()))
    # D.
    barrier.wait(BARRIER_S)
    waits, waited = link.stats.recv_waits, link.stats.recv_wait_seconds
    out["got"].append(_got(link.recv()))
    out["recv_waits"] = link.stats.recv_waits - waits
    out["recv_wait_s"] = link.stats.recv_wait_seconds - waited
    # E. leave without receiving message 300
    barrier.wait(BARRIER_S)
    barrier.wait(BARRIER_S)
    return out


def _pair_main(rank: int, port: int, barrier, results_q) -> None:
    """One process of the pair: rank 0 sends, rank 1 receives."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(LOOPBACK, port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
        ctrl = control_group(store, rank, 2, TIMEOUT_S, LOOPBACK)
        data = control_group(dist.PrefixStore("data", store), rank, 2, TIMEOUT_S, LOOPBACK)
        peer = 1 - rank
        link = Link(ctrl, peer, data=data, data_peer=peer, name=f"rank {peer}")
        out = _sender(link, barrier) if rank == 0 else _receiver(link, barrier)
    except BaseException:  # reported to the test, which fails with it
        out = {"error": traceback.format_exc()}
    results_q.put((rank, out))
    os._exit(0)  # no teardown of a group whose peer may be gone


@pytest.fixture(scope="module")
def pair() -> tuple[dict, dict]:
    """Run the phases once in two fresh processes: (sender's record, receiver's record)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results_q = ctx.Barrier(2), ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_pair_main, args=(r, port, barrier, results_q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + 120
    while len(got) < 2 and time.monotonic() < deadline:
        if results_q.empty():
            if not any(p.is_alive() for p in procs) and results_q.empty():
                break
            time.sleep(0.05)
            continue
        rank, out = results_q.get()
        got[rank] = out
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    assert set(got) == {0, 1}, f"a process of the pair gave no record: {got}"
    for rank in (0, 1):
        assert "error" not in got[rank], got[rank]["error"]
    return got[0], got[1]


def test_posted_send_returns_before_the_peer_receives(pair):
    """With wait=False a send returns before the peer has even posted its receive (the
    receiver sleeps 1 s first), and the messages arrive in order with their tensors; a blocking
    send to the same sleeping receiver returns only after it posted its receive.

    Fails if posted sends wait for the peer (tried: `wait = True` as the first line of
    wire.Link.send: the posted sends returned after the receiver's receive, 1 s in)."""
    sender, receiver = pair
    for t in sender["posted_returned"]:
        assert t < receiver["posted_recv"], (sender["posted_returned"], receiver["posted_recv"])
    assert sender["posted_returned"][-1] - sender["posted_returned"][0] < SLEEP / 2
    assert sender["pending_after_posting"] == 2
    # The blocking send waits for the peer's receive (the overlap the posted one gives up).
    assert sender["blocking_returned"] > receiver["blocking_recv"]
    assert sender["blocking_returned"] - sender["blocking_started"] > SLEEP / 2
    # Order and content: every message, in the order sent.
    expected = [*range(2 + BURST), 100, 200]
    assert [i for i, _ in receiver["got"]] == expected
    assert [v for _, v in receiver["got"]] == [float(i) for i in expected]
    assert sender["stats"]["posted"] == 2 + BURST + 1


def test_pending_sends_are_bounded_and_flushed(pair):
    """A burst of 6 posted sends to a receiver that sleeps: the first BOUND (2) return at once,
    each later one waits for the oldest, so never more than 2 are outstanding; flush() returns
    only once the peer has taken every one, and leaves none pending.

    Fails if the bound is not kept (tried: the `while bound is not None and ...` wait in
    wire.Link.send replaced by `pass`: all 6 returned before the receiver woke) and if flush
    does not wait (tried: Link.flush's body replaced by `pass`: 2 still pending after it)."""
    sender, receiver = pair
    early = [t < receiver["burst_recv"] for t in sender["burst_returned"]]
    assert early == [True] * BOUND + [False] * (BURST - BOUND), (
        sender["burst_returned"],
        receiver["burst_recv"],
    )
    assert max(sender["burst_pending"]) == BOUND
    assert sender["stats"]["pending_max"] == BOUND
    assert sender["stats"]["pending_wait_seconds"] > SLEEP / 2  # the bound and flush waited
    # flush: every send taken by the peer, nothing left pending
    assert sender["flush_returned"] > receiver["posted_recv"]
    assert sender["pending_after_flush"] == 0
    assert sender["burst_flushed"] > receiver["burst_recv"]
    assert sender["burst_pending_after_flush"] == 0


def test_failed_posted_send_raises_link_error(pair):
    """A posted send whose peer leaves without receiving it fails where it is waited for (the
    flush before a rank stops) as LinkError, within the pair's timeout.

    Fails if the failure is swallowed (tried: _wait_oldest's `raise LinkError` replaced by
    `return`: flush returned without an error)."""
    sender, _ = pair
    assert sender["failure"] is not None and "send to rank 1 failed" in sender["failure"]
    assert sender["failure_s"] < TIMEOUT_S + 5


def test_recv_wait_is_counted(pair):
    """The receiver's recv waits 1 s for a message the sender sends after sleeping: its link
    stats count one wait of about that long.

    Fails if recv does not add its wait (tried: the recv_wait_seconds line in Link.recv
    removed: 0.0)."""
    _, receiver = pair
    assert receiver["recv_waits"] == 1
    assert SLEEP / 2 < receiver["recv_wait_s"] < 30 * SLEEP


# ---- the executors: hot-path sends posted, stats, same frames, nothing pending after close ------
BLOCKS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("tiny-overlap"))


def _hot_links(stats: list[dict]) -> list[dict]:
    """Links of the layer/step ranks (not the decode rank) that sent posted messages."""
    return [lk for s in stats[:-1] for lk in s["links"] if lk["posted"]]


def _check_stats(stats: list[dict], blocks: int) -> None:
    for s in stats:
        for key in ("recv_wait_seconds", "recv_waits", "sends_posted", "idle_seconds"):
            assert key in s, (key, sorted(s))
        assert s["recv_waits"] >= s["messages_received"] > 0
        assert s["recv_wait_seconds"] > 0
        for lk in s["links"]:
            assert "recv_wait_seconds" in lk and "posted" in lk
            if lk["max_pending"] is not None:
                assert lk["pending_max"] <= lk["max_pending"]
                assert lk["pending"] == 0, lk  # the close flushed them
    # every denoise/layer rank posted its blocks on (the decode rank answers the driver)
    for s in stats[:-1]:
        assert s["sends_posted"] >= blocks, s


def test_tpp_posts_block_sends_and_reports_recv_waits(model_dir):
    """TPP with 2 step ranks: the same frames as the single-process engine (timestep forcing,
    sink refresh on), every step rank's block sends posted (wait=False), bounded, and none
    pending once the session closed; every rank's stats carry recv_wait_seconds/recv_waits
    and per-link figures.

    Fails if the block send waits (tried: wait=False removed from StepRank.block's send:
    sends_posted 0 on rank 0)."""
    from models.registry import load_model
    from pipelines.executors.tpp import TPPExecutor
    from pipelines.generator import StreamingGenerator

    ex = TPPExecutor.launch(
        model=model_dir,
        devices="cpu:3",
        threads=1,
        timeout_s=60,
        heartbeat_s=30,
        keep_latents=16,
        verbose=False,
    )
    try:
        info = ex.info
        ref = default_reference(info.height, info.width)
        audio = audio_blocks(info, BLOCKS, seed=3)
        ex.open_session(SessionSpec("o", ref, seed=4, sink_refresh=True))
        got = results(submit_all(ex, [request("o", i, audio[i]) for i in range(BLOCKS)]), 120)
        ex.close_session("o")
        stats = ex.worker_stats(events=False)
        latents = dict(ex.latents)
    finally:
        ex.close()
    gen = StreamingGenerator.from_bundle(load_model(model_dir), cache_mode="timestep_forcing")
    want = reference_blocks(gen, ref, audio, seed=4, sink_refresh=True)
    for i, (latent, frames) in enumerate(want):
        r = got["o", i]
        assert r.ok, r.error
        np.testing.assert_allclose(latents["o", i], latent.numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(r.frames.astype(np.int16) - frames.astype(np.int16)).max() <= 1
    _check_stats(stats, BLOCKS)
    hot = _hot_links(stats)
    assert {lk["name"] for lk in hot} >= {"rank 1", "rank 2"}, hot  # rank 0 → 1 → decode


def test_tpp_sink_refresh_back_channel_is_bounded(model_dir):
    """TPP with 2 step ranks, 5 sessions with sink refresh whose block 0 all pass before any
    closes (so none reaches its refresh block): rank 1 sends 5 refresh frames back to rank 0,
    never more than the link's bound (2) outstanding, none pending once they closed, and rank 0
    holds none of them. A session after them still refreshes its sink from its own frame (the
    same frames as the single-process engine).

    Fails if the back channel is unbounded again (tried: `ctx.link_back(r, max_pending=None)`
    in StepRank.run: pending_max 5 on rank 1's back link). A bound without rank 0's listener
    (frames received only at a refresh block, as before) would not pass either: rank 1 would
    wait on the third frame for a receive that never comes."""
    from models.registry import load_model
    from pipelines.executors.tpp import TPPExecutor
    from pipelines.generator import StreamingGenerator

    stale = [f"s{i}" for i in range(5)]
    ex = TPPExecutor.launch(
        model=model_dir,
        devices="cpu:3",
        threads=1,
        timeout_s=60,
        heartbeat_s=30,
        keep_latents=16,
        verbose=False,
    )
    try:
        info = ex.info
        ref = default_reference(info.height, info.width)
        audio = audio_blocks(info, BLOCKS, seed=5)
        for sid in stale:
            ex.open_session(SessionSpec(sid, ref, seed=1, sink_refresh=True))
        first = results(submit_all(ex, [request(sid, 0, audio[0]) for sid in stale]), 120)
        assert all(r.ok for r in first.values()), [r.error for r in first.values()]
        for sid in stale:
            ex.close_session(sid)
        ex.open_session(SessionSpec("z", ref, seed=4, sink_refresh=True))
        got = results(submit_all(ex, [request("z", i, audio[i]) for i in range(BLOCKS)]), 120)
        ex.close_session("z")
        stats = ex.worker_stats(events=False)
        latents = dict(ex.latents)
    finally:
        ex.close()
    gen = StreamingGenerator.from_bundle(load_model(model_dir), cache_mode="timestep_forcing")
    for i, (latent, _) in enumerate(reference_blocks(gen, ref, audio, seed=4, sink_refresh=True)):
        assert got["z", i].ok, got["z", i].error
        np.testing.assert_allclose(latents["z", i], latent.numpy(), rtol=1e-5, atol=1e-5)
    (back,) = [lk for lk in stats[1]["links"] if lk["name"] == "rank 0 (back channel)"]
    assert back["posted"] == len(stale) + 1, back  # one frame per session that refreshed
    assert back["pending_max"] <= BOUND and back["pending"] == 0, back
    assert back["max_pending"] == BOUND, back
    assert stats[0]["refresh_frames_held"] == 0 and stats[0]["sessions"] == 0, stats[0]
    _check_stats(stats, 1)


def test_dualparal_posts_forwards_and_ring_returns(model_dir):
    """DualParal with 2 layer ranks: forwards (rank 0 → 1), ring returns (rank 1 → 0) and
    clean blocks (→ decode) are posted, bounded, and none is pending once the session closed
    (its close flushes the ring too); the stats carry the receive waits; the frames are the
    staggered reference's.

    Fails if the ring's returns wait (tried: wait=False removed from LayerRank._ring: no posted
    send on the back channel) and if close does not flush the ring (tried: the flush_links()
    call in LayerRank.handle's close removed: the ring link still had 2 pending)."""
    from models.registry import load_model
    from pipelines.executors.dualparal import DualParalExecutor
    from pipelines.executors.staggered import StaggeredReference
    from pipelines.generator import StreamingGenerator

    ex = DualParalExecutor.launch(
        model=model_dir,
        devices="cpu:3",
        threads=1,
        timeout_s=60,
        heartbeat_s=30,
        keep_latents=16,
        drain_after_s=0.5,
        verbose=False,
    )
    try:
        info = ex.info
        ref = default_reference(info.height, info.width)
        audio = audio_blocks(info, BLOCKS, seed=5)
        ex.open_session(SessionSpec("d", ref, seed=6))
        got = results(submit_all(ex, [request("d", i, audio[i]) for i in range(BLOCKS)]), 120)
        ex.close_session("d")
        stats = ex.worker_stats(events=False)
        latents = dict(ex.latents)
    finally:
        ex.close()
    bundle = load_model(model_dir)
    gen = StreamingGenerator.from_bundle(bundle, coordinated_noise=True)
    sr = StaggeredReference(gen)
    want = sr.generate(sr.new_session(ref, seed=6), audio)
    for i, (latent, frames) in enumerate(want):
        r = got["d", i]
        assert r.ok, r.error
        np.testing.assert_allclose(latents["d", i], latent.numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(r.frames.astype(np.int16) - frames.astype(np.int16)).max() <= 1
    _check_stats(stats, BLOCKS)
    names = {lk["name"] for lk in _hot_links(stats)}
    assert {"rank 1", "rank 0 (back channel)", "rank 2"} <= names, names

"""Soak through the real service (benchmarks/soak.py): one av-probe session streams looped audio
with a tone burst every 1.5 s in real time, and every interval the soak records the service's
and the engine worker's RSS, fds and threads, the event loop's tasks, block latency, the fps
that reached the receiver and the A/V offset there (each burst's frames against its audio, by
pts; see the benchmark's docstring). The short check runs with `make test`; the three-minute one
(`-m slow`) checks the slopes after a warm-up minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import soak

FRAME_MS = 40.0  # one video frame at 25 fps


def _print(result: dict) -> None:
    print()
    print(soak.markdown(result))


def test_short_soak_keeps_pairing_and_returns_to_baseline(tmp_path: Path) -> None:
    """45 s sampled every 10 s: every sample has measured bursts, every burst's frames within
    one frame of its audio, the receiver gets its frames, and once the session is closed the
    service is back to its baseline of asyncio tasks and fds and the engine holds no session.

    Fails if the audio the viewer hears is shifted against the frames by a block (the
    scheduler's viewer-audio FIFO starting with one block of silence: every sample reads
    -126 ms, the frames showing each burst a block before it is heard), or if the service leaks
    an asyncio task per block (tasks 4 before the session, 345 after it)."""
    result = soak.run_soak(
        seconds=45, interval_s=10, warmup_s=10, model="av-probe", log_path=tmp_path / "serve.log"
    )
    _print(result)
    assert not result["errors"], result.get("serve_log_tail")
    samples = result["samples"]
    assert len(samples) == 4
    for s in samples:
        assert s["bursts"] >= 3, s  # 6 or 7 per 10 s; a few may be cut by a late block
        assert s["offset_ms"] is not None and abs(s["offset_ms"]) <= FRAME_MS, s
        for session in s["per_session"]:
            lo, hi = session["offset_ms_range"]
            assert -FRAME_MS <= lo <= hi <= FRAME_MS, session
        assert s["fps"] >= 20, s
        assert s["block_ms_p50"] is not None and s["block_ms_p99"] is not None, s
        assert s["rss_mb"] > 0 and s["fds"] > 0 and s["tasks"] > 0, s
    assert result["engine_sessions_after"] == [0]
    base, after = result["baseline"], result["after"]
    assert after["tasks"] <= base["tasks"], (base, after)
    assert after["fds"] <= base["fds"] + 2, (base, after)  # lazily opened once, e.g. a pool's
    summary = result["summary"]
    assert summary["offset_drift_ms"] is not None and abs(summary["offset_drift_ms"]) <= FRAME_MS


@pytest.mark.slow
def test_three_minute_soak_has_no_drift_and_no_growth(tmp_path: Path) -> None:
    """Three minutes sampled every 20 s; over the two after the warm-up minute the fitted A/V
    offset moves less than 20 ms, RSS (service + worker) grows less than 5 %, fds and tasks
    stay flat (within 2 of where they were, fitted and sampled) and threads within 4 (the
    event loop's default executor may still add a thread or two under load, up to its bound).

    Fails if the service leaks an asyncio task per block (tasks grow by ~8 a second), or if the
    viewer's audio slips against the frames by as little as 2 samples (48 kHz) per block: each
    frame is then still within a frame of its audio over the short soak, but the offset drifts
    by ~40 ms over these two minutes."""
    result = soak.run_soak(
        seconds=180, interval_s=20, warmup_s=60, model="av-probe", log_path=tmp_path / "serve.log"
    )
    _print(result)
    assert not result["errors"], result.get("serve_log_tail")
    summary = result["summary"]
    assert summary["samples_used"] >= 6
    assert all(s["offset_ms"] is not None for s in result["samples"])
    assert abs(summary["offset_drift_ms"]) < 20, summary["offset_ms"]
    off = summary["offset_ms"]
    assert abs(off["end"] - off["start"]) < 20 + FRAME_MS / 2, off  # a sample's median: noisier
    assert summary["rss_growth_pct"] < 5, summary["rss_mb"]
    for key, noise in (("fds", 2), ("tasks", 2), ("threads", 4)):
        fig = summary[key]
        assert fig["change"] <= noise and fig["fitted_change"] <= noise, (key, fig)
    assert result["engine_sessions_after"] == [0]

import os

import pytest
import torch

# Two cores shared by the test processes: one torch thread each keeps runs predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# serve, render and bench compile the block step by default; compiling costs tens of seconds on
# two cores, so the suite runs eager (this reaches the CLI's subprocesses and Settings too) and
# only the tests about compiling (tests/test_compile.py) turn it on, explicitly.
os.environ.setdefault("DIFFSTREAM_COMPILE", "0")

# DIFFSTREAM_STRICT_SKIPS=1 (set by `make test`, so in CI): a skipped test is a failure, since a
# skip there hides a claim (a missing browser, a broken import). Only tests marked `gpu`, for
# hardware CI lacks, may skip, and only by a mark on the test (a skip while importing a module
# fails whatever its marks). xfail is not a skip and is left alone.
STRICT_SKIPS = os.environ.get("DIFFSTREAM_STRICT_SKIPS") == "1"


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped ({_skip_reason(report.longrepr)}), and DIFFSTREAM_STRICT_SKIPS=1 makes "
        "a skip a failure: install what it needs (scripts/install-browser.sh for chromium, "
        "espeak-ng and coturn), or mark it `gpu` if it needs hardware CI does not have"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        STRICT_SKIPS
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("gpu") is None
    ):
        _fail_skip(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped:  # a module-level skip or importorskip
        _fail_skip(report, "module")


@pytest.fixture(scope="session")
def tiny_bundle():
    from models.registry import build_tiny

    return build_tiny()

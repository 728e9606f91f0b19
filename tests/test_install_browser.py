"""scripts/install-browser.sh fails loudly when chromium, espeak-ng, coturn's turnserver or
haproxy is still missing after installing, so CI stops at the cause instead of at the tests needing them.

The script runs against stubs: an `apt-get` that installs nothing, `sudo` and `id`, on a PATH
of their own, with its chromium path pointed into a temporary folder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-browser.sh"
CHROMIUM_LINE = "CHROMIUM=/usr/bin/chromium"
HAPROXY_LINE = "HAPROXY=/usr/sbin/haproxy"


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_installer(
    tmp_path: Path,
    *,
    chromium: bool,
    espeak: bool,
    apt: bool = True,
    turnserver: bool = True,
    haproxy: bool = True,
) -> subprocess.CompletedProcess:
    source = SCRIPT.read_text()
    assert source.count(CHROMIUM_LINE) == 1  # the one place the tests' path is written
    assert source.count(HAPROXY_LINE) == 1
    chromium_path = tmp_path / "chromium"
    if chromium:
        _executable(chromium_path, "#!/bin/sh\n")
    script = tmp_path / "install-browser.sh"
    haproxy_path = tmp_path / "haproxy"
    if haproxy:
        _executable(haproxy_path, "#!/bin/sh\n")
    source = source.replace(HAPROXY_LINE, f"HAPROXY={haproxy_path}")
    script.write_text(source.replace(CHROMIUM_LINE, f"CHROMIUM={chromium_path}"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").symlink_to(shutil.which("id"))
    _executable(bin_dir / "sudo", '#!/bin/sh\nexec "$@"\n')
    if apt:
        _executable(bin_dir / "apt-get", f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.log\n')
    if espeak:
        _executable(bin_dir / "espeak-ng", "#!/bin/sh\n")
    if turnserver:
        _executable(bin_dir / "turnserver", "#!/bin/sh\n")
    return subprocess.run(
        [shutil.which("bash"), str(script)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nothing_to_do_when_all_are_there(tmp_path):
    r = run_installer(tmp_path, chromium=True, espeak=True)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize(
    ("chromium", "espeak", "turnserver", "haproxy", "message"),
    [
        (False, True, True, True, "chromium is not at"),
        (True, False, True, True, "espeak-ng is not on PATH"),
        (False, False, True, True, "chromium is not at"),
        (True, True, False, True, "turnserver is not on PATH"),
        (True, True, True, False, "haproxy is not at"),
    ],
)
def test_fails_loudly_when_still_missing_after_installing(
    tmp_path, chromium, espeak, turnserver, haproxy, message
):
    """Fails if the script trusts apt-get's exit status (tried: without the checks after the
    install it exits 0 here; without the turnserver check, 0 in the fourth case; without the
    haproxy check, 0 in the last)."""
    r = run_installer(
        tmp_path, chromium=chromium, espeak=espeak, turnserver=turnserver, haproxy=haproxy
    )
    assert r.returncode == 1
    assert message in r.stderr
    assert "install -y -qq chromium espeak-ng coturn haproxy" in (tmp_path / "apt.log").read_text()


def test_fails_loudly_without_apt_get(tmp_path):
    r = run_installer(tmp_path, chromium=False, espeak=True, apt=False)
    assert r.returncode == 1
    assert "apt-get not found" in r.stderr

#!/usr/bin/env bash
# Debian's chromium for the end-to-end browser tests (never a downloaded browser build),
# espeak-ng, whose real speech the lip-sync tests and the page's sample audio use, coturn,
# whose turnserver tests/test_turn.py starts to relay a session with short-lived credentials,
# and haproxy, the load balancer tests/test_replicas.py starts in front of two replicas.
# Fails loudly (a message on stderr, exit 1) when one is still missing after installing:
# `make test` would fail on the tests that need them anyway (DIFFSTREAM_STRICT_SKIPS), this
# says why first.
set -euo pipefail
CHROMIUM=/usr/bin/chromium # where tests/test_browser.py looks
HAPROXY=/usr/sbin/haproxy  # where tests/test_replicas.py looks (not on a user's PATH)

fail() {
	echo "scripts/install-browser.sh: $*" >&2
	exit 1
}

have_haproxy() { [ -x "$HAPROXY" ] || command -v haproxy >/dev/null; }

if [ -x "$CHROMIUM" ] && command -v espeak-ng >/dev/null && command -v turnserver >/dev/null &&
	have_haproxy; then
	exit 0
fi
command -v apt-get >/dev/null ||
	fail "apt-get not found; install chromium at $CHROMIUM, espeak-ng, coturn and haproxy by hand"
SUDO=
if [ "$(id -u)" != "0" ]; then
	command -v sudo >/dev/null || fail "not root and no sudo: run it as root"
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || fail "apt-get update failed (see above)"
$SUDO apt-get install -y -qq chromium espeak-ng coturn haproxy >/dev/null ||
	fail "apt-get install chromium espeak-ng coturn haproxy failed (see above)"
[ -x "$CHROMIUM" ] ||
	fail "chromium is not at $CHROMIUM after installing it, and the browser tests look there"
command -v espeak-ng >/dev/null || fail "espeak-ng is not on PATH after installing it"
command -v turnserver >/dev/null || fail "coturn's turnserver is not on PATH after installing it"
have_haproxy || fail "haproxy is not at $HAPROXY nor on PATH after installing it"

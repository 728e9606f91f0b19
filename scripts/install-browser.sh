#!/usr/bin/env bash
# Debian's chromium for the end-to-end browser tests (never a downloaded browser build) and
# espeak-ng, whose real speech the lip-sync tests and the page's sample audio use.
set -euo pipefail
if [ -x /usr/bin/chromium ] && command -v espeak-ng >/dev/null; then exit 0; fi
if [ "$(id -u)" != "0" ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium espeak-ng >/dev/null

#!/usr/bin/env bash
# Installs everything edge-agent needs on a fresh Debian machine: system tools (when root with apt),
# a virtual environment in .venv with the package, its training extras and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

want=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have mosquitto || want+=(mosquitto)
have mosquitto_sub || want+=(mosquitto-clients)
have promtool || want+=(prometheus)
have ffmpeg || want+=(ffmpeg)
# The station page's browser test drives a real headless chromium; skipped without it.
have chromium || want+=(chromium)
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get install ${want[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    echo "install.sh: not root or no apt-get; without ${want[*]} the tests that need them are skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch is pinned to 2.13.0 in pyproject.toml: the CPU wheel, not a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[train,dev]'

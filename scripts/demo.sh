#!/usr/bin/env bash
# Installs from nothing, then runs the station daemon on the bundled demo station
# (synthetic video, demo model, embedded MQTT broker); verdicts are printed, Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
EDGE_AGENT=.venv/bin/edge-agent exec deploy/demo.sh "$@"

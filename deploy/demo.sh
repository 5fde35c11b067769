#!/bin/sh
# The demo station: makes the synthetic station video once, then runs the daemon on it with the
# verdicts printed one line each. Ctrl-C stops it cleanly. Extra arguments go to `edge-agent run`
# (e.g. --set mqtt.port=1884). Subscribe meanwhile with: mosquitto_sub -t 'edge-agent/demo/#' -v
# The station page (latest frame, verdicts, health) is on http://127.0.0.1:8108/.
set -eu
cd "$(dirname "$0")/.."
EDGE_AGENT=${EDGE_AGENT:-edge-agent}
if [ ! -f data/demo/station.avi ]; then
    $EDGE_AGENT synth data/demo/parts --train 0 --calib 0 --test-good 0 --test-defect 0 \
        --video data/demo/station.avi --frames 100 --defect-every 5
fi
echo "demo: the station page is on http://127.0.0.1:8108/ (open it in a browser); Ctrl-C stops the agent" >&2
exec $EDGE_AGENT run deploy/demo.toml --print-verdicts "$@"

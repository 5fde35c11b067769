#!/usr/bin/env bash
# Residual whitening on and off on the same trained weights (docs/RESULTS.md, round 13).
#
#   bash benchmarks/whiten_ablation.sh DATA OUT [train options...]
#
# DATA: an `edge-agent synth` / benchmarks/*_set.py folder (train/good, test/good, test/defect with kinds.csv).
# Trains one model with `train`'s defaults (plus the options given), copies it with the card's whitening
# removed (the low side and place weights stay as fitted with it), and evaluates both with the map score.
set -euo pipefail
data=$1 out=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
ea=$here/.venv/bin/edge-agent
mkdir -p "$out"
"$ea" train "$data/train/good" --out "$out/white.pt" -q "$@"
cp "$out/white.pt" "$out/plain.pt"
"$here/.venv/bin/python" - "$out/plain.pt" <<'PY'
import sys
from edge_agent import artifact

def change(card):
    card["anomaly_map"]["white"] = None
    return card

artifact.update_card(sys.argv[1], change)
PY
kinds=()
[ -f "$data/test/defect/kinds.csv" ] && kinds=(--kinds "$data/test/defect/kinds.csv")
for m in white plain; do
    echo "== $m"
    "$ea" evaluate "$out/$m.pt" --good "$data/test/good" --defect "$data/test/defect" "${kinds[@]}" --score m_map \
        2>&1 | grep -v "^evaluate "
done

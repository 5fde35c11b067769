#!/usr/bin/env bash
# Trains every family on the synthetic station and compares them in one evaluate report
# (docs/RESULTS.md, "All families side by side"). Usage: benchmarks/families.sh [DATA] [OUT]
set -euo pipefail
D=${1:-data/station}
R=${2:-runs/families}
EA=${EDGE_AGENT:-.venv/bin/edge-agent}
[ -d "$D/train/good" ] || $EA synth "$D"
mkdir -p "$R"
T=$D/test
# A model already in $R is kept (rerun the comparison without retraining).
train() { out=$1; shift; [ -f "$out" ] || $EA train "$D/train/good" --out "$out" -q "$@"; }
train "$R/vae.pt" --model vae --epochs 10 --nz 50
train "$R/ae.pt" --model ae --epochs 10
train "$R/gmm.pt" --model gmm
train "$R/anogan.pt" --model anogan --stride 16 --nc 16 --epochs 1000 --max-minutes 6 --threshold-images 20
$EA evaluate "$R/vae.pt" "$R/ae.pt" "$R/gmm.pt" --score m --score elbo --score m_map --score l1 --score l2 --score ssim --score l2_map \
    --score nll --score m_full --score m_full_map \
    --good "$T/good" --defect "$T/defect" --masks "$T/masks" --report "$R/report" -q 2>&1 | tee "$R/evaluate.txt" || true
# AnoGAN's latent search costs up to 110 generator+discriminator passes per patch: every 5th test image.
for d in good defect masks; do
  mkdir -p "$R/sub/$d"
  for i in $(seq -f %04g 0 5 99); do cp "$T/$d/$i.png" "$R/sub/$d/"; done
done
# The anomaly-map score's name follows the model's default score (encoder_refine_map for the default AnoGAN).
map=$($EA info "$R/anogan.pt" | .venv/bin/python -c 'import json, sys; print((json.load(sys.stdin).get("anomaly_map") or {}).get("name", ""))')
for s in encoder encoder_refine search $map; do
  $EA evaluate "$R/anogan.pt" --score $s --good "$R/sub/good" --defect "$R/sub/defect" --masks "$R/sub/masks" \
      --report "$R/report-anogan-$s" -q 2>&1 | tee "$R/evaluate-anogan-$s.txt"
done

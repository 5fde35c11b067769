"""Two anomaly-map variants that `benchmarks/anomaly_map.py` cannot compute from the model's pixel map, measured
against it on one VAE (no retraining); neither beat the plain map (docs/RESULTS.md, round 4):

- signed fold: each pixel's normalized residual r = (x - mu_x) / sigma_x averaged over the patches that cover it,
  then 0.5 * mean(r)^2 (optionally x K, the number of covering patches): reconstruction errors that differ
  between overlapping patches cancel, a defect that no patch reconstructs stays;
- multi-scale: the plain map blurred at several sigmas, each scale z-normalized by good calibration images'
  maxima, the image score the highest of them (small defects at scale 0, larger ones blurred).

    python benchmarks/signed_fold.py MODEL DATA [--calib 100 --good 100 --defect 100] [--sigmas 0,2,4,8]

DATA is an `edge-agent synth` folder (calib/good, test/good, test/defect); the first half of the calibration
images z-normalizes and (for the position rows) fits statistics, the second half sets the FRR-method threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import MapHead, PositionStats, fold_mean, gaussian_blur, window_max
from edge_agent.images import read_image
from edge_agent.scoring import Scorer

import subset  # benchmarks/subset.py: the splits and the table both scripts print


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=100)
    ap.add_argument("--defect", type=int, default=100)
    ap.add_argument("--sigmas", default="0,2,4,8")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    module, card = artifact.load(a.model)
    if not hasattr(module, "encode"):
        raise SystemExit(f"{a.model} is not a VAE (no encode/decode); the signed fold needs mu_x and sigma_x")
    module.eval()
    scorer = Scorer(a.model, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
    splits = subset.splits(a.data, a.calib, a.good, a.defect)
    squared, signed, grid = {}, {}, None
    for k, files in splits.items():
        squared[k], signed[k] = [], []
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            r = []
            for s in range(0, patches.shape[0], 128):
                x = patches[s : s + 128]
                mu_x, sigma_x = module.decode(module.encode(x)[0])
                r.append((x - mu_x) / sigma_x)
            r = torch.cat(r)
            squared[k].append(fold_mean(grid, (0.5 * r**2).sum(1)))
            signed[k].append(0.5 * torch.stack([fold_mean(grid, r[:, c]) for c in range(r.shape[1])]).pow(2).sum(0))
    count = torch.zeros(grid.frame_h, grid.frame_w)
    for y in grid.ys:
        for x in grid.xs:
            count[y : y + grid.size, x : x + grid.size] += 1
    half = len(splits["c"]) // 2
    row = subset.table(splits, a.data, "variant")

    def image_scores(maps, head=None, cache=None):
        return {k: np.array([float(window_max(grid, (head.normalized(m, cache) if head else m)).max()) for m in v])
                for k, v in maps.items()}

    for name, maps in (("plain map (m_map)", squared), ("signed fold", signed),
                       ("signed fold x K", {k: [m * count for m in v] for k, v in signed.items()})):
        s = image_scores(maps)
        row(name, s)
        head = MapHead(0.0, PositionStats.fit(maps["c"][:half]))
        s = image_scores(maps, head, {})
        row(name + ", position statistics", s)
    sigmas = [float(s) for s in a.sigmas.split(",")]
    per_scale = {s: image_scores({k: [gaussian_blur(m, s) for m in v] for k, v in squared.items()}) for s in sigmas}
    for s in sigmas[1:]:
        row(f"plain map, blur {s:g} px", per_scale[s])
    z = {s: {k: (v - per_scale[s]["c"][:half].mean()) / per_scale[s]["c"][:half].std() for k, v in per_scale[s].items()}
         for s in sigmas}
    for combo in (sigmas[:2], sigmas):
        best = {k: np.max([z[s][k] for s in combo], 0) for k in "cgd"}
        row(f"multi-scale: max over blur {', '.join(f'{s:g}' for s in combo)} px, z-normalized", best)


if __name__ == "__main__":
    main()

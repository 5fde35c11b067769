"""Two levers against the good parts' score tail of an fc + conv VAE pair (docs/RESULTS.md, round 7).

1. A shift-tolerant pixel map: m_t(i,j) = min over |dy|, |dx| <= t of
   0.5 ((mu_x[i+dy, j+dx] - x[i,j]) / sigma_x[i+dy, j+dx])^2 (edges replicated inside the patch), because the conv
   model's highest good scores come from the hole's sharp edge drawn a pixel off. t = 0 is the product's map.
2. The combination's scales: 1 / a quantile of each member's image maxima on the held-out images (combine takes
   the median), because the calibrated threshold sits at the good parts' maximum, not their median.

    python benchmarks/shift_tolerance.py FC.pt CONV.pt --data DATA --out scores.npz

DATA is an `edge-agent synth` folder. As `edge-agent combine` does, the scales come from the training images both
models held out (found again in the training folder their cards name); the threshold is the FRR method's
(target 1 %, 95 % confidence) on all calibration images, the metrics on all test images. The combination's
maximum is taken before the fold (what combine writes); for the scale table after it, where the image score of
the pixelwise maximum is exactly the maximum of the members' scaled image scores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent import artifact
from edge_agent.anomaly_map import fold_mean, window_max
from edge_agent.combine import heldout_files
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer

import subset  # benchmarks/subset.py: the result table the other benchmarks print

TOLS = (0, 1, 2)


def tolerant(x, mu, sigma, t):
    if t == 0:
        return (0.5 * ((mu - x) / sigma).pow(2)).sum(1)
    p = x.shape[-1]
    mp = F.pad(mu, (t, t, t, t), mode="replicate")
    sp = F.pad(sigma, (t, t, t, t), mode="replicate")
    best = None
    for dy in range(2 * t + 1):
        for dx in range(2 * t + 1):
            r = (0.5 * ((mp[..., dy:dy + p, dx:dx + p] - x) / sp[..., dy:dy + p, dx:dx + p]).pow(2)).sum(1)
            best = r if best is None else torch.minimum(best, r)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path, nargs=2)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    scorer = Scorer(a.models[0], device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
    loaded = [artifact.load(p) for p in a.models]
    modules = [m.eval() for m, _ in loaded]
    scale_files = heldout_files([card for _, card in loaded], a.models)
    print(f"{len(scale_files)} scale images", file=sys.stderr)
    splits = {"s": scale_files, "c": list_images(a.data / "calib/good"), "g": list_images(a.data / "test/good"),
              "d": list_images(a.data / "test/defect")}

    def maps_of(f):
        grid, patches = scorer.patches(read_image(f))
        out = []
        for m in modules:
            per_t = {t: [] for t in TOLS}
            for s in range(0, patches.shape[0], 128):
                x = patches[s:s + 128].float()
                mu_z, _ = m.encode(x)
                mu, sig = m.decode(mu_z)
                for t in TOLS:
                    per_t[t].append(tolerant(x, mu, sig, t))
            out.append({t: torch.cat(v) for t, v in per_t.items()})
        return grid, out

    variants = [(t0, t1) for t0 in TOLS for t1 in TOLS]
    alone = {}  # (k, t) -> split -> list of image max (unscaled fold)
    combo = {}  # (t0, t1) -> split -> list
    scales = {}
    t0 = time.monotonic()
    n = 0
    for split, files in splits.items():
        for f in files:
            grid, pm = maps_of(f)
            folds = {(k, t): fold_mean(grid, pm[k][t]) for k in range(2) for t in TOLS}
            for key, fm in folds.items():
                alone.setdefault(key, {}).setdefault(split, []).append(float(window_max(grid, fm).max()))
            if split != "s":
                for v in variants:
                    pre = torch.maximum(scales[(0, v[0])] * pm[0][v[0]], scales[(1, v[1])] * pm[1][v[1]])
                    combo.setdefault(v, {}).setdefault(split, []).append(float(window_max(grid, fold_mean(grid, pre)).max()))
            n += 1
            if n % 50 == 0:
                print(f"{n} images {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        if split == "s":
            scales = {key: 1.0 / float(np.median(v["s"])) for key, v in alone.items()}
    np.savez(a.out, **{f"alone_{k}_{t}_{s}": np.array(v) for (k, t), d in alone.items() for s, v in d.items()},
             **{f"combo_{v0}_{v1}_{s}": np.array(v) for (v0, v1), d in combo.items() for s, v in d.items()})
    row = subset.table(splits, a.data, "variant", threshold_from=0, missed=True)  # threshold: all calibration images
    for (k, t), d in alone.items():
        row(f"{a.models[k].name} t={t}", d)
    for (v0, v1), d in combo.items():
        row(f"{a.models[0].name} t={v0} + {a.models[1].name} t={v1}", d)
    print()
    first, second = alone[(0, 0)], alone[(1, 0)]
    for q in (50, 75, 90, 100):
        s0, s1 = 1 / np.percentile(first["s"], q), 1 / np.percentile(second["s"], q)
        row(f"t=0 pair, scales from the {q}th percentile of the held-out maxima (after the fold)",
            {s: np.maximum(s0 * np.array(first[s]), s1 * np.array(second[s])) for s in "cgd"})


if __name__ == "__main__":
    main()

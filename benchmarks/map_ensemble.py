"""Two or more models' anomaly maps combined, measured against each alone (docs/RESULTS.md, rounds 5 and 6).

Round 5 found that the seed's fc-latent VAE and a `--latent conv` VAE fail on different defects: the fc model
draws the 640x480 part's thread as grey noise (defects on it score nothing), the conv model reconstructs the
thread but partly copies large debris and misses the hole's sharp edge by a pixel on good parts. Each model's
map is divided by the median of its image maxima over the first half of the calibration images, then:

- after the fold: the pixelwise maximum of the models' fold-mean maps (round 5's measurement);
- after the fold, the mean: the pixelwise mean of the scaled fold-mean maps (round 10: a place where one model
  errs on a good part is diluted by the other, a defect caught by one model is halved);
- before the fold: the fold mean of the pixelwise maximum of the models' per-patch pixel maps, which is what
  `edge-agent combine` writes (its module's pixel_map is the scaled maximum; the map head folds it).

Every combination of two or more of the models is printed.

    python benchmarks/map_ensemble.py MODEL MODEL [MODEL ...] --data DATA [--calib 100 --good 100 --defect 100]

DATA is an `edge-agent synth` folder (calib/good, test/good, test/defect); the second half of the calibration
images sets the FRR-method threshold (target 1 %, 95 % confidence), as in benchmarks/signed_fold.py.
The models must share the patch geometry (same P, S and frame size).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import fold_mean, window_max
from edge_agent.images import read_image
from edge_agent.scoring import Scorer

import subset  # benchmarks/subset.py: the splits and the table both scripts print


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=100)
    ap.add_argument("--defect", type=int, default=100)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    splits = subset.splits(a.data, a.calib, a.good, a.defect)
    half = len(splits["c"]) // 2
    scorer = Scorer(a.models[0], device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
    modules = [artifact.load(path)[0].eval() for path in a.models]

    def maps_of(f: Path):
        grid, patches = scorer.patches(read_image(f))
        return grid, [torch.cat([m.pixel_map(patches[s : s + 128]).float() for s in range(0, patches.shape[0], 128)])
                      for m in modules]

    def top(grid, image: torch.Tensor) -> float:
        return float(window_max(grid, image).max())

    maxima = [[] for _ in modules]
    for f in splits["c"][:half]:
        grid, pixel = maps_of(f)
        for k, p in enumerate(pixel):
            maxima[k].append(top(grid, fold_mean(grid, p)))
    scales = [1.0 / float(np.median(m)) for m in maxima]
    print(f"scales from {half} calibration images: " + ", ".join(f"{p.name} {s:.4g}" for p, s in zip(a.models, scales)),
          file=sys.stderr)
    combos = [c for r in range(2, len(modules) + 1) for c in itertools.combinations(range(len(modules)), r)]
    rows: dict[str, dict[str, np.ndarray]] = {}

    def put(name: str, split: str, i: int, value: float) -> None:
        rows.setdefault(name, {k: np.full(len(v), np.nan) for k, v in splits.items()})[split][i] = value

    t0, done = time.monotonic(), 0
    for split, files in splits.items():
        for i, f in enumerate(files):
            if split == "c" and i < half:
                continue  # the scales' images: the rows' thresholds use the second half only
            grid, pixel = maps_of(f)
            folds = [s * fold_mean(grid, p) for s, p in zip(scales, pixel)]
            for k, path in enumerate(a.models):
                put(f"{path.name} alone", split, i, top(grid, folds[k]))
            for c in combos:
                names = " + ".join(a.models[k].name for k in c)
                put(f"{names}: max after the fold", split, i, top(grid, torch.stack([folds[k] for k in c]).amax(0)))
                put(f"{names}: mean after the fold", split, i, top(grid, torch.stack([folds[k] for k in c]).mean(0)))
                pre = torch.stack([scales[k] * pixel[k] for k in c]).amax(0)
                put(f"{names}: max before the fold (combine)", split, i, top(grid, fold_mean(grid, pre)))
            done += 1
            if done % 50 == 0:
                print(f"{done} images, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    row = subset.table(splits, a.data, "combination")
    for name, values in rows.items():
        row(name, values)


if __name__ == "__main__":
    main()

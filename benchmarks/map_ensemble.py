"""Two or more models' anomaly maps combined, measured against each alone (docs/RESULTS.md, round 5).

Round 5 found that the seed's fc-latent VAE and a `--latent conv` VAE fail on different defects: the fc model
draws the 640x480 part's thread as grey noise (defects on it score nothing), the conv model reconstructs the
thread but partly copies large debris and misses the hole's sharp edge by a pixel on good parts. Combined:

- ratio: each model's plain map (fold mean of its pixel map, no blur) divided by the median of its maxima over
  the first half of the calibration images, then the pixelwise maximum over models (a heatmap still exists);
- z: each model's image score (the map's maximum), log-z-normalised by the same calibration images, then the
  highest over models.

    python benchmarks/map_ensemble.py MODEL MODEL [MODEL ...] --data DATA [--calib 100 --good 100 --defect 100]

DATA is an `edge-agent synth` folder (calib/good, test/good, test/defect); the second half of the calibration
images sets the FRR-method threshold (target 1 %, 95 % confidence), as in benchmarks/signed_fold.py.
The models must share the patch geometry (same P, S and frame size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import fold_mean, window_max
from edge_agent.images import read_image
from edge_agent.scoring import Scorer

import subset  # benchmarks/subset.py: the splits and the table both scripts print


def plain_maps(path: Path, splits: dict[str, list[Path]]) -> tuple[dict[str, list[torch.Tensor]], object]:
    scorer = Scorer(path, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
    module, _ = artifact.load(path)
    module.eval()
    maps, grid = {}, None
    for k, files in splits.items():
        maps[k] = []
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            pixel = torch.cat([module.pixel_map(patches[s : s + 128]) for s in range(0, patches.shape[0], 128)])
            maps[k].append(fold_mean(grid, pixel))
    return maps, grid


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
    row = subset.table(splits, a.data, "combination")

    per_model, grid = [], None
    for path in a.models:
        maps, grid = plain_maps(path, splits)
        per_model.append(maps)
        row(f"{path.name} alone", {k: np.array([float(window_max(grid, m).max()) for m in v]) for k, v in maps.items()})
    scales = [1.0 / np.median([float(window_max(grid, m).max()) for m in maps["c"][:half]]) for maps in per_model]
    ratio = {k: np.array([float(window_max(grid, torch.stack([s * maps[k][i] for s, maps in zip(scales, per_model)])
                                                     .amax(0)).max()) for i in range(len(splits[k]))]) for k in splits}
    row("ratio: pixelwise max of maps / median good maximum", ratio)
    z = []
    for maps in per_model:
        top = {k: np.log([float(window_max(grid, m).max()) for m in v]) for k, v in maps.items()}
        ref = top["c"][:half]
        z.append({k: (v - ref.mean()) / ref.std() for k, v in top.items()})
    row("z: highest log-z-normalised image score", {k: np.max([zz[k] for zz in z], 0) for k in splits})


if __name__ == "__main__":
    main()

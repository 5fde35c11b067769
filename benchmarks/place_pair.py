"""Goal 1's candidate, measured offline: a pair of models plus the first one's place score (docs/RESULTS.md round 10).

The first model's `mu_z` gets one Gaussian per grid cell on the training images (as benchmarks/place_latent.py);
each image score is the maximum of the two models' own scores and that place score, each divided by the median
of its image maxima on the first --calib calibration images, which also set the FRR-method threshold (the
maximum of their combined scores; `calibrated` in the output).

    python benchmarks/place_pair.py FC.pt CONV.pt --data data/s640 [--fit 200 --calib 50 --good 100 --defect 100]

Both models must share the patch geometry (same P, S and frame size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.evaluate_cmd import read_kinds
from edge_agent.evaluation import recall_at_frr, roc_auc
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer

from place_latent import encoder_codes, gaussians, mahalanobis2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path, help="the model whose encoder gives the place score")
    ap.add_argument("second", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--fit", type=int, default=200)
    ap.add_argument("--calib", type=int, default=50)
    ap.add_argument("--good", type=int, default=100)
    ap.add_argument("--defect", type=int, default=100)
    ap.add_argument("--shrink", type=float, default=0.01)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    first, second = (Scorer(p, device="cpu", precision="fp32", warmup=False, threshold=0.0) for p in (a.first, a.second))
    encoder = artifact.load(a.first)[0].eval()

    def latents(patches: torch.Tensor) -> np.ndarray:
        return encoder_codes(encoder, patches)

    train = np.stack([latents(first.patches(read_image(f))[1]) for f in list_images(a.data / "train/good")[:a.fit]])
    mean, precision = gaussians(train, a.shrink)

    def run(path: Path) -> tuple[float, float, float]:
        grid, patches = first.patches(read_image(path))
        place = float(np.sqrt(mahalanobis2(latents(patches), mean, precision)).max())
        return float(first.score_frame(grid, patches).max()), float(second.score_frame(grid, patches).max()), place

    calib = np.array([run(f) for f in list_images(a.data / "calib/good")[:a.calib]])
    good = np.array([run(f) for f in list_images(a.data / "test/good")[:a.good]])
    defect_files = list_images(a.data / "test/defect")[:a.defect]
    defect = np.array([run(f) for f in defect_files])
    kinds = np.array(read_kinds(defect_files, None, a.data / "test/defect"))
    scale = 1 / np.median(calib, axis=0)
    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    print(f"| score | image AUROC | recall at test FRR 1 % | calibrated on {len(calib)}: FRR / recall | by kind |")
    print("|---|---:|---:|---:|---|")
    for name, cols in ((a.first.name, [0]), (a.second.name, [1]), ("pair (max)", [0, 1]),
                       (f"{a.first.name} + place", [0, 2]), ("pair + place (max)", [0, 1, 2])):
        c, g, d = ((x[:, cols] * scale[cols]).max(1) for x in (calib, good, defect))
        t = c.max()
        by_kind = ", ".join(f"{k} {roc_auc(np.r_[np.zeros(len(g)), np.ones((kinds == k).sum())], np.r_[g, d[kinds == k]]):.3f}"
                            for k in sorted(set(kinds)))
        print(f"| {name} | {roc_auc(labels, np.r_[g, d]):.4f} | {recall_at_frr(labels, np.r_[g, d], 0.01)['recall']:.3f} "
              f"| {(g > t).mean():.3f} / {(d > t).mean():.3f} | {by_kind} |", flush=True)


if __name__ == "__main__":
    main()

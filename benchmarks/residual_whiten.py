"""A whitened residual map for VAE models, measured against the plain map on one model (no retraining).

The VAE's map 0.5 ((x - mu_x) / sigma_x)^2 treats pixels as independent, but a good part's residual is not:
brushing and a loosely drawn thread leave residuals correlated along lines and rings, and a 1-px scratch over
them is a few tenths of a sigma per pixel. Here each pixel's normalized residual r = (x - mu_x) / sigma_x is
averaged over the patches that cover it (the signed fold), and every k x k window of that map is scored by
its Mahalanobis distance to the windows of good images (mean and covariance from the first half of the
calibration images), so a residual shaped like nothing good parts leave stands out even when each pixel is
weak. Rows: the plain map, the whitened map for each k, and the maximum of the two, each z-normalized on the
first half's image maxima.

    PYTHONPATH=.:benchmarks python benchmarks/residual_whiten.py MODEL DATA [--calib 100 --good 100 --defect 100] [--k 3,5,7]

DATA is an `edge-agent synth` folder; the second half of the calibration images sets the FRR-method threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import MapHead, PositionStats, Whitening, fold_mean, window_max
from edge_agent.images import read_image
from edge_agent.scoring import Scorer

import subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=100)
    ap.add_argument("--defect", type=int, default=100)
    ap.add_argument("--k", default="3,5,7")
    ap.add_argument("--save", type=Path, help="write every variant's image scores here (.npz)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    module, card = artifact.load(a.model)
    if not hasattr(module, "encode"):
        raise SystemExit(f"{a.model} is not a VAE (no encode/decode)")
    module.eval()
    scorer = Scorer(a.model, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
    splits = subset.splits(a.data, a.calib, a.good, a.defect)
    plain, signed, grid = {}, {}, None
    for key, files in splits.items():
        plain[key], signed[key] = [], []
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            r = []
            for s in range(0, patches.shape[0], 128):
                x = patches[s : s + 128]
                mu_x, sigma_x = module.decode(module.encode(x)[0])
                r.append(((x - mu_x) / sigma_x).float())
            r = torch.cat(r)
            plain[key].append(fold_mean(grid, (0.5 * r**2).sum(1)))
            signed[key].append(fold_mean(grid, r.mean(1)))
        print(f"scored {key}: {len(files)} images", flush=True)
    half = len(splits["c"]) // 2
    row = subset.table(splits, a.data, "map")
    gen = torch.Generator().manual_seed(0)

    def image_scores(maps):
        return {key: np.array([float(window_max(grid, m).max()) for m in v]) for key, v in maps.items()}

    def z(s):
        mu, sd = s["c"][:half].mean(), s["c"][:half].std()
        return {key: (v - mu) / sd for key, v in s.items()}

    results = {"plain": image_scores(plain)}
    row("plain map (m_map, no head)", results["plain"])
    head = MapHead(0.0, PositionStats.fit(plain["c"][:half]))
    results["plain_pos"] = {key: np.array([float(window_max(grid, head.normalized(m, {})).max()) for m in v])
                            for key, v in plain.items()}
    row("plain map, position statistics", results["plain_pos"])
    for k in (int(v) for v in a.k.split(",")):
        sample = []
        for m in signed["c"][:half]:
            w = Whitening.windows(m, k)
            sample.append(w[torch.randint(0, w.shape[0], (20000,), generator=gen)])
        sample = torch.cat(sample).double()
        mean = sample.mean(0)
        cov = torch.cov((sample - mean).t())
        cov += 1e-3 * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0], dtype=cov.dtype)
        chol = torch.linalg.cholesky(torch.linalg.inv(cov)).float()  # P = L L^T: d^2 = |(w - mean) L|^2
        mean = mean.float()
        white = {key: [0.5 * ((Whitening.windows(m, k) - mean) @ chol).pow(2).sum(1).reshape(m.shape) for m in v]
                 for key, v in signed.items()}
        results[f"white{k}"] = image_scores(white)
        row(f"whitened signed residual, {k}x{k}", results[f"white{k}"])
        zp, zw = z(results["plain"]), z(results[f"white{k}"])
        results[f"max{k}"] = {key: np.maximum(zp[key], zw[key]) for key in zp}
        row(f"max of plain and whitened {k}x{k}, z-normalized", results[f"max{k}"])
    if a.save:
        np.savez(a.save, **{f"{n}_{key}": v for n, s in results.items() for key, v in s.items()})


if __name__ == "__main__":
    main()

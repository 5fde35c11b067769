"""Which member's residual to whiten in goal 1's pair (docs/RESULTS.md, round 13): the product whitens the first
member's; this compares the conv member's, the mean of both, and the maximum of both, at the image level, on
the first 100 calibration / good / defective images (statistics and scales from the first 50 calibration
images, the FRR-method threshold from the other 50).

    PYTHONPATH=.:benchmarks python benchmarks/whiten_members.py PAIR_WITHOUT_WHITENING FC CONV DATA
"""
import sys

import numpy as np
import torch

import subset
from pathlib import Path
from edge_agent.anomaly_map import Whitening, fold_mean
from edge_agent.images import read_image
from edge_agent.scoring import Scorer
torch.set_grad_enabled(False)
pair_path, fc_path, c2_path, data = sys.argv[1:5]
pair = Scorer(pair_path, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
fc = Scorer(fc_path, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
c2 = Scorer(c2_path, device="cpu", precision="fp32", warmup=False, fast=False, threshold=0.0)
D = Path(data); sp = subset.splits(D, 100, 100, 100)
base, r1, r2 = {}, {}, {}
for k, files in sp.items():
    base[k], r1[k], r2[k] = [], [], []
    for f in files:
        grid, patches = pair.patches(read_image(f))
        base[k].append(pair.score_frame(grid, patches).max())
        _, a, _ = fc.maps_residuals(patches); _, b, _ = c2.maps_residuals(patches)
        r1[k].append(fold_mean(grid, a)); r2[k].append(fold_mean(grid, b))
    print("scored", k, flush=True)
half = 50
row = subset.table(sp, D, "variant")
B = {k: np.array(v) for k, v in base.items()}
row("pair without whitening (map+place+low)", B)
def white(sig):
    m, c = Whitening.fit(sig["c"][:half], 5)
    w = Whitening(5, m.astype(np.float32), c.astype(np.float32), 1.0, half)
    return {k: np.array([float(w.unweighted(s).max()) for s in v]) for k, v in sig.items()}
def comb(W):
    wt = np.median(B["c"][:half]) / np.median(W["c"][:half])
    return {k: np.maximum(B[k], wt * W[k]) for k in B}
W1 = white(r1); W2 = white(r2)
avg = {k: [(a + b) / 2 for a, b in zip(r1[k], r2[k])] for k in r1}
WA = white(avg)
row("+ whiten fc residual (product)", comb(W1))
row("+ whiten conv residual", comb(W2))
row("+ whiten mean of both residuals", comb(WA))
w1 = np.median(B["c"][:half]) / np.median(W1["c"][:half]); w2 = np.median(B["c"][:half]) / np.median(W2["c"][:half])
row("+ whiten both, max", {k: np.maximum(B[k], np.maximum(w1 * W1[k], w2 * W2[k])) for k in B})

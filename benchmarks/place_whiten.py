"""Per-place residual whitening against the global one, offline on one trained model (no retraining).

The head's whitening (anomaly_map.Whitening) scores each k x k window of the folded signed residual by one
Gaussian of every good window, wherever it lies. On a fixtured part the residual's structure depends on the
place: on a thread its correlation follows the ring, whose direction turns around the hole, on a brushed
face it follows the brushing. Here the frame is cut into cells of c x c pixels and each cell gets its own
window Gaussian (optionally pooled over its 3 x 3 neighbouring cells, which tolerates a part that sits a few
pixels off, and shrunk towards the global Gaussian), fitted on the first half of the calibration images; the
map is put on the head's scale as train does (median image maxima) and the image score is the head's, with
the global whitening swapped for the per-place one.

    PYTHONPATH=.:benchmarks python benchmarks/place_whiten.py MODEL DATA [--calib 100 --good 200 --defect 200]
        [--cells 16,32,80] [--pool 1,3] [--shrink 0,0.3] [--cache maps.pt]

MODEL must whiten (a VAE/AE trained with the default `--whiten`, or an ensemble whose first member does).
DATA is an `edge-agent synth` folder; the second half of the calibration images sets the FRR-method threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent.anomaly_map import Whitening, fold_mean, window_max
from edge_agent.images import read_image
from edge_agent.scoring import Scorer

import subset


def collect(scorer: Scorer, splits: dict[str, list[Path]]):
    """Per image: the head's normalized map (H, W), the folded signed residual (H, W), and the (N,) patch scores
    the map is raised to: the low side's and the place score's, where the head has them."""
    head = scorer.head
    out, grid = {}, None
    for key, files in splits.items():
        norm, signed, low = [], [], []
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            maps, residuals, codes = scorer.maps_residuals(patches)
            norm.append(head.normalized(head.smoothed(grid, maps)).half())
            signed.append(fold_mean(grid, residuals).half())
            floor = torch.zeros(maps.shape[0])
            if head.low is not None:
                floor = torch.maximum(floor, head.low.scores(maps))
            if head.place is not None:
                floor = torch.maximum(floor, head.place.scores(codes))
            low.append(floor)
        out[key] = (norm, signed, low)
        print(f"scored {key}: {len(files)} images", flush=True)
    return grid, out


def cell_stats(signed: list[torch.Tensor], k: int, c: int, pool: int, shrink: float, glob: tuple) -> tuple:
    """Per cell of c x c px: the mean (cells, k^2) and the precision's Cholesky factor (cells, k^2, k^2)."""
    h, w = signed[0].shape
    ch, cw, d = h // c, w // c, k * k
    total = torch.zeros(ch, cw, d, dtype=torch.float64)
    outer = torch.zeros(ch, cw, d, d, dtype=torch.float64)
    for s in signed:
        win = Whitening.windows(s.float(), k).reshape(ch, c, cw, c, d).permute(0, 2, 1, 3, 4).reshape(ch, cw, c * c, d)
        win = win.double()
        total += win.sum(2)
        outer += win.transpose(2, 3) @ win
    n = torch.full((ch, cw), float(len(signed) * c * c), dtype=torch.float64)
    if pool > 1:  # each cell with its pool x pool neighbours
        def box(t):
            flat = t.reshape(ch, cw, -1).permute(2, 0, 1)[:, None]
            return F.avg_pool2d(F.pad(flat, (pool // 2,) * 4, mode="replicate"), pool, 1)[:, 0].permute(1, 2, 0).reshape(t.shape)
        total, outer, n = box(total), box(outer), box(n[..., None])[..., 0]
    mean = total / n[..., None]
    cov = outer / n[..., None, None] - mean[..., :, None] * mean[..., None, :]
    gmean, gcov = glob
    cov = (1 - shrink) * cov + shrink * gcov
    cov += 1e-3 * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.linalg.inv(cov))
    return mean.float(), chol.float()


def place_map(signed: torch.Tensor, k: int, c: int, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    h, w = signed.shape
    ch, cw, d = h // c, w // c, k * k
    win = Whitening.windows(signed.float(), k).reshape(ch, c, cw, c, d).permute(0, 2, 1, 3, 4).reshape(ch, cw, c * c, d)
    z = ((win - mean[:, :, None]) @ chol).pow(2).sum(-1) * 0.5  # (ch, cw, c*c)
    return z.reshape(ch, cw, c, c).permute(0, 2, 1, 3).reshape(h, w)


def gain(fit: list[torch.Tensor], held: list[torch.Tensor], k: int, c: int, pool: int, shrink: float) -> float:
    """Mean log-likelihood gain (nats per window) of held-out good windows under their place's Gaussian over the
    global one, both fitted on `fit`: the rule that would choose per-place whitening."""
    gmean, gchol = (torch.from_numpy(v) for v in Whitening.fit(fit, k))
    gcov = torch.linalg.inv(gchol @ gchol.t())
    mean, chol = cell_stats(fit, k, c, pool, shrink, (gmean, gcov))
    logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (ch, cw)
    glogdet = float(torch.log(torch.diagonal(gchol)).sum())
    total = 0.0
    for s in held:
        d_place = place_map(s.float(), k, c, mean, chol)  # 0.5 d^2
        h, w = s.shape
        lp = logdet.repeat_interleave(c, 0).repeat_interleave(c, 1)[:h, :w] - d_place
        d_glob = 0.5 * ((Whitening.windows(s.float(), k).double() - gmean) @ gchol).pow(2).sum(1)
        total += float((lp - (glogdet - d_glob.reshape(h, w).float())).mean())
    return total / len(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=200)
    ap.add_argument("--defect", type=int, default=200)
    ap.add_argument("--cells", default="16,32,80")
    ap.add_argument("--pool", default="1,3", help="cells pooled with their pool x pool neighbours (odd)")
    ap.add_argument("--shrink", default="0,0.3", help="weights of the global covariance in each cell's")
    ap.add_argument("--cache", type=Path, help="keep the scored maps here and reuse them")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    scorer = Scorer(a.model, device="cpu", precision="fp32", warmup=False, fast=False)
    white = scorer.head.white if scorer.head is not None else None
    if white is None:
        raise SystemExit(f"{a.model} does not whiten its residual; train it with --whiten")
    k = white.window
    splits = subset.splits(a.data, a.calib, a.good, a.defect)
    if a.cache and a.cache.exists():
        data = torch.load(a.cache)["data"]  # tensors only: the safe default loader reads it
        grid = scorer.grid(*data["c"][0][0].shape)
    else:
        grid, data = collect(scorer, splits)
        if a.cache:
            torch.save({"data": data}, a.cache)
    half = len(splits["c"]) // 2
    row = subset.table(splits, a.data, "variant", missed=True)

    def image_scores(extra):
        """extra(signed) -> (H, W) map raised into the head's, or None for the head without whitening."""
        out = {}
        for key, (norm, signed, low) in data.items():
            s = []
            for n_, sg, lo in zip(norm, signed, low):
                img = n_.float()
                if extra is not None:
                    img = torch.maximum(img, extra(sg))
                sc = window_max(grid, img)
                if lo.numel():
                    sc = torch.maximum(sc, lo)
                s.append(float(sc.max()))
            out[key] = np.array(s)
        return out

    def weight_of(unweighted):
        fit = data["c"]
        m = np.median([float(n_.float().max()) for n_ in fit[0][:half]])
        u = np.median([float(unweighted(sg).max()) for sg in fit[1][:half]])
        return m / u

    row("no whitening", image_scores(None))
    row(f"global whitening from the card ({k}x{k}, weight {white.weight:.3g})", image_scores(lambda sg: white.map(sg.float())))
    fit_signed = [s.float() for s in data["c"][1][:half]]
    gmean, gchol = Whitening.fit(fit_signed, k)
    gm = torch.from_numpy(gmean)
    gprec = torch.from_numpy(gchol) @ torch.from_numpy(gchol).t()
    gcov = torch.linalg.inv(gprec)
    refit = Whitening(k, gmean.astype(np.float32), gchol.astype(np.float32), 1.0, half)
    wg = weight_of(refit.unweighted)
    row(f"global whitening refitted here (weight {wg:.3g})", image_scores(lambda sg: wg * refit.unweighted(sg.float())))
    for c in (int(v) for v in a.cells.split(",")):
        for pool in (int(v) for v in a.pool.split(",")):
            for shrink in (float(v) for v in a.shrink.split(",")):
                mean, chol = cell_stats(fit_signed, k, c, pool, shrink, (gm, gcov))
                wp = weight_of(lambda sg: place_map(sg.float(), k, c, mean, chol))
                g = gain(fit_signed[: half // 2], fit_signed[half // 2:], k, c, pool, shrink)
                name = (f"per place, cells {c} px{f', {pool}x{pool} pooled' if pool > 1 else ''}, shrink {shrink} "
                        f"(weight {wp:.3g}, gain {g:+.2f} nats/window)")
                row(name, image_scores(lambda sg: wp * place_map(sg.float(), k, c, mean, chol)))


if __name__ == "__main__":
    main()

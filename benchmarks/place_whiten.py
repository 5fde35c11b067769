"""Per-place residual whitening against the global one, offline on one trained model (no retraining).

The head's whitening (anomaly_map.Whitening) scores each k x k window of the folded signed residual by one
Gaussian of every good window, wherever it lies. On a fixtured part the residual's structure depends on the
place: on a thread its correlation follows the ring, whose direction turns around the hole, on a brushed
face it follows the brushing. Here the frame is cut into cells of c x c pixels and each cell gets its own
window Gaussian (Whitening.fit_places: pooled over its pool x pool neighbouring cells, which tolerates a part
that sits a few pixels off), fitted on the first half of the calibration images; the
map is put on the head's scale as train does (median image maxima) and the image score is the head's, with
the global whitening swapped for the per-place one.

    PYTHONPATH=.:benchmarks python benchmarks/place_whiten.py MODEL DATA [--calib 100 --good 200 --defect 200]
        [--cells 8,16] [--pool 1,3,5] [--cache maps.pt]

MODEL must whiten (a VAE/AE trained with the default `--whiten`, or an ensemble whose first member does).
DATA is an `edge-agent synth` folder; the second half of the calibration images sets the FRR-method threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=200)
    ap.add_argument("--defect", type=int, default=200)
    ap.add_argument("--cells", default="8,16")
    ap.add_argument("--pool", default="1,3,5", help="cells pooled with their pool x pool neighbours (odd)")
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
        data = torch.load(a.cache, weights_only=True)["data"]  # tensors only
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
    mean, chol = Whitening.fit(fit_signed, k)
    refit = Whitening(k, mean.astype(np.float32), chol.astype(np.float32), 1.0, half)
    wg = weight_of(refit.unweighted)
    row(f"global whitening refitted here (weight {wg:.3g})", image_scores(lambda sg: wg * refit.unweighted(sg.float())))
    h, w = fit_signed[0].shape
    for c in (int(v) for v in a.cells.split(",")):
        for pool in (int(v) for v in a.pool.split(",")):
            p_mean, p_chol = Whitening.fit_places(fit_signed, k, c, pool)
            place = dataclasses.replace(refit, cell=c, frame=(h, w), place_mean=p_mean.astype(np.float32),
                                        place_chol=p_chol.astype(np.float32))
            wp = weight_of(place.unweighted)
            g = Whitening.place_gain(fit_signed, k, c, pool)
            name = (f"per place, cells {c} px{f', {pool}x{pool} pooled' if pool > 1 else ''} "
                    f"(weight {wp:.3g}, gain {g:+.2f} nats/window)")
            row(name, image_scores(lambda sg: wp * place.unweighted(sg.float())))


if __name__ == "__main__":
    main()

"""What each lever of the anomaly-map score buys, on one trained model (no retraining): raw max patch score,
the fold-averaged pixel map at several blurs, with and without position statistics.

    python benchmarks/anomaly_map.py MODEL --calib DIR --good DIR --defect DIR [--sigmas 0,1,2,4] [--precision fp32]

The first half of --calib fits the position statistics (as `train` does on its hold-out), the second half
sets each variant's threshold by the FRR method at 1 % (calibrate.py). Reported on --good/--defect, never
used for either: image AUROC, the observed FRR and recall at that threshold, recall at the threshold that
rejects 1 % of the test good images, per-kind AUROC (kinds.csv in --defect). The pixel maps are computed
once per image; every variant is then computed from them with the product's own functions.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact, calibrate
from edge_agent.anomaly_map import MapHead, PositionStats, fold_mean, gaussian_blur, window_max
from edge_agent.evaluate_cmd import read_kinds
from edge_agent.evaluation import recall_at_frr, roc_auc
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer


def maps_of(scorer: Scorer, files: list[Path]) -> tuple[np.ndarray, list[torch.Tensor], object]:
    raw, maps, grid = [], [], None
    with torch.inference_mode():
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            pm = scorer.pixel_maps(patches)
            raw.append(float(pm.flatten(1).sum(1).max()))  # the raw patch score: m = the sum of its pixel map
            maps.append(fold_mean(grid, pm))
    return np.array(raw), maps, grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--good", type=Path, required=True)
    ap.add_argument("--defect", type=Path, required=True)
    ap.add_argument("--sigmas", default="0,1,2,4")
    ap.add_argument("--precision", default="fp32")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:  # a copy whose card asks for pixel maps (the fast path freezes them)
        copy = Path(tmp) / "m.pt"
        shutil.copy(a.model, copy)

        def head(card):
            if "anomaly_map" not in card:
                name = card["scores"]["default"] + "_map"
                card["scores"]["names"] = [*card["scores"]["names"], name]
                card["anomaly_map"] = {"name": name, "blur_sigma_px": 0.0, "position": None}
                card["thresholds"][name] = {"value": 0.0}
            return card

        artifact.update_card(copy, head)
        scorer = Scorer(copy, device="cpu", precision=a.precision, score_name=artifact.verify(copy)["anomaly_map"]["name"],
                        threshold=0.0, warmup=False)
        calib_files = list_images(a.calib)
        half = len(calib_files) // 2
        good_files, defect_files = list_images(a.good), list_images(a.defect)
        kinds = read_kinds(defect_files, None, a.defect)
        c_raw, c_maps, grid = maps_of(scorer, calib_files)
        g_raw, g_maps, _ = maps_of(scorer, good_files)
        d_raw, d_maps, _ = maps_of(scorer, defect_files)

    labels = np.r_[np.zeros(len(good_files)), np.ones(len(defect_files))]
    print(f"{len(calib_files)} calibration ({half} position, {len(calib_files) - half} threshold), "
          f"{len(good_files)} good, {len(defect_files)} defective test images; P={grid.size} S={grid.stride}")
    print(f"| variant | image AUROC | FRR / recall at the FRR-method threshold | recall at test FRR 1 % | by kind |")
    print("|---|---:|---:|---:|---|")

    def row(name: str, calib: np.ndarray, good: np.ndarray, bad: np.ndarray) -> None:
        t = calibrate.choose(calib[half:], None, "frr", 0.01, None, 0.95)["value"]
        at1 = recall_at_frr(labels, np.r_[good, bad], 0.01)["recall"]
        by_kind = ""
        if kinds is not None:
            ks = np.array(kinds)
            by_kind = ", ".join(f"{k} {roc_auc(np.r_[np.zeros(len(good)), np.ones((ks == k).sum())], np.r_[good, bad[ks == k]]):.3f}"
                                for k in sorted(set(kinds)))
        print(f"| {name} | {roc_auc(labels, np.r_[good, bad]):.4f} | {(good > t).mean():.3f} / {(bad > t).mean():.3f} "
              f"| {at1:.3f} | {by_kind} |", flush=True)

    row("raw max patch score", c_raw, g_raw, d_raw)
    for sigma in [float(s) for s in a.sigmas.split(",")]:
        plain = MapHead(sigma)
        smooth = {k: [gaussian_blur(m, sigma) for m in v] for k, v in (("c", c_maps), ("g", g_maps), ("d", d_maps))}
        score = lambda h, maps, cache: np.array([float(window_max(grid, h.normalized(m, cache)).max()) for m in maps])
        row(f"map, blur {sigma:g} px", *(score(plain, smooth[k], None) for k in "cgd"))
        placed = MapHead(sigma, PositionStats.fit(smooth["c"][:half]))
        cache: dict = {}
        row(f"map, blur {sigma:g} px, position statistics", *(score(placed, smooth[k], cache) for k in "cgd"))


if __name__ == "__main__":
    main()

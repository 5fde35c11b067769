"""What each lever of the anomaly-map score buys, on one trained model (no retraining): raw max patch score,
the fold-averaged pixel map at several blurs, with and without position statistics.

    python benchmarks/anomaly_map.py MODEL --calib DIR --good DIR --defect DIR [--sigmas 0,1,2,4] [--lines 5,9,15]
        [--precision fp32]

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


LINE_ANGLES = 12


def line_kernels(length: int, angles: int = LINE_ANGLES) -> torch.Tensor:
    """(angles, 1, L, L): anti-aliased 1-px lines through the centre, each summing to 1."""
    import cv2

    kernels = []
    for i in range(angles):
        t, big = np.pi * i / angles, length * 8
        canvas = np.zeros((big, big), np.float32)
        c, r = big / 2 - 0.5, big / 2 - 4
        p0 = (int(round((c - r * np.cos(t)) * 16)), int(round((c - r * np.sin(t)) * 16)))
        p1 = (int(round((c + r * np.cos(t)) * 16)), int(round((c + r * np.sin(t)) * 16)))
        cv2.line(canvas, p0, p1, 1.0, 8, cv2.LINE_AA, 4)
        k = cv2.resize(canvas, (length, length), interpolation=cv2.INTER_AREA)
        kernels.append(k / k.sum())
    return torch.from_numpy(np.stack(kernels))[:, None]


def line_max(image: torch.Tensor, length: int) -> torch.Tensor:
    """(H, W) -> (H, W): at each pixel the highest mean of the map along a short line through it, any angle
    (a matched filter for scratches and fibres, which a round blur dilutes)."""
    x = torch.nn.functional.pad(image[None, None], (length // 2,) * 4, mode="replicate")
    return torch.nn.functional.conv2d(x, line_kernels(length))[0].amax(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--good", type=Path, required=True)
    ap.add_argument("--defect", type=Path, required=True)
    ap.add_argument("--sigmas", default="0,1,2,4")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--lines", default="5,9,15", help="line lengths for the oriented-line variant ('' = none)")
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
        if sigma == 0:  # the spread floored at its median: position statistics only ever discount noisy places
            floored = MapHead(0.0, PositionStats.fit(smooth["c"][:half], floor_quantile=0.5))
            cache = {}
            row("map, no blur, position statistics, spread floored at its median",
                *(score(floored, smooth[k], cache) for k in "cgd"))
    for length in [int(x) for x in a.lines.split(",") if x]:  # oriented line means instead of a round blur
        lined = {k: [line_max(m, length) for m in v] for k, v in (("c", c_maps), ("g", g_maps), ("d", d_maps))}
        row(f"map, max of {LINE_ANGLES} oriented {length}-px line means", *(score(MapHead(0.0), lined[k], None) for k in "cgd"))


if __name__ == "__main__":
    main()

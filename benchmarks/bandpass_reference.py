"""How visible each defect kind is to a plain band-pass filter: a reference for a texture set's hard kinds.

For every difference-of-Gaussians scale (sigma, 3 sigma) the image score is the largest |response| away from
the border; the table gives each defect kind's image AUROC against the good test images per scale. It needs no
training. A kind no scale separates from the grain (AUROC near 0.5-0.7) is at the limit of what the pixels
hold, not of a model: a stain as faint as the grain's own blobs (docs/RESULTS.md, round 8).

    python benchmarks/bandpass_reference.py data/tex
"""

import argparse
from pathlib import Path

import cv2
import numpy as np

from edge_agent.evaluate_cmd import read_kinds
from edge_agent.evaluation import roc_auc
from edge_agent.images import list_images, read_image


def bandpass_score(img: np.ndarray, sigma: float, border: int) -> float:
    d = cv2.GaussianBlur(img, (0, 0), sigma) - cv2.GaussianBlur(img, (0, 0), 3 * sigma)
    return float(np.abs(d[border:-border, border:-border]).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a data set written by `edge-agent synth` (test/good, test/defect)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--border", type=int, default=12, help="pixels left out at the edge (the blur's reach)")
    a = ap.parse_args()
    load = lambda f: read_image(f).astype(np.float32) / 255  # noqa: E731  (the texture sets are grayscale)
    good = [load(f) for f in list_images(a.data / "test/good")]
    defect_files = list_images(a.data / "test/defect")
    kinds = read_kinds(defect_files, None, a.data / "test/defect")
    if kinds is None:
        raise SystemExit(f"{a.data / 'test/defect'} has no kinds.csv; write the set with `edge-agent synth`")
    print("| kind | images | " + " | ".join(f"DoG sigma {s:g}" for s in a.sigmas) + " |")
    print("|---|---:|" + "---:|" * len(a.sigmas))
    for kind in sorted(set(kinds)):
        imgs = [load(f) for f, k in zip(defect_files, kinds) if k == kind]
        row = []
        for s in a.sigmas:
            g = [bandpass_score(x, s, a.border) for x in good]
            d = [bandpass_score(x, s, a.border) for x in imgs]
            row.append(f"{roc_auc(np.r_[np.zeros(len(g)), np.ones(len(d))], np.r_[g, d]):.3f}")
        print(f"| {kind} | {len(imgs)} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

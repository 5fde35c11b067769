"""A reference for faint, large defects (stains, discolouration): one Gaussian of k x k windows of the image
itself at 1/f of its resolution, fitted on the training images, the image scored by its highest Mahalanobis
distance. Image AUROC on the test split, overall and per defect kind (kinds.csv).

    python benchmarks/coarse_gaussian.py DATA [--grid f:k:detrend,...]

DATA: a set as `edge-agent synth` or benchmarks/photo_set.py writes it. detrend: subtract a Gaussian blur of
that sigma (px) first (0: none). Round 15 (docs/RESULTS.md) measured it on the texture set and the photos.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.metrics import roc_auc_score

GRID = "8:2:0,8:2:16,8:2:24,8:1:16,4:2:16,4:3:16,6:2:16,4:4:16,8:3:24,2:6:16"


def load(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    files = sorted(folder.glob("*.png"))
    return [f.name for f in files], [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for f in files]


def windows(image: np.ndarray, f: int, k: int, detrend: float) -> np.ndarray:
    if detrend:
        image = image - cv2.GaussianBlur(image, (0, 0), detrend, borderType=cv2.BORDER_REFLECT)
    small = cv2.resize(image, (image.shape[1] // f, image.shape[0] // f), interpolation=cv2.INTER_AREA) if f > 1 else image
    return sliding_window_view(small, (k, k)).reshape(-1, k * k).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--grid", default=GRID, help="f:k:detrend triples, comma-separated")
    a = ap.parse_args()
    _, train = load(a.data / "train/good")
    _, good = load(a.data / "test/good")
    names, defect = load(a.data / "test/defect")
    kinds = {r["image"]: r["kind"] for r in csv.DictReader(open(a.data / "test/defect/kinds.csv"))}
    kind = np.array([kinds[n] for n in names])
    for triple in a.grid.split(","):
        f, k, detrend = (float(v) for v in triple.split(":"))
        f, k = int(f), int(k)
        x = np.concatenate([windows(i, f, k, detrend) for i in train])
        mean = x.mean(0)
        cov = np.cov(x.T).reshape(k * k, k * k)
        precision = np.linalg.inv(cov + 1e-6 * np.trace(cov) / (k * k) * np.eye(k * k))

        def score(images: list[np.ndarray]) -> np.ndarray:
            out = []
            for i in images:
                z = windows(i, f, k, detrend) - mean
                out.append(np.einsum("ij,jk,ik->i", z, precision, z).max())
            return np.array(out)

        g, d = score(good), score(defect)
        row = f"f {f} k {k} detrend {detrend:g}: all {roc_auc_score(np.r_[np.zeros(len(g)), np.ones(len(d))], np.r_[g, d]):.3f}"
        for name in sorted(set(kind)):
            m = kind == name
            row += f"  {name} {roc_auc_score(np.r_[np.zeros(len(g)), np.ones(m.sum())], np.r_[g, d[m]]):.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

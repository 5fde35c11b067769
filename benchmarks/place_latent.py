"""Position-aware scoring with the model's own encoder (PaDiM's idea without pretrained features), measured offline.

A patch model judges each patch on its own: a plain-plate patch where a hole should be, or a blank patch where a
lot code should be, looks like any plain patch, so a missing feature scores nothing. For a fixtured part each
grid cell always shows the same piece of the part, so the encoder's code of that cell's patch (`mu_z` of the
VAE) has a distribution of its own. This fits one Gaussian of `mu_z` per grid cell on the training images
(mean, covariance shrunk towards its average variance by `--shrink`) and scores each patch by its Mahalanobis
distance at its place (PaDiM, Defard et al. 2021, keeps a Gaussian of pretrained CNN features per position).

Printed rows: the model's own score (what its card scores), the place score alone, a single Gaussian of every
cell pooled (no place: what a texture has), and the maximum of the model's score and the place score, each
divided by the median of its image maxima over the first half of the calibration images (as `combine` scales
members). The FRR-method threshold comes from the second half.

The line before the table compares the two Gaussians on the calibration images (no defects needed): how many
nats more log-likelihood a good patch gets from its place's Gaussian than from the pooled one. Near 0 (or below:
the place Gaussians are fitted on fewer codes) the places do not differ, as on a texture, and the place score has
nothing to add; a fixtured part gives tens of nats.

    python benchmarks/place_latent.py MODEL --data DATA [--calib 100 --good 100 --defect 100]

MODEL is a VAE artifact (`fc` or `conv` latent); DATA an `edge-agent synth` folder or one of the benchmark sets
(bracket_set.py, photo_set.py) with train/good.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer

import subset  # benchmarks/subset.py: the splits and the table


def gaussians(z: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """z (images, cells, dims) -> per-cell mean (cells, dims) and precision (cells, dims, dims)."""
    mean = z.mean(0)
    dims = z.shape[2]
    precision = np.empty((z.shape[1], dims, dims))
    for c in range(z.shape[1]):
        cov = np.cov(z[:, c, :], rowvar=False)
        precision[c] = np.linalg.inv(cov + shrink * np.trace(cov) / dims * np.eye(dims))
    return mean, precision


def mahalanobis2(z: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """z (cells, dims) against per-cell (or, with 2-D precision, one pooled) Gaussians -> (cells,) squared."""
    d = z - mean
    if precision.ndim == 2:
        return np.einsum("ci,ij,cj->c", d, precision, d)
    return np.einsum("ci,cij,cj->c", d, precision, d)


def encoder_codes(module: torch.nn.Module, patches: torch.Tensor) -> np.ndarray:
    """(N, C, P, P) patches -> (N, dims) float64: the encoder's mu_z, flattened (a conv latent's cells too)."""
    return torch.cat([module.encode(patches[s : s + 256])[0].flatten(1)
                      for s in range(0, patches.shape[0], 256)]).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--fit", type=int, default=200, help="training images the Gaussians are fitted on")
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--good", type=int, default=100)
    ap.add_argument("--defect", type=int, default=100)
    ap.add_argument("--shrink", type=float, default=0.01)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    scorer = Scorer(a.model, device="cpu", precision="fp32", warmup=False, threshold=0.0)
    module = artifact.load(a.model)[0].eval()

    def latents(patches: torch.Tensor) -> np.ndarray:
        return encoder_codes(module, patches)

    def run(path: Path) -> tuple[float, np.ndarray]:
        grid, patches = scorer.patches(read_image(path))
        return float(scorer.score_frame(grid, patches).max()), latents(patches)

    train = np.stack([latents(scorer.patches(read_image(f))[1]) for f in list_images(a.data / "train/good")[:a.fit]])
    mean, precision = gaussians(train, a.shrink)
    pooled_mean, pooled_precision = gaussians(train.reshape(1, -1, train.shape[2]).transpose(1, 0, 2), a.shrink)
    pooled_mean, pooled_precision = pooled_mean[0], pooled_precision[0]

    splits = subset.splits(a.data, a.calib, a.good, a.defect)
    half = len(splits["c"]) // 2
    results = {k: [run(f) for f in files] for k, files in splits.items()}
    own = {k: np.array([s for s, _ in v]) for k, v in results.items()}
    place = {k: np.array([np.sqrt(mahalanobis2(z, mean, precision)).max() for _, z in v]) for k, v in results.items()}
    pooled = {k: np.array([np.sqrt(mahalanobis2(z, pooled_mean, pooled_precision)).max() for _, z in v])
              for k, v in results.items()}
    # log N(z; place) - log N(z; pooled) per good patch, in nats: what knowing the place tells about a patch
    logdet_place, logdet_pooled = np.linalg.slogdet(precision)[1], np.linalg.slogdet(pooled_precision)[1]
    gain = np.mean([np.mean(0.5 * (logdet_place - logdet_pooled) - 0.5 * (mahalanobis2(z, mean, precision)
                    - mahalanobis2(z, pooled_mean, pooled_precision))) for _, z in results["c"]])
    s_own, s_place = 1 / np.median(own["c"][:half]), 1 / np.median(place["c"][:half])
    print(f"{a.model.name}: a Gaussian of mu_z ({train.shape[2]} dims) at each of {train.shape[1]} places from "
          f"{train.shape[0]} training images, shrink {a.shrink}; on {len(splits['c'])} calibration images the place "
          f"Gaussians give a good patch {gain:.1f} nats more log-likelihood than one pooled Gaussian", file=sys.stderr)
    row = subset.table(splits, a.data, "score")
    row("the model's own", own)
    row("place: mu_z at its cell", place)
    row("no place: one pooled Gaussian", pooled)
    row("max of own and place, each / median good max", {k: np.maximum(s_own * own[k], s_place * place[k]) for k in own})


if __name__ == "__main__":
    main()

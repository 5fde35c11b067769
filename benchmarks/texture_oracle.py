"""How visible each texture defect kind is to an ideal detector that knows its shape and place.

For test seeds, draws the same texture with and without a defect (synth.make_texture draws the defect after
the surface from one generator, so the difference is the defect alone) and computes the matched-filter
signal-to-noise ratio d = sqrt(s' C^-1 s) of the defect's layer s in the worst-placed P x P window, C the
covariance of good P x P patches from the training images. d is the most any detector of P x P patches
can get; a detector that does not know the shape (a Mahalanobis distance over all P^2 directions) needs
d^2 of the order of sqrt(2 P^2) just to stand out of one patch's noise. Used in docs/RESULTS.md (round 9).

    python benchmarks/texture_oracle.py data/tex
"""

import argparse
from pathlib import Path

import numpy as np

from edge_agent import synth
from edge_agent.images import list_images, read_image


def windows(image: np.ndarray, p: int, s: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(image, (p, p))[::s, ::s].reshape(-1, p * p)


def gray(image: np.ndarray) -> np.ndarray:
    return (image if image.ndim == 2 else image[..., 0]).astype(np.float32) / 255


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a texture set from `edge-agent synth DIR --kind texture`")
    ap.add_argument("--patch-sizes", default="16,32")
    ap.add_argument("--seeds", type=int, default=40)
    a = ap.parse_args()
    train = [gray(read_image(f)) for f in list_images(a.data / "train/good")]
    print("| P | kind | matched-filter d: median | 10th pct | 90th pct |\n|---:|---|---:|---:|---:|")
    for p in (int(v) for v in a.patch_sizes.split(",")):
        good = np.concatenate([windows(t, p, 4) for t in train])
        precision = np.linalg.inv(np.cov(good, rowvar=False) + 1e-5 * np.eye(p * p))
        for kind in synth.TEXTURE_DEFECTS:
            d = []
            for seed in range(900_000, 900_000 + a.seeds):
                s = windows(gray(synth.make_texture(seed, kind).image) - gray(synth.make_texture(seed, None).image), p, 2)
                d.append(np.sqrt(np.einsum("nd,de,ne->n", s, precision, s).max()))
            print(f"| {p} | {kind} | {np.median(d):.1f} | {np.percentile(d, 10):.1f} | {np.percentile(d, 90):.1f} |")


if __name__ == "__main__":
    main()

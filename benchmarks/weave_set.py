"""A second texture for the generalisation check: a woven fabric (periodic, directional, not Gaussian).

Writes the same layout as `edge-agent synth` (train/good, calib/good, test/good, test/defect with masks and
kinds.csv) with the texture set's six defect drawers on a plain weave: 8-px threads that alternate over and
under, rotated by up to +-3 degrees and shifted per image, a lighting gradient and sensor noise. Used in
docs/RESULTS.md (round 8) to see whether the PCA+GMM family's lead on the grain carries over to a structured
texture.

    python benchmarks/weave_set.py data/weave
"""

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from edge_agent import synth


def weave(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(-3, 3) * math.pi / 180
    u = xx * math.cos(a) + yy * math.sin(a) + rng.uniform(0, 16)
    v = -xx * math.sin(a) + yy * math.cos(a) + rng.uniform(0, 16)
    period = 8.0
    warp = np.cos(2 * math.pi * v / period)  # threads running along u: bright ridges every 8 px in v
    weft = np.cos(2 * math.pi * u / period)
    over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0  # which thread is on top in this cell
    img = 0.5 + 0.08 * np.where(over, warp, weft)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)) / size
    return ((img + 0.08 * gradient) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, img.shape)).astype(np.float32)


def make_weave(seed: int, defect: str | None = None, size: int = synth.SIZE, width: int | None = None) -> synth.Part:
    """One weave image, the same contract as synth.make_texture (defect in TEXTURE_DEFECTS, "random" or None)."""
    rng = np.random.default_rng(seed)
    img = weave(rng, size)
    defect = synth._pick_defect(rng, defect, synth.TEXTURE_DEFECTS)
    return synth._as_part(img, synth._texture_defect(rng, img, defect) if defect else None, defect)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    synth.KINDS["weave"] = make_weave  # synth's own writer: same splits, seeds per split, masks and kinds.csv
    counts = synth.write_dataset(a.out, seed=a.seed, size=a.size, kind="weave")
    print(f"wrote {sum(counts.values())} images to {a.out}")


if __name__ == "__main__":
    main()

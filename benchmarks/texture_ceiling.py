"""The most any detector can reach on a texture set, kind by kind: an ideal detector that knows each defect's
exact shape but not its place.

The surface of `edge-agent synth --kind texture` is Gaussian grain (two blurred noise fields) with sparse
fibres, a lighting ramp and a gain; a defect is added to it. For an additive signal of known shape s in
stationary Gaussian noise of spectrum S, the best statistic at one place is the whitened matched filter
z = <s, C^-1 x> / sqrt(s' C^-1 s) (in the frequency domain conj(S_hat) X / S); with the place unknown, the
generalised likelihood ratio takes the image's largest |z|. This script regenerates every test defect of the
set with and without its defect (synth draws the defect after the surface from one generator), takes the
difference as the exact shape, and compares the defective image's largest |z| with that of every good test
image under the same filter. The fraction of good images below it is that defect's ceiling; the mean per
kind is the kind's ceiling AUROC. No detector that does not know the shape in advance can do better, up to
the fibres' and the ramp's departure from a Gaussian field.

    python benchmarks/texture_ceiling.py data/tex [--seed 0] [--stain-scale 1.0]

--seed: the seed the set was drawn with (`synth --seed`). Used in docs/RESULTS.md (round 16).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from edge_agent import synth
from edge_agent.anomaly_map import SURFACE_TILE as TILE, SurfaceFilters
from edge_agent.images import list_images, read_image


def gray(image: np.ndarray) -> np.ndarray:
    return (image if image.ndim == 2 else image[..., 0]).astype(np.float32) / 255


def spectrum(images: list[np.ndarray], tile: int = TILE) -> np.ndarray:
    """The good surface's power per pixel, as the product measures it (SurfaceFilters.measure_spectrum)."""
    return SurfaceFilters.measure_spectrum([torch.from_numpy(im) for im in images], tile).astype(np.float64)


class Filters:
    """Images reflect-padded by half a tile and transformed once; a shape's whitened matched filter applied to
    all of them by one product per image."""

    def __init__(self, images: list[np.ndarray], tile: int = TILE):
        self.h, self.w = images[0].shape
        self.p = tile // 2
        padded = [np.pad(im.astype(np.float64), self.p, mode="reflect") for im in images]
        self.shape = padded[0].shape
        self.hat = np.stack([np.fft.fft2(x) for x in padded])

    def responses(self, kernel: np.ndarray) -> np.ndarray:
        """kernel (tile, tile), centred -> (n, h, w) correlation with every image."""
        k = np.zeros(self.shape)
        t = kernel.shape[0]
        k[:t, :t] = kernel
        k = np.roll(k, (-(t // 2), -(t // 2)), axis=(0, 1))
        out = np.real(np.fft.ifft2(self.hat * np.fft.fft2(k)[None]))
        return out[:, self.p:self.p + self.h, self.p:self.p + self.w]


def matched_kernel(layer: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The defect's layer cropped around its centre of mass to a tile -> the spatial whitened matched filter."""
    tile = s.shape[0]
    weight = np.abs(layer)
    ys, xs = np.nonzero(weight > 0.05 * weight.max())
    cy, cx = int(np.round(np.average(ys, weights=weight[ys, xs]))), int(np.round(np.average(xs, weights=weight[ys, xs])))
    padded = np.pad(layer.astype(np.float64), tile)
    crop = padded[cy + tile - tile // 2:cy + tile + tile // 2, cx + tile - tile // 2:cx + tile + tile // 2]
    h = np.conj(np.fft.fft2(np.fft.ifftshift(crop))) / s
    h[0, 0] = 0  # the frame's mean level is lighting and gain, not a defect
    return np.fft.fftshift(np.real(np.fft.ifft2(h)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a texture set from `edge-agent synth DIR --kind texture`")
    ap.add_argument("--seed", type=int, default=0, help="the set's `synth --seed`")
    a = ap.parse_args()
    train = [gray(read_image(f)) for f in list_images(a.data / "train/good")]
    s = spectrum(train)
    calib = Filters([gray(read_image(f)) for f in list_images(a.data / "calib/good")])
    good = Filters([gray(read_image(f)) for f in list_images(a.data / "test/good")])
    rows = list(csv.DictReader(open(a.data / "test/defect/kinds.csv")))
    per_kind: dict[str, list[float]] = {}
    z_at: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        seed = a.seed * 1_000_003 + synth.SPLITS["test/defect"] + i
        rng = np.random.default_rng(seed)
        size = good.h
        clean = synth._texture(rng, size, good.w)
        kind = synth._pick_defect(rng, "random", synth.TEXTURE_DEFECTS)
        if kind != row["kind"]:
            raise SystemExit(f"{row['image']}: regenerated a {kind}, the set says {row['kind']}: give the set's --seed")
        drawn = clean.copy()
        synth._texture_defect(rng, drawn, kind)
        layer = drawn - clean
        kernel = matched_kernel(layer, s)
        spread = float(calib.responses(kernel).std())
        image = gray(read_image(a.data / "test/defect" / row["image"]))
        z = np.abs(Filters([image]).responses(kernel)[0]) / spread
        null = np.abs(good.responses(kernel)).reshape(len(good.hat), -1).max(1) / spread
        per_kind.setdefault(kind, []).append(float((null < z.max()).mean() + 0.5 * (null == z.max()).mean()))
        z_at.setdefault(kind, []).append(float(z.max()))
    print("| kind | defects | ceiling AUROC | largest z: median | 10th pct |\n|---|---:|---:|---:|---:|")
    for kind in sorted(per_kind):
        v, z = np.array(per_kind[kind]), np.array(z_at[kind])
        print(f"| {kind} | {len(v)} | {v.mean():.3f} | {np.median(z):.1f} | {np.percentile(z, 10):.1f} |")
    every = np.concatenate([np.array(v) for v in per_kind.values()])
    print(f"\nthe set's ceiling (mean over its {len(every)} defects): {every.mean():.4f}")


if __name__ == "__main__":
    main()

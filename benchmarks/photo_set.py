"""A photographed surface with defects drawn by a different tool than `edge-agent synth`'s: the generalisation check.

Cuts crops out of one photograph (`benchmarks/photos/`: brick, grass and gravel, CC0 photographs as shipped in
scikit-image's data folder, see benchmarks/photos/README.md), good crops from the upper part of the photo
for train/calib and from the lower part for test/good and test/defect, with a band between them so that no
test pixel was ever seen in training. Each crop gets a small gain change and sensor noise, like shots of the
same surface under the same lamp. The defects are not the synth drawers, so a model tuned to those is not
favoured:

- cutpaste: a rectangle of the same crop copied elsewhere, rotated by 90 degrees (CutPaste, Li et al. 2021)
- smear: a disc whose texture is blurred away (polish, smudge, wet spot)
- gouge: a 2-3 segment polyline, 1-2 px wide, brighter or darker
- dent: a dark ellipse with a lit rim
- discolour: a blob 15-30 % darker or brighter, multiplicative (oil, burn, dye)
- foreign: a blob of a foreign grain (smoothed noise of another scale and mean)

    python benchmarks/photo_set.py benchmarks/photos/gravel.png data/gravel
"""

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from edge_agent import synth

PHOTO_DEFECTS = ("cutpaste", "smear", "gouge", "dent", "discolour", "foreign")
TRAIN_SHARE = 0.6  # rows of the photo the good training crops come from; test crops come from below the gap
GAP = 8


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int, test: bool) -> np.ndarray:
    h, w = photo.shape
    split = int(h * TRAIN_SHARE)
    lo, hi = (split + GAP, h - size) if test else (0, split - size)
    if hi < lo or w < size:
        raise SystemExit(f"the photo ({w}x{h}) is too small for --size {size}; give a smaller --size")
    y, x = int(rng.integers(lo, hi + 1)), int(rng.integers(0, w - size + 1))
    img = photo[y:y + size, x:x + size].astype(np.float32) / 255
    return (img * rng.uniform(0.95, 1.05) + rng.normal(0, 0.008, img.shape)).astype(np.float32)


def _blob(rng: np.random.Generator, shape: tuple[int, int], x: float, y: float, r: tuple[float, float]) -> np.ndarray:
    """A soft-edged ellipse in [0, 1]."""
    m = np.zeros(shape, np.float32)
    cv2.ellipse(m, (int(x), int(y)), (max(2, int(r[0])), max(2, int(r[1]))), rng.uniform(0, 180), 0, 360, 1.0, -1)
    return cv2.GaussianBlur(m, (0, 0), 1.5)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str, at: tuple[float, float] | None = None) -> np.ndarray:
    """Change img in place with one defect of `kind` (centred at `at`, else anywhere); return its mask."""
    h, w = img.shape
    s = min(h, w) / 128
    x, y = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
    if at is not None:
        x, y = at
    before = img.copy()
    if kind == "cutpaste":
        bh, bw = (int(v) for v in rng.uniform(10, 24, 2) * s)
        sy, sx = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        piece = np.rot90(img[sy:sy + bh, sx:sx + bw], int(rng.integers(1, 4))).copy()
        ty, tx = int(min(max(0, y - piece.shape[0] / 2), h - piece.shape[0])), int(
            min(max(0, x - piece.shape[1] / 2), w - piece.shape[1]))
        img[ty:ty + piece.shape[0], tx:tx + piece.shape[1]] = piece
        mask = np.zeros(img.shape, np.uint8)
        mask[ty:ty + piece.shape[0], tx:tx + piece.shape[1]] = 255
        return mask
    if kind == "smear":
        soft = _blob(rng, img.shape, x, y, tuple(rng.uniform(6, 14, 2) * s))
        img[:] = img * (1 - soft) + cv2.GaussianBlur(img, (0, 0), rng.uniform(2.5, 4) * s) * soft
        return np.where(soft > 0.5, 255, 0).astype(np.uint8)
    if kind == "gouge":
        layer = np.zeros(img.shape, np.float32)
        pts, a = [(x, y)], rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(2, 4))):
            a += rng.normal(0, 0.4)
            step = rng.uniform(8, 18) * s
            pts.append((pts[-1][0] + step * math.cos(a), pts[-1][1] + step * math.sin(a)))
        cv2.polylines(layer, [np.array(pts, np.int32)], False, 1.0, int(rng.integers(1, 3)), cv2.LINE_AA)
        img += cv2.GaussianBlur(layer, (0, 0), 0.5) * rng.uniform(0.2, 0.35) * rng.choice([-1.0, 1.0])
    elif kind == "dent":
        r = tuple(rng.uniform(3, 7, 2) * s)
        inner = _blob(rng, img.shape, x, y, r)
        rim = np.clip(_blob(rng, img.shape, x - 1.5 * s, y - 1.5 * s, tuple(v + 2 * s for v in r)) - inner, 0, 1)
        img[:] = img * (1 - 0.45 * inner) + 0.2 * rim
    elif kind == "discolour":
        soft = _blob(rng, img.shape, x, y, tuple(rng.uniform(6, 16, 2) * s))
        img[:] = img * (1 + soft * rng.uniform(0.15, 0.3) * rng.choice([-1.0, 1.0]))
    else:  # foreign: a blob of another grain
        soft = _blob(rng, img.shape, x, y, tuple(rng.uniform(4, 10, 2) * s))
        grain = cv2.GaussianBlur(rng.normal(0, 1, img.shape).astype(np.float32), (0, 0), rng.uniform(0.6, 2.5))
        grain = rng.uniform(0.3, 0.7) + 0.12 * grain / (grain.std() + 1e-6)
        img[:] = img * (1 - soft) + grain * soft
    return np.where(np.abs(img - before) > 0.04, 255, 0).astype(np.uint8)


def make_photo_maker(photo: np.ndarray):
    """A synth.KINDS maker that cuts crops out of `photo`: test crops (any call with a defect, and test/good)
    from below the gap."""

    def make(seed: int, defect: str | None = None, size: int = synth.SIZE, width: int | None = None) -> synth.Part:
        rng = np.random.default_rng(seed)
        split = (seed % 1_000_003) // 100_000  # synth.SPLITS: train 0, calib 100k, test good 200k, defect 300k
        img = _crop(rng, photo, size, test=split >= 2)
        defect = synth._pick_defect(rng, defect, PHOTO_DEFECTS)
        return synth._as_part(img, _defect(rng, img, defect) if defect else None, defect)

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    photo = cv2.imread(str(a.photo), cv2.IMREAD_GRAYSCALE)
    if photo is None:
        raise SystemExit(f"cannot read {a.photo}; give a photograph (PNG or JPEG)")
    synth.KINDS["photo"] = make_photo_maker(photo)
    counts = synth.write_dataset(a.out, seed=a.seed, size=a.size, kind="photo")
    print(f"wrote {sum(counts.values())} images to {a.out}")


if __name__ == "__main__":
    main()

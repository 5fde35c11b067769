"""A second part geometry, drawn by a different tool than `edge-agent synth`'s: the generalisation check for parts.

`synth` draws one design (a machined part with a threaded hole) at any size. This draws another kind of part a
station might see: a stamped steel bracket lying on a belt, seen from above.

- a brushed plate (rounded rectangle, grain along its length) on a dark, faintly ribbed belt;
- two punched holes with a lit chamfer, and a slot;
- a stamped lot code of three characters that **changes from part to part** (a date or batch code: normal
  variation the model must accept, which the synthetic station does not have);
- placement jitter +-4 px and +-3 degrees, a lamp gradient of random direction, gain and sensor noise.

Defects: the six of benchmarks/photo_set.py placed on the plate (cutpaste, smear, gouge, dent, discolour,
foreign) and three structural ones no other set has:

- missing_hole: one hole not punched (the plate is whole where the hole should be);
- notch: a bite out of the plate's edge;
- no_code: the lot code not stamped (a logical defect: every patch of it looks like plain plate).

    python benchmarks/bracket_set.py data/bracket [--size 128] [--seed 5]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from edge_agent import synth

import photo_set  # benchmarks/photo_set.py: the defect drawers of another tool

BRACKET_DEFECTS = (*photo_set.PHOTO_DEFECTS, "missing_hole", "notch", "no_code")
CHARS = "0123456789ABCDEFHKLMNPRTUXY"


def _rotate(points: np.ndarray, centre: tuple[float, float], angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = points - centre
    return np.stack([centre[0] + c * d[:, 0] - s * d[:, 1], centre[1] + s * d[:, 0] + c * d[:, 1]], 1)


def _rounded_rect(shape: tuple[int, int], centre, half: tuple[float, float], r: float, angle: float) -> np.ndarray:
    """A filled, antialiased rounded rectangle in [0, 1], rotated by angle about its centre."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = math.cos(-angle), math.sin(-angle)
    dx, dy = xx - centre[0], yy - centre[1]
    u, v = np.abs(c * dx - s * dy), np.abs(s * dx + c * dy)
    qx, qy = np.maximum(u - (half[0] - r), 0), np.maximum(v - (half[1] - r), 0)
    inside_box = np.minimum(np.maximum(u - (half[0] - r), v - (half[1] - r)), 0)
    dist = np.hypot(qx, qy) + inside_box - r  # signed distance, negative inside
    return np.clip(0.5 - dist, 0, 1).astype(np.float32)


def _disc(shape: tuple[int, int], centre, r: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.clip(r + 0.5 - np.hypot(xx - centre[0], yy - centre[1]), 0, 1).astype(np.float32)


def _bracket(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image in [0, 1] (float32) and, for a structural defect, its mask."""
    h = w = size
    s = size / 128
    angle = math.radians(rng.uniform(-3, 3))
    centre = (w / 2 + rng.uniform(-4, 4) * s, h / 2 + rng.uniform(-4, 4) * s)
    # belt: dark, faint ribs across, fine noise
    yy = np.arange(h, dtype=np.float32)[:, None]
    belt = 0.13 + 0.015 * np.sin(2 * math.pi * (yy + rng.uniform(0, 6)) / (6 * s)) + np.zeros((h, w), np.float32)
    belt += cv2.GaussianBlur(rng.normal(0, 0.02, (h, w)).astype(np.float32), (0, 0), 0.8)
    # plate: brushed grain along its length (rotated with it)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), sigmaX=8 * s, sigmaY=0.6)
    grain = 0.035 * grain / (grain.std() + 1e-6)
    m = cv2.getRotationMatrix2D(centre, -math.degrees(angle), 1.0)
    grain = cv2.warpAffine(grain, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    plate = 0.62 + grain
    half = (44 * s, 26 * s)
    body = _rounded_rect((h, w), centre, half, 7 * s, angle)
    img = belt * (1 - body) + plate * body
    mask = None
    # holes with a lit chamfer, and a slot (all cut through to the belt)
    holes = _rotate(np.array([[centre[0] - 30 * s, centre[1] + 4 * s], [centre[0] + 30 * s, centre[1] + 4 * s]]),
                    centre, angle)
    missing = int(rng.integers(0, 2)) if defect == "missing_hole" else -1
    for k, (hx, hy) in enumerate(holes):
        r = 8.5 * s
        if k == missing:
            mask = np.where(_disc((h, w), (hx, hy), r + 2 * s) > 0.5, 255, 0).astype(np.uint8)
            continue
        rim = np.clip(_disc((h, w), (hx, hy), r + 1.6 * s) - _disc((h, w), (hx, hy), r), 0, 1)
        hole = _disc((h, w), (hx, hy), r)
        img = img * (1 - rim) + 0.85 * rim
        img = img * (1 - hole) + belt * hole
    slot_c = tuple(_rotate(np.array([[centre[0], centre[1] + 15 * s]]), centre, angle)[0])
    slot = _rounded_rect((h, w), slot_c, (12 * s, 3 * s), 3 * s, angle)
    img = img * (1 - slot) + belt * slot
    # the stamped lot code: three characters that differ from part to part
    if defect != "no_code":
        code = "".join(rng.choice(list(CHARS), 3))
        layer = np.zeros((h, w), np.uint8)
        scale = 0.42 * s
        (tw, th), _ = cv2.getTextSize(code, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, int(round(s))))
        org = (int(centre[0] - tw / 2), int(centre[1] - 10 * s + th / 2))
        cv2.putText(layer, code, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, int(round(s))), cv2.LINE_AA)
        layer = cv2.warpAffine(layer.astype(np.float32) / 255, m, (w, h))
        img = img * (1 - 0.35 * layer)
    else:
        box = _rounded_rect((h, w), tuple(_rotate(np.array([[centre[0], centre[1] - 10 * s]]), centre, angle)[0]),
                            (12 * s, 5 * s), 1, angle)
        mask = np.where(box > 0.5, 255, 0).astype(np.uint8)
    if defect == "notch":
        t = rng.uniform(-0.7, 0.7)
        side = rng.choice([-1.0, 1.0])
        edge = _rotate(np.array([[centre[0] + t * half[0], centre[1] + side * half[1]]]), centre, angle)[0]
        bite = _disc((h, w), tuple(edge), rng.uniform(3, 6) * s) * body
        img = img * (1 - bite) + belt * bite
        mask = np.where(bite > 0.3, 255, 0).astype(np.uint8)
    # lamp gradient, gain, sensor noise
    a = rng.uniform(0, 2 * math.pi)
    xx = np.arange(w, dtype=np.float32)[None, :]
    ramp = ((xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)) / size
    img = img * (1 + rng.uniform(0.04, 0.12) * ramp) * rng.uniform(0.95, 1.05)
    img = img + rng.normal(0, 0.008, img.shape)
    return img.astype(np.float32), mask


def _on_plate(rng: np.random.Generator, img: np.ndarray, kind: str) -> np.ndarray:
    """photo_set's drawer for `kind`, placed on the plate (not on the belt or in a hole)."""
    plate = img > 0.45
    plate = cv2.erode(plate.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    ys, xs = np.nonzero(plate)
    i = int(rng.integers(0, len(ys)))
    return photo_set._defect(rng, img, kind, at=(float(xs[i]), float(ys[i])))


def make_bracket(seed: int, defect: str | None = None, size: int = synth.SIZE, width: int | None = None) -> synth.Part:
    if width is not None and width != size:
        raise SystemExit("the bracket is drawn square: give only --size")
    rng = np.random.default_rng(seed)
    defect = synth._pick_defect(rng, defect, BRACKET_DEFECTS)
    img, mask = _bracket(rng, size, defect)
    if defect in photo_set.PHOTO_DEFECTS:
        mask = _on_plate(rng, img, defect)
    return synth._as_part(img, mask, defect)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--test-defect", type=int, default=180, help="defective test images (9 kinds)")
    a = ap.parse_args()
    synth.KINDS["bracket"] = make_bracket
    counts = synth.write_dataset(a.out, seed=a.seed, size=a.size, kind="bracket", n_test_defect=a.test_defect)
    print(f"wrote {sum(counts.values())} images to {a.out}")


if __name__ == "__main__":
    main()

"""The synthetic station: a machined part with a threaded hole, seen from above, like the seed's screw holes.

Patches differ in complexity (flat brushed surface, bright chamfer, thread spiral, dark hole bottom);
good parts vary in lighting, position and thread phase; defects are scratches, chips and debris with
ground-truth masks. Deterministic for a seed. Images are HW uint8 grayscale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SIZE = 128
DEFECT_KINDS = ("scratch", "chip", "debris")


@dataclass(frozen=True)
class Part:
    image: np.ndarray  # (SIZE, SIZE) uint8
    mask: np.ndarray  # (SIZE, SIZE) uint8, 255 where defective
    defect: str | None


def _good(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = size / 2 + rng.uniform(-2, 2)
    cy = size / 2 + rng.uniform(-2, 2)
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx)

    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)) / size
    gain = rng.uniform(0.85, 1.15)

    # Brushed metal: noise stretched along x, a new pattern on every part.
    # Blurred on a larger canvas and cropped: blurring at the image border would mirror the pattern
    # there, a texture no camera sees and that no model should learn as "normal at the edge".
    pad = 16
    noise = rng.normal(0, 1, (size + 2 * pad, size + 2 * pad)).astype(np.float32)
    brush = cv2.GaussianBlur(noise, (0, 0), sigmaX=4, sigmaY=0.6)[pad:-pad, pad:-pad]
    brush *= 0.04 / (brush.std() + 1e-6)
    img = 0.55 + brush + 0.08 * gradient

    s = size / 128
    r_bottom, r_thread, r_chamfer = 12 * s, 30 * s, 34 * s
    phase = rng.uniform(0, 2 * math.pi)
    pitch = 4.0 * s
    thread = 0.42 + 0.22 * np.sin(2 * math.pi * r / pitch + theta + phase) - 0.1 * (r_thread - r) / r_thread
    chamfer = 0.85 - 0.1 * (r - r_thread) / (r_chamfer - r_thread) + 0.05 * np.cos(theta - angle)
    bottom = 0.12 + 0.02 * np.cos(theta - angle)
    img = np.where(r < r_chamfer, chamfer, img)
    img = np.where(r < r_thread, thread, img)
    img = np.where(r < r_bottom, bottom, img)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7)
    img = img * gain + rng.normal(0, 0.01, img.shape)
    return img.astype(np.float32), (cx, cy)


def _defect(rng: np.random.Generator, img: np.ndarray, centre: tuple[float, float], kind: str) -> np.ndarray:
    """Draw a defect into img (in place); returns its mask."""
    size = img.shape[0]
    cx, cy = centre
    mask = np.zeros(img.shape, np.uint8)
    if kind == "scratch":
        length = rng.uniform(12, 36) * size / 128
        a = rng.uniform(0, math.pi)
        x0, y0 = rng.uniform(0.12, 0.88, 2) * size
        x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        layer = np.zeros(img.shape, np.float32)
        cv2.line(layer, (int(x0), int(y0)), (int(x1), int(y1)), 1.0, 1, cv2.LINE_AA)
        layer = cv2.GaussianBlur(layer, (0, 0), 0.5)
        # Light catches a scratch: at least 0.15 (x0.6 after the blur) above the brushed texture's 0.04 rms.
        contrast = rng.uniform(0.15, 0.3) * rng.choice([-1, 1])
        img += contrast * layer
        mask[layer > 0.1] = 255
    elif kind == "chip":
        # Missing material at the hole's rim: a dark notch across the chamfer.
        a = rng.uniform(0, 2 * math.pi)
        rr = 32 * size / 128
        px, py = cx + rr * math.cos(a), cy + rr * math.sin(a)
        n = rng.integers(5, 9)
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(2.5, 5.5, n) * size / 128
        pts = np.stack([px + radii * np.cos(angles), py + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255)
        img[mask > 0] = rng.uniform(0.2, 0.35) + rng.normal(0, 0.02, int((mask > 0).sum()))
    else:  # debris: a small particle anywhere on the part
        x, y = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(2.0, 3.5) * size / 128
        cv2.circle(mask, (int(x), int(y)), max(1, int(round(radius))), 255, -1, cv2.LINE_AA)
        level = rng.choice([0.05, 0.95])
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 0.6)
        img[:] = img * (1 - soft) + level * soft
        mask = np.where(soft > 0.2, 255, 0).astype(np.uint8)
    return mask


def make_part(seed: int, defect: str | None = None, size: int = SIZE) -> Part:
    """One part; defect in DEFECT_KINDS, "random", or None for a good part."""
    rng = np.random.default_rng(seed)
    img, centre = _good(rng, size)
    mask = np.zeros((size, size), np.uint8)
    if defect == "random":
        defect = str(rng.choice(DEFECT_KINDS))
    if defect is not None:
        if defect not in DEFECT_KINDS:
            raise ValueError(f"unknown defect {defect!r}; choose from {', '.join(DEFECT_KINDS)}")
        mask = _defect(rng, img, centre, defect)
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return Part(image, mask, defect)


# Each split draws from its own seed range so no image appears in two splits.
SPLITS = {"train/good": 0, "calib/good": 100_000, "test/good": 200_000, "test/defect": 300_000}


def write_dataset(out: Path, n_train: int = 200, n_calib: int = 100, n_test_good: int = 100,
                  n_test_defect: int = 100, seed: int = 0, size: int = SIZE) -> dict[str, int]:
    """out/{train/good, calib/good, test/good, test/defect, test/masks}/*.png; returns counts per split."""
    counts = {"train/good": n_train, "calib/good": n_calib, "test/good": n_test_good, "test/defect": n_test_defect}
    for split, n in counts.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            part_seed = seed * 1_000_003 + SPLITS[split] + i
            part = make_part(part_seed, "random" if split == "test/defect" else None, size)
            name = f"{i:04d}.png"
            cv2.imwrite(str(folder / name), part.image)
            if split == "test/defect":
                (out / "test/masks").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out / "test/masks" / name), part.mask)
    return counts


def write_video(path: Path, frames: int = 100, seed: int = 0, defect_every: int = 5, fps: float = 10.0,
                size: int = SIZE) -> list[bool]:
    """A station video (MJPG .avi, BGR): every defect_every-th part is defective. Returns which frames are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write video {path}; use a .avi name")
    defective = []
    try:
        for i in range(frames):
            bad = defect_every > 0 and i % defect_every == defect_every - 1
            part = make_part(seed * 1_000_003 + 400_000 + i, "random" if bad else None, size)
            writer.write(cv2.cvtColor(part.image, cv2.COLOR_GRAY2BGR))
            defective.append(bad)
    finally:
        writer.release()
    return defective

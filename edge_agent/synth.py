"""The synthetic stations: a machined part with a threaded hole, seen from above, like the seed's screw holes.

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


def _good(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, tuple[float, float]]:
    size = min(height, width)  # the part scales with the shorter side; a wider frame shows more surface
    s = size / 128
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Fixturing is good to a couple of pixels at 128 px, proportionally more on a larger frame.
    cx = width / 2 + rng.uniform(-2, 2) * s
    cy = height / 2 + rng.uniform(-2, 2) * s
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx)

    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * (xx - width / 2) + np.sin(angle) * (yy - height / 2)) / size
    gain = rng.uniform(0.85, 1.15)

    # Brushed metal: noise stretched along x, a new pattern on every part.
    # Blurred on a larger canvas and cropped: blurring at the image border would mirror the pattern
    # there, a texture no camera sees and that no model should learn as "normal at the edge".
    pad = 16
    noise = rng.normal(0, 1, (height + 2 * pad, width + 2 * pad)).astype(np.float32)
    brush = cv2.GaussianBlur(noise, (0, 0), sigmaX=4, sigmaY=0.6)[pad:-pad, pad:-pad]
    brush *= 0.04 / (brush.std() + 1e-6)
    img = 0.55 + brush + 0.08 * gradient

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
    height, width = img.shape
    size = min(height, width)
    cx, cy = centre
    mask = np.zeros(img.shape, np.uint8)
    if kind == "scratch":
        length = rng.uniform(12, 36) * size / 128
        a = rng.uniform(0, math.pi)
        x0, y0 = rng.uniform(0.12, 0.88, 2) * (width, height)
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
        x, y = rng.uniform(0.1, 0.9, 2) * (width, height)
        radius = rng.uniform(2.0, 3.5) * size / 128
        cv2.circle(mask, (int(x), int(y)), max(1, int(round(radius))), 255, -1, cv2.LINE_AA)
        level = rng.choice([0.05, 0.95])
        soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 0.6)
        img[:] = img * (1 - soft) + level * soft
        mask = np.where(soft > 0.2, 255, 0).astype(np.uint8)
    return mask


def _pick_defect(rng: np.random.Generator, defect: str | None, kinds: tuple[str, ...]) -> str | None:
    if defect == "random":
        defect = str(rng.choice(kinds))
    if defect is not None and defect not in kinds:
        raise ValueError(f"unknown defect {defect!r}; choose from {', '.join(kinds)}")
    return defect


def _as_part(img: np.ndarray, mask: np.ndarray | None, defect: str | None) -> Part:
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return Part(image, mask if mask is not None else np.zeros(image.shape, np.uint8), defect)


def make_part(seed: int, defect: str | None = None, size: int = SIZE, width: int | None = None) -> Part:
    """One part, size px high (and `width` wide, default square); defect in DEFECT_KINDS, "random", or None."""
    rng = np.random.default_rng(seed)
    img, centre = _good(rng, size, width or size)
    defect = _pick_defect(rng, defect, DEFECT_KINDS)
    return _as_part(img, _defect(rng, img, centre, defect) if defect else None, defect)


TEXTURE_DEFECTS = ("scratch", "crack", "stain", "hole", "fibre", "spots")


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A surface with no fixed geometry: granular cast/sandblasted grain at two scales, random fibres
    at any angle, a lighting gradient; stationary, so every patch position is like any other."""
    pad = 24
    shape = (height + 2 * pad, width + 2 * pad)
    fine = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 1.0)
    coarse = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 6.0)
    img = 0.5 + 0.05 * fine / (fine.std() + 1e-6) + 0.04 * coarse / (coarse.std() + 1e-6)
    fibres = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(20, 40) * height * width / 128**2 / 4)):
        x0, y0 = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        a, length = rng.uniform(0, math.pi), rng.uniform(6, 16)
        x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        cv2.line(fibres, (int(x0), int(y0)), (int(x1), int(y1)), float(rng.uniform(0.03, 0.07)), 1, cv2.LINE_AA)
    img = img + cv2.GaussianBlur(fibres, (0, 0), 0.6)
    img = img[pad:-pad, pad:-pad]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * (xx - width / 2) + np.sin(angle) * (yy - height / 2)) / max(height, width)
    img = (img + 0.1 * gradient) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.01, img.shape)
    return img.astype(np.float32)


def _texture_defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> np.ndarray:
    """Draw one defect of `kind` (TEXTURE_DEFECTS) into img in place, at a random place and size; its mask."""
    h, w = img.shape
    s = min(h, w) / 128
    x, y = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    layer = np.zeros(img.shape, np.float32)
    sign = rng.choice([-1.0, 1.0])
    if kind == "scratch":  # a straight thin line, any angle
        a, length = rng.uniform(0, math.pi), rng.uniform(10, 40) * s
        cv2.line(layer, (int(x), int(y)), (int(x + length * math.cos(a)), int(y + length * math.sin(a))), 1.0, 1,
                 cv2.LINE_AA)
        layer = cv2.GaussianBlur(layer, (0, 0), 0.5) * rng.uniform(0.2, 0.35) * sign
    elif kind == "crack":  # a dark, jagged random walk
        pts = [(x, y)]
        a = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(6, 14))):
            a += rng.normal(0, 0.5)
            step = rng.uniform(2, 4) * s
            pts.append((pts[-1][0] + step * math.cos(a), pts[-1][1] + step * math.sin(a)))
        cv2.polylines(layer, [np.array(pts, np.int32)], False, 1.0, max(1, int(round(s * 0.8))), cv2.LINE_AA)
        layer = -cv2.GaussianBlur(layer, (0, 0), 0.5) * rng.uniform(0.2, 0.35)
    elif kind == "stain":  # a soft, low-contrast blob (oil, discolouration)
        rx, ry = rng.uniform(4, 12, 2) * s
        cv2.ellipse(layer, (int(x), int(y)), (int(rx), int(ry)), rng.uniform(0, 180), 0, 360, 1.0, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), 2.0 * s) * rng.uniform(0.1, 0.18) * sign
    elif kind == "hole":  # a small pit: dark centre, bright rim
        r = rng.uniform(1.5, 4) * s
        cv2.circle(layer, (int(x), int(y)), max(1, int(round(r))), 1.0, -1, cv2.LINE_AA)
        layer = -cv2.GaussianBlur(layer, (0, 0), 0.5) * rng.uniform(0.3, 0.45)
    elif kind == "fibre":  # a foreign fibre: a long thin curved bright or dark thread
        t = np.linspace(0, 1, 20)
        a, length, bend = rng.uniform(0, 2 * math.pi), rng.uniform(25, 60) * s, rng.uniform(-0.8, 0.8)
        angles = a + bend * t
        xs = x + np.cumsum(np.cos(angles)) * length / 20
        ys = y + np.cumsum(np.sin(angles)) * length / 20
        cv2.polylines(layer, [np.stack([xs, ys], 1).astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
        layer = cv2.GaussianBlur(layer, (0, 0), 0.6) * rng.uniform(0.15, 0.3) * sign
    else:  # spots: a cluster of small specks
        for _ in range(int(rng.integers(3, 8))):
            px, py = x + rng.normal(0, 4 * s), y + rng.normal(0, 4 * s)
            cv2.circle(layer, (int(px), int(py)), max(1, int(round(rng.uniform(0.8, 1.8) * s))), 1.0, -1, cv2.LINE_AA)
        layer = cv2.GaussianBlur(layer, (0, 0), 0.5) * rng.uniform(0.2, 0.35) * sign
    img += layer
    return np.where(np.abs(layer) > 0.04, 255, 0).astype(np.uint8)


def make_texture(seed: int, defect: str | None = None, size: int = SIZE, width: int | None = None) -> Part:
    """One texture-surface image; defect in TEXTURE_DEFECTS, "random", or None."""
    rng = np.random.default_rng(seed)
    img = _texture(rng, size, width or size)
    defect = _pick_defect(rng, defect, TEXTURE_DEFECTS)
    return _as_part(img, _texture_defect(rng, img, defect) if defect else None, defect)


KINDS = {"part": make_part, "texture": make_texture}


# Each split draws from its own seed range so no image appears in two splits.
SPLITS = {"train/good": 0, "calib/good": 100_000, "test/good": 200_000, "test/defect": 300_000}


def write_dataset(out: Path, n_train: int = 200, n_calib: int = 100, n_test_good: int = 100,
                  n_test_defect: int = 100, seed: int = 0, size: int = SIZE, width: int | None = None,
                  kind: str = "part") -> dict[str, int]:
    """out/{train/good, calib/good, test/good, test/defect, test/masks}/*.png; returns counts per split.

    kind "part": the machined part with a threaded hole; "texture": a surface with no fixed geometry."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    make = KINDS[kind]
    kinds: list[str] = []
    counts = {"train/good": n_train, "calib/good": n_calib, "test/good": n_test_good, "test/defect": n_test_defect}
    for split, n in counts.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            part_seed = seed * 1_000_003 + SPLITS[split] + i
            part = make(part_seed, "random" if split == "test/defect" else None, size, width)
            name = f"{i:04d}.png"
            cv2.imwrite(str(folder / name), part.image)
            if split == "test/defect":
                (out / "test/masks").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(out / "test/masks" / name), part.mask)
                kinds.append(f"{name},{part.defect}")
    if kinds:  # evaluate reads it for per-kind numbers
        (out / "test/defect/kinds.csv").write_text("image,kind\n" + "\n".join(kinds) + "\n")
    return counts


def write_video(path: Path, frames: int = 100, seed: int = 0, defect_every: int = 5, fps: float = 10.0,
                size: int = SIZE, width: int | None = None, kind: str = "part") -> list[bool]:
    """A station video (MJPG .avi, BGR): every defect_every-th part is defective. Returns which frames are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make = KINDS[kind]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width or size, size))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write video {path}; use a .avi name")
    defective = []
    try:
        for i in range(frames):
            bad = defect_every > 0 and i % defect_every == defect_every - 1
            part = make(seed * 1_000_003 + 400_000 + i, "random" if bad else None, size, width)
            writer.write(cv2.cvtColor(part.image, cv2.COLOR_GRAY2BGR))
            defective.append(bad)
    finally:
        writer.release()
    return defective

"""Reading image files and folders for the offline commands (train, score, evaluate, calibrate)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"}


def list_images(paths: list[Path] | Path, what: str = "images") -> list[Path]:
    """Files as given plus the images inside folders (sorted); DataError if there are none."""
    if isinstance(paths, Path):
        paths = [paths]
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{what}: {p} does not exist; check the path")
    if not found:
        shown = ", ".join(str(p) for p in paths)
        raise DataError(f"{what}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {shown}")
    return found


def read_image(path: Path) -> np.ndarray:
    """HW (gray) or HWC (BGR) uint8; DataError naming the file if OpenCV cannot decode it."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"cannot read image {path}: not an image OpenCV can decode (or truncated); remove or replace it")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise DataError(f"image {path} has pixel type {image.dtype}; save it as 8-bit")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def file_hashes(files: list[Path]) -> list[str]:
    """Short content hashes (16 hex digits of sha256), kept in cards to catch test images used in training."""
    return [hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files]


def fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names and contents, in order: which data a model or threshold came from."""
    h = hashlib.sha256()
    for f, digest in zip(files, file_hashes(files)):
        h.update(f.name.encode() + b"\0" + digest.encode())
    return "sha256:" + h.hexdigest()


def fitted_hashes(card: dict) -> set[str]:
    """Hashes of the images a model's parameters were fitted on: its training images and those that gave the
    anomaly map's position statistics. Scores on them are optimistic: no calibration or test image."""
    used = set(card.get("training", {}).get("image_hashes", []))
    position = (card.get("anomaly_map") or {}).get("position") or {}
    return used | set(position.get("image_hashes", []))


def fitted_files(card: dict, files: list[Path], hashes: list[str] | None = None) -> list[Path]:
    """The files (by content) that a model's parameters were fitted on: see fitted_hashes."""
    used = fitted_hashes(card)
    return [f for f, h in zip(files, hashes if hashes is not None else file_hashes(files)) if h in used]

"""The frame-quality gate between capture and scoring: a frame that shows nothing is ERROR, never OK.

A uniform grey frame (a stream decoder's answer to a broken packet) scores far below any threshold
and would pass as a perfect part, so frames are checked before they are judged: blank, uniform,
under- or over-exposed, and frozen (the same image again and again from a stuck live decoder).
Pure checks on HWC/HW uint8 images plus one small stateful detector; the thresholds are [quality].
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.config import QualityConfig

REASONS = ("blank", "uniform", "underexposed", "overexposed", "frozen")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a frame cannot be judged: `reason` is one of REASONS (a metrics label), `detail` the numbers."""

    reason: str
    detail: str

    def message(self) -> str:
        return f"frame quality: {self.reason} ({self.detail})"


SAMPLE_PIXELS = 65536  # the statistics read about this many pixels, evenly spread, whatever the frame size


def _gray(image: np.ndarray) -> np.ndarray:
    """A grey, evenly subsampled view: exposure and spread need a sample, not every pixel of a 5 MP frame."""
    step = max(1, int((image.shape[0] * image.shape[1] / SAMPLE_PIXELS) ** 0.5))
    sample = np.ascontiguousarray(image[::step, ::step])
    if sample.ndim == 2:
        return sample
    if sample.shape[2] == 1:
        return sample[..., 0]
    return cv2.cvtColor(sample[..., :3], cv2.COLOR_BGR2GRAY)


def check(image: np.ndarray, cfg: QualityConfig) -> Problem | None:
    """None when the frame shows something worth judging; else the first problem found: blank, under- or
    overexposed, uniform (in that order)."""
    if image.size == 0:
        return Problem("blank", "the frame has no pixels")
    gray = _gray(image)
    lo, hi = int(gray.min()), int(gray.max())
    if lo == hi:
        return Problem("blank", f"every pixel is {lo}")
    n = gray.size
    dark = float(np.count_nonzero(gray <= cfg.dark_level)) / n
    if dark > cfg.max_dark_fraction:
        return Problem("underexposed", f"{dark:.1%} of pixels <= quality.dark_level {cfg.dark_level}, "
                                       f"over quality.max_dark_fraction {cfg.max_dark_fraction:g}")
    bright = float(np.count_nonzero(gray >= cfg.bright_level)) / n
    if bright > cfg.max_bright_fraction:
        return Problem("overexposed", f"{bright:.1%} of pixels >= quality.bright_level {cfg.bright_level}, "
                                      f"over quality.max_bright_fraction {cfg.max_bright_fraction:g}")
    # After exposure: a dark frame is also flat, and "underexposed" says what to fix.
    _mean, std = cv2.meanStdDev(gray)
    sd = float(std[0, 0])
    if sd < cfg.min_std:
        return Problem("uniform", f"pixel std {sd:.2f} < quality.min_std {cfg.min_std:g}")
    return None


class FrozenDetector:
    """Counts identical consecutive frames from a live source; frozen from the `frozen_frames`-th on.

    A real camera's sensor noise makes two frames differ in some pixel, so byte-identical images in a
    row mean a stuck decoder or a camera that repeats its last frame. Stored files and folders are
    never judged frozen (a replayed still scene repeats by design): give live=False for them.
    """

    def __init__(self, frozen_frames: int, live: bool) -> None:
        self.frozen_frames = frozen_frames if live else 0
        self._last: np.ndarray | None = None  # the previous frame (frames are never written to after capture)
        self.repeats = 0  # frames identical to the one before, in a row

    def observe(self, image: np.ndarray) -> Problem | None:
        if self.frozen_frames <= 0:
            return None
        same = (self._last is not None and self._last.shape == image.shape and self._last.dtype == image.dtype
                and np.array_equal(self._last, image))
        self.repeats = self.repeats + 1 if same else 0
        self._last = image
        if self.repeats + 1 >= self.frozen_frames:
            return Problem("frozen", f"{self.repeats + 1} identical frames in a row from a live source "
                                     f"(quality.frozen_frames {self.frozen_frames})")
        return None


class Gate:
    """check() and the frozen detector together, for one source; `enabled = false` lets every frame through."""

    def __init__(self, cfg: QualityConfig, live: bool) -> None:
        self.cfg = cfg
        self.frozen = FrozenDetector(cfg.frozen_frames, live)

    def __call__(self, image: np.ndarray) -> Problem | None:
        if not self.cfg.enabled:
            return None
        # The detector sees every frame, even one that fails a check, so its run of repeats stays exact.
        frozen = self.frozen.observe(image)
        return check(image, self.cfg) or frozen

"""Pure decision and rendering: any patch over the threshold makes the frame NG; heatmap overlays.

The threshold is strict (score > threshold is anomalous), as in anomalib's post-processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_agent.patches import PatchGrid


@dataclass(frozen=True, slots=True)
class Decision:
    anomalous: bool
    score: float  # the image score: the highest counted patch score (nan if no patch counts)
    worst_box: tuple[int, int, int, int] | None  # (x, y, w, h) of that patch
    patches_over: int
    patches_total: int
    error: str | None = None  # set when the scores cannot be trusted; such a frame is never OK

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        return "NG" if self.anomalous else "OK"


def decide(grid: PatchGrid, scores: np.ndarray, threshold: float, counted: np.ndarray | None = None) -> Decision:
    """Any counted patch with score > threshold makes the frame anomalous; NaN scores make it an ERROR."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (grid.count,):
        return Decision(True, float("nan"), None, 0, grid.count, f"scorer returned {scores.shape} for {grid.count} patches")
    if not np.all(np.isfinite(scores)):
        bad = int((~np.isfinite(scores)).sum())
        return Decision(True, float("nan"), None, 0, grid.count, f"scorer returned {bad} non-finite patch scores")
    live = scores if counted is None else np.where(counted, scores, -np.inf)
    if not np.any(np.isfinite(live)):
        return Decision(False, float("nan"), None, 0, grid.count)
    worst = int(np.argmax(live))
    image_score = float(live[worst])
    over = int((live > threshold).sum())
    return Decision(over > 0, image_score, grid.box(worst), over, grid.count)


def heat_colours(heat: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) scores -> BGR colour map with the threshold at mid-scale, the same scale on every frame."""
    scale = 2.0 * threshold if threshold > 0 else float(np.nanmax(heat)) or 1.0
    level = np.clip(np.nan_to_num(heat / scale) * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(level, cv2.COLORMAP_JET)


def overlay(image: np.ndarray, grid: PatchGrid, scores: np.ndarray, threshold: float,
            decision: Decision | None = None, alpha: float = 0.45) -> np.ndarray:
    """The image with the patch-score heatmap over it and the worst patch boxed when NG; BGR uint8."""
    base = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
    out = cv2.addWeighted(base, 1.0 - alpha, heat_colours(grid.heatmap(scores), threshold), alpha, 0.0)
    if decision is not None and decision.anomalous and decision.worst_box is not None:
        x, y, w, h = decision.worst_box
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), 1)
    return out

"""Pure decision, the verdict document and rendering: any patch over the threshold makes the frame NG.

The threshold is strict (score > threshold is anomalous), as in anomalib's post-processor. An
image score below the card's low bound (far under every good part at calibration) is ERROR: the
frame does not look like this station. The pipeline hands a frame and its scores in; the verdict
document (deploy/verdict.schema.json) comes out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from edge_agent.frames import Frame
from edge_agent.patches import PatchGrid

VERDICT_VERSION = 1
# A station with [[cameras]] publishes version 2: one answer per part (triggered) or per camera frame
# (free-run), each camera's result in `cameras` (deploy/verdict.v2.schema.json).
CAMERAS_VERDICT_VERSION = 2
CAMERA_FIELDS = ("seq", "captured_at", "result", "anomalous", "score", "threshold", "score_name", "worst_patch",
                 "patches_over_threshold", "patches_total", "error", "error_reason", "model", "latency_s", "frame_age_s")
# Why a frame is ERROR: the verdict's error_reason and the label of edge_agent_error_verdicts_total.
ERROR_REASONS = ("unreadable", "wrong_size", "blank", "uniform", "underexposed", "overexposed", "frozen",
                 "unlike_station", "scoring", "internal", "trigger_deadline", "no_frame")


@dataclass(frozen=True, slots=True)
class Decision:
    anomalous: bool
    score: float  # the image score: the highest counted patch score (nan if no patch counts)
    worst_box: tuple[int, int, int, int] | None  # (x, y, w, h) of that patch
    patches_over: int
    patches_total: int
    error: str | None = None  # set when the scores cannot be trusted; such a frame is never OK
    reason: str | None = None  # with error: one of ERROR_REASONS

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        return "NG" if self.anomalous else "OK"


def failed(error: str, reason: str, patches_total: int = 0) -> Decision:
    """The decision for a frame that could not be judged: ERROR with the reason (one of ERROR_REASONS)."""
    return Decision(True, float("nan"), None, 0, patches_total, error, reason)


def decide(grid: PatchGrid, scores: np.ndarray, threshold: float, counted: np.ndarray | None = None,
           low: float | None = None) -> Decision:
    """Any counted patch with score > threshold makes the frame anomalous; NaN scores make it an ERROR.

    `low` (the card's low bound, None for cards without one): an image score below it is ERROR,
    never a very good part: nothing a good part produced at calibration came near it.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (grid.count,):
        return failed(f"scorer returned {scores.shape} for {grid.count} patches", "scoring", grid.count)
    if not np.all(np.isfinite(scores)):
        bad = int((~np.isfinite(scores)).sum())
        return failed(f"scorer returned {bad} non-finite patch scores", "scoring", grid.count)
    live = scores if counted is None else np.where(counted, scores, -np.inf)
    if not np.any(np.isfinite(live)):
        return Decision(False, float("nan"), None, 0, grid.count)
    worst = int(np.argmax(live))
    image_score = float(live[worst])
    over = int((live > threshold).sum())
    if low is not None and image_score < low:
        return failed(f"image score {image_score:.6g} is below the low bound {low:.6g}: far under every good part "
                      "at calibration, so the frame does not look like this station (wrong view, lens, lighting or "
                      "part); check the camera", "unlike_station", grid.count)
    return Decision(over > 0, image_score, grid.box(worst), over, grid.count)


class ScorerInfo(Protocol):
    """What the verdict names about the model (scoring.Scorer has it)."""

    threshold: float
    score_name: str
    model_id: str
    checksum: str


def _box(box: tuple[int, int, int, int] | None) -> dict[str, int] | None:
    return None if box is None else dict(zip(("x", "y", "w", "h"), (int(v) for v in box)))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def document(frame: Frame, scorer: ScorerInfo, d: Decision, station: str, boot_id: str,
             stage_s: Mapping[str, float], heatmap: bool) -> dict[str, Any]:
    """The verdict message (deploy/verdict.schema.json) for one frame."""
    trig = frame.trigger
    error = d.error is not None
    return {
        "version": VERDICT_VERSION,
        "station": station,
        "seq": frame.seq,
        "message_id": f"{station}:{boot_id}:{frame.seq}",
        "captured_at": frame.captured_at,
        "part_id": trig.part_id if trig else None,
        "trigger_id": trig.trigger_id if trig else None,
        "recipe": trig.recipe if trig else None,
        "job_id": trig.job_id if trig else None,
        "result": d.result,
        "anomalous": d.anomalous,
        "score": None if error else _finite(d.score),
        "threshold": scorer.threshold,
        "score_name": scorer.score_name,
        "worst_patch": None if error else _box(d.worst_box),
        "patches_over_threshold": d.patches_over,
        "patches_total": d.patches_total,
        "error": d.error,
        "error_reason": (d.reason or "internal") if error else None,
        "model": {"id": scorer.model_id, "checksum": scorer.checksum},
        "latency_s": {k: round(v, 6) for k, v in stage_s.items()},
        "heatmap": heatmap,
        "frame_age_s": None if frame.frame_age_s is None else round(frame.frame_age_s, 6),
    }


def camera_result(camera: str, doc: Mapping[str, Any], heatmap_topic: str | None) -> dict[str, Any]:
    """One camera's entry in a version 2 verdict, from the version 1 document of its frame."""
    return {"camera": camera, **{k: doc.get(k) for k in CAMERA_FIELDS}, "heatmap": heatmap_topic is not None,
            "heatmap_topic": heatmap_topic}


def part_result(results: list[Mapping[str, Any]]) -> tuple[str, str | None, str | None]:
    """(result, error, error_reason) of a part from its cameras' results: NG when any camera is NG, ERROR when
    any could not judge and none is NG, else OK."""
    if any(r["result"] == "NG" for r in results):
        return "NG", None, None
    errors = [r for r in results if r["result"] != "OK"]  # never OK unless every camera said OK
    if errors or not results:
        why = "; ".join(f"camera {r['camera']}: {r['error']}" for r in errors) or "no camera judged this part"
        return "ERROR", why, (errors[0]["error_reason"] or "internal") if errors else "internal"
    return "OK", None, None


def cameras_document(station: str, boot_id: str, seq: int, results: list[dict[str, Any]], trigger: Any = None,
                     camera: str | None = None) -> dict[str, Any]:
    """A version 2 verdict: a part's (camera None: every camera the trigger needed) or one camera's frame."""
    result, error, reason = part_result(results)
    return {
        "version": CAMERAS_VERDICT_VERSION,
        "station": station,
        "camera": camera,
        "seq": seq,
        "message_id": f"{station}:{boot_id}:{seq}",
        "captured_at": min((r["captured_at"] for r in results), default=0.0),
        "part_id": trigger.part_id if trigger else None,
        "trigger_id": trigger.trigger_id if trigger else None,
        "recipe": trigger.recipe if trigger else None,
        "job_id": trigger.job_id if trigger else None,
        "result": result,
        "anomalous": result != "OK",
        "error": error,
        "error_reason": reason,
        "cameras": results,
        "heatmap": any(r["heatmap"] for r in results),
    }


def heat_scale(threshold: float, good_image_scores: Mapping[str, float] | None = None) -> tuple[float, float]:
    """(lo, hi) patch scores mapped to the ends of the colour map, with the threshold at mid-scale.

    From the model's own calibration scores: lo is as far below the threshold as twice the gap
    between the median good image score and the threshold, so good parts sit in the cool half for
    any score, negative ones (elbo, a, GMM nll) included. Cards without the statistics: [0, 2t]
    for a positive threshold, [2t, 0] for a negative one; never inverted.
    """
    p50 = (good_image_scores or {}).get("p50")
    if p50 is not None and math.isfinite(p50) and threshold > p50:
        spread = 2.0 * (threshold - p50)
    else:
        spread = abs(threshold) if threshold != 0 else 1.0
    return threshold - spread, threshold + spread


def heat_colours(heat: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """(H, W) scores -> BGR colour map, `scale` (lo, hi) from heat_scale: the same scale on every frame."""
    lo, hi = scale
    level = np.clip(np.nan_to_num((heat - lo) / (hi - lo)) * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(level, cv2.COLORMAP_JET)


def overlay(image: np.ndarray, grid: PatchGrid, scores: np.ndarray, threshold: float,
            decision: Decision | None = None, alpha: float = 0.45,
            good_image_scores: Mapping[str, float] | None = None) -> np.ndarray:
    """The image with the patch-score heatmap over it and the worst patch boxed when NG; BGR uint8."""
    base = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
    colours = heat_colours(grid.heatmap(scores), heat_scale(threshold, good_image_scores))
    out = cv2.addWeighted(base, 1.0 - alpha, colours, alpha, 0.0)
    if decision is not None and decision.anomalous and decision.worst_box is not None:
        x, y, w, h = decision.worst_box
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), 1)
    return out

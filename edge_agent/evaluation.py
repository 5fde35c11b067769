"""Offline scoring of image files and the accuracy numbers: image/pixel ROC-AUC, best F1, reports.

Used by `score`, `evaluate` and `calibrate`; plots need matplotlib (the `train` extra).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import DataError
from edge_agent.images import read_image
from edge_agent.patches import PatchGrid
from edge_agent.progress import Progress
from edge_agent.scoring import Scorer


@dataclass
class ImageResult:
    """All patch scores of one image, by score name; counted marks patches outside the ignore mask."""

    path: Path
    grid: PatchGrid
    scores: dict[str, np.ndarray]
    counted: np.ndarray | None = None

    def image_score(self, name: str) -> float:
        s = self.scores[name]
        if self.counted is not None:
            s = s[self.counted]
        return float(s.max()) if s.size else float("nan")


@dataclass
class ScoringRun:
    results: list[ImageResult] = field(default_factory=list)
    patches: int = 0
    model_seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.model_seconds if self.model_seconds > 0 else float("nan")


def score_files(scorer: Scorer, files: list[Path], names: list[str] | None = None, ignore_mask: np.ndarray | None = None,
                progress: bool = True, label: str = "scoring", run: ScoringRun | None = None) -> list[ImageResult]:
    """Score every patch of every file with the named scores (all of the model's when None)."""
    run = run if run is not None else ScoringRun()
    with Progress(len(files), label, enabled=progress) as bar:
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            t0 = time.perf_counter()
            if names is not None and len(names) == 1:
                scores = {names[0]: scorer.score_frame(grid, patches, names[0])}
            else:
                scores = scorer.score_frame_all(grid, patches)
                if names is not None:
                    scores = {n: scores[n] for n in names}
            run.model_seconds += time.perf_counter() - t0
            run.patches += grid.count
            run.results.append(ImageResult(f, grid, scores, grid.counted(ignore_mask)))
            bar.update(1)
    return run.results


def blank_frame_scores(scorer: Scorer, names: list[str]) -> dict[str, float]:
    """Each score's image score of a flat mid-grey frame of the model's frame size: the floor a frame that
    shows nothing reaches (calibrate.low_bound places the low bound between it and the good parts)."""
    card_input = scorer.card.get("input", {})
    h = int(card_input.get("frame_height") or 4 * scorer.patch_size)
    w = int(card_input.get("frame_width") or 4 * scorer.patch_size)
    shape = (h, w) if scorer.channels == 1 else (h, w, scorer.channels)
    grid, patches = scorer.patches(np.full(shape, 128, np.uint8))
    return {name: float(np.max(scorer.score_frame(grid, patches, name))) for name in names}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); labels 1 = defective."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    if len(counts) < len(scores):  # average the ranks of ties
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule score > threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(scores)[::-1]
    pos, neg = max(labels.sum(), 1), max((~labels).sum(), 1)
    order = np.argsort(-scores, kind="mergesort")
    s_sorted, l_sorted = scores[order], labels[order]
    # Count of items with score > t for each t: items strictly above it in descending order.
    above = np.searchsorted(-s_sorted, -thresholds, side="left")
    tp = np.concatenate([[0], np.cumsum(l_sorted)])[above]
    fp = above - tp
    fpr = np.concatenate([fp / neg, [1.0]])
    tpr = np.concatenate([tp / pos, [1.0]])
    return fpr, tpr, np.concatenate([thresholds, [-np.inf]])


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) > threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    n_good = int((~labels).sum())
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "false_reject_rate": fp / n_good if n_good else float("nan"),
            "miss_rate": fn / (tp + fn) if tp + fn else float("nan")}


def recall_at_frr(labels: np.ndarray, scores: np.ndarray, frr: float = 0.01) -> dict[str, float]:
    """The operating point of the lowest threshold that rejects at most `frr` of the good images (strict >):
    how many defects a line tuned to that false-reject rate on these images would catch."""
    labels = np.asarray(labels).astype(bool)
    good = np.sort(np.asarray(scores, dtype=np.float64)[~labels])[::-1]
    allowed = int(np.floor(frr * len(good) + 1e-9))  # good images that may lie over the threshold
    threshold = float(good[allowed]) if allowed < len(good) else float(good[-1]) - 1.0
    return {"target_frr": frr, **operating_point(labels, scores, threshold)}


def log_axis(values: np.ndarray) -> bool:
    """True when positive scores span more than two decades: a linear histogram would show one bar."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() / v.min() > 100)


def histogram_bins(values: np.ndarray, bins: int = 40) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if log_axis(v):
        return np.geomspace(v.min(), v.max(), bins + 1)
    return np.histogram_bin_edges(v, bins=bins)


def best_f1(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The threshold with the highest F1 (seeds/001), placed midway between neighbouring scores."""
    labels = np.asarray(labels).astype(bool)
    s = np.unique(np.asarray(scores, dtype=np.float64))
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2]) if len(s) > 1 else s - 1.0
    pos = labels.sum()
    order = np.sort(np.asarray(scores, dtype=np.float64))
    pos_sorted = np.sort(np.asarray(scores, dtype=np.float64)[labels])
    above_all = len(order) - np.searchsorted(order, candidates, side="right")
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, candidates, side="right")
    fp = above_all - tp
    fn = pos - tp
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return operating_point(labels, scores, float(candidates[int(np.argmax(f1))]))


def pixel_auroc(results: list[ImageResult], masks: list[np.ndarray | None], name: str,
                max_pixels: int = 4_000_000) -> float:
    """ROC-AUC over pixels: each pixel scored by the highest patch covering it; good images have empty masks."""
    total = sum(r.grid.frame_h * r.grid.frame_w for r in results)
    step = max(1, int(np.ceil(total / max_pixels)))  # subsample huge sets evenly, never at random
    labels, scores = [], []
    for r, m in zip(results, masks):
        heat = r.grid.heatmap(r.scores[name]).ravel()[::step]
        lab = np.zeros_like(heat, dtype=bool) if m is None else (m.reshape(-1)[::step] > 0)
        labels.append(lab)
        scores.append(heat)
    return roc_auc(np.concatenate(labels), np.concatenate(scores))


def read_masks(defect_files: list[Path], mask_dir: Path, shape_of: list[PatchGrid]) -> list[np.ndarray]:
    """The ground-truth mask of each defect image: same name (or <stem>_mask.*) in mask_dir."""
    masks = []
    for f, grid in zip(defect_files, shape_of):
        candidates = [mask_dir / f.name] + sorted(mask_dir.glob(f"{f.stem}_mask.*")) + sorted(mask_dir.glob(f"{f.stem}.*"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"no mask for defect image {f.name} in {mask_dir}; name it {f.name} or {f.stem}_mask.png")
        m = read_image(found)
        m = m.max(axis=2) if m.ndim == 3 else m
        if m.shape != (grid.frame_h, grid.frame_w):
            raise DataError(f"mask {found} is {m.shape[1]}x{m.shape[0]} but its image is {grid.frame_w}x{grid.frame_h}")
        masks.append(m)
    return masks


def write_plots(report_dir: Path, curves: dict[str, dict[str, Any]]) -> list[Path]:
    """roc.png (every curve in one plot, like the seed's Figure 3) and histograms.png (good vs defect)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("plots need matplotlib: pip install 'edge-agent[train]' (numbers are in report.json)") from None
    report_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6))
    for label, c in curves.items():
        fpr, tpr, _ = roc_curve(c["labels"], c["scores"])
        ax.plot(fpr, tpr, label=f"{label} (AUC {c['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (good parts rejected)", ylabel="true positive rate (defects caught)",
           title="Image ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    roc_path = report_dir / "roc.png"
    fig.savefig(roc_path, dpi=110, bbox_inches="tight")
    plt.close(fig)

    n = len(curves)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax, (label, c) in zip(axes.ravel(), curves.items()):
        s, lab = np.asarray(c["scores"]), np.asarray(c["labels"]).astype(bool)
        bins = histogram_bins(s)
        if log_axis(s):
            ax.set_xscale("log")
        ax.hist(s[~lab], bins=bins, alpha=0.6, label="good", color="tab:blue")
        ax.hist(s[lab], bins=bins, alpha=0.6, label="defect", color="tab:red")
        for key, style in (("threshold", "k--"), ("best_f1_threshold", "g:")):
            if c.get(key) is not None and np.isfinite(c[key]):
                ax.axvline(c[key], color=style[0], linestyle=style[1:], lw=1, label=key.replace("_", " "))
        ax.set(title=label, xlabel="image score (max patch score)" + (", log scale" if log_axis(s) else ""),
               ylabel="images")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    hist_path = report_dir / "histograms.png"
    fig.tight_layout()
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    return [roc_path, hist_path]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")

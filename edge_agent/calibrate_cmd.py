"""`edge-agent calibrate`: score calibration images, choose a threshold (calibrate.py) and write it into the card.

The ignore mask goes into the card too, so score, evaluate and the daemon read it from the model alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

import edge_agent
from edge_agent import artifact, calibrate
from edge_agent.errors import ConfigError, DataError
from edge_agent.evaluation import (blank_frame_scores, histogram_bins, log_axis, pixel_auroc, read_masks, roc_auc,
                                   roc_curve, score_files, write_json)
from edge_agent.images import file_hashes, fingerprint, fitted_files, list_images, read_image
from edge_agent.scoring import Scorer


def mask_record(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Read an ignore-mask image (black = ignore) -> (card record with the PNG as base64, (H, W) uint8 0/255)."""
    if not path.is_file():
        raise DataError(f"--ignore-mask {path} does not exist; give a PNG whose black pixels mark ignored areas")
    image = read_image(path)
    gray = image.max(axis=2) if image.ndim == 3 else image
    mask = np.where(gray > 0, 255, 0).astype(np.uint8)
    ok, png = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise DataError(f"cannot encode ignore mask {path} as PNG")
    data = png.tobytes()
    record = {"png_base64": base64.b64encode(data).decode("ascii"), "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
              "width": int(mask.shape[1]), "height": int(mask.shape[0]), "source": path.name,
              "ignored_fraction": round(float((mask == 0).mean()), 6)}
    return record, mask


def _check_mask_leaves_patches(scorer: Scorer, mask: np.ndarray, path: Path | None) -> None:
    h, w = scorer.card["input"].get("frame_height"), scorer.card["input"].get("frame_width")
    if not h or not w:
        return
    counted = scorer.grid(int(h), int(w)).counted(mask)
    if counted is not None and not counted.any():
        where = path or "the card's ignore mask"
        raise ConfigError(f"ignore mask {where} hides every patch of a {w}x{h} frame (no patch centre is on a "
                          "white pixel); paint the inspected area white")


def _quantiles(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    q = np.quantile(values, [0.5, 0.9, 0.99])
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std()), "p50": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "max": float(values.max()), "min": float(values.min())}


def resolve_method(method: str | None, target_frr: float | None, target_recall: float | None) -> str:
    if method is None:
        method = "target-recall" if target_recall is not None and target_frr is None else "frr"
    if method not in calibrate.METHODS:
        raise ConfigError(f"--method {method!r} is not a method; choose one of: {', '.join(calibrate.METHODS)}")
    if target_frr is not None and method not in ("frr", "max-train"):
        raise ConfigError(f"--target-frr applies to --method frr, not {method}; drop one of them")
    if target_recall is not None and method != "target-recall":
        raise ConfigError(f"--target-recall applies to --method target-recall, not {method}; drop one of them")
    return method


def _changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    old = old or {}
    lines = []
    for key in new:
        if key in ("image_hashes", "good_image_scores", "defect_image_scores", "description"):
            continue
        if old.get(key) != new[key]:
            lines.append(f"  {key}: {json.dumps(old.get(key), default=float)} -> {json.dumps(new[key], default=float)}")
    return lines


def run_calibration(model: Path, good: Path, defect: Path | None = None, masks: Path | None = None,
                    score_name: str | None = None, method: str | None = None, target_frr: float | None = None,
                    target_recall: float | None = None, confidence: float = 0.95, ignore_mask: Path | None = None,
                    strict: bool = False, dry_run: bool = False, report: Path | None = None, device: str = "auto",
                    progress: bool = True, warn: Callable[[str], None] = print, precision: str = "fp32") -> str:
    """Calibrate model in place (unless dry_run) and return the summary to print."""
    method = resolve_method(method, target_frr, target_recall)
    rate = 0.01 if target_frr is None else target_frr
    calibrate.check_rate("--target-frr", rate)
    calibrate.check_rate("--target-recall", target_recall, upto_one=True)
    calibrate.check_rate("--confidence", confidence)
    if masks is not None and defect is None:
        raise ConfigError("--masks needs --defect (they are the defects' ground-truth masks)")
    good_files = list_images(good, what="--good")
    defect_files = list_images(defect, what="--defect") if defect is not None else []
    if method in calibrate.NEEDS_DEFECTS and not defect_files:
        raise ConfigError(f"--method {method} needs defective images; pass --defect DIR or use --method frr")

    scorer = Scorer(model, device=device, score_name=score_name, threshold=math.inf, precision=precision)
    card = scorer.card
    name = scorer.score_name
    record = None
    mask = scorer.ignore_mask
    if ignore_mask is not None:
        record, mask = mask_record(ignore_mask)
    if mask is not None:
        _check_mask_leaves_patches(scorer, mask, ignore_mask)

    n_min = calibrate.min_good_images(rate, confidence)
    if method == "frr" and len(good_files) < n_min:
        msg = (f"{len(good_files)} good images are fewer than the {n_min} needed to show a false-reject rate <= "
               f"{rate:g} with {confidence:g} confidence even at threshold = max")
        if strict:
            raise ConfigError(f"{msg}; add good images or lower the confidence (--strict refuses)")
        warn(f"{msg}; using the maximum score and reporting the bound it achieves")

    files = good_files + defect_files
    hashes = file_hashes(files)
    overlap = fitted_files(card, files, hashes)
    if overlap:
        msg = (f"{len(overlap)} calibration images (e.g. {overlap[0]}) were used to train {model}; their scores are "
               "optimistic and the threshold will reject more good parts than stated")
        if strict:
            raise ConfigError(f"{msg}; calibrate on images held out from training (--strict refuses)")
        warn(msg)

    results = score_files(scorer, files, [name], ignore_mask=mask, progress=progress, label=f"calibrate {model.name}")
    scores = np.array([r.image_score(name) for r in results], dtype=np.float64)
    good_scores, defect_scores = scores[: len(good_files)], scores[len(good_files):]
    blank = blank_frame_scores(scorer, [name])[name]
    entry = calibrate.choose(good_scores, defect_scores, method, rate, target_recall, confidence, blank)
    if entry["k"]:  # the good images at and just under the threshold: the parts an engineer should look at
        top = np.argsort(-good_scores, kind="stable")[: min(entry["k"] + 2, 5)]
        entry["highest_good"] = [{"image": _shown(good_files[i], good), "score": float(good_scores[i])} for i in top]
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry.update({
        "good_dir": str(good), "defect_dir": str(defect) if defect is not None else None,
        "data_fingerprint": fingerprint(files), "image_hashes": hashes,
        "ignore_mask_sha256": (record or card.get("ignore_mask") or {}).get("sha256"),
        "chosen_at": now, "tool_version": edge_agent.__version__,
        "good_image_scores": _quantiles(good_scores), "defect_image_scores": _quantiles(defect_scores),
        "scored_with": scorer.scored_with(),  # the station warns when it scores in another precision
    })
    if defect_files:
        labels = np.r_[np.zeros(len(good_files)), np.ones(len(defect_files))]
        entry["image_auroc"] = roc_auc(labels, scores)
        if masks is not None:
            gt = [None] * len(good_files) + read_masks(defect_files, masks, [r.grid for r in results[len(good_files):]])
            entry["pixel_auroc"] = pixel_auroc(results, gt, name)

    old = card.get("thresholds", {}).get(name)
    if report is not None:
        write_report(report, model, name, entry, old, good_scores, defect_scores, files)
    lines = [_headline(model, name, entry, old, dry_run), *_numbers(entry)]
    if dry_run:
        lines += ["would change:", *_changes(old, entry)]
        if record is not None:
            lines.append(f"  ignore_mask: {(card.get('ignore_mask') or {}).get('sha256')} -> {record['sha256']}")
        lines.append("dry run: nothing written")
    else:
        try:
            artifact.update_card(model, lambda c: calibrate.apply(c, name, entry, record, now))
        except OSError as e:
            raise DataError(f"cannot write {model} ({e}); the model file is unchanged: free space or fix "
                            "permissions and calibrate again") from None
        lines.append(f"wrote {model} (previous threshold kept in calibration_history)")
    if report is not None:
        lines.append(f"report: {report / 'calibration.json'}, {report / 'histograms.png'}"
                     + (f", {report / 'roc.png'}" if defect_files else ""))
    return "\n".join(lines)


def _shown(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return path.name


def _headline(model: Path, name: str, entry: dict[str, Any], old: dict[str, Any] | None, dry_run: bool) -> str:
    was = f"{old['value']:.6g} ({old.get('method')})" if old else "none"
    rank = f", k={entry['k']} of {entry['n_good']} good images" if entry["k"] else ""
    verb = "would set" if dry_run else "set"
    return f"{model.name} score {name}: {verb} threshold {entry['value']:.6g} (method {entry['method']}{rank}); was {was}"


def _numbers(e: dict[str, Any]) -> list[str]:
    pct = e["confidence"] * 100
    lines = [f"  good: {e['good_over_threshold']}/{e['n_good']} over the threshold (observed FRR {e['observed_frr']:.4f}); "
             f"true FRR <= {e['frr_upper_bound']:.4f} with {pct:g} % confidence"]
    if e["target_frr"] is not None:
        enough = "enough" if e["enough_good_images"] else "NOT enough"
        lines.append(f"  target FRR {e['target_frr']:g} at {pct:g} %: needs >= {e['n_min_for_target']} good images "
                     f"({enough}); confidence achieved for FRR <= {e['target_frr']:g}: "
                     f"{e['confidence_for_target_frr']:.3f}")
    if e.get("highest_good"):
        shown = ", ".join(f"{h['image']} {h['score']:.6g}" + (" (sets it)" if i == e["k"] - 1 else "")
                          for i, h in enumerate(e["highest_good"]))
        line = (f"  highest good images: {shown}; look at those at or over the threshold: a rare good part the "
                "model finds unusual, or a defect among the good parts")
        if e.get("n_for_next_rank"):
            line += (f"; with >= {e['n_for_next_rank']} good images the method leaves {e['k']} of them over the "
                     "threshold")
        lines.append(line)
    if e.get("low"):
        lines.append(f"  low bound {e['low']['value']:.6g} ({e['low']['method']}: lowest good {e['low']['min']:.6g}, "
                     f"blank frame {e['low']['blank_score']:.6g}): a lower image score is ERROR, not a good part"
                     if e["low"]["blank_score"] is not None else
                     f"  low bound {e['low']['value']:.6g} ({e['low']['method']}: lowest good {e['low']['min']:.6g}): "
                     "a lower image score is ERROR, not a good part")
    if e["n_defect"]:
        lines.append(f"  defects: recall {e['recall']:.4f}, miss rate {e['miss_rate']:.4f}, precision "
                     f"{e['precision']:.4f}, F1 {e['f1']:.4f} on {e['n_defect']} images; image AUROC {e['image_auroc']:.4f}")
    return lines


def write_report(report: Path, model: Path, name: str, entry: dict[str, Any], old: dict[str, Any] | None,
                 good_scores: np.ndarray, defect_scores: np.ndarray, files: list[Path]) -> None:
    """calibration.json, histograms.png (threshold line) and roc.png (with defects)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("the report needs matplotlib: pip install 'edge-agent[train]'") from None
    report.mkdir(parents=True, exist_ok=True)
    body = {"model": str(model), "score": name, "threshold": {k: v for k, v in entry.items() if k != "image_hashes"},
            "previous": {k: v for k, v in (old or {}).items() if k != "image_hashes"} or None,
            "images": [{"image": str(f), "label": "good" if i < len(good_scores) else "defect", "score": float(s)}
                       for i, (f, s) in enumerate(zip(files, np.r_[good_scores, defect_scores]))]}
    write_json(report / "calibration.json", body)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    every = np.r_[good_scores, defect_scores]
    bins = histogram_bins(np.r_[every, entry["value"]])
    if log_axis(np.r_[every, entry["value"]]):
        ax.set_xscale("log")
    ax.hist(good_scores, bins=bins, alpha=0.6, color="tab:blue", label=f"good ({good_scores.size})")
    if defect_scores.size:
        ax.hist(defect_scores, bins=bins, alpha=0.6, color="tab:red", label=f"defect ({defect_scores.size})")
    ax.axvline(entry["value"], color="k", linestyle="--", lw=1.2, label=f"threshold ({entry['method']})")
    if old is not None and np.isfinite(old.get("value", np.nan)):
        ax.axvline(old["value"], color="gray", linestyle=":", lw=1, label=f"previous ({old.get('method')})")
    ax.set(title=f"{model.name} {name}: FRR <= {entry['frr_upper_bound']:.3g} at {entry['confidence']:g}",
           xlabel="image score (max counted patch score)", ylabel="images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "histograms.png", dpi=110)
    plt.close(fig)

    if defect_scores.size:
        labels = np.r_[np.zeros(good_scores.size), np.ones(defect_scores.size)]
        fpr, tpr, _ = roc_curve(labels, every)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, label=f"AUC {entry['image_auroc']:.3f}")
        ax.plot([entry["observed_frr"]], [entry["recall"]], "ko", label="chosen threshold")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false-reject rate (good parts rejected)", ylabel="recall (defects caught)",
               title=f"Image ROC, {name}", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        fig.savefig(report / "roc.png", dpi=110, bbox_inches="tight")
        plt.close(fig)

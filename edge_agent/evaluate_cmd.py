"""`edge-agent evaluate`: score good and defective test images with one or more models and compare scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import DataError
from edge_agent.evaluation import (ScoringRun, best_f1, operating_point, pixel_auroc, read_masks, recall_at_frr, roc_auc,
                                   score_files, write_json, write_plots)
from edge_agent.images import file_hashes, fitted_hashes, list_images
from edge_agent.scoring import Scorer


def check_not_trained_on(card: dict[str, Any], files: list[Path], model: Path) -> None:
    """Honest evaluation: refuse test images that the model was trained or calibrated on."""
    used = fitted_hashes(card)
    for entry in card.get("thresholds", {}).values():
        used |= set(entry.get("image_hashes", []))
    overlap = [f for f, h in zip(files, file_hashes(files)) if h in used]
    if overlap:
        raise DataError(f"{len(overlap)} test images (e.g. {overlap[0]}) were used to train or calibrate {model}; "
                        "evaluate on images the model has never seen (or pass --allow-overlap)")


def read_kinds(defect_files: list[Path], kinds: Path | None, defect_dir: Path) -> list[str] | None:
    """Each defect image's kind: from a CSV of `image,kind` lines (--kinds, or kinds.csv in the defect folder,
    as `edge-agent synth` writes it); None when there is none."""
    path = kinds if kinds is not None else defect_dir / "kinds.csv"
    if not path.is_file():
        if kinds is not None:
            raise DataError(f"--kinds {kinds} does not exist; give a CSV of image,kind lines")
        return None
    table: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lower().startswith("image,"):
            continue
        name, _, kind = line.partition(",")
        if not kind.strip():
            raise DataError(f"{path} line {n}: {line!r} is not `image,kind`; fix the line")
        table[name.strip()] = kind.strip()
    missing = [f.name for f in defect_files if f.name not in table]
    if missing:
        raise DataError(f"{path} names no kind for {len(missing)} defect images (e.g. {missing[0]}); add them")
    return [table[f.name] for f in defect_files]


def run_evaluation(models: list[Path], good: Path, defect: Path, masks: Path | None, score_names: list[str] | None,
                   report: Path | None, device: str, allow_overlap: bool, progress: bool,
                   kinds: Path | None = None, station: Any = None) -> str:
    """`station` (pipeline.Model from a station config): evaluate that model as the station runs it, with its
    score, threshold, precision and ignore mask, instead of `models`."""
    good_files = list_images(good, what="--good")
    defect_files = list_images(defect, what="--defect")
    defect_kinds = read_kinds(defect_files, kinds, defect)
    files = good_files + defect_files
    labels = np.array([0] * len(good_files) + [1] * len(defect_files))
    out: dict[str, Any] = {"good_images": len(good_files), "defect_images": len(defect_files),
                           "good_dir": str(good), "defect_dir": str(defect), "models": []}
    curves: dict[str, dict[str, Any]] = {}
    rows = []
    if station is not None:
        models = [station.scorer.path]
        scorers = [station.scorer]
        score_names = score_names or [station.scorer.score_name]
    else:
        scorers = [Scorer(model, device=device, warmup=True) for model in models]
    # With several models, --score picks among all of their scores: each model gives the ones it has.
    known = {n for s in scorers for n in s.card["scores"]["names"]}
    for n in score_names or []:
        if n not in known:
            raise DataError(f"--score {n!r} is not a score of {', '.join(map(str, models))}; "
                            f"choose from: {', '.join(sorted(known))}")
    for model, scorer in zip(models, scorers):
        card = scorer.card
        if not allow_overlap:
            check_not_trained_on(card, files, model)
        names = [n for n in score_names or card["scores"]["names"] if n in card["scores"]["names"]]
        if not names:
            raise DataError(f"none of --score {', '.join(score_names or [])} is a score of {model}; "
                            f"it has: {', '.join(card['scores']['names'])}")
        run = ScoringRun()
        mask = station.ignore_mask if station is not None else scorer.ignore_mask
        results = score_files(scorer, files, names, ignore_mask=mask, progress=progress,
                              label=f"evaluate {model.name}", run=run)
        mask_list = None
        if masks is not None:
            mask_list = [None] * len(good_files) + read_masks(defect_files, masks, [r.grid for r in results[len(good_files):]])
        entry: dict[str, Any] = {"model": str(model), "model_id": scorer.model_id, "family": card.get("family"),
                                 "checksum": scorer.checksum, "patches_per_s": run.patches_per_s,
                                 "device": str(scorer.device), "scores": {}}
        for name in names:
            image_scores = np.array([r.image_score(name) for r in results])
            th = card.get("thresholds", {}).get(name, {}).get("value", float("nan"))
            if station is not None and name == scorer.score_name:
                th = scorer.threshold  # the station's threshold, a config override included
            result = {
                "image_auroc": roc_auc(labels, image_scores),
                "pixel_auroc": pixel_auroc(results, mask_list, name) if mask_list is not None else None,
                "best_f1": best_f1(labels, image_scores),
                "at_frr_1pct": recall_at_frr(labels, image_scores, 0.01),
                "at_card_threshold": operating_point(labels, image_scores, th),
                "good_scores": {"min": float(image_scores[labels == 0].min()), "max": float(image_scores[labels == 0].max())},
                "defect_scores": {"min": float(image_scores[labels == 1].min()), "max": float(image_scores[labels == 1].max())},
            }
            if defect_kinds is not None:
                good_s, bad_s = image_scores[labels == 0], image_scores[labels == 1]
                t1 = result["at_frr_1pct"]["threshold"]
                result["by_kind"] = {
                    k: {"images": int(sum(1 for x in defect_kinds if x == k)),
                        "image_auroc": roc_auc(np.r_[np.zeros(len(good_s)), np.ones(sel.sum())], np.r_[good_s, bad_s[sel]]),
                        "recall_at_frr_1pct": float((bad_s[sel] > t1).mean())}
                    for k in sorted(set(defect_kinds)) for sel in [np.array([x == k for x in defect_kinds])]}
            entry["scores"][name] = result
            label = name if len(models) == 1 else f"{scorer.model_id}:{name}"
            curves[label] = {"labels": labels, "scores": image_scores, "auroc": result["image_auroc"], "threshold": th,
                             "best_f1_threshold": result["best_f1"]["threshold"]}
            pix = result["pixel_auroc"]
            rows.append(f"{label:24s} {result['image_auroc']:11.4f} {('%.4f' % pix) if pix is not None else '-':>11s} "
                        f"{result['best_f1']['f1']:8.4f} {result['at_frr_1pct']['recall']:13.4f} "
                        f"{run.patches_per_s:11.0f}")
            if "by_kind" in result:
                rows.append(" " * 26 + "by kind (AUROC / recall at FRR 1 %): " + ", ".join(
                    f"{k} {v['image_auroc']:.3f} / {v['recall_at_frr_1pct']:.2f}" for k, v in result["by_kind"].items()))
        # Every image's score, so a missed defect or a false reject can be looked up (and re-thresholded).
        entry["images"] = [{"image": str(r.path), "label": "defect" if lab else "good",
                            **({"kind": defect_kinds[i - len(good_files)]} if lab and defect_kinds else {}),
                            "scores": {n: r.image_score(n) for n in names}}
                           for i, (r, lab) in enumerate(zip(results, labels))]
        out["models"].append(entry)
    if report is not None:
        out["plots"] = [str(p) for p in write_plots(report, curves)]
        write_json(report / "report.json", out)
    header = (f"{'score':24s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'best F1':>8s} {'recall@FRR1%':>13s} "
              f"{'patches/s':>11s}")
    lines = [f"{len(good_files)} good, {len(defect_files)} defective images", header, *rows]
    if report is not None:
        lines.append(f"report: {report / 'report.json'}, {report / 'roc.png'}, {report / 'histograms.png'}")
    return "\n".join(lines)

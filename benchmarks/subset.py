"""What benchmarks/signed_fold.py and benchmarks/map_ensemble.py share: the first N images of an `edge-agent synth`
folder's calibration, good and defective test splits, and one markdown row per variant (image AUROC, recall at
test FRR 1 %, FRR / recall at the FRR-method threshold set on the second half of the calibration images, AUROC
per defect kind)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edge_agent import calibrate
from edge_agent.evaluate_cmd import read_kinds
from edge_agent.evaluation import recall_at_frr, roc_auc
from edge_agent.images import list_images


def splits(data: Path, calib: int, good: int, defect: int) -> dict[str, list[Path]]:
    return {"c": list_images(data / "calib/good")[:calib], "g": list_images(data / "test/good")[:good],
            "d": list_images(data / "test/defect")[:defect]}


def table(files: dict[str, list[Path]], data: Path, first_column: str, threshold_from: int | None = None,
          missed: bool = False) -> Callable[[str, dict[str, np.ndarray]], None]:
    """Print the table's header; return row(name, {"c": .., "g": .., "d": ..} image scores) that prints a row.

    The threshold comes from the calibration scores from index `threshold_from` on (default: the second half);
    `missed` adds a column of the defects per kind at or under it.
    """
    start = len(files["c"]) // 2 if threshold_from is None else threshold_from
    kinds = np.array(read_kinds(files["d"], None, data / "test/defect"))
    names = sorted(set(kinds))
    labels = np.r_[np.zeros(len(files["g"])), np.ones(len(files["d"]))]
    extra = f" missed at the threshold: {' / '.join(names)} |" if missed else ""
    print(f"| {first_column} | image AUROC | recall at test FRR 1 % | FRR / recall at the FRR-method threshold |{extra} by kind |")
    print("|---|---:|---:|---:|" + ("---|" if missed else "") + "---|")

    def row(name: str, s: dict[str, np.ndarray]) -> None:
        c, g, d = (np.asarray(s[k]) for k in "cgd")
        t = calibrate.choose(c[start:], None, "frr", 0.01, None, 0.95)["value"]
        by_kind = ", ".join(f"{k} {roc_auc(np.r_[np.zeros(len(g)), np.ones((kinds == k).sum())], np.r_[g, d[kinds == k]]):.3f}"
                            for k in names)
        lost = " " + " / ".join(str(int(((d <= t) & (kinds == k)).sum())) for k in names) + " |" if missed else ""
        print(f"| {name} | {roc_auc(labels, np.r_[g, d]):.4f} | {recall_at_frr(labels, np.r_[g, d], 0.01)['recall']:.3f} "
              f"| {(g > t).mean():.3f} / {(d > t).mean():.3f} |{lost} {by_kind} |", flush=True)

    return row

"""Threshold math for `edge-agent calibrate` and the change it makes to a model card; pure: numbers in, numbers out.

Good parts only (method `frr`, the default). The any-patch rule decides per image, so every
calibration image contributes one number, its image score s = the highest counted patch score.
Sort the n good image scores from the top, s_(1) >= s_(2) >= ... >= s_(n), and take the
threshold t = s_(k). A new good image is falsely rejected when its score is > t; call that
probability p (the true false-reject rate, FRR). For independent images from a continuous score
distribution, the number of calibration scores above the threshold is Binomial(n, p), and the
exceedance probability of the k-th largest of n scores is Beta(k, n - k + 1), so

    P(p > R) = P(Binomial(n, R) <= k - 1).

We pick the largest k (the lowest, most sensitive threshold) with P(Binomial(n, R) <= k - 1) <= 1 - c:
then the true FRR is <= R with confidence c. Equivalently, the one-sided Clopper-Pearson upper bound
on p from k - 1 observed exceedances in n images, the p_U solving P(Binomial(n, p_U) <= k - 1) = 1 - c,
is <= R. Ties and discrete scores only make it more conservative (strict `>`).

Even k = 1 (t = the maximum) needs (1 - R)^n <= 1 - c, i.e. at least
n_min = ceil(log(1 - c) / log(1 - R)) good images: 299 for R = 1 % at c = 95 %, 459 at 99 %.
With fewer, the tool falls back to the maximum and reports what that achieves: the bound p_U at
confidence c, and the confidence 1 - (1 - R)^n that the FRR is <= R.

With defective images too: `f1` (highest F1, seeds/001), `youden` (highest TPR - FPR) or
`target-recall` (highest threshold catching at least that share of defects); candidates lie midway
between neighbouring image scores. `max-train` is the seeds' reference rule: the maximum good score.
Every method reports the Clopper-Pearson bound on the FRR that its threshold achieves on the good set.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError
from edge_agent.evaluation import best_f1, operating_point

METHODS = ("frr", "f1", "youden", "target-recall", "max-train")
NEEDS_DEFECTS = ("f1", "youden", "target-recall")
DESCRIPTIONS = {
    "frr": "k-th highest good image score, k the largest rank whose binomial (Clopper-Pearson) upper bound "
           "on the false-reject rate at the confidence is <= the target",
    "f1": "threshold with the highest F1 over good and defective images (seeds/001)",
    "youden": "threshold with the highest Youden's J = recall - false-reject rate",
    "target-recall": "highest threshold that still flags at least the target share of defective images",
    "max-train": "highest good image score (the seeds' reference rule, seeds/003)",
}


def binom_cdf(x: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= x), summed exactly in log space (no overflow for large n)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(x + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def frr_upper_bound(exceedances: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate from `exceedances` events in n trials, by bisection."""
    if n <= 0:
        return 1.0
    if exceedances >= n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):  # the cdf falls as p rises; 200 halvings reach float resolution
        mid = (lo + hi) / 2
        if binom_cdf(exceedances, n, mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return hi


def min_good_images(target_frr: float, confidence: float) -> int:
    """The fewest good images for which even threshold = max shows FRR <= target at this confidence."""
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-target_frr)))
    while n > 1 and (1 - target_frr) ** (n - 1) <= 1 - confidence:  # guard the float division both ways
        n -= 1
    while (1 - target_frr) ** n > 1 - confidence:
        n += 1
    return n


def frr_rank(n: int, target_frr: float, confidence: float) -> int:
    """The largest k with P(Binomial(n, R) <= k - 1) <= 1 - c; 0 when even k = 1 fails (n < n_min)."""
    if n <= 0:
        return 0
    lp, lq = math.log(target_frr), math.log1p(-target_frr)
    cdf, k = 0.0, 0
    for i in range(n):  # the cdf grows with k: walk up until it passes 1 - c
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
        if cdf > 1.0 - confidence:
            break
        k = i + 1
    return k


def images_for_rank(k: int, target_frr: float, confidence: float, start: int = 1) -> int:
    """The fewest good images (from start) for which the FRR method may take the k-th highest score."""
    n = max(1, start)
    while frr_rank(n, target_frr, confidence) < k:
        n += 1
    return n


def confidence_for(exceedances: int, n: int, target_frr: float) -> float:
    """The confidence with which `exceedances` of n good images over the threshold show FRR <= target."""
    return 1.0 - binom_cdf(exceedances, n, target_frr)


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Ascending: below every score, then midway between neighbouring distinct scores (like best_f1)."""
    s = np.unique(scores)
    return np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2])


def _rates(good: np.ndarray, defect: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, frr) at each threshold for the rule score > t."""
    g, d = np.sort(good), np.sort(defect)
    recall = (len(d) - np.searchsorted(d, t, side="right")) / len(d)
    frr = (len(g) - np.searchsorted(g, t, side="right")) / len(g)
    return recall, frr


def youden_threshold(good: np.ndarray, defect: np.ndarray) -> float:
    """Highest J = recall - FRR; among ties the lowest threshold (catch more), like best_f1."""
    t = _candidates(np.concatenate([good, defect]))
    recall, frr = _rates(good, defect, t)
    return float(t[int(np.argmax(recall - frr))])


def target_recall_threshold(good: np.ndarray, defect: np.ndarray, target_recall: float) -> float:
    """The highest candidate threshold whose recall on the defects is >= target_recall (fewest false rejects)."""
    t = _candidates(np.concatenate([good, defect]))
    recall, _ = _rates(good, defect, t)
    ok = np.flatnonzero(recall >= target_recall - 1e-12)
    return float(t[ok[-1]])


def check_rate(name: str, value: float | None, upto_one: bool = False) -> None:
    """ConfigError unless 0 < value < 1 (or <= 1 with upto_one, for a recall of 100 %)."""
    if value is not None and not (0.0 < value < 1.0 or (upto_one and value == 1.0)):
        top = "1 (inclusive)" if upto_one else "1"
        raise ConfigError(f"{name} {value} must be a rate between 0 and {top} (e.g. 0.01 for 1 %)")


def choose(good_scores, defect_scores=None, method: str = "frr", target_frr: float = 0.01,
           target_recall: float | None = None, confidence: float = 0.95,
           blank_score: float | None = None) -> dict[str, Any]:
    """Pick the threshold and describe it: the card's threshold entry, without provenance fields.

    good_scores, defect_scores: per-image scores (the max counted patch score of each image).
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of: {', '.join(METHODS)}")
    check_rate("--target-frr", target_frr)
    check_rate("--confidence", confidence)
    good = np.asarray(good_scores, dtype=np.float64)
    defect = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    if good.size == 0:
        raise ConfigError("calibration needs at least one good image")
    if not np.all(np.isfinite(good)) or not np.all(np.isfinite(defect)):
        raise ConfigError("some image scores are not finite (NaN/inf); the model or the ignore mask is broken "
                          "(a mask that hides every patch leaves an image without a score)")
    if method in NEEDS_DEFECTS and defect.size == 0:
        raise ConfigError(f"method {method} needs defective images; pass --defect DIR or use --method frr")
    if method == "target-recall":
        if target_recall is None:
            raise ConfigError("method target-recall needs --target-recall R (e.g. 0.95)")
        check_rate("--target-recall", target_recall, upto_one=True)

    n = int(good.size)
    n_min = min_good_images(target_frr, confidence)
    ranked = np.sort(good)[::-1]
    k = None
    if method == "frr":
        k = frr_rank(n, target_frr, confidence) or 1  # too few images: fall back to the maximum
        value = float(ranked[k - 1])
    elif method == "max-train":
        k = 1
        value = float(ranked[0])
    elif method == "f1":
        value = float(best_f1(np.r_[np.zeros(n), np.ones(defect.size)], np.r_[good, defect])["threshold"])
    elif method == "youden":
        value = youden_threshold(good, defect)
    else:
        value = target_recall_threshold(good, defect, target_recall)

    exceedances = int((good > value).sum())
    entry: dict[str, Any] = {
        "value": value,
        "low": low_bound(good, blank_score),
        "method": method,
        "description": DESCRIPTIONS[method],
        "target_frr": target_frr if method in ("frr", "max-train") else None,
        "target_recall": target_recall if method == "target-recall" else None,
        "confidence": confidence,
        "n_good": n,
        "n_defect": int(defect.size),
        "images": n + int(defect.size),
        "k": k,
        "good_over_threshold": exceedances,
        "observed_frr": exceedances / n,
        "frr_upper_bound": frr_upper_bound(exceedances, n, confidence),
    }
    if method in ("frr", "max-train"):
        entry.update({"n_min_for_target": n_min, "enough_good_images": n >= n_min,
                      "confidence_for_target_frr": confidence_for(exceedances, n, target_frr)})
    if method == "frr":  # how many good images would let the method leave one more of them above the threshold
        entry["n_for_next_rank"] = images_for_rank(k + 1, target_frr, confidence, start=n + 1)
    if defect.size:
        point = operating_point(np.r_[np.zeros(n), np.ones(defect.size)], np.r_[good, defect], value)
        entry.update({key: point[key] for key in ("precision", "recall", "f1", "miss_rate")})
    return entry


LOW_MARGIN = 3.0
LOW_DESCRIPTIONS = {
    "blank-third": "a third of the way from a blank frame's image score (flat mid-grey) up to the lowest good image "
                   "score, at most the lowest good score minus one spread (p90 - p10); an image score below it is nothing a good part produced: ERROR, the frame does not look "
                   "like this station",
    "min-minus-spread": "lowest good image score minus margin x the spread (p90 - p10) of the good image scores; an "
                        "image score below it is nothing a good part produced: ERROR, the frame does not look like "
                        "this station",
}


def low_bound(good_scores, blank_score: float | None = None, margin: float = LOW_MARGIN) -> dict[str, Any]:
    """The low end of good image scores, for the card's threshold entry (`low`): two-sided scores.

    A very low score is not a very good part: a grey frame, a covered lens or another station's view
    reconstructs "too well" and lands near what a frame showing nothing scores. With that floor
    (`blank_score`, evaluation.blank_frame_scores) under the good scores, the bound sits a third of the way
    from it to the lowest good score: scale-free, for any sign of score, and clear of good parts even when
    few images set it (the spread of 8 images says little), and never closer to them than one spread
    (p90 - p10; 10 % of |min| when all are equal). When a blank frame scores within two spreads of the
    good parts (the score cannot tell them apart) or above them: the lowest good score minus `margin`
    spreads. Used by calibrate and by train.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    good = good[np.isfinite(good)]
    if good.size == 0:
        raise ConfigError("the low bound needs at least one finite good image score")
    lowest = float(good.min())
    q10, q90 = np.quantile(good, [0.1, 0.9])
    spread = float(q90 - q10)
    if not spread > 0:
        spread = abs(lowest) * 0.1 or 1.0
    entry: dict[str, Any] = {"min": lowest, "spread": spread, "n_good": int(good.size), "blank_score": blank_score}
    if blank_score is not None and math.isfinite(blank_score) and lowest - blank_score > 2 * spread:
        # Never closer to the good parts than one spread.
        entry.update(value=min(blank_score + (lowest - blank_score) / 3.0, lowest - spread), method="blank-third")
    else:
        entry.update(value=lowest - margin * spread, method="min-minus-spread", margin=margin)
    entry["description"] = LOW_DESCRIPTIONS[entry["method"]]
    return entry


def apply(card: dict[str, Any], score_name: str, entry: dict[str, Any], ignore_mask: dict[str, Any] | None,
          now: str) -> dict[str, Any]:
    """The card change: the score's threshold replaced by entry, the old one appended to calibration_history."""
    card = copy.deepcopy(card)
    old = card.setdefault("thresholds", {}).get(score_name)
    if old is not None:
        card.setdefault("calibration_history", []).append({"score": score_name, "replaced_at": now, **old})
    card["thresholds"][score_name] = entry
    if ignore_mask is not None:
        card["ignore_mask"] = ignore_mask
    return card

import numpy as np
import pytest

from edge_agent.evaluation import best_f1, operating_point, roc_auc, roc_curve


@pytest.mark.parametrize(
    "labels, scores, auc",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([0, 1], [0.5, 0.5], 0.5),  # a tie counts half
        ([0, 0, 1, 1], [0.1, 0.4, 0.3, 0.5], 0.75),
    ],
)
def test_roc_auc_exact(labels, scores, auc):
    assert roc_auc(np.array(labels), np.array(scores)) == auc


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels, 1.0), 1)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_ends_and_area():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    fpr, tpr, _ = roc_curve(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_best_f1_separable_and_strict():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.25, 0.5, 0.5, 0.75, 1.0])
    r = best_f1(labels, scores)
    assert r["f1"] == 1.0 and 0.5 <= r["threshold"] < 0.75
    op = operating_point(labels, scores, 0.5)  # 0.5 is not > 0.5: those two good parts pass
    assert op["false_reject_rate"] == 0.0 and op["recall"] == 1.0


def test_recall_at_frr_by_hand():
    from edge_agent.evaluation import recall_at_frr

    good = list(range(100))  # 0..99: at 1 % one good image (99) may lie over the threshold -> t = 98
    labels = [0] * 100 + [1] * 4
    point = recall_at_frr(labels, good + [97.5, 98.0, 98.5, 200.0], 0.01)
    assert point["threshold"] == 98.0 and point["false_reject_rate"] == 0.01
    assert point["recall"] == 0.5  # 98.5 and 200 are over 98 (strict >); 98.0 is not


def test_log_axis_only_for_scores_over_decades():
    from edge_agent.evaluation import histogram_bins, log_axis

    assert log_axis([1.0, 10.0, 1000.0]) and not log_axis([1.0, 50.0]) and not log_axis([-5.0, 1000.0])
    bins = histogram_bins([1.0, 10.0, 1000.0], bins=3)
    assert np.allclose(bins, [1.0, 10.0, 100.0, 1000.0])

import numpy as np
import pytest

from edge_agent.patches import PatchGrid
from edge_agent.verdict import decide, overlay

GRID = PatchGrid.for_frame(32, 48, 16, 16)  # 6 patches


@pytest.mark.parametrize(
    "scores, threshold, anomalous, over, worst",
    [
        ([0.5, 0.25, 0.5, 0.25, 0.5, 0.25], 0.5, False, 0, 0),  # equal to the threshold is OK (strict >)
        ([0.5, 0.25, 0.75, 0.25, 0.5, 0.25], 0.5, True, 1, 2),
        ([0.75, 0.25, 0.75, 1.0, 0.5, 0.25], 0.5, True, 3, 3),
    ],
)
def test_any_patch_over_threshold(scores, threshold, anomalous, over, worst):
    d = decide(GRID, np.array(scores, np.float32), threshold)
    assert d.anomalous is anomalous and d.patches_over == over and d.patches_total == 6
    assert d.worst_box == GRID.box(worst) and d.score == max(scores)
    assert d.result == ("NG" if anomalous else "OK")


def test_ignored_patches_do_not_count():
    scores = np.array([0.25, 0.25, 0.75, 0.25, 0.25, 0.25], np.float32)
    counted = np.array([True, True, False, True, True, True])
    d = decide(GRID, scores, 0.5, counted)
    assert not d.anomalous and d.score == 0.25


@pytest.mark.parametrize("bad", [[np.nan] + [0.1] * 5, [np.inf] + [0.1] * 5, [0.1] * 5])
def test_broken_scores_are_an_error_never_ok(bad):
    d = decide(GRID, np.array(bad, np.float32), 0.5)
    assert d.result == "ERROR" and d.anomalous and d.error


def test_overlay_shape_and_box():
    image = np.full((32, 48), 128, np.uint8)
    scores = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 2.0], np.float32)
    d = decide(GRID, scores, 0.5)
    out = overlay(image, GRID, scores, 0.5, d)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert (out[16, 32:48] == 255).all()  # the worst patch's top edge is boxed in white

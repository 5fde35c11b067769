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


def test_a_score_below_the_cards_low_bound_is_error_unlike_station_not_a_very_good_part():
    scores = np.full(6, 0.25, np.float32)
    d = decide(GRID, scores, 0.5, low=0.375)
    assert d.result == "ERROR" and d.reason == "unlike_station" and "does not look like this station" in d.error
    assert decide(GRID, scores, 0.5, low=0.25).result == "OK"  # at the bound: a good part did score that
    assert decide(GRID, scores, 0.5, low=None).result == "OK"  # a card from before two-sided scores


def test_the_verdict_document_names_the_error_reason():
    from edge_agent.frames import Frame
    from edge_agent.verdict import document, failed

    class Info:
        threshold, score_name, model_id, checksum = 0.5, "m", "vae", "sha256:x"

    frame = Frame(3, np.zeros((0, 0), np.uint8), captured_at=1.5)
    v = document(frame, Info(), failed("frame quality: blank (every pixel is 0)", "blank"), "st1", "b00t", {}, False)
    assert (v["result"], v["error_reason"], v["score"], v["message_id"]) == ("ERROR", "blank", None, "st1:b00t:3")
    ok = document(frame, Info(), decide(GRID, np.full(6, 0.25, np.float32), 0.5), "st1", "b00t", {"queue": 0.1}, False)
    assert (ok["result"], ok["error_reason"], ok["score"]) == ("OK", None, 0.25)


@pytest.mark.parametrize("threshold, good", [
    (737.0, {"p50": 557.0}),  # the demo VAE's m
    (-4000.0, {"p50": -4600.0}),  # elbo: negative scores
    (-12.5, None),  # a negative threshold without calibration statistics
    (0.5, None),
])
def test_heatmap_colours_get_hotter_with_the_score_for_any_sign(threshold, good):
    from edge_agent.verdict import heat_colours, heat_scale

    lo, hi = heat_scale(threshold, good)
    assert lo < threshold < hi and threshold - lo == pytest.approx(hi - threshold)
    ramp = np.linspace(lo, hi, 9, dtype=np.float64).reshape(1, 9)
    bgr = heat_colours(ramp, (lo, hi)).reshape(9, 3).astype(int)
    # JET runs blue -> red: blue falls and red rises along a rising score, never the other way round.
    assert bgr[0, 0] > bgr[-1, 0] and bgr[0, 2] < bgr[-1, 2]
    if good:  # the median good part sits in the cool half
        level = (good["p50"] - lo) / (hi - lo)
        assert 0.0 < level < 0.5

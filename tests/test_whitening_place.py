"""Per-place residual whitening (anomaly_map.Whitening with cells): the fit and the map against hand computations,
the rule that keeps it (fixtured structure yes, stationary no), the card and archive round trip, the frame-size
guard, and what train and combine write."""

import dataclasses

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import WHITE_PLACE_ENTRY, MapHead, Whitening, _encode
from edge_agent.errors import ModelError
from edge_agent.train.fit import fit
from tests.conftest import tiny_options


def hand_windows(image: np.ndarray, k: int) -> np.ndarray:
    """(H, W) -> (H, W, k * k) windows, reflected at the edges."""
    padded = np.pad(image, k // 2, mode="reflect")
    h, w = image.shape
    return np.stack([[padded[y : y + k, x : x + k].ravel() for x in range(w)] for y in range(h)])


def hand_fit(images: list[np.ndarray], k: int, cell: int, pool: int = 3, shrink: float = 1e-3):
    """Each cell's Gaussian from the windows of the pixels in it and its pool x pool neighbour cells (the frame
    padded to whole cells by repeating its last row and column, as the product does)."""
    h, w = images[0].shape
    ch, cw = -(-h // cell), -(-w // cell)
    wins = [np.pad(hand_windows(im, k), ((0, ch * cell - h), (0, cw * cell - w), (0, 0)), mode="edge") for im in images]
    means = np.zeros((ch, cw, k * k))
    covs = np.zeros((ch, cw, k * k, k * k))
    r = pool // 2
    for cy in range(ch):
        for cx in range(cw):
            ys = [min(max(y, 0), ch - 1) for y in range(cy - r, cy + r + 1)]
            xs = [min(max(x, 0), cw - 1) for x in range(cx - r, cx + r + 1)]
            sample = np.concatenate([wn[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell].reshape(-1, k * k)
                                     for wn in wins for y in ys for x in xs]).astype(np.float64)
            means[cy, cx] = sample.mean(0)
            cov = np.cov(sample.T, bias=True).reshape(k * k, k * k)
            covs[cy, cx] = cov + shrink * np.trace(cov) / (k * k) * np.eye(k * k)
    return means, covs


def hand_map(image: np.ndarray, k: int, cell: int, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    win = hand_windows(image, k).astype(np.float64)
    out = np.zeros(image.shape)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            d = win[y, x] - means[y // cell, x // cell]
            out[y, x] = 0.5 * d @ np.linalg.inv(covs[y // cell, x // cell]) @ d
    return out


def two_grains(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    """A fixtured part's good residual: brushed along x on the left half, along y on the right half."""
    left = rng.normal(0, 1, (h, 1)) * np.ones((1, w // 2))
    right = rng.normal(0, 1, (1, w - w // 2)) * np.ones((h, 1))
    return (np.concatenate([left, right], 1) + rng.normal(0, 0.3, (h, w))).astype(np.float32)


def stationary(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    """A texture's good residual: the same grain everywhere."""
    return (rng.normal(0, 1, (h, 1)) * np.ones((1, w)) + rng.normal(0, 0.3, (h, w))).astype(np.float32)


@pytest.mark.parametrize("shape,cell,k", [((24, 32), 8, 3), ((20, 30), 8, 3), ((16, 16), 4, 1)])
def test_fit_places_and_the_map_equal_the_hand_computation(shape, cell, k):
    rng = np.random.default_rng(cell + k)
    goods = [two_grains(rng, *shape) for _ in range(3)]
    mean, chol = Whitening.fit_places([torch.from_numpy(g) for g in goods], k, cell)
    want_mean, want_cov = hand_fit(goods, k, cell)
    np.testing.assert_allclose(mean, want_mean, atol=1e-6)
    np.testing.assert_allclose(np.linalg.inv(chol @ np.swapaxes(chol, -1, -2)), want_cov, rtol=1e-4, atol=1e-6)
    white = Whitening(k, np.zeros(k * k, np.float32), np.eye(k * k, dtype=np.float32), 1.5, 3, cell=cell,
                      frame=shape, place_mean=mean.astype(np.float32), place_chol=chol.astype(np.float32))
    probe = two_grains(rng, *shape)
    want = 1.5 * hand_map(probe, k, cell, want_mean, want_cov)
    np.testing.assert_allclose(white.map(torch.from_numpy(probe)).numpy(), want, rtol=2e-3, atol=2e-3)


def test_place_scales_and_the_scaled_map_equal_the_hand_computation():
    rng = np.random.default_rng(7)
    goods = [two_grains(rng, 20, 30) for _ in range(6)]
    k, cell, pool, q = 3, 8, 3, 0.75
    mean, chol = Whitening.fit_places([torch.from_numpy(g) for g in goods], k, cell)
    white = Whitening(k, np.zeros(k * k, np.float32), np.eye(k * k, dtype=np.float32), 1.0, 6, cell=cell,
                      frame=(20, 30), place_mean=mean.astype(np.float32), place_chol=chol.astype(np.float32))
    scale = white.place_scales([torch.from_numpy(g) for g in goods], pool, q)
    want_mean, want_cov = hand_fit(goods, k, cell)
    ch, cw = 3, 4
    maxima = np.zeros((len(goods), ch, cw))
    for n, g in enumerate(goods):
        z = hand_map(g, k, cell, want_mean, want_cov)
        for cy in range(ch):
            for cx in range(cw):
                maxima[n, cy, cx] = z[cy * cell:(cy + 1) * cell, cx * cell:(cx + 1) * cell].max()
    qc = np.zeros((ch, cw))
    for cy in range(ch):
        for cx in range(cw):
            ys = [min(max(y, 0), ch - 1) for y in range(cy - 1, cy + 2)]
            xs = [min(max(x, 0), cw - 1) for x in range(cx - 1, cx + 2)]
            qc[cy, cx] = np.quantile([maxima[n, y, x] for n in range(len(goods)) for y in ys for x in xs], q)
    lower_median = np.sort(qc.ravel())[(qc.size - 1) // 2]  # torch.median: the lower of the two middle values
    np.testing.assert_allclose(scale, lower_median / qc, rtol=2e-3)
    scaled = dataclasses.replace(white, place_scale=scale, weight=2.0)
    probe = two_grains(rng, 20, 30)
    per_pixel = np.repeat(np.repeat(scale, cell, 0), cell, 1)[:20, :30]
    np.testing.assert_allclose(scaled.map(torch.from_numpy(probe)).numpy(),
                               2.0 * per_pixel * hand_map(probe, k, cell, want_mean, want_cov), rtol=2e-3, atol=2e-3)


def spiky(rng: np.random.Generator, h: int = 32, w: int = 64) -> np.ndarray:
    """A fixtured part's good residual whose top-left corner (a moving edge) sometimes shows a large spike."""
    x = rng.normal(0, 1, (h, w)).astype(np.float32)
    if rng.random() < 0.5:
        x[rng.integers(2, 14), rng.integers(2, 14)] += 9.0
    return x


def test_a_place_whose_good_parts_have_heavy_tails_is_scaled_down_and_defects_elsewhere_stand_out():
    rng = np.random.default_rng(5)
    goods = [torch.from_numpy(spiky(rng)) for _ in range(40)]
    white = Whitening.weighted(goods, [1.0] * len(goods), 3, stride=8, min_gain=0.0)
    assert white.per_place and white.place_scale.shape == (4, 8)
    assert white.place_check["scale_range"] == [round(float(white.place_scale.min()), 4),
                                                round(float(white.place_scale.max()), 4)]
    assert white.place_scale[0, 0] < 0.85  # the spiky corner (measured 0.77)
    assert np.all(np.abs(white.place_scale[:, 5:] - 1.0) < 0.06)  # places with a Gaussian tail keep about 1
    tests = [spiky(rng) for _ in range(60)]
    defects = []
    for t in tests[30:]:
        t = t.copy()
        t[rng.integers(18, 30), rng.integers(36, 60)] += 6.0  # a spike where good parts have none
        defects.append(t)

    def separation(w):
        good = [float(w.unweighted(torch.from_numpy(t)).max()) for t in tests[:30]]
        bad = [float(w.unweighted(torch.from_numpy(t)).max()) for t in defects]
        return np.mean([b > g for b in bad for g in good])

    plain, scaled = separation(dataclasses.replace(white, place_scale=None)), separation(white)
    assert scaled > plain + 0.05, (plain, scaled)  # measured 0.46 -> 0.56


def test_places_that_differ_keep_it_and_a_line_that_is_normal_only_elsewhere_stands_out():
    rng = np.random.default_rng(0)
    goods = [torch.from_numpy(two_grains(rng, 32, 64)) for _ in range(12)]
    scores = [1.0] * len(goods)
    white = Whitening.weighted(goods, scores, 3, stride=8)
    check = white.place_check
    assert white.per_place and check["used"] and check["cell_px"] == 8
    assert check["gain_nats_per_window"] >= 1.5
    one = dataclasses.replace(white, place_mean=None, place_chol=None, cell=0, frame=None)
    one = dataclasses.replace(one, weight=1.0)
    place = dataclasses.replace(white, weight=1.0)
    tests = [two_grains(rng, 32, 64) for _ in range(30)]
    defects = []
    for t in tests[15:]:
        t = t.copy()
        t[4:28, 10] += 3.0  # a vertical line on the left half: the right half's grain, not the left's
        defects.append(t)

    def separation(w):
        good = [float(w.unweighted(torch.from_numpy(t)).max()) for t in tests[:15]]
        bad = [float(w.unweighted(torch.from_numpy(t)).max()) for t in defects]
        return np.mean([b > g for b in bad for g in good])

    assert separation(place) == 1.0
    assert separation(one) < 0.8  # measured 0.65: the one Gaussian has seen vertical lines (on the right)


def test_a_stationary_residual_keeps_one_gaussian_and_says_why():
    rng = np.random.default_rng(1)
    goods = [torch.from_numpy(stationary(rng)) for _ in range(12)]
    white = Whitening.weighted(goods, [1.0] * len(goods), 3, stride=8)
    assert not white.per_place and white.place_check["used"] is False
    assert abs(white.place_check["gain_nats_per_window"]) < 0.5 and "do not differ" in white.place_check["why"]
    few = Whitening.weighted(goods[:3], [1.0] * 3, 3, stride=8)
    assert not few.per_place and ">= 4" in few.place_check["why"]
    assert Whitening.weighted(goods, [1.0] * len(goods), 3).place_check is None  # stride 0: not checked


def test_card_and_archive_round_trip_and_malformed_or_missing_entries():
    rng = np.random.default_rng(2)
    goods = [torch.from_numpy(two_grains(rng)) for _ in range(8)]
    white = Whitening.weighted(goods, [1.0] * len(goods), 3, stride=8, min_gain=0.0)
    assert white.per_place
    head = MapHead(0.0, white=white)
    record = {**head.card(), "name": "m_map"}
    extras = head.extras()
    assert set(extras) == {WHITE_PLACE_ENTRY} and record["white"]["place"]["cells"] == [3, 4]
    back = MapHead.from_card({"anomaly_map": record}, extras).white
    np.testing.assert_allclose(back.place_mean, white.place_mean)
    np.testing.assert_allclose(back.place_chol, white.place_chol)
    assert back.cell == 8 and back.frame == (24, 32) and back.place_check == white.place_check
    np.testing.assert_allclose(back.place_scale, white.place_scale)
    assert record["white"]["place"]["scale"]["pool"] == 5 and record["white"]["place"]["scale"]["quantile"] == 0.9
    probe = torch.from_numpy(two_grains(rng))
    np.testing.assert_allclose(back.map(probe).numpy(), white.map(probe).numpy(), rtol=1e-6)
    with pytest.raises(ModelError, match="lacks; retrain"):
        MapHead.from_card({"anomaly_map": record}, {})
    bad = {**record, "white": {**record["white"], "place": {**record["white"]["place"], "cells": [2, 4]}}}
    with pytest.raises(ModelError, match="retrain the model"):
        MapHead.from_card({"anomaly_map": bad}, extras)
    for values in (np.ones((2, 4)), -np.ones((3, 4)), np.full((3, 4), np.nan)):
        place = {**record["white"]["place"], "scale": {**record["white"]["place"]["scale"], "values": _encode(values)}}
        with pytest.raises(ModelError, match="malformed; retrain the model"):
            MapHead.from_card({"anomaly_map": {**record, "white": {**record["white"], "place": place}}}, extras)
    place = {**record["white"]["place"], "scale": {"values": "not base64 of an array"}}
    with pytest.raises(ModelError, match="retrain the model"):
        MapHead.from_card({"anomaly_map": {**record, "white": {**record["white"], "place": place}}}, extras)
    unscaled = {k: v for k, v in record["white"]["place"].items() if k != "scale"}  # a card from before the scale
    old = MapHead.from_card({"anomaly_map": {**record, "white": {**record["white"], "place": unscaled}}}, extras).white
    assert old.place_scale is None
    np.testing.assert_allclose(old.map(probe).numpy(), dataclasses.replace(white, place_scale=None).map(probe).numpy(),
                               rtol=1e-6)
    with pytest.raises(ModelError, match="frame is 40x24 but .* 32x24 frame"):
        white.map(torch.zeros(24, 40))


@pytest.fixture(scope="module")
def fixtured_model(tmp_path_factory):
    """40 good 64x64 parts (fixtured: the synthetic station), 8 held out; a tiny VAE with the defaults."""
    from edge_agent.synth import write_dataset

    root = tmp_path_factory.mktemp("wplace")
    write_dataset(root, n_train=40, n_calib=6, n_test_good=2, n_test_defect=2, seed=4, size=64)
    out = root / "m.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=20, whiten_window=3))
    return root, out


def test_train_records_the_check_and_the_scorer_scores_with_the_cells(fixtured_model, tmp_path):
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer

    root, model = fixtured_model
    card = artifact.verify(model)
    check = card["anomaly_map"]["white"]["place_check"]
    assert check["cell_px"] == 16 and "gain_nats_per_window" in check
    _, _, extras = artifact.load_with_extras(model)
    assert (WHITE_PLACE_ENTRY in extras) == check["used"] == ("place" in card["anomaly_map"]["white"])
    if check["used"]:  # cells come with their scales, fitted on the same held-out images
        assert "scale" in card["anomaly_map"]["white"]["place"] and len(check["scale_range"]) == 2
    fast, eager = Scorer(model, device="cpu"), Scorer(model, device="cpu", fast=False)
    grid, patches = fast.patches(read_image(list_images(root / "test/defect")[0]))
    maps, residuals, _ = eager.maps_residuals(patches)
    want = fast.head.patch_scores(grid, maps, residuals=residuals).numpy()
    np.testing.assert_allclose(eager.score_frame(grid, patches), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.score_frame(grid, patches), want, rtol=1e-3, atol=1e-3)
    out = tmp_path / "one.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=5, whiten_window=3,
                                               whiten_place=False))
    white = artifact.verify(out)["anomaly_map"]["white"]
    assert "place" not in white and "place_check" not in white
    assert WHITE_PLACE_ENTRY not in artifact.load_with_extras(out)[2]


def test_combine_checks_it_on_the_threshold_images_unless_told_not_to(fixtured_model, tmp_path):
    from edge_agent.combine import combine

    root, first = fixtured_model
    second = tmp_path / "b.pt"
    fit(root / "train/good", second, tiny_options(model="vae", patch_size=32, stride=16, steps=10, seed=1,
                                                  whiten=False))
    card = combine([first, second], tmp_path / "pair.pt", good=root / "calib/good", progress=False)
    check = card["anomaly_map"]["white"]["place_check"]
    assert check["cell_px"] == 16 and check["used"] is False and ">= 4" in check["why"]  # 3 threshold images
    card = combine([first, second], tmp_path / "pair2.pt", good=root / "calib/good", progress=False,
                   whiten_place=False)
    assert "place_check" not in card["anomaly_map"]["white"]
    assert WHITE_PLACE_ENTRY not in artifact.load_with_extras(tmp_path / "pair2.pt")[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_place_whitening_on_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    goods = [torch.from_numpy(two_grains(rng)) for _ in range(8)]
    white = Whitening.weighted(goods, [1.0] * len(goods), 3, stride=8, min_gain=0.0)
    assert white.place_scale is not None  # the cells' scales are folded into their factors on the device too
    probe = torch.from_numpy(two_grains(rng))
    np.testing.assert_allclose(white.map(probe.cuda()).cpu().numpy(), white.map(probe).numpy(), rtol=1e-3, atol=1e-3)

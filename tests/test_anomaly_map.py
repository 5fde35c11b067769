"""The anomaly-map head against hand computations, its card round trip, and the hold-out that sets a fresh
model's threshold."""

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import (POSITION_SCALE, LowSide, MapHead, PositionStats, fold_mean, gaussian_blur,
                                    window_max)
from edge_agent.errors import DataError, ModelError
from edge_agent.patches import PatchGrid
from edge_agent.train.fit import fit, lr_factor, planned_steps, split_holdout
from tests.conftest import tiny_options

GRIDS = [(128, 128, 32, 8), (100, 77, 32, 10), (64, 64, 32, 32), (480, 640, 96, 16)]


def naive_boxes(grid):
    return [grid.box(k) for k in range(grid.count)]


@pytest.mark.parametrize("h,w,p,s", GRIDS)
def test_fold_mean_is_the_mean_over_covering_patches(h, w, p, s):
    grid = PatchGrid.for_frame(h, w, p, s)
    maps = torch.rand(grid.count, p, p, generator=torch.Generator().manual_seed(h + w))
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for k, (x, y, _, _) in enumerate(naive_boxes(grid)):
        total[y : y + p, x : x + p] += maps[k].numpy()
        count[y : y + p, x : x + p] += 1
    np.testing.assert_allclose(fold_mean(grid, maps).numpy(), total / count, atol=1e-6)


@pytest.mark.parametrize("h,w,p,s", GRIDS)
def test_window_max_is_the_maximum_inside_each_patch(h, w, p, s):
    grid = PatchGrid.for_frame(h, w, p, s)
    image = torch.rand(h, w, generator=torch.Generator().manual_seed(7))
    want = [image[y : y + p, x : x + p].max().item() for x, y, _, _ in naive_boxes(grid)]
    assert window_max(grid, image).tolist() == pytest.approx(want, abs=0)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 6.0])
def test_blur_matches_opencv_gaussian_with_replicated_edges(sigma):
    image = np.random.default_rng(0).random((60, 90)).astype(np.float32)
    radius = math.ceil(3 * sigma)
    want = cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REPLICATE)
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(image), sigma).numpy(), want, atol=1e-5)


def test_no_blur_is_identity():
    x = torch.rand(10, 12)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_position_stats_are_median_and_scaled_mad_per_place():
    rng = np.random.default_rng(1)
    # Constant within POSITION_SCALE blocks, so the pooled values are exactly the block values.
    blocks = rng.random((9, 3, 4)).astype(np.float32)
    maps = [torch.from_numpy(np.kron(b, np.ones((POSITION_SCALE, POSITION_SCALE), np.float32))) for b in blocks]
    stats = PositionStats.fit(maps, floor_quantile=0.0)
    median = np.median(blocks, axis=0)
    mad = 1.4826 * np.median(np.abs(blocks - median), axis=0)
    np.testing.assert_allclose(stats.mean, median, rtol=1e-6)
    np.testing.assert_allclose(stats.spread, np.maximum(mad, 1e-6), rtol=1e-5)
    assert stats.images == 9


def test_position_spread_is_floored_so_a_constant_place_cannot_explode():
    maps = [torch.ones(8, 8) for _ in range(5)]
    maps[0][:4, :4] = 2.0  # one place varies; the rest never does
    stats = PositionStats.fit(maps)
    assert (stats.spread > 0).all()


def test_position_stats_card_round_trip():
    stats = PositionStats(np.arange(12, dtype=np.float32).reshape(3, 4), np.full((3, 4), 0.5, np.float32), 20)
    back = PositionStats.from_card(stats.card())
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.spread, stats.spread)
    assert back.images == 20
    bad = stats.card() | {"spread_npy_base64": PositionStats(stats.mean, np.zeros((3, 4), np.float32), 1).card()[
        "spread_npy_base64"]}
    with pytest.raises(ModelError, match="malformed"):
        PositionStats.from_card(bad)
    with pytest.raises(ModelError, match="unreadable"):
        PositionStats.from_card(stats.card() | {"mean_npy_base64": "bm90IG5weQ=="})


def test_head_scores_by_hand():
    grid = PatchGrid.for_frame(64, 64, 32, 16)  # 3 x 3 patches
    maps = torch.zeros(grid.count, 32, 32)
    maps[4, 10, 10] = 9.0  # the centre patch (x=y=16), pixel (26, 26) of the frame
    head = MapHead(sigma_px=0.0)
    scores = head.patch_scores(grid, maps).numpy()
    # The pixel is covered by patches 0, 1, 3, 4 (x, y in {0, 16}); each place's mean over those covering it.
    count = 4  # (26, 26) lies in the patches at x in {0, 16} and y in {0, 16}
    want = np.zeros(9)
    for k in range(9):
        x, y, _, _ = grid.box(k)
        if x <= 26 < x + 32 and y <= 26 < y + 32:
            want[k] = 9.0 / count
    np.testing.assert_allclose(scores, want, atol=1e-6)
    # With position statistics: (value - mean) / spread at each place.
    stats = PositionStats(np.full((16, 16), 0.25, np.float32), np.full((16, 16), 0.5, np.float32), 3)
    normalized = MapHead(0.0, stats).patch_scores(grid, maps).numpy()
    np.testing.assert_allclose(normalized, (want - 0.25) / 0.5, atol=1e-6)


def test_head_card_round_trip():
    stats = PositionStats(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), 5)
    card = {"anomaly_map": {"name": "m_map", **MapHead(3.0, stats).card()}}
    head = MapHead.from_card(card)
    assert head.sigma_px == 3.0 and head.position.images == 5
    assert MapHead.from_card({}) is None


def test_low_side_scores_by_hand():
    grid = PatchGrid.for_frame(64, 64, 32, 16)  # 3 x 3 patches
    g = torch.Generator().manual_seed(0)
    maps = 0.5 + torch.rand(grid.count, 32, 32, generator=g)  # every patch sums to about 1024
    maps[4] = 1e-3  # the centre patch: texture gone, the model explains it far better than any good patch
    low = LowSide(reference=400.0, weight=3.0, images=7)
    plain = MapHead(0.0).patch_scores(grid, maps).numpy()
    scores = MapHead(0.0, None, low).patch_scores(grid, maps).numpy()
    sums = maps.flatten(1).double().sum(1).numpy()
    assert (np.delete(sums, 4) > 400.0).all()
    assert scores[4] == pytest.approx(3.0 * 400.0 / 1.024, rel=1e-4)  # 1024 pixels of 1e-3
    np.testing.assert_allclose(np.delete(scores, 4), np.delete(plain, 4), rtol=1e-6)  # above the reference: as before
    # Just under the reference: weight x reference / sum, even where the map's own score is lower.
    maps[0] = 399.0 / 1024
    scores = MapHead(0.0, None, low).patch_scores(grid, maps).numpy()
    assert scores[0] == pytest.approx(max(MapHead(0.0).patch_scores(grid, maps).numpy()[0], 3.0 * 400.0 / 399.0),
                                      rel=1e-5)
    # A pixel map summing to zero cannot divide by zero: it is clamped at 1/1000 of the reference.
    zero = MapHead(0.0, None, low).patch_scores(grid, torch.zeros(grid.count, 32, 32)).numpy()
    np.testing.assert_allclose(zero, 3.0 * 1000.0)


def test_low_side_fit_takes_the_lowest_good_patch_and_the_median_image_score():
    low = LowSide.fit([torch.tensor([5.0, 3.0, 9.0]), torch.tensor([4.0, 7.0])], [1.0, 2.0, 10.0])
    assert (low.reference, low.weight, low.images) == (3.0, 2.0, 2)
    # A patch just under the lowest good one scores the median good image's score; one at or above it nothing.
    got = low.scores_from_sums(torch.tensor([2.999, 1.5, 3.0, 50.0])).tolist()
    assert got[:2] == [pytest.approx(2.0, rel=1e-3), pytest.approx(4.0)] and got[2:] == [-math.inf, -math.inf]
    assert LowSide.fit([torch.tensor([0.0, 3.0])], [1.0]) is None  # no shell: nothing to fall inside
    assert LowSide.fit([torch.tensor([2.0])], [-1.0]) is None  # position-normalized scores below zero


def test_head_with_low_side_card_round_trip():
    card = {"anomaly_map": {"name": "m_map", **MapHead(0.0, None, LowSide(12.5, 4.0, 40)).card()}}
    head = MapHead.from_card(card)
    assert head.low == LowSide(12.5, 4.0, 40) and head.position is None
    assert MapHead.from_card({"anomaly_map": {"name": "m_map", **MapHead(0.0).card()}}).low is None
    for bad in ({"reference": -1.0, "weight": 4.0}, {"weight": 4.0}, {"reference": "x", "weight": 1.0}):
        with pytest.raises(ModelError, match="low side"):
            MapHead.from_card({"anomaly_map": {"name": "m_map", **MapHead(0.0).card(), "low": bad}})


def test_split_holdout_is_disjoint_even_and_sized():
    keep, held = split_holdout(200, 0.2)
    assert len(held) == 40 and len(keep) == 160 and not set(keep) & set(held)
    assert sorted(keep + held) == list(range(200))
    gaps = np.diff(held)
    assert gaps.min() >= 4 and gaps.max() <= 6  # evenly spread, not a block at the end
    assert split_holdout(20, 0.2) == (list(range(20)), [])  # 4 would be too few to say anything
    assert split_holdout(50, 0.0) == (list(range(50)), [])


def test_planned_steps_gives_small_data_a_real_budget():
    # 130 images of 32 x 32 with P = 32: one patch each, 3 steps an epoch: 30 steps would leave a model untrained.
    assert planned_steps(tiny_options(epochs=10, min_steps=2000), 3) == (2000, "min steps")
    assert planned_steps(tiny_options(epochs=10, min_steps=2000), 500) == (5000, "epochs")
    assert planned_steps(tiny_options(steps=123), 500) == (123, "steps")


def test_cosine_learning_rate():
    assert lr_factor(0.0, "cosine", 0.05) == pytest.approx(1.0)
    assert lr_factor(0.5, "cosine", 0.05) == pytest.approx(0.525)
    assert lr_factor(1.0, "cosine", 0.05) == pytest.approx(0.05)
    assert lr_factor(0.7, "constant", 0.05) == 1.0


@pytest.fixture(scope="module")
def held_out_model(tmp_path_factory):
    """40 good 64x64 parts: 8 held out (4 for the map's statistics, 4 for the threshold)."""
    from edge_agent.synth import write_dataset

    root = tmp_path_factory.mktemp("holdout")
    write_dataset(root, n_train=40, n_calib=0, n_test_good=4, n_test_defect=4, seed=3, size=64)
    out = root / "m.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=20, min_position_images=4))
    return root, out


def test_fresh_model_is_thresholded_on_held_out_images(held_out_model):
    from edge_agent.images import file_hashes, list_images

    root, model = held_out_model
    card = artifact.verify(model)
    files = list_images(root / "train/good")
    hashes = file_hashes(files)
    training = card["training"]
    assert training["images"] == 32 and training["holdout"]["images"] == 8
    held = set(training["holdout"]["image_hashes"])
    assert not held & set(training["image_hashes"]) and held | set(training["image_hashes"]) == set(hashes)
    assert card["scores"]["default"] == "m_map" and "m" in card["scores"]["names"]
    position = card["anomaly_map"]["position"]
    assert position["images"] == 4 and len(position["image_hashes"]) == 4
    entry = card["thresholds"]["m_map"]
    assert entry["method"] == "frr" and entry["n_good"] == 4 and not entry["enough_good_images"]
    assert len(entry["image_hashes"]) == 4 and not set(entry["image_hashes"]) & set(position["image_hashes"])
    assert set(entry["image_hashes"]) | set(position["image_hashes"]) == held
    # 4 images: the FRR method falls back to their maximum and says what that bounds.
    assert entry["k"] == 1 and entry["good_over_threshold"] == 0 and entry["frr_upper_bound"] > 0.5


def test_fresh_threshold_is_the_max_of_the_held_out_scores(held_out_model):
    from edge_agent.evaluation import ImageResult, score_files
    from edge_agent.images import read_image
    from edge_agent.images import file_hashes, list_images
    from edge_agent.scoring import Scorer

    root, model = held_out_model
    scorer = Scorer(model, device="cpu")
    entry = scorer.card["thresholds"]["m_map"]
    files = [f for f, h in zip(list_images(root / "train/good"), file_hashes(list_images(root / "train/good")))
             if h in set(entry["image_hashes"])]
    results = score_files(scorer, files, ["m_map"], progress=False)
    assert entry["value"] == pytest.approx(max(r.image_score("m_map") for r in results), rel=1e-5)
    # The low side (texture loss) from the same images: the lowest patch's pixel-map sum, and the median image
    # score of the map without it.
    low = scorer.card["anomaly_map"]["low"]
    plain = dataclasses.replace(scorer.head, low=None)
    sums, image_scores = [], []
    for f in files:
        grid, patches = scorer.patches(read_image(f))
        maps, codes, residuals = scorer.pixel_maps_codes(patches)
        sums.append(float(maps.flatten(1).sum(1).min()))
        image_scores.append(ImageResult(f, grid, {"s": plain.patch_scores(grid, maps, None, codes, residuals).numpy()},
                                        scorer.counted(grid)).image_score("s"))
    assert low["images"] == len(files) == 4
    assert low["reference"] == pytest.approx(min(sums), rel=1e-4)
    assert low["weight"] == pytest.approx(float(np.median(image_scores)), rel=1e-4)


def test_scorer_head_equals_the_hand_pipeline(held_out_model):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = held_out_model
    image = make_part(99, "scratch", size=64).image
    fast = Scorer(model, device="cpu")
    eager = Scorer(model, device="cpu", fast=False)
    grid, patches = fast.patches(image)
    head = fast.head  # the card's head with its archive entries (per-place whitening)
    maps, residuals, _ = eager.module.pixel_map_residual(patches)
    want = head.patch_scores(grid, maps.detach(), residuals=residuals.detach())
    np.testing.assert_allclose(eager.score_frame(grid, patches), want.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fast.score_frame(grid, patches), want.numpy(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="grid"):
        fast.score_patches(patches)


def test_too_few_held_out_images_for_position_statistics_all_set_the_threshold(held_out_model, tmp_path):
    root, _ = held_out_model
    out = tmp_path / "m.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=20))  # needs 2 x 50
    card = artifact.verify(out)
    assert card["anomaly_map"]["position"] is None and card["anomaly_map"]["blur_sigma_px"] == 0.0
    entry = card["thresholds"]["m_map"]
    assert entry["n_good"] == 8 and set(entry["image_hashes"]) == set(card["training"]["holdout"]["image_hashes"])


def test_evaluate_and_calibrate_refuse_or_warn_on_held_out_images(held_out_model, tmp_path):
    from edge_agent.calibrate_cmd import run_calibration
    from edge_agent.evaluate_cmd import check_not_trained_on
    from edge_agent.images import file_hashes, list_images

    root, model = held_out_model
    card = artifact.verify(model)
    files = list_images(root / "train/good")
    by_hash = dict(zip(file_hashes(files), files))
    position_file = by_hash[card["anomaly_map"]["position"]["image_hashes"][0]]
    with pytest.raises(DataError, match="used to train or calibrate"):
        check_not_trained_on(card, [position_file], model)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / position_file.name).write_bytes(position_file.read_bytes())
    warnings = []
    run_calibration(model, tmp_path / "g", dry_run=True, device="cpu", progress=False, warn=warnings.append)
    assert any("were used to train" in w for w in warnings)


def test_early_stop_when_the_held_out_loss_is_flat(held_out_model, tmp_path):
    root, _ = held_out_model
    card = fit(root / "train/good", tmp_path / "m.pt",
               tiny_options(model="ae", steps=400, lr=0.0, patience=2, anomaly_map=False))
    t = card["training"]
    assert t["stopped_by"].startswith("converged") and t["steps"] < 400
    assert len(t["heldout_loss"]["history"]) == 3


def test_too_few_images_fall_back_to_the_training_maximum(vae_model):
    card = artifact.verify(vae_model)
    entry = card["thresholds"][card["scores"]["default"]]
    assert card["training"]["holdout"]["images"] == 0
    assert entry["method"] == "max-train" and entry["images"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_map_head_on_cuda_matches_cpu(held_out_model):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = held_out_model
    image = make_part(98, "debris", size=64).image
    cpu = Scorer(model, device="cpu")
    cuda = Scorer(model, device="cuda", precision="fp32", batch_size=5)  # 9 patches: the last graph batch is padded
    grid, patches = cpu.patches(image)
    np.testing.assert_allclose(cuda.score_frame(grid, patches), cpu.score_frame(grid, patches), rtol=1e-3, atol=1e-3)


def test_mixed_frame_sizes_train_without_position_statistics(tmp_path):
    import cv2

    from edge_agent.synth import make_part

    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"{i:03d}.png"), make_part(i, None, size=64, width=64 if i % 2 else 80).image)
    card = fit(folder, tmp_path / "m.pt", tiny_options(model="vae", patch_size=32, stride=16, steps=5))
    assert card["anomaly_map"]["position"] is None  # no place-by-place comparison across frame sizes
    assert card["thresholds"]["m_map"]["method"] == "frr" and card["thresholds"]["m_map"]["n_good"] == 8


def test_bf16_map_score_keeps_the_fast_path_and_stays_near_fp32(held_out_model):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = held_out_model
    fp32 = Scorer(model, device="cpu", precision="fp32")
    bf16 = Scorer(model, device="cpu", precision="bf16")
    assert bf16.fast is not None, "bf16 pixel-map rounding must not send the map score to the slow eager path"
    for seed, defect in ((5, None), (6, "debris")):
        image = make_part(seed, defect, size=64).image
        a, b = fp32.score_image(image).scores.max(), bf16.score_image(image).scores.max()
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3

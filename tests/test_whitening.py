"""Residual whitening (anomaly_map.Whitening) against hand computations, its card round trip, what train and
combine write, and the property it exists for: a faint line across correlated residual noise."""

import dataclasses

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import MapHead, Whitening, fold_mean, window_max
from edge_agent.errors import ModelError
from edge_agent.patches import PatchGrid
from edge_agent.train.fit import fit
from tests.conftest import tiny_options


def hand_windows(image: np.ndarray, k: int) -> np.ndarray:
    """(H, W) -> (H * W, k * k) windows, reflected at the edges, row-major like F.unfold."""
    padded = np.pad(image, k // 2, mode="reflect")
    h, w = image.shape
    return np.stack([padded[y : y + k, x : x + k].ravel() for y in range(h) for x in range(w)])


def streaks(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    """A good residual: horizontal streaks (one value per row, like brushing along x) plus weak pixel noise."""
    return rng.normal(0, 1, (h, 1)) * np.ones((1, w)) + rng.normal(0, 0.3, (h, w))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fit_is_the_windows_mean_and_precision_and_the_map_their_mahalanobis_distance(k):
    rng = np.random.default_rng(k)
    goods = [streaks(rng) for _ in range(3)]
    mean, chol = Whitening.fit([torch.from_numpy(g).float() for g in goods], k, shrink=0.0)
    windows = np.concatenate([hand_windows(g.astype(np.float32), k) for g in goods]).astype(np.float64)
    want_mean = windows.mean(0)
    want_cov = np.cov(windows.T, bias=True).reshape(k * k, k * k)
    np.testing.assert_allclose(mean, want_mean, atol=1e-6)
    np.testing.assert_allclose(np.linalg.inv(chol @ chol.T), want_cov, rtol=1e-4, atol=1e-6)
    white = Whitening(k, mean.astype(np.float32), chol.astype(np.float32), 2.5, 3)
    probe = streaks(rng).astype(np.float32)
    d = hand_windows(probe, k) - want_mean
    want = 2.5 * 0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(want_cov), d).reshape(probe.shape)
    np.testing.assert_allclose(white.map(torch.from_numpy(probe)).numpy(), want, rtol=2e-3, atol=2e-3)


def test_a_faint_line_across_streaks_stands_out_only_when_whitened():
    rng = np.random.default_rng(0)
    goods = [streaks(rng) for _ in range(20)]
    mean, chol = Whitening.fit([torch.from_numpy(g).float() for g in goods], 5)
    white = Whitening(5, mean.astype(np.float32), chol.astype(np.float32), 1.0, 20)
    tests = [streaks(rng) for _ in range(40)]
    defects = []
    for t in tests[20:]:
        t = t.copy()
        t[5:35, 24] += 1.0  # a vertical line of one streak sigma, across the grain
        defects.append(t)
    tests = tests[:20]

    def plain(r):  # the pixel map's view: each pixel's own squared residual
        return float((0.5 * r**2).max())

    def whitened(r):
        return float(white.unweighted(torch.from_numpy(r).float()).max())

    def separation(score):
        good, bad = [score(t) for t in tests], [score(t) for t in defects]
        return np.mean([b > g for b in bad for g in good])

    assert separation(plain) < 0.8
    assert separation(whitened) == 1.0


def test_card_round_trip_and_malformed_cards():
    rng = np.random.default_rng(1)
    mean, chol = Whitening.fit([torch.from_numpy(streaks(rng)).float()], 3)
    white = Whitening(3, mean.astype(np.float32), chol.astype(np.float32), 0.7, 1)
    back = Whitening.from_card(white.card())
    np.testing.assert_array_equal(back.mean, white.mean)
    np.testing.assert_array_equal(back.chol, white.chol)
    assert (back.window, back.weight, back.images) == (3, pytest.approx(0.7), 1)
    head = MapHead(0.0, white=white)
    card = {"anomaly_map": {**head.card(), "name": "m_map"}}
    assert MapHead.from_card(card).white.window == 3
    for bad in ({**white.card(), "window_px": 4}, {**white.card(), "weight": -1.0}, {"window_px": 3}):
        with pytest.raises(ModelError, match="whitening"):
            Whitening.from_card(bad)


def test_head_takes_the_larger_of_map_and_whitened_map_then_the_patch_maximum():
    grid = PatchGrid.for_frame(64, 80, 32, 16)
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(grid.count, 32, 32, generator=gen)
    residuals = torch.randn(grid.count, 32, 32, generator=gen)
    rng = np.random.default_rng(2)
    mean, chol = Whitening.fit([torch.from_numpy(streaks(rng, 64, 80)).float()], 3)
    white = Whitening(3, mean.astype(np.float32), chol.astype(np.float32), 0.05, 1)
    head = MapHead(0.0, white=white)
    image = torch.maximum(fold_mean(grid, maps), white.map(fold_mean(grid, residuals)))
    np.testing.assert_allclose(head.patch_scores(grid, maps, residuals=residuals).numpy(),
                               window_max(grid, image).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="signed residuals"):
        head.patch_scores(grid, maps)


@pytest.fixture(scope="module")
def whitened_model(tmp_path_factory):
    """40 good 64x64 parts, 8 held out; a tiny VAE with the defaults' whitening."""
    from edge_agent.synth import write_dataset

    root = tmp_path_factory.mktemp("white")
    write_dataset(root, n_train=40, n_calib=6, n_test_good=2, n_test_defect=2, seed=4, size=64)
    out = root / "m.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=20, whiten_window=3))
    return root, out


def test_train_fits_the_whitening_on_held_out_images_and_the_threshold_covers_it(whitened_model):
    from edge_agent.evaluation import ImageResult
    from edge_agent.images import file_hashes, list_images, read_image
    from edge_agent.scoring import Scorer

    root, model = whitened_model
    scorer = Scorer(model, device="cpu")
    card = scorer.card
    assert scorer.with_residual and scorer.fast is not None
    white = scorer.head.white
    assert white.window == 3 and white.images == card["thresholds"]["m_map"]["images"] == 8
    files = [f for f, h in zip(list_images(root / "train/good"), file_hashes(list_images(root / "train/good")))
             if h in set(card["thresholds"]["m_map"]["image_hashes"])]
    signed, map_max, white_max, full = [], [], [], []
    without = dataclasses.replace(scorer.head, white=None, low=None, place=None)
    for f in files:
        grid, patches = scorer.patches(read_image(f))
        maps, residuals, _ = scorer.maps_residuals(patches)
        signed.append(fold_mean(grid, residuals))
        map_max.append(ImageResult(f, grid, {"s": without.patch_scores(grid, maps).numpy()}, None).image_score("s"))
        white_max.append(float(white.unweighted(signed[-1]).max()))
        full.append(float(scorer.score_frame(grid, patches).max()))
    mean, chol = Whitening.fit(signed, 3)
    np.testing.assert_allclose(white.mean, mean, rtol=1e-4, atol=1e-6)
    assert white.weight == pytest.approx(np.median(map_max) / np.median(white_max), rel=1e-3)
    assert card["thresholds"]["m_map"]["value"] == pytest.approx(max(full), rel=1e-4)
    # The frozen fast path packs map and residual in one output: it scores like the module itself.
    eager = Scorer(model, device="cpu", fast=False)
    grid, patches = scorer.patches(read_image(list_images(root / "test/defect")[0]))
    np.testing.assert_allclose(scorer.score_frame(grid, patches), eager.score_frame(grid, patches), rtol=1e-3, atol=1e-3)


def test_no_whiten_and_families_without_a_residual_leave_it_out(whitened_model, tmp_path):
    root, _ = whitened_model
    out = tmp_path / "plain.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=5, whiten=False))
    assert artifact.verify(out)["anomaly_map"]["white"] is None
    gmm = tmp_path / "gmm.pt"
    fit(root / "train/good", gmm, tiny_options(model="gmm", patch_size=16, stride=8, components=2, nh=4))
    assert artifact.verify(gmm)["anomaly_map"]["white"] is None


def test_combine_refits_the_first_members_whitening_on_the_combined_scale(whitened_model, tmp_path):
    from edge_agent.combine import combine
    from edge_agent.scoring import Scorer
    from edge_agent.images import read_image, list_images

    root, first = whitened_model
    second = tmp_path / "b.pt"
    fit(root / "train/good", second, tiny_options(model="vae", patch_size=32, stride=16, steps=10, seed=1,
                                                  whiten=False))
    out = tmp_path / "pair.pt"
    card = combine([first, second], out, good=root / "calib/good", progress=False)
    assert card["anomaly_map"]["white"]["window_px"] == 3 and card["anomaly_map"]["white"]["images"] == 3
    scorer, eager = Scorer(out, device="cpu"), Scorer(out, device="cpu", fast=False)
    assert scorer.with_residual
    grid, patches = scorer.patches(read_image(list_images(root / "test/defect")[0]))
    maps, residuals, _ = eager.maps_residuals(patches)
    member_maps, member_residuals, _ = Scorer(first, device="cpu", fast=False).maps_residuals(patches)
    np.testing.assert_allclose(residuals.numpy(), member_residuals.numpy(), rtol=1e-5, atol=1e-6)
    want = MapHead(0.0, white=scorer.head.white).patch_scores(grid, maps, residuals=residuals).numpy()
    if scorer.head.low is not None:
        want = np.maximum(want, scorer.head.low.scores(maps).numpy())
    np.testing.assert_allclose(eager.score_frame(grid, patches), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scorer.score_frame(grid, patches), want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whitening_on_cuda_matches_cpu(whitened_model):
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer

    root, model = whitened_model
    # 9 patches in batches of 5: the last CUDA graph batch is padded; the output packs map and residual
    cpu, cuda = Scorer(model, device="cpu"), Scorer(model, device="cuda", precision="fp32", batch_size=5)
    assert cuda.with_residual and cuda.fast is not None
    grid, patches = cpu.patches(read_image(list_images(root / "test/defect")[0]))
    np.testing.assert_allclose(cuda.score_frame(grid, patches), cpu.score_frame(grid, patches), rtol=1e-3, atol=1e-3)


def test_bf16_whitening_keeps_the_fast_path_and_stays_near_fp32(whitened_model):
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer

    root, model = whitened_model
    fp32, bf16 = Scorer(model, device="cpu", precision="fp32"), Scorer(model, device="cpu", precision="bf16")
    assert bf16.fast is not None and bf16.with_residual
    for f in list_images(root / "test/good")[:1] + list_images(root / "test/defect")[:1]:
        a, b = fp32.score_image(read_image(f)).scores.max(), bf16.score_image(read_image(f)).scores.max()
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3


def test_an_old_artifact_without_the_residual_export_cannot_claim_whitening(whitened_model, tmp_path):
    """A card that asks for whitening from a module that cannot give a residual is one clear error."""
    from edge_agent.combine import Ensemble
    from edge_agent.scoring import Scorer

    _, model = whitened_model
    module, card = artifact.load(model)
    plain = torch.jit.script(Ensemble([module], [1.0], "m"))
    card = {**card, "family": "ensemble", "scores": {**card["scores"], "names": ["m", "m_map"], "default": "m_map"}}
    out = tmp_path / "old.pt"
    artifact.save(plain, card, out)
    with pytest.raises(ModelError, match="pixel_map_residual; retrain"):
        Scorer(out, device="cpu")


@pytest.mark.parametrize("window", ["4", "0", "17"])
def test_train_cli_rejects_a_bad_window_in_one_line(window, tmp_path, whitened_model, capsys):
    from edge_agent import cli

    root, _ = whitened_model
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(root / "train/good"), "--out", str(tmp_path / "m.pt"), "--whiten-window", window])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--whiten-window {window} must be an odd number" in err[0]
    assert not (tmp_path / "m.pt").exists()

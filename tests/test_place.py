"""The place score (anomaly_map.PlaceStats): its statistics against hand computations, the archive entry that
holds them, the check that switches it on for fixtured parts and off for textures, and the scorer, combine and
a frame of the wrong size with it."""

import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import PLACE_ENTRY, MapHead, PlaceStats
from edge_agent.errors import ModelError
from edge_agent.patches import PatchGrid
from edge_agent.train.fit import fit
from tests.conftest import tiny_options


def codes_at_places(images=40, cells=6, dims=3, seed=0, shared=False, spread=5.0):
    """(images, cells, dims) codes: each place a Gaussian of its own (or, shared, all places one Gaussian)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((cells, dims)) if shared else rng.normal(0, spread, (cells, dims))
    mix = rng.normal(0, 1, (cells, dims, dims)) * (0 if shared else 1) + np.eye(dims)
    return means + np.einsum("ncd,cde->nce", rng.normal(0, 1, (images, cells, dims)), mix)


def test_place_fit_is_each_places_mean_and_shrunk_inverse_covariance():
    z = codes_at_places()
    mean, chol = PlaceStats.fit(z, shrink=0.1)
    for c in range(z.shape[1]):
        cov = np.cov(z[:, c, :], rowvar=False)
        precision = np.linalg.inv(cov + 0.1 * np.trace(cov) / 3 * np.eye(3))
        np.testing.assert_allclose(mean[c], z[:, c].mean(0))
        np.testing.assert_allclose(chol[c] @ chol[c].T, precision, rtol=1e-9, atol=1e-12)
        assert np.allclose(chol[c], np.tril(chol[c]))


def test_place_distance_is_the_mahalanobis_distance_at_its_place():
    z = codes_at_places()
    mean, chol = PlaceStats.fit(z, shrink=0.01)
    probe = np.random.default_rng(5).normal(0, 3, (6, 3))
    for c in range(6):
        cov = np.cov(z[:, c, :], rowvar=False)
        precision = np.linalg.inv(cov + 0.01 * np.trace(cov) / 3 * np.eye(3))
        d = probe[c] - mean[c]
        assert PlaceStats.distances(probe, mean, chol)[c] == pytest.approx(np.sqrt(d @ precision @ d), rel=1e-9)
    # The torch path the scorer takes gives weight x the same distances.
    place = PlaceStats(mean.astype(np.float32), chol.astype(np.float32), 2.5, 40, 0.01, 10.0)
    got = place.scores(torch.from_numpy(probe).float())
    np.testing.assert_allclose(got.numpy(), 2.5 * PlaceStats.distances(probe, mean, chol), rtol=1e-4)


def test_gain_is_large_where_places_differ_and_not_where_they_do_not():
    codes = codes_at_places(images=250, spread=20)  # 200 to fit, 50 held-out draws of the same places
    assert PlaceStats.gain(codes[:200], codes[200:], *PlaceStats.fit(codes[:200], 0.01), 0.01) > 5
    texture = codes_at_places(images=250, shared=True)
    assert PlaceStats.gain(texture[:200], texture[200:], *PlaceStats.fit(texture[:200], 0.01), 0.01) < 1


def test_gain_by_hand_for_one_dimension():
    # Two places of one dimension: N(-3, 1) and N(+3, 1); pooled: N(0, 10). A code at its place's mean gains
    # log N(0; 0, 1) - log N(-3; 0, 10) = 0.5 log 10 + 9 / 20 nats, by the formula with the fitted Gaussians.
    z = np.array([[[-3.0 + e], [3.0 + e]] for e in (-1.0, 1.0)] * 50)  # variance 1 (n-1 weighted: 100/99)
    mean, chol = PlaceStats.fit(z, shrink=0.0)
    held = np.array([[[-3.0], [3.0]]])
    var = 100 / 99
    pooled_var = np.var(z.reshape(-1), ddof=1)
    want = 0.5 * np.log(pooled_var / var) + 9 / (2 * pooled_var)
    assert PlaceStats.gain(z, held, mean, chol, 0.0) == pytest.approx(want, rel=1e-6)


def test_place_stats_round_trip_through_the_archive_entry():
    mean, chol = PlaceStats.fit(codes_at_places(), 0.01)
    place = PlaceStats(mean.astype(np.float32), chol.astype(np.float32), 1.7, 40, 0.01, 12.5)
    back = PlaceStats.from_card(place.card(), {PLACE_ENTRY: place.blob()})
    np.testing.assert_array_equal(back.mean, place.mean)
    np.testing.assert_array_equal(back.chol, place.chol)
    assert (back.weight, back.images, back.shrink, back.gain_nats) == (1.7, 40, 0.01, 12.5)
    with pytest.raises(ModelError, match="archive entry 'place.npz'"):
        PlaceStats.from_card(place.card(), {})
    with pytest.raises(ModelError, match="unreadable"):
        PlaceStats.from_card(place.card(), {PLACE_ENTRY: b"not an npz"})


def test_head_with_a_place_takes_the_larger_of_map_and_place_score():
    grid = PatchGrid.for_frame(64, 64, 32, 16)  # 3 x 3 patches
    rng = np.random.default_rng(2)
    mean, chol = PlaceStats.fit(rng.normal(0, 1, (30, grid.count, 2)), 0.01)
    place = PlaceStats(mean.astype(np.float32), chol.astype(np.float32), 0.5, 30, 0.01, 9.0)
    maps = torch.from_numpy(rng.random((grid.count, 32, 32)).astype(np.float32))
    codes = torch.from_numpy(rng.normal(0, 4, (grid.count, 2)).astype(np.float32))
    plain = MapHead(0.0).patch_scores(grid, maps)
    got = MapHead(0.0, place=place).patch_scores(grid, maps, codes=codes)
    np.testing.assert_allclose(got.numpy(), np.maximum(plain.numpy(), place.scores(codes).numpy()), rtol=1e-6)
    assert (place.scores(codes) > plain).any() and (place.scores(codes) < plain).any()  # both sides are exercised
    with pytest.raises(ValueError, match="codes"):
        MapHead(0.0, place=place).patch_scores(grid, maps)
    with pytest.raises(ModelError, match="size the model was trained on"):
        MapHead(0.0, place=place).patch_scores(grid, maps, codes=codes[:4])


def test_extra_archive_entries_are_covered_by_the_checksum_and_kept_by_card_updates(tmp_path):
    module = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "m.pt"
    artifact.save(module, {"model_id": "x", "thresholds": {}}, path, {"place.npz": b"statistics"})
    assert artifact.load_with_extras(path)[2] == {"place.npz": b"statistics"}
    artifact.update_card(path, lambda c: {**c, "note": 1})
    _, card, extras = artifact.load_with_extras(path)
    assert card["note"] == 1 and extras == {"place.npz": b"statistics"}
    # Another entry with the same card: the checksum no longer holds.
    data = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(data, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, b"tampered!!" if info.filename.endswith("extra/place.npz") else src.read(info))
    path.write_bytes(data.getvalue())
    with pytest.raises(ModelError, match="checksum"):
        artifact.load(path)


@pytest.fixture(scope="module")
def place_models(tmp_path_factory):
    """A fixtured part and a texture, 40 good 64x64 images each (32 trained on, 8 held out), tiny VAEs (Nz 4,
    30 steps: their part's codes gain ~2 nats from the place, not the tens of a trained model; hence 1 nat)."""
    from edge_agent.synth import write_dataset

    out = {}
    for kind in ("part", "texture"):
        root = tmp_path_factory.mktemp(kind)
        write_dataset(root, n_train=40, n_calib=0, n_test_good=4, n_test_defect=4, seed=3, size=64, kind=kind)
        model = root / "m.pt"
        fit(root / "train/good", model, tiny_options(model="vae", patch_size=32, stride=16, steps=30,
                                                      min_place_images=8, place_images=24, place_min_gain=1.0))
        out[kind] = (root, model)
    return out


def test_train_keeps_the_place_score_for_a_fixtured_part_and_leaves_it_out_for_a_texture(place_models):
    _, part = place_models["part"]
    card = artifact.verify(part)
    check, place = card["anomaly_map"]["place_check"], card["anomaly_map"]["place"]
    assert check["used"] and check["gain_nats"] >= check["min_gain_nats"] and check["checked_on"] == 8
    assert place["images"] == 24 and place["cells"] == 9 and place["dims"] == 4 and place["weight"] > 0
    assert PLACE_ENTRY in artifact.load_with_extras(part)[2]
    _, texture = place_models["texture"]
    card = artifact.verify(texture)
    assert card["anomaly_map"]["place"] is None and not card["anomaly_map"]["place_check"]["used"]
    assert "texture" in card["anomaly_map"]["place_check"]["why"]
    assert PLACE_ENTRY not in artifact.load_with_extras(texture)[2]


def test_place_weight_puts_the_place_on_the_maps_scale_and_the_threshold_covers_both(place_models):
    from edge_agent.evaluation import ImageResult
    from edge_agent.images import file_hashes, list_images, read_image
    from edge_agent.scoring import Scorer

    root, model = place_models["part"]
    scorer = Scorer(model, device="cpu")
    entry = scorer.card["thresholds"]["m_map"]
    files = [f for f, h in zip(list_images(root / "train/good"), file_hashes(list_images(root / "train/good")))
             if h in set(entry["image_hashes"])]
    place = scorer.head.place
    without = dataclasses.replace(scorer.head, place=None, low=None)
    map_max, place_max, full = [], [], []
    for f in files:
        grid, patches = scorer.patches(read_image(f))
        maps, codes, residuals = scorer.pixel_maps_codes(patches)
        map_max.append(ImageResult(f, grid, {"s": without.patch_scores(grid, maps, residuals=residuals).numpy()},
                                   None).image_score("s"))
        place_max.append(float((place.scores(codes) / place.weight).max()))
        full.append(float(scorer.score_frame(grid, patches).max()))
    assert place.weight == pytest.approx(np.median(map_max) / np.median(place_max), rel=1e-3)
    assert entry["value"] == pytest.approx(max(full), rel=1e-4)


def test_scorer_with_a_place_score_equals_the_hand_pipeline_in_one_forward_pass(place_models):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = place_models["part"]
    image = make_part(99, "chip", size=64).image
    fast, eager = Scorer(model, device="cpu"), Scorer(model, device="cpu", fast=False)
    assert fast.fast is not None and fast.with_code and fast.with_residual
    grid, patches = fast.patches(image)
    module = eager.module
    with torch.no_grad():
        maps, residuals, codes = module.pixel_map_residual(patches)
        np.testing.assert_allclose(maps.numpy(), module.pixel_map(patches).numpy(), rtol=1e-6)
        np.testing.assert_allclose(codes.numpy(), module.latent_code(patches).numpy(), rtol=1e-6)
        np.testing.assert_allclose(codes.numpy(), module.pixel_map_code(patches)[1].numpy(), rtol=1e-6)
    want = fast.head.patch_scores(grid, maps, codes=codes, residuals=residuals).numpy()
    np.testing.assert_allclose(eager.score_frame(grid, patches), want, rtol=1e-5)
    np.testing.assert_allclose(fast.score_frame(grid, patches), want, rtol=1e-3, atol=1e-3)
    both = fast.score_frames([(grid, patches), (grid, patches)])
    np.testing.assert_allclose(both[1], fast.score_frame(grid, patches), rtol=1e-6)
    # A frame of another size has other places: one clear error, not a score.
    other, other_patches = fast.patches(make_part(98, None, size=96).image)
    with pytest.raises(ModelError, match="trained on"):
        fast.score_frame(other, other_patches)


def test_no_place_score_option_leaves_it_out(place_models, tmp_path):
    root, _ = place_models["part"]
    out = tmp_path / "m.pt"
    fit(root / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=5, place_score=False,
                                               min_place_images=8))
    card = artifact.verify(out)
    assert card["anomaly_map"]["place"] is None and "place_check" not in card["anomaly_map"]


def test_combine_keeps_the_first_members_place_score_on_the_combined_scale(place_models, tmp_path):
    from edge_agent.combine import combine
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    root, first = place_models["part"]
    second = tmp_path / "b.pt"
    fit(root / "train/good", second, tiny_options(model="vae", patch_size=32, stride=16, steps=10, seed=1,
                                                  place_score=False))
    out = tmp_path / "pair.pt"
    card = combine([first, second], out, progress=False)
    place = card["anomaly_map"]["place"]
    assert place is not None and place["gain_nats"] == artifact.verify(first)["anomaly_map"]["place"]["gain_nats"]
    scorer = Scorer(out, device="cpu")
    member = Scorer(first, device="cpu")
    np.testing.assert_array_equal(scorer.head.place.chol, member.head.place.chol)
    grid, patches = scorer.patches(make_part(7, "scratch", size=64).image)
    maps, codes, residuals = scorer.pixel_maps_codes(patches)
    with torch.no_grad():
        np.testing.assert_allclose(codes.numpy(), member.module.latent_code(patches).numpy(), rtol=1e-4, atol=1e-6)
    assert scorer.head.white is not None  # the first member's whitening, refitted (tests/test_whitening.py)
    want = np.maximum(MapHead(0.0, white=scorer.head.white).patch_scores(grid, maps, residuals=residuals).numpy(),
                      place["weight"] / member.head.place.weight * member.head.place.scores(codes).numpy())
    low = scorer.head.low
    if low is not None:
        want = np.maximum(want, low.scores(maps).numpy())
    np.testing.assert_allclose(scorer.score_frame(grid, patches), want, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_place_score_on_cuda_matches_cpu(place_models):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = place_models["part"]
    # 9 patches in batches of 5: the last CUDA graph batch is padded; the output packs map and code
    cpu, cuda = Scorer(model, device="cpu"), Scorer(model, device="cuda", precision="fp32", batch_size=5)
    assert cuda.with_code and cuda.fast is not None
    grid, patches = cpu.patches(make_part(5, "debris", size=64).image)
    np.testing.assert_allclose(cuda.score_frame(grid, patches), cpu.score_frame(grid, patches), rtol=1e-3, atol=1e-3)


def test_bf16_place_score_keeps_the_fast_path_and_stays_near_fp32(place_models):
    from edge_agent.scoring import Scorer
    from edge_agent.synth import make_part

    _, model = place_models["part"]
    fp32, bf16 = Scorer(model, device="cpu", precision="fp32"), Scorer(model, device="cpu", precision="bf16")
    assert bf16.fast is not None and bf16.with_code
    for seed, defect in ((5, None), (6, "chip")):
        image = make_part(seed, defect, size=64).image
        a, b = fp32.score_image(image).scores.max(), bf16.score_image(image).scores.max()
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3


def test_a_gain_under_the_minimum_leaves_the_place_score_out_and_says_how_to_change_it(place_models, tmp_path):
    root, _ = place_models["part"]
    model = tmp_path / "m.pt"
    fit(root / "train/good", model, tiny_options(model="vae", patch_size=32, stride=16, steps=30,
                                                 min_place_images=8, place_images=24, place_min_gain=1e9))
    card = artifact.verify(model)
    check = card["anomaly_map"]["place_check"]
    assert card["anomaly_map"]["place"] is None and not check["used"] and check["min_gain_nats"] == 1e9
    assert "--place-min-gain" in check["why"] and PLACE_ENTRY not in artifact.load_with_extras(model)[2]


def test_train_cli_passes_place_min_gain(monkeypatch, tmp_path, place_models):
    from edge_agent import cli
    from edge_agent.anomaly_map import PLACE_MIN_GAIN_NATS
    from edge_agent.train import fit as fit_module

    seen = []
    monkeypatch.setattr(fit_module, "fit", lambda data, out, opts: seen.append(opts) or artifact.verify(place_models["part"][1]))
    root, _ = place_models["part"]
    for extra, want in (([], None), (["--place-min-gain", "2.5"], 2.5)):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", str(root / "train/good"), "--out", str(tmp_path / "m.pt"), "-q", *extra])
        assert e.value.code in (0, None)
        assert seen[-1].place_min_gain == want
    assert PLACE_MIN_GAIN_NATS == 15.0  # the default the help text and README state

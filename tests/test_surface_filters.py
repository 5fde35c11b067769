"""Surface filters (anomaly_map.SurfaceFilters): whitened matched filters on the frame of a uniform surface.
The spectrum and the filters against hand computations, what they see that good grain does not show, the
good-only check that keeps them off fixtured parts, the card round trip, and what train writes."""

import dataclasses

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import SURFACE_SHAPES, MapHead, SurfaceFilters, _encode, surface_template
from edge_agent.errors import ModelError
from edge_agent.train.fit import fit
from tests.conftest import tiny_options


def grain(rng: np.random.Generator, h: int = 64, w: int = 64, sigma: float = 1.5) -> np.ndarray:
    """A uniform surface: Gaussian noise blurred by sigma px (FFT, periodic), unit variance, plus fine noise."""
    noise = rng.normal(0, 1, (h, w))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * np.exp(-2 * np.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))))
    return (smooth / smooth.std() + 0.3 * rng.normal(0, 1, (h, w))).astype(np.float32)


def hand_convolve(frame: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The frame (reflected by half a tile) convolved with the centred kernel, pixel by pixel."""
    t = kernel.shape[0]
    padded = np.pad(frame.astype(np.float64), ((t // 2, t - t // 2), (t // 2, t - t // 2)), mode="reflect")
    flipped = kernel[::-1, ::-1].astype(np.float64)
    h, w = frame.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            # out(u) = sum_v K(v) x(u - v), v = index - t // 2; reflect the kernel and slide it
            out[y, x] = (padded[y + 1:y + 1 + t, x + 1:x + 1 + t] * flipped).sum()
    return out


def test_the_spectrum_of_white_noise_is_its_variance_and_its_filters_are_the_shapes_without_their_mean():
    rng = np.random.default_rng(0)
    frames = [torch.from_numpy(rng.normal(0, 2.0, (64, 64)).astype(np.float32)) for _ in range(30)]
    s = SurfaceFilters.measure_spectrum(frames, 32)
    assert s.shape == (32, 32)
    assert abs(float(np.median(s)) - 4.0) < 0.3  # power per pixel = the variance
    flat = SurfaceFilters(32, np.full((32, 32), 4.0, np.float32), SURFACE_SHAPES[:3], np.ones((3, 17), np.float32),
                          {"disc": 1.0, "line": 1.0}, 1)
    for kernel, (kind, size, angle) in zip(flat.kernels(), SURFACE_SHAPES[:3]):
        t = surface_template(kind, size, angle, 32)
        np.testing.assert_allclose(kernel, (t - t.mean()) / 4.0, atol=1e-5)


def test_the_filters_response_equals_the_hand_convolution():
    rng = np.random.default_rng(1)
    frames = [torch.from_numpy(grain(rng, 40, 48)) for _ in range(6)]
    spread = np.stack([np.linspace(3.0, 2.0, 17), np.linspace(1.0, 0.5, 17)]).astype(np.float32)
    filters = SurfaceFilters(32, SurfaceFilters.measure_spectrum(frames, 32), SURFACE_SHAPES[:2], spread,
                             {"disc": 1.0, "line": 1.0}, len(frames))
    probe = grain(rng, 40, 48)
    z = filters.z(torch.from_numpy(probe)).numpy()
    yy, xx = np.mgrid[0:40, 0:48]
    edge = np.minimum(np.minimum(yy, 39 - yy), np.minimum(xx, 47 - xx)).clip(max=16)  # px to the nearest edge
    for k, kernel in enumerate(filters.kernels()):
        np.testing.assert_allclose(z[k], np.abs(hand_convolve(probe, kernel)) / spread[k][edge], rtol=1e-3, atol=1e-3)
    # the map: each group's weight x its largest |z|
    weighted = dataclasses.replace(filters, weights={"disc": 3.0, "line": 0.5})
    np.testing.assert_allclose(weighted.map(torch.from_numpy(probe)).numpy(), np.maximum(3 * z[0], 0.5 * z[1]),
                               rtol=1e-5, atol=1e-5)


def test_a_faint_stain_and_a_faint_line_stand_out_of_the_grain_better_than_pixels_do():
    rng = np.random.default_rng(2)
    goods = [torch.from_numpy(grain(rng)) for _ in range(30)]
    filters = SurfaceFilters.fit(goods[:20], [1.0] * 20)
    assert filters is not None and set(filters.weights) == {"disc", "line"}
    assert (filters.spread[:, 0] > filters.spread[:, -1]).all()  # the reflected edge's crease is discounted
    good_max = max(float(filters.map(g).max()) for g in goods[20:])
    good_pixel = max(float(g.abs().max()) for g in goods[20:])
    disc = surface_template("disc", 8, 0, 64).astype(np.float32)
    line = surface_template("line", 15, 30, 64).astype(np.float32)
    for shape in (disc, line):
        by_filter = by_pixel = 0
        for _ in range(10):
            frame = grain(rng) + 2.0 * shape  # two grain sigmas at most, as deep as the grain's own extremes
            by_filter += float(filters.map(torch.from_numpy(frame)).max()) > good_max
            by_pixel += float(np.abs(frame).max()) > good_pixel
        assert by_filter >= 8 and by_filter > by_pixel


def test_the_check_keeps_them_for_a_uniform_surface_and_says_why_not_for_a_part_with_places():
    rng = np.random.default_rng(3)
    uniform = [torch.from_numpy(grain(rng)) for _ in range(8)]
    check = SurfaceFilters.check(uniform, 8)
    assert check["used"] is True and check["gain_nats_per_window"] < check["max_gain_nats"]
    parts = []
    for _ in range(8):  # a fixtured part: a bright ring and a dark bar at the same place in every frame
        f = 0.1 * rng.normal(0, 1, (64, 64))
        yy, xx = np.mgrid[0:64, 0:64]
        f[np.abs(np.hypot(yy - 32, xx - 32) - 14) < 2] += 3.0
        f[50:56, 8:40] -= 2.0
        parts.append(torch.from_numpy(f.astype(np.float32)))
    check = SurfaceFilters.check(parts, 8)
    assert check["used"] is False and "places" in check["why"] and check["gain_nats_per_window"] >= 1.5
    assert SurfaceFilters.check(uniform[:3], 8) == {"used": False, "max_gain_nats": 1.5,
                                                   "why": "3 held-out images; the check needs >= 4"}
    assert "too small" in SurfaceFilters.check([torch.zeros(10, 40)] * 4, 8)["why"]


def test_card_round_trip_and_malformed_cards():
    rng = np.random.default_rng(4)
    goods = [torch.from_numpy(grain(rng)) for _ in range(8)]
    filters = SurfaceFilters.fit(goods, [2.0] * 8)
    head = MapHead(0.0, surface=filters)
    back = MapHead.from_card({"anomaly_map": head.card()})
    probe = torch.from_numpy(grain(rng))
    np.testing.assert_allclose(back.surface.map(probe).numpy(), filters.map(probe).numpy(), rtol=1e-6)
    assert MapHead.from_card({"anomaly_map": MapHead(0.0).card()}).surface is None  # cards from before
    good = filters.card()
    for bad in ({**good, "spread": _encode(np.ones((3, 33)))}, {**good, "weights": {"line": 1.0}},
                {**good, "shapes": [["square", 3, 0]] + good["shapes"][1:]}, {**good, "tile_px": "x"},
                {**good, "spread": _encode(-np.ones((len(SURFACE_SHAPES), 33)))}, {k: v for k, v in good.items() if k != "spectrum"}):
        with pytest.raises(ModelError, match="surface filters"):
            SurfaceFilters.from_card(bad)


@pytest.fixture(scope="module")
def texture_set(tmp_path_factory):
    from edge_agent.synth import write_dataset

    root = tmp_path_factory.mktemp("surface")
    write_dataset(root, n_train=40, n_calib=2, n_test_good=2, n_test_defect=2, seed=5, size=64, kind="texture")
    return root


def test_train_keeps_them_on_a_texture_and_the_scorer_scores_with_them(texture_set, tmp_path):
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer

    out = tmp_path / "t.pt"
    fit(texture_set / "train/good", out, tiny_options(model="vae", patch_size=32, stride=16, steps=10))
    card = artifact.verify(out)
    assert card["anomaly_map"]["surface_check"]["used"] is True
    assert card["anomaly_map"]["surface"]["shapes"][0] == ["disc", 8.0, 0.0]
    scorer = Scorer(out, device="cpu")
    assert scorer.head.surface is not None
    grid, patches = scorer.patches(read_image(list_images(texture_set / "test/defect")[0]))
    maps, codes, residuals = scorer.pixel_maps_codes(patches)
    want = scorer.head.patch_scores(grid, maps, codes=codes, residuals=residuals, patches=patches).numpy()
    np.testing.assert_allclose(scorer.score_frame(grid, patches), want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="surface filters"):
        scorer.head.patch_scores(grid, maps, codes=codes, residuals=residuals)
    # the daemon's batched path (several cameras' frames through one forward pass) scores them alike
    other = scorer.patches(read_image(list_images(texture_set / "test/good")[0]))
    both = scorer.score_frames([(grid, patches), other])
    np.testing.assert_allclose(both[0], scorer.score_frame(grid, patches), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both[1], scorer.score_frame(*other), rtol=1e-4, atol=1e-4)
    out2 = tmp_path / "off.pt"
    fit(texture_set / "train/good", out2, tiny_options(model="vae", patch_size=32, stride=16, steps=5,
                                                       surface_filters=False))
    am = artifact.verify(out2)["anomaly_map"]
    assert am["surface"] is None and "surface_check" not in am


def test_train_leaves_them_off_a_fixtured_part_and_says_why(tmp_path):
    from edge_agent.synth import write_dataset

    write_dataset(tmp_path, n_train=40, n_calib=1, n_test_good=1, n_test_defect=1, seed=4, size=64)
    fit(tmp_path / "train/good", tmp_path / "m.pt", tiny_options(model="vae", patch_size=32, stride=16, steps=5))
    am = artifact.verify(tmp_path / "m.pt")["anomaly_map"]
    assert am["surface"] is None
    assert am["surface_check"]["used"] is False and "places" in am["surface_check"]["why"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_surface_filters_on_cuda_match_cpu():
    rng = np.random.default_rng(6)
    filters = SurfaceFilters.fit([torch.from_numpy(grain(rng)) for _ in range(8)], [1.0] * 8)
    probe = torch.from_numpy(grain(rng))
    np.testing.assert_allclose(filters.map(probe.cuda()).cpu().numpy(), filters.map(probe).numpy(), rtol=1e-3, atol=1e-3)


def test_combine_refits_them_when_a_member_has_them(texture_set, tmp_path):
    from edge_agent.combine import combine
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    fit(texture_set / "train/good", a, tiny_options(model="vae", patch_size=32, stride=16, steps=5))
    fit(texture_set / "train/good", b, tiny_options(model="vae", patch_size=32, stride=16, steps=5, seed=1,
                                                    surface_filters=False, whiten=False))
    card = combine([a, b], tmp_path / "ab.pt", progress=False)  # the images both held out
    assert card["anomaly_map"]["surface_check"]["used"] is True and card["anomaly_map"]["surface"]["weights"]
    scorer = Scorer(tmp_path / "ab.pt", device="cpu")
    grid, patches = scorer.patches(read_image(list_images(texture_set / "test/defect")[0]))
    assert scorer.head.surface is not None and np.isfinite(scorer.score_frame(grid, patches)).all()
    c = tmp_path / "c.pt"
    fit(texture_set / "train/good", c, tiny_options(model="vae", patch_size=32, stride=16, steps=5, seed=2,
                                                    surface_filters=False, whiten=False))
    card = combine([b, c], tmp_path / "bc.pt", progress=False)  # neither member has them
    assert card["anomaly_map"]["surface"] is None and "surface_check" not in card["anomaly_map"]

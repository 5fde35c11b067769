"""PCA+GMM and AnoGAN: scores against hand computations and scikit-learn, the latent search, the artifact round trip."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from edge_agent import artifact
from edge_agent.cli import main
from edge_agent.scoring import Scorer
from edge_agent.train.anogan import AnoGAN
from edge_agent.train.gmm import fit_pca_gmm

pytest.importorskip("sklearn")


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def tiny_gmm():
    """PCA to 3 dims and a 2-component GMM on 16x16 crops drawn from two patch types (flat, striped)."""
    g = torch.Generator().manual_seed(0)
    flat = 0.3 + 0.05 * torch.randn(200, 1, 16, 16, generator=g)
    stripes = (torch.arange(16) % 4 < 2).float().view(1, 1, 1, 16) * 0.6 + 0.05 * torch.randn(200, 1, 16, 16, generator=g)
    module, pca, gmm, _ = fit_pca_gmm(torch.cat([flat, stripes]).clamp(0, 1), nh=3, components=2, reg_covar=1e-4, seed=0)
    x = torch.cat([flat[:5], stripes[:5], torch.rand(5, 1, 16, 16, generator=g)])
    return torch.jit.script(module), pca, gmm, x


def test_gmm_scores_match_hand_computation(tiny_gmm):
    module, pca, gmm, x = tiny_gmm
    f = (x.flatten(1).double().numpy() - pca.mean_) @ pca.components_.T
    nh = f.shape[1]
    log_joint = np.stack([np.log(w) + multivariate_normal(mu, cov).logpdf(f)
                          for w, mu, cov in zip(gmm.weights_, gmm.means_, gmm.covariances_)], axis=1)
    k = log_joint.argmax(1)
    diff = f - gmm.means_[k]
    m = np.array([0.5 * d @ np.linalg.solve(gmm.covariances_[kk], d) for d, kk in zip(diff, k)])
    a = np.array([0.5 * (nh * math.log(2 * math.pi) + np.linalg.slogdet(gmm.covariances_[kk])[1]) for kk in k])
    d = -np.log(gmm.weights_[k])
    got = {name: v.double().numpy() for name, v in module.scores(x).items()}
    np.testing.assert_allclose(got["m"], m, rtol=1e-4)
    np.testing.assert_allclose(got["a"], a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["d"], d, rtol=1e-5)
    np.testing.assert_allclose(got["nll"], -logsumexp(log_joint, axis=1), rtol=1e-4)
    # -log w_k p(f|k) = D + A + M for the MAP k, and the mixture likelihood is at least that component's.
    assert np.all(got["d"] + got["a"] + got["m"] >= got["nll"] - 1e-3)
    assert set(k) == {0, 1}, "the test data should exercise both components"


def test_gmm_nll_equals_sklearn_score_samples(tiny_gmm):
    module, pca, gmm, x = tiny_gmm
    expected = -gmm.score_samples(pca.transform(x.flatten(1).double().numpy()))
    np.testing.assert_allclose(module.score(x, "nll").double().numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(module(x).numpy(), module.score(x, "m_full").numpy())


def test_gmm_m_full_adds_the_pca_residual_over_its_variance(tiny_gmm):
    """m_full = M + 1/2 |x - x_pca|^2 / (mean discarded eigenvalue + reg_covar): probabilistic PCA's residual."""
    module, pca, _, x = tiny_gmm
    flat = x.flatten(1).double().numpy()
    residual = flat - pca.inverse_transform(pca.transform(flat))
    noise = pca.noise_variance_ + 1e-4
    expected = module.score(x, "m").double().numpy() + 0.5 * (residual ** 2).sum(1) / noise
    np.testing.assert_allclose(module.score(x, "m_full").double().numpy(), expected, rtol=1e-4)
    # Off-model patches (the uniform noise at the end) are far above good ones mostly through the residual.
    assert module.score(x, "m_full")[10:].min() > 10 * module.score(x, "m_full")[:10].max()


def test_gmm_pixel_map_is_each_pixels_share_of_m_full(tiny_gmm):
    """The map is 1/2 (V^T S_k (f - mu_k))^2 + 1/2 r^2 / noise per pixel (S_k the symmetric root of the MAP
    component's precision): it sums to m_full and is computed here by hand with numpy."""
    module, pca, gmm, x = tiny_gmm
    flat = x.flatten(1).double().numpy()
    f = pca.transform(flat)
    k = gmm.predict(f)
    noise = pca.noise_variance_ + 1e-4
    expected = []
    for fi, xi, ki in zip(f, flat, k):
        vals, vecs = np.linalg.eigh(np.linalg.inv(gmm.covariances_[ki]))
        root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
        y = root @ (fi - gmm.means_[ki])
        r = xi - (pca.mean_ + fi @ pca.components_)
        expected.append(0.5 * (y @ pca.components_) ** 2 + 0.5 * r ** 2 / noise)
    got = module.pixel_map(x).double().numpy()
    np.testing.assert_allclose(got, np.array(expected).reshape(-1, 16, 16), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got.sum((1, 2)), module.score(x, "m_full").double().numpy(), rtol=1e-3)


def test_gmm_with_every_dimension_kept_has_no_residual_term():
    g = torch.Generator().manual_seed(1)
    crops = (0.5 + 0.1 * torch.randn(600, 1, 4, 4, generator=g)).clamp(0, 1)
    module, _, _, _ = fit_pca_gmm(crops, nh=16, components=1, reg_covar=1e-4, seed=0)
    x = crops[:8]
    scores = module.scores(x)
    torch.testing.assert_close(scores["m_full"], scores["m"])
    torch.testing.assert_close(module.pixel_map(x).sum((1, 2)), scores["m"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_anogan():
    torch.manual_seed(0)
    model = AnoGAN(channels=1, patch_size=16, nc=4, nz=4, gamma_steps=5, refine_steps=2, lam=0.1, search_lr=0.05)
    return model.eval(), torch.jit.script(model)


def test_latent_search_lowers_its_loss(tiny_anogan):
    model, scripted = tiny_anogan
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fx = model.discriminator.features(x)
        z0 = model.random_start(8)
        z = scripted.search(x, z0, 30)
        before, after = model.anomaly(x, fx, z0), model.anomaly(x, fx, z)
        assert torch.is_grad_enabled() is False, "the search must restore the caller's grad mode"
        assert torch.all(after < before), (before, after)
        # The "search" score is this search with the card's Gamma from the same fixed start.
        z_gamma = scripted.search(x, z0, scripted.gamma_steps)
        torch.testing.assert_close(scripted.score(x, "search"), model.anomaly(x, fx, z_gamma))


def test_latent_search_cannot_run_in_inference_mode(tiny_anogan):
    """Why the card carries scores.needs_grad: the scorer must use no_grad for this family."""
    _, scripted = tiny_anogan
    with torch.inference_mode(), pytest.raises((RuntimeError, torch.jit.Error), match="needs autograd"):
        scripted.score(torch.rand(2, 1, 16, 16), "encoder_refine")


def test_anogan_scores_are_consistent(tiny_anogan):
    _, scripted = tiny_anogan
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        all_scores = scripted.scores(x)
        assert set(all_scores) == {"encoder", "encoder_refine", "search"}
        for name, v in all_scores.items():
            torch.testing.assert_close(scripted.score(x, name), v)
        assert scripted.pixel_map(x).shape == (6, 16, 16)


@pytest.mark.parametrize("family,options,default,architecture", [
    ("gmm", ["--nh", "8", "--components", "3", "--reg-covar", "1e-3", "--crops-per-image", "50"], "m_full_map",
     {"nh": 8, "components": 3, "reg_covar": 1e-3}),
    ("anogan", ["--nc", "4", "--nz", "4", "--batch-size", "16", "--max-minutes", "0.005", "--gamma-steps", "3",
                "--refine-steps", "2", "--lambda", "0.25", "--threshold-images", "4"], "encoder_refine_map",
     {"gamma_steps": 3, "refine_steps": 2, "lambda": 0.25, "latent_search": "encoder+refine"}),
])
def test_family_trains_exports_and_scores_through_the_cli(capsys, station, tmp_path, family, options, default,
                                                          architecture):
    out = tmp_path / f"{family}.pt"
    code, _, err = run(capsys, "train", station / "train/good", "--out", out, "--model", family, "--stride", "16",
                       "--device", "cpu", "-q", *options)
    assert code == 0, err
    card = artifact.verify(out)
    assert card["family"] == family
    assert card["scores"]["default"] == default and card["scores"]["precision"] == "fp32"
    assert card["scores"]["needs_grad"] is (family == "anogan")
    assert architecture.items() <= card["architecture"].items()
    assert set(card["thresholds"]) == set(card["scores"]["names"])
    assert card["thresholds"][default]["images"] == (4 if family == "anogan" else 8)

    scorer = Scorer(out, device="cpu", precision="bf16", warmup=False)
    assert scorer.dtype == torch.float32, "the card's fp32 must win over a bf16 request"
    grid, patches = scorer.patches(np.full((128, 128), 128, np.uint8))
    assert scorer.score_frame(grid, patches).shape == (grid.count,)

    code, stdout, err = run(capsys, "score", out, station / "test/defect", "--json", "--device", "cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert r["score_name"] == default and math.isfinite(r["score"])
        assert r["anomalous"] == (r["score"] > r["threshold"])


def test_bad_family_options_are_one_line_errors(capsys, station, tmp_path):
    code, _, err = run(capsys, "train", station / "train/good", "--out", tmp_path / "a.pt", "--model", "anogan",
                       "--latent-search", "genetic")
    assert code != 0 and "Traceback" not in err and "--latent-search 'genetic'" in err
    code, _, err = run(capsys, "train", station / "train/good", "--out", tmp_path / "g.pt", "--model", "gmm",
                       "--nh", "5000", "-q")
    assert code != 0 and "Traceback" not in err and "--nh 5000" in err
    code, _, err = run(capsys, "train", station / "train/good", "--out", tmp_path / "g0.pt", "--model", "gmm",
                       "--nh", "0", "-q")
    assert code != 0 and "Traceback" not in err and "internal error" not in err and "--nh" in err


def test_gmm_default_nh_keeps_every_pixel_up_to_256_and_never_more_than_the_crops(capsys, station, tmp_path):
    """Without --nh a 16x16 patch keeps all 256 dims (no residual: m_full = m); 2 crops per image on 8 images
    allow only 16 dims, and the card says what was used and the residual's variance (never below reg_covar)."""
    full = tmp_path / "full.pt"
    code, _, err = run(capsys, "train", station / "train/good", "--out", full, "--model", "gmm", "--patch-size", "16",
                       "--stride", "16", "--components", "1", "--crops-per-image", "50", "-q")
    assert code == 0, err
    card = artifact.verify(full)
    assert card["architecture"]["nh"] == 256 and card["training"]["pca_residual_variance"] == 0.0
    few = tmp_path / "few.pt"
    code, _, err = run(capsys, "train", station / "train/good", "--out", few, "--model", "gmm", "--patch-size", "16",
                       "--stride", "16", "--components", "1", "--crops-per-image", "2", "-q")
    assert code == 0, err
    card = artifact.verify(few)
    assert card["architecture"]["nh"] == 16 and card["training"]["pca_residual_variance"] >= 1e-4  # reg_covar floor
    assert card["scores"]["default"] == "m_full_map"


def test_gmm_colour_pixel_map_sums_the_channels_to_m_full():
    """BGR patches: the map is (N, P, P), each pixel the sum of its three channels' shares of m_full."""
    g = torch.Generator().manual_seed(2)
    crops = (0.5 + 0.1 * torch.randn(800, 3, 8, 8, generator=g)).clamp(0, 1)
    module, _, _, _ = fit_pca_gmm(crops, nh=40, components=2, reg_covar=1e-4, seed=0)
    scripted = torch.jit.script(module)
    x = torch.cat([crops[:4], torch.rand(2, 3, 8, 8, generator=g)])
    pixel_map = scripted.pixel_map(x)
    assert pixel_map.shape == (6, 8, 8) and bool((pixel_map >= 0).all())
    torch.testing.assert_close(pixel_map.sum((1, 2)), scripted.score(x, "m_full"), rtol=1e-4, atol=1e-3)


def test_texture_loss_flags_a_smeared_spot_and_can_be_turned_off(capsys, tmp_path):
    """A gmm on a grain texture: blurring a disc away makes its patches explain better than any good patch; the
    default map score flags it there (anomaly_map.LowSide), --no-texture-loss leaves no low side in the card."""
    import cv2

    from edge_agent.synth import write_dataset

    write_dataset(tmp_path / "d", n_train=60, n_calib=0, n_test_good=1, n_test_defect=0, seed=5, size=64,
                  kind="texture")
    out = tmp_path / "t.pt"
    code, _, err = run(capsys, "train", tmp_path / "d/train/good", "--out", out, "--model", "gmm", "--patch-size", 16,
                       "--stride", 8, "-q")
    assert code == 0, err
    card = artifact.verify(out)
    assert card["scores"]["default"] == "m_full_map" and card["anomaly_map"]["low"]["images"] == 12
    good = cv2.imread(str(tmp_path / "d/test/good/0000.png"))
    smeared = good.copy()
    disc = np.zeros(good.shape[:2], np.uint8)
    cv2.circle(disc, (40, 24), 12, 1, -1)
    smeared[disc > 0] = cv2.GaussianBlur(good, (0, 0), 4)[disc > 0]
    scorer = Scorer(out, device="cpu")
    threshold = card["thresholds"]["m_full_map"]["value"]
    grid, patches = scorer.patches(smeared)
    scores = scorer.score_frame(grid, patches)
    assert scores.max() > threshold
    x, y, w, h = grid.box(int(scores.argmax()))
    assert x <= 40 < x + w and y <= 24 < y + h, "the flagged patch is not the smeared one"
    grid, patches = scorer.patches(good)
    assert scorer.score_frame(grid, patches).max() < scores.max()
    off = tmp_path / "off.pt"
    code, _, err = run(capsys, "train", tmp_path / "d/train/good", "--out", off, "--model", "gmm", "--patch-size", 16,
                       "--stride", 8, "--no-texture-loss", "-q")
    assert code == 0, err
    assert artifact.verify(off)["anomaly_map"]["low"] is None

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.errors import DataError
from edge_agent.train.fit import CropSampler, fit, loss_fn
from edge_agent.train.nets import VAE
from tests.conftest import tiny_options


def test_card_holds_everything_needed_to_score(vae_model, station):
    card = artifact.verify(vae_model)
    assert card["family"] == "vae" and card["scores"]["default"] == "m_map"  # the anomaly map over m's pixel map
    assert card["patch"] == {"size": 32, "stride": 16, "cover_edges": True}
    assert card["input"]["channels"] == 1 and card["input"]["frame_width"] == 128
    assert set(card["thresholds"]) == {"m", "elbo", "d", "a", "m_map"}
    assert card["anomaly_map"]["name"] == "m_map" and card["anomaly_map"]["position"] is None  # none held out
    assert card["anomaly_map"]["blur_sigma_px"] == 0.0  # the default: a blur buries 1-px scratches (RESULTS.md)
    t = card["training"]
    assert t["images"] == 8 and t["steps"] > 0 and np.isfinite(t["final_loss"])
    assert t["data_fingerprint"].startswith("sha256:") and len(t["image_hashes"]) == 8
    assert card["versions"]["torch"] == torch.__version__


def test_untrained_threshold_is_max_over_training_images(vae_model, station):
    from edge_agent.evaluation import score_files
    from edge_agent.images import list_images
    from edge_agent.scoring import Scorer

    scorer = Scorer(vae_model, device="cpu")
    results = score_files(scorer, list_images(station / "train/good"), progress=False)
    entry = scorer.card["thresholds"]["m"]
    assert entry["method"] == "max-train"
    assert entry["value"] == pytest.approx(max(r.image_score("m") for r in results), rel=1e-6)


def test_same_seed_same_weights(station, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for out in (a, b):
        fit(station / "train/good", out, tiny_options(model="ae"))
    wa, wb = artifact.load(a)[0].state_dict(), artifact.load(b)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_budget_stops_training(station, tmp_path):
    card = fit(station / "train/good", tmp_path / "m.pt", tiny_options(model="ae", epochs=1000, max_minutes=0.02))
    assert card["training"]["stopped_by"] == "time budget"


def test_crop_sampler_crops_come_from_images():
    imgs = [torch.arange(2 * 40 * 50, dtype=torch.float32).reshape(2, 40, 50) for _ in range(3)]
    crops = CropSampler(imgs, 16, seed=0).sample(20)
    assert crops.shape == (20, 2, 16, 16)
    for c in crops:  # every crop is a contiguous window: values step by 1 along x and 50 along y
        assert torch.all(c[:, :, 1:] - c[:, :, :-1] == 1) and torch.all(c[:, 1:, :] - c[:, :-1, :] == 50)


def test_deferred_loss_reads_train_the_same_model_and_still_stop_divergence(station, tmp_path, monkeypatch):
    # On a GPU the loop reads its loss every LOSS_READ_EVERY steps (no host wait per step); forced here on CPU.
    from edge_agent.train import fit as fit_module

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    fit(station / "train/good", a, tiny_options(model="ae", epochs=3))
    monkeypatch.setattr(fit_module, "loss_read_every", lambda device: 4)
    card = fit(station / "train/good", b, tiny_options(model="ae", epochs=3))
    wa, wb = artifact.load(a)[0].state_dict(), artifact.load(b)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert card["training"]["final_loss"] == artifact.verify(a)["training"]["final_loss"]  # every loss was read
    assert card["training"]["steps"] % 4 != 0  # the last, partial group of losses was read too
    with pytest.raises(DataError, match=r"training diverged at step \d+ \(loss (nan|inf)"):
        fit(station / "train/good", tmp_path / "c.pt", tiny_options(model="ae", epochs=3, lr=1e30))


def test_crop_sampler_stays_on_the_host_when_the_gpu_is_short_of_memory(monkeypatch, caplog):
    imgs = [torch.rand(1, 40, 50) for _ in range(3)]
    sampler = CropSampler(imgs, 16, seed=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10**9))  # 1 kB free
    with caplog.at_level("INFO", logger="edge_agent.train.fit"):
        sampler.to(torch.device("cuda"))
    assert sampler.images.device.type == "cpu" and "stay in host memory" in caplog.text
    assert sampler.to(torch.device("cpu")).images.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crop_sampler_on_the_gpu_cuts_the_cpu_crops():
    imgs = [torch.rand(1, 40, 50) for _ in range(3)]
    on_cpu = CropSampler(imgs, 16, seed=3)
    on_gpu = CropSampler(imgs, 16, seed=3).to(torch.device("cuda"))
    assert on_gpu.images.is_cuda
    for _ in range(3):
        got = on_gpu.sample(8)
        assert got.is_cuda and torch.equal(got.cpu(), on_cpu.sample(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_the_gpu_reads_every_loss_and_scores_on_the_cpu(station, tmp_path):
    from edge_agent.scoring import Scorer
    from edge_agent.train.fit import LOSS_READ_EVERY

    card = fit(station / "train/good", tmp_path / "g.pt", tiny_options(model="vae", device="cuda", epochs=3))
    t = card["training"]
    assert t["device"].startswith("cuda") and t["steps"] > LOSS_READ_EVERY and np.isfinite(t["final_loss"])
    scores = Scorer(tmp_path / "g.pt", device="cpu", score_name="m").score_patches(torch.rand(4, 1, 32, 32))
    assert torch.isfinite(torch.as_tensor(scores)).all()


def test_empty_and_unreadable_data(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        fit(tmp_path / "empty", tmp_path / "m.pt", tiny_options())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        fit(bad, tmp_path / "m.pt", tiny_options())


def test_beta_nll_loss_against_a_hand_computation():
    """beta 0 is the seed's negative ELBO; beta 0.5 weights each pixel's Gaussian NLL by sigma_x (detached),
    normalised to mean 1, and moves the gradient on mu_x from (mu - x) / sigma^2 to (mu - x) / sigma."""
    torch.manual_seed(0)
    model = VAE(1, 16, nc=4, nz=3).train()
    x = torch.rand(5, 1, 16, 16)

    def hand(beta):
        torch.manual_seed(1)
        mu_z, logvar_z = model.encode(x)
        z = mu_z + torch.randn_like(mu_z) * torch.exp(0.5 * logvar_z)
        mu_x, sigma_x = model.decode(z)
        d = 0.5 * (-logvar_z - 1 + logvar_z.exp() + mu_z**2).sum(1)
        nll = torch.log(sigma_x) + 0.5 * np.log(2 * np.pi) + 0.5 * ((mu_x - x) / sigma_x) ** 2
        w = sigma_x.detach() ** (2 * beta)
        return (d + (w / w.mean() * nll).flatten(1).sum(1)).mean(), mu_x, sigma_x

    for beta in (0.0, 0.5, 1.0):
        torch.manual_seed(1)
        got = loss_fn(model, x, beta_nll=beta)
        want, _, _ = hand(beta)
        assert torch.allclose(got, want, rtol=1e-5), beta
    # the gradient reaching the decoder's mean: d loss / d mu_x per pixel
    loss, mu_x2, sigma_x2 = hand(0.5)
    mu_x2.retain_grad()
    loss.backward()
    w = sigma_x2.detach() / sigma_x2.detach().mean()
    expected = w * (mu_x2.detach() - x) / sigma_x2.detach() ** 2 / x.shape[0]
    assert torch.allclose(mu_x2.grad, expected, rtol=1e-4, atol=1e-7)


def test_conv_latent_card_round_trip_and_scoring(station, tmp_path):
    """A --latent conv model is one more TorchScript file: its card says the code's shape, and the scorer
    (the daemon's) runs it like any other, with the same scores from the file as from the trained module."""
    from edge_agent.evaluation import score_files
    from edge_agent.images import list_images
    from edge_agent.scoring import Scorer

    out = tmp_path / "conv.pt"
    card = fit(station / "train/good", out, tiny_options(model="vae", latent="conv", nz=2))
    assert card["architecture"]["latent"] == {"kind": "conv", "channels": 2, "cells": "4x4", "size": 32,
                                              "head": "3x3 conv (encoder and decoder)"}
    assert artifact.verify(out)["architecture"] == card["architecture"]
    module, _ = artifact.load(out)
    assert module.encode(torch.rand(3, 1, 32, 32))[0].shape == (3, 32)
    scorer = Scorer(out, device="cpu")
    results = score_files(scorer, list_images(station / "test/defect")[:2], progress=False)
    assert all(np.isfinite(r.image_score("m_map")) and r.image_score("m_map") > 0 for r in results)

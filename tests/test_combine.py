"""`edge-agent combine`: the combined map against a hand computation, the card round trip, the scorer (the
daemon's) running it like any model, the default hold-out, and every error path as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent import artifact
from edge_agent.anomaly_map import fold_mean, window_max
from edge_agent.calibrate import frr_rank
from edge_agent.cli import main
from edge_agent.combine import Ensemble
from edge_agent.images import file_hashes, list_images, read_image
from edge_agent.scoring import Scorer
from edge_agent.train.fit import fit
from tests.conftest import tiny_options
from tests.test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def conv_model(station, tmp_path_factory):
    out = tmp_path_factory.mktemp("combine") / "conv.pt"
    fit(station / "train/good", out, tiny_options(model="vae", latent="conv", nz=2, seed=3))
    return out


def _frame_maps(path, image):
    """(grid, patches, (N, P, P) pixel map) of one image through one model file, computed outside the scorer."""
    module, card = artifact.load(path)
    scorer = Scorer(path, device="cpu", threshold=0.0, warmup=False, fast=False)
    grid, patches = scorer.patches(image)
    with torch.inference_mode():
        return grid, patches, module.pixel_map(patches).float()


def test_ensemble_module_is_the_pixelwise_max_of_scaled_maps(vae_model, conv_model):
    a, _ = artifact.load(vae_model)
    b, _ = artifact.load(conv_model)
    module = torch.jit.script(Ensemble([a, b], [0.5, 3.0], "m"))
    x = torch.rand(5, 1, 32, 32)
    with torch.inference_mode():
        pa, pb = a.pixel_map(x), b.pixel_map(x)
        got = module.pixel_map(x)
        want = torch.where(0.5 * pa >= 3.0 * pb, 0.5 * pa, 3.0 * pb)
        assert torch.allclose(got, want)
        assert ((got == 0.5 * pa) | (got == 3.0 * pb)).all()  # each pixel is one member's, not a blend
        assert torch.allclose(module.score(x, "m"), want.flatten(1).sum(1))
        assert torch.allclose(module.scores(x)["m"], want.flatten(1).sum(1))


@pytest.fixture(scope="module")
def combined(station, vae_model, conv_model, tmp_path_factory):
    """The two tiny models combined by the real CLI, its good images from the station's calibration set."""
    out = tmp_path_factory.mktemp("combined") / "both.pt"
    with pytest.raises(SystemExit) as e:
        main(["combine", str(vae_model), str(conv_model), "--good", str(station / "calib/good"), "--out", str(out)])
    assert e.value.code == 0
    return out


def test_combine_writes_an_artifact_the_scorer_runs_like_any_model(combined, station, vae_model, conv_model):
    out = combined
    good = station / "calib/good"
    card = artifact.verify(out)
    files = list_images(good)
    scale_files, threshold_files = files[0::2], files[1::2]
    # The scales by hand: 1 / median over the scale images of each member's image maximum of its fold-mean map.
    scales = []
    for path in (vae_model, conv_model):
        maxima = []
        for f in scale_files:
            grid, _, pixel = _frame_maps(path, read_image(f))
            maxima.append(float(window_max(grid, fold_mean(grid, pixel)).max()))
        scales.append(1.0 / float(np.median(maxima)))
    members = card["architecture"]["members"]
    assert [m["file"] for m in members] == ["vae.pt", "conv.pt"]
    assert np.allclose([m["scale"] for m in members], scales, rtol=1e-5)
    assert members[1]["architecture"]["latent"]["kind"] == "conv"
    assert members[0]["checksum"] == artifact.verify(vae_model)["checksum"]
    assert card["family"] == "ensemble" and card["scores"]["default"] == "m_map"
    assert card["scores"]["names"] == ["m", "m_map"]
    # Images any member was fitted on and the scale images are fitted; the threshold images are not.
    fitted = set(card["training"]["image_hashes"])
    assert set(file_hashes(scale_files)) <= fitted
    assert set(artifact.verify(vae_model)["training"]["image_hashes"]) <= fitted
    assert not set(file_hashes(threshold_files)) & fitted

    # The scorer's patch scores equal the hand computation from the members' files.
    image = read_image(station / "test/defect" / sorted(p.name for p in (station / "test/defect").iterdir())[0])
    maps = []
    for path, s in zip((vae_model, conv_model), scales):
        grid, patches, pixel = _frame_maps(path, image)
        maps.append(s * pixel)
    want = window_max(grid, fold_mean(grid, torch.maximum(*maps))).numpy()
    for fast in (False, True):
        scorer = Scorer(out, device="cpu", fast=fast)
        got = scorer.score_frame(grid, patches)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6)
    raw = Scorer(out, device="cpu", score_name="m").score_frame(grid, patches)
    assert np.allclose(raw, torch.maximum(*maps).flatten(1).sum(1).numpy(), rtol=1e-4)

    # The threshold: the FRR method over the threshold images' image scores (too few here: their maximum).
    entry = card["thresholds"]["m_map"]
    scorer = Scorer(out, device="cpu")
    top = sorted((float(scorer.score_image(read_image(f)).scores.max()) for f in threshold_files), reverse=True)
    assert entry["n_good"] == len(threshold_files) and entry["method"] == "frr"
    assert entry["value"] == pytest.approx(top[(frr_rank(len(top), 0.01, 0.95) or 1) - 1], rel=1e-4)
    assert scorer.threshold == pytest.approx(entry["value"])
    # The low side (texture loss) fitted on the same images, as train does for one model.
    low, plain = card["anomaly_map"]["low"], Scorer(out, device="cpu", fast=False)
    sums = [float(Scorer(out, device="cpu", score_name="m").score_image(read_image(f)).scores.min())
            for f in threshold_files]
    image_scores = []
    for f in threshold_files:
        grid, patches = plain.patches(read_image(f))
        image_scores.append(float(window_max(grid, fold_mean(grid, plain.pixel_maps(patches))).max()))
    assert low["images"] == len(threshold_files)
    assert low["reference"] == pytest.approx(min(sums), rel=1e-4)
    assert low["weight"] == pytest.approx(float(np.median(image_scores)), rel=1e-4)


def test_combined_model_in_bf16_keeps_each_members_output_layer_float32(combined, station):
    out = combined
    scorer = Scorer(out, device="cpu", precision="bf16", warmup=False, fast=False)
    for member in scorer.module.members.children():
        dtypes = [p.dtype for p in member.parameters()]
        assert dtypes[-1] == torch.float32 and dtypes[-1] != dtypes[0] == torch.bfloat16
    ref = Scorer(out, device="cpu", warmup=False, fast=False)
    grid, patches = ref.patches(read_image(list_images(station / "test/good")[0]))
    assert np.allclose(scorer.score_frame(grid, patches), ref.score_frame(grid, patches), rtol=0.1)


def test_combine_defaults_to_the_images_every_member_held_out(capsys, tmp_path, monkeypatch):
    from edge_agent.synth import write_dataset

    data = tmp_path / "data"
    write_dataset(data, n_train=40, n_calib=0, n_test_good=0, n_test_defect=0, seed=2)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    monkeypatch.chdir(tmp_path)  # trained on a relative folder ...
    fit(Path("data/train/good"), a, tiny_options(model="vae"))
    fit(Path("data/train/good"), b, tiny_options(model="vae", seed=1))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # ... and combined from another directory: the card's path is absolute
    assert artifact.verify(a)["training"]["data_dir"] == str((data / "train/good").resolve())
    held = artifact.verify(a)["training"]["holdout"]["image_hashes"]
    assert len(held) == 8
    code, _, err = run(capsys, "combine", a, b, "--out", tmp_path / "ab.pt", "-q")
    assert code == 0, err
    assert "2 models combined (a.pt x " in err and "threshold m_map" in err
    card = artifact.verify(tmp_path / "ab.pt")
    assert card["training"]["images"] == 4 and card["thresholds"]["m_map"]["n_good"] == 4
    scale_and_threshold = set(card["training"]["holdout"]["image_hashes"]) | (set(card["training"]["image_hashes"])
                                                                             & set(held))
    assert scale_and_threshold == set(held)
    code, out, _ = run(capsys, "info", tmp_path / "ab.pt")
    assert json.loads(out)["architecture"]["members"][1]["file"] == "b.pt"


def test_combine_errors_are_one_line(capsys, tmp_path, station, vae_model, conv_model):
    other = tmp_path / "s8.pt"
    fit(station / "train/good", other, tiny_options(model="vae", stride=8))
    plain = tmp_path / "plain.pt"
    fit(station / "train/good", plain, tiny_options(model="vae", anomaly_map=False))
    good = station / "calib/good"
    cases = [
        ((vae_model, "--good", good), ["two or more models"]),
        ((vae_model, vae_model, "--good", good), ["named twice"]),
        ((vae_model, other, "--good", good), ["S=8", "same --patch-size"]),
        ((vae_model, plain, "--good", good), ["plain.pt", "no anomaly map"]),
        ((vae_model, tmp_path / "missing.pt", "--good", good), ["missing.pt", "not found"]),
        ((vae_model, conv_model), ["held-out", "--good DIR"]),  # 8 training images: none held out
        ((vae_model, conv_model, "--good", tmp_path), ["--good"]),  # no images there
        ((vae_model, conv_model, "--good", station / "train/good"), ["was used to train", "vae.pt"]),
        ((vae_model, conv_model, "--good", good, "--scale-images", 0), ["--scale-images 0"]),
        ((vae_model, conv_model, "--good", good, "--target-frr", 2), ["--target-frr"]),
    ]
    for args, needles in cases:
        code, _, err = run(capsys, "combine", *args, "--out", tmp_path / "e.pt", "-q")
        assert_one_line_error(code, err, *needles)
    code, _, err = run(capsys, "combine", vae_model, conv_model, "--good", good, "--out", conv_model, "-q")
    assert_one_line_error(code, err, "is one of the models")
    assert not (tmp_path / "e.pt").exists()

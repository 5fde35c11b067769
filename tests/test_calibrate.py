import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent import artifact, calibrate
from edge_agent.calibrate import (apply, binom_cdf, choose, frr_rank, frr_upper_bound, min_good_images,
                                  target_recall_threshold, youden_threshold)
from edge_agent.cli import main
from edge_agent.errors import ConfigError
from edge_agent.scoring import Scorer

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def model(vae_model, tmp_path) -> Path:
    path = tmp_path / "vae.pt"
    shutil.copy(vae_model, path)
    return path


# --- the math -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, confidence, n_min", [(0.01, 0.95, 299), (0.01, 0.99, 459), (0.05, 0.95, 59),
                                                     (0.1, 0.9, 22), (0.5, 0.75, 2)])
def test_min_good_images(rate, confidence, n_min):
    assert min_good_images(rate, confidence) == n_min
    assert (1 - rate) ** n_min <= 1 - confidence < (1 - rate) ** (n_min - 1)


@pytest.mark.parametrize("n, k", [(100, 0), (298, 0), (299, 1), (473, 2), (1000, 5), (5000, 39)])
def test_frr_rank_is_the_largest_safe_order_statistic(n, k):
    from scipy.stats import binom

    assert frr_rank(n, 0.01, 0.95) == k
    if k:
        assert binom.cdf(k - 1, n, 0.01) <= 0.05
    assert binom.cdf(k, n, 0.01) > 0.05


def test_binom_cdf_and_clopper_pearson_match_scipy():
    from scipy.stats import beta, binom

    for x, n, p in [(0, 10, 0.5), (4, 1000, 0.01), (39, 5000, 0.01), (3000, 10000, 0.3)]:
        assert binom_cdf(x, n, p) == pytest.approx(binom.cdf(x, n, p), rel=1e-9)
    assert frr_upper_bound(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert frr_upper_bound(4, 1000, 0.95) == pytest.approx(beta.ppf(0.95, 5, 996), rel=1e-7)
    assert frr_upper_bound(5, 5, 0.95) == 1.0


def test_frr_method_picks_the_kth_largest_score():
    scores = np.arange(1000, dtype=np.float64)  # 0..999, all distinct
    e = choose(scores, method="frr", target_frr=0.01, confidence=0.95)
    assert e["k"] == 5 and e["value"] == 995.0  # the 5th largest: 4 scores above it
    assert e["good_over_threshold"] == 4 and e["observed_frr"] == 0.004
    assert e["frr_upper_bound"] <= 0.01 and e["enough_good_images"]
    assert e["confidence_for_target_frr"] >= 0.95


@pytest.mark.parametrize("k,rate,confidence,want", [(1, 0.01, 0.95, 299), (2, 0.01, 0.95, 473), (3, 0.01, 0.95, 628),
                                                     (2, 0.05, 0.95, 93)])
def test_images_for_rank_is_the_fewest_that_allow_that_rank(k, rate, confidence, want):
    n = calibrate.images_for_rank(k, rate, confidence)
    assert n == want and calibrate.frr_rank(n, rate, confidence) >= k > calibrate.frr_rank(n - 1, rate, confidence)
    entry = calibrate.choose(np.arange(float(n)), target_frr=rate, confidence=confidence)
    assert entry["k"] == k and entry["n_for_next_rank"] == calibrate.images_for_rank(k + 1, rate, confidence)


def test_exactly_n_min_images_give_the_max():
    e = choose(np.linspace(0.0, 1.0, 299), target_frr=0.01, confidence=0.95)
    assert e["k"] == 1 and e["value"] == 1.0 and e["enough_good_images"]
    assert e["frr_upper_bound"] <= 0.01


def test_too_few_images_fall_back_to_the_max_and_say_what_it_achieves():
    e = choose(np.linspace(0.0, 1.0, 100), target_frr=0.01, confidence=0.95)
    assert e["k"] == 1 and e["value"] == 1.0 and not e["enough_good_images"] and e["n_min_for_target"] == 299
    assert e["frr_upper_bound"] == pytest.approx(1 - 0.05 ** 0.01)  # 0.0295
    assert e["confidence_for_target_frr"] == pytest.approx(1 - 0.99 ** 100)  # 0.634


def test_max_train_is_the_maximum():
    e = choose([0.25, 0.75, 0.5], method="max-train")
    assert e["value"] == 0.75 and e["k"] == 1 and e["good_over_threshold"] == 0


# good 0.125..0.5, defects mostly above; candidates are midway between neighbouring scores.
GOOD = [0.125, 0.25, 0.375, 0.5]
DEFECT = [0.4375, 0.625, 0.75, 0.875]


def test_f1_on_a_crafted_list():
    # t = 0.40625 catches all 4 defects with 1 false reject: F1 = 8/9, better than 6/7 at t = 0.5625.
    e = choose(GOOD, DEFECT, method="f1")
    assert e["value"] == 0.40625 and e["f1"] == pytest.approx(8 / 9)
    assert e["recall"] == 1.0 and e["miss_rate"] == 0.0 and e["precision"] == 0.8 and e["observed_frr"] == 0.25


def test_youden_differs_from_f1_when_defects_are_rare():
    good = [0.125, 0.25, 0.375, 0.5, 0.5625, 0.625]
    defect = [0.4375, 0.75]
    # J: t=0.40625 -> 1 - 3/6 = 0.5; t=0.6875 -> 0.5 - 0 = 0.5; t=0.3125 -> 1 - 4/6. Ties go to the lower t.
    assert youden_threshold(np.array(good), np.array(defect)) == 0.40625
    e = choose(good, defect, method="f1")
    assert e["value"] == 0.6875  # F1: 2/3 at 0.6875 vs 4/7 at 0.40625


@pytest.mark.parametrize("recall, threshold", [(1.0, 0.40625), (0.75, 0.5625), (0.5, 0.6875), (0.25, 0.8125)])
def test_target_recall_is_the_highest_threshold_that_reaches_it(recall, threshold):
    assert target_recall_threshold(np.array(GOOD), np.array(DEFECT), recall) == threshold
    e = choose(GOOD, DEFECT, method="target-recall", target_recall=recall)
    assert e["recall"] >= recall and e["value"] == threshold


@pytest.mark.parametrize("kw", [dict(target_frr=1.5), dict(target_frr=-0.1), dict(target_frr=0.0),
                                dict(confidence=1.0), dict(method="nope"), dict(method="f1"),
                                dict(method="target-recall")])
def test_bad_arguments_are_config_errors(kw):
    with pytest.raises(ConfigError):
        choose([0.5, 0.25], **kw)


def test_apply_keeps_history():
    card = {"thresholds": {"M": {"value": 1.0, "method": "max-train"}}}
    card = apply(card, "M", {"value": 2.0, "method": "frr"}, None, "t1")
    card = apply(card, "M", {"value": 3.0, "method": "frr"}, None, "t2")
    assert card["thresholds"]["M"]["value"] == 3.0
    assert [(h["value"], h["replaced_at"], h["score"]) for h in card["calibration_history"]] == [
        (1.0, "t1", "M"), (2.0, "t2", "M")]


# --- the command ------------------------------------------------------------------------------------------------


def test_calibrate_writes_card_and_history(capsys, model, station, tmp_path):
    before = artifact.verify(model)
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "-q", "--device", "cpu")
    assert rc == 0, err
    assert "fewer than the 299 needed" in err and err.startswith("edge-agent: warning:")
    card = artifact.verify(model)
    name = card["scores"]["default"]
    entry = card["thresholds"][name]
    assert entry["method"] == "frr" and entry["k"] == 1 and entry["n_good"] == 6 and entry["target_frr"] == 0.01
    assert entry["value"] == entry["good_image_scores"]["max"]
    assert len(entry["image_hashes"]) == 6 and entry["frr_upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 6))
    assert card["calibration_history"] == [{"score": name, "replaced_at": entry["chosen_at"],
                                            **before["thresholds"][name]}]
    # the parts at and just under the threshold are named, highest first, with how many images would drop one
    top = entry["highest_good"]
    assert len(top) == 3 and top[0]["score"] == entry["value"] and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert all((station / "calib/good" / t["image"]).is_file() for t in top)
    assert entry["n_for_next_rank"] == 473
    assert f"highest good images: {top[0]['image']} {top[0]['score']:.6g} (sets it), {top[1]['image']}" in out
    assert "with >= 473 good images the method leaves 1 of them over the threshold" in out
    report = tmp_path / "report"
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "--defect",
                           station / "test/defect", "--masks", station / "test/masks", "--method", "youden",
                           "--report", report, "-q", "--device", "cpu")
    assert rc == 0, err
    assert "miss rate" in out
    card = artifact.verify(model)
    assert [h["method"] for h in card["calibration_history"]] == ["max-train", "frr"]
    assert card["thresholds"][name]["method"] == "youden" and card["thresholds"][name]["n_defect"] == 6
    body = json.loads((report / "calibration.json").read_text())
    assert body["threshold"]["value"] == card["thresholds"][name]["value"] and len(body["images"]) == 12
    assert (report / "histograms.png").stat().st_size > 0 and (report / "roc.png").stat().st_size > 0
    # calibration images become off limits as test images for evaluate
    rc, out, err = run_cli(capsys, "evaluate", model, "--good", station / "calib/good", "--defect",
                           station / "test/defect", "-q", "--device", "cpu")
    assert rc == 1 and "calibrate" in err


def test_dry_run_writes_nothing(capsys, model, station):
    data = model.read_bytes()
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "--target-frr", "0.25",
                           "--dry-run", "-q", "--device", "cpu")
    assert rc == 0, err
    assert "would change:" in out and "method: \"max-train\" -> \"frr\"" in out and "nothing written" in out
    assert model.read_bytes() == data


def test_strict_refuses_too_few_images(capsys, model, station):
    data = model.read_bytes()
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "--strict", "-q")
    assert rc == 2 and "fewer than the 299 needed" in err and "Traceback" not in err
    assert model.read_bytes() == data


@pytest.mark.parametrize("args, needle", [
    (["--good", "{station}/nowhere"], "does not exist"),
    (["--good", "{station}/calib/good", "--target-frr", "1.5"], "--target-frr 1.5"),
    (["--good", "{station}/calib/good", "--target-frr", "-0.1"], "--target-frr -0.1"),
    (["--good", "{station}/calib/good", "--score", "bogus"], "bogus"),
    (["--good", "{station}/calib/good", "--method", "f1"], "needs defective images"),
    (["--good", "{station}/calib/good", "--method", "magic"], "choose one of"),
    (["--good", "{station}/calib/good", "--method", "f1", "--target-frr", "0.1"], "--target-frr applies"),
    (["--good", "{station}/calib/good", "--ignore-mask", "{station}/none.png"], "does not exist"),
])
def test_cli_errors_are_one_line(capsys, model, station, args, needle):
    data = model.read_bytes()
    rc, out, err = run_cli(capsys, "calibrate", model, *[a.format(station=station) for a in args], "-q")
    assert rc != 0 and needle in err
    assert err.startswith("edge-agent: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert model.read_bytes() == data


def test_all_black_mask_is_refused(capsys, model, station, tmp_path):
    black = tmp_path / "black.png"
    cv2.imwrite(str(black), np.zeros((128, 128), np.uint8))
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "--ignore-mask", black, "-q")
    assert rc == 2 and "hides every patch" in err


# --- atomic write ------------------------------------------------------------------------------------------------


def test_failed_rename_leaves_the_old_model(capsys, model, station, monkeypatch):
    before = model.read_bytes()

    def boom(*a, **k):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", boom)
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "-q", "--device", "cpu")
    assert rc == 1 and err.splitlines()[-1].startswith("edge-agent: error: cannot write") and "disk unplugged" in err
    assert model.read_bytes() == before and artifact.verify(model)
    assert [p.name for p in model.parent.iterdir() if p.name.endswith(".tmp")] == []


WRITER = """
import os, sys, time
from edge_agent import artifact, calibrate
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)  # the new file is written, not yet renamed over the old one
    time.sleep(60)
os.fsync = slow_fsync
artifact.update_card(sys.argv[1], lambda c: {**c, "note": "half-written"})
"""


def test_writer_killed_mid_write_leaves_a_loadable_model(model):
    before = artifact.verify(model)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(model)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.endswith(".tmp") for p in model.parent.iterdir())
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    card = artifact.verify(model)
    assert card["checksum"] == before["checksum"] and "note" not in card
    module, _ = artifact.load(model)
    assert module is not None


# --- ignore mask through the real `score --json` --------------------------------------------------------------


def _with_defect(image: np.ndarray, x: int, y: int) -> np.ndarray:
    out = image.copy()
    checker = (np.indices((24, 24)).sum(axis=0) // 3 % 2 * 255).astype(np.uint8)
    out[y : y + 24, x : x + 24] = checker
    return out


def test_ignore_mask_in_the_card_changes_the_verdict(capsys, model, station, tmp_path):
    good = cv2.imread(str(sorted((station / "test/good").iterdir())[0]), cv2.IMREAD_UNCHANGED)
    h, w = good.shape[:2]
    masked, elsewhere = tmp_path / "masked.png", tmp_path / "elsewhere.png"
    cv2.imwrite(str(masked), _with_defect(good, 4, 4))  # top-left: under the black part of the mask
    cv2.imwrite(str(elsewhere), _with_defect(good, w - 28, h - 28))  # bottom-right: inspected
    mask = np.full((h, w), 255, np.uint8)
    mask[:48, :48] = 0
    mask_path = tmp_path / "mask.png"
    cv2.imwrite(str(mask_path), mask)

    scorer = Scorer(model, device="cpu", threshold=math.inf, warmup=False)
    a = scorer.score_image(cv2.imread(str(masked), cv2.IMREAD_UNCHANGED))
    b = scorer.score_image(cv2.imread(str(elsewhere), cv2.IMREAD_UNCHANGED))
    counted = a.grid.counted(mask)
    low = float(a.scores[counted].max())  # the masked image without its defect's patches
    high = min(float(a.scores.max()), float(b.scores[counted].max()))
    assert low < high, "the painted defect must score above the rest of the image"
    threshold = str((low + high) / 2)

    def verdicts() -> list[bool]:
        rc, out, err = run_cli(capsys, "score", model, masked, elsewhere, "--json", "--threshold", threshold,
                               "--device", "cpu")
        assert rc == 0, err
        return [json.loads(line)["anomalous"] for line in out.splitlines()]

    assert verdicts() == [True, True]
    rc, out, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "--ignore-mask", mask_path,
                           "-q", "--device", "cpu")
    assert rc == 0, err
    card = artifact.verify(model)
    assert card["ignore_mask"]["width"] == w and card["ignore_mask"]["sha256"].startswith("sha256:")
    assert card["thresholds"][card["scores"]["default"]]["ignore_mask_sha256"] == card["ignore_mask"]["sha256"]
    assert np.array_equal(Scorer(model, device="cpu", warmup=False).ignore_mask, mask)
    assert verdicts() == [False, True]  # the defect under the black area is OK now, the other still NG
    # evaluate takes the mask from the card too: the masked image scores without its defect's patches
    (tmp_path / "good").mkdir()
    (tmp_path / "defect").mkdir()
    shutil.copy(masked, tmp_path / "good/masked.png")
    shutil.copy(elsewhere, tmp_path / "defect/elsewhere.png")
    rc, out, err = run_cli(capsys, "evaluate", model, "--good", tmp_path / "good", "--defect", tmp_path / "defect",
                           "--report", tmp_path / "eval", "-q", "--device", "cpu")
    assert rc == 0, err
    result = json.loads((tmp_path / "eval/report.json").read_text())["models"][0]["scores"][card["scores"]["default"]]
    assert result["good_scores"]["max"] == pytest.approx(low, rel=1e-6)
    # and so does the daemon, unless its config names a mask of its own
    from edge_agent.config import ModelConfig
    from edge_agent.daemon import load_model

    assert np.array_equal(load_model(ModelConfig(path=model, device="cpu"), warmup=False).ignore_mask, mask)


# --- two-sided scores: the low end of good scores --------------------------------------------------------------


@pytest.mark.parametrize("good", [
    np.linspace(400.0, 740.0, 50),  # m: positive
    -np.linspace(4000.0, 4800.0, 50),  # elbo: negative
    np.full(10, 3.0),  # all equal
    np.array([-0.5]),  # one image
])
def test_low_bound_is_under_every_good_score_whatever_the_sign(good):
    from edge_agent.calibrate import low_bound

    low = low_bound(good)
    assert low["value"] < good.min() and low["min"] == good.min() and low["method"] == "min-minus-spread"
    assert "does not look like this station" in low["description"]


@pytest.mark.parametrize("good, blank", [
    (np.linspace(8.9, 11.8, 8), 0.39),  # GMM m: a test image at 6.27 is still a part
    (np.linspace(56.3, 80.0, 8), 8.4),  # the tiny VAE's m
    (-np.linspace(1500.0, 990.0, 50), -2984.0),  # the demo VAE's elbo: negative
])
def test_low_bound_sits_a_third_of_the_way_from_a_blank_frame_to_the_good_parts(good, blank):
    from edge_agent.calibrate import low_bound

    low = low_bound(good, blank)
    assert low["method"] == "blank-third" and blank < low["value"] < good.min()
    assert low["value"] == pytest.approx(blank + (good.min() - blank) / 3)
    # A floor above the good scores (a score where flat frames look anomalous), or within two spreads of
    # them (the score cannot tell a blank frame from a part), says nothing: the spread rule.
    spread = float(np.quantile(good, 0.9) - np.quantile(good, 0.1))
    for useless in (float(good.max()) + 1, float(good.min()) - spread):
        fallback = low_bound(good, useless)
        assert fallback["method"] == "min-minus-spread" and fallback["value"] == pytest.approx(good.min() - 3 * spread)


def test_calibrate_and_train_record_the_low_bound_and_the_daemon_reads_it(capsys, model, station):
    trained = artifact.verify(model)["thresholds"]["m"]
    assert trained["low"]["value"] < trained["value"]  # train (set_training_thresholds) writes it too
    assert trained["low"]["method"] == "blank-third" and trained["low"]["blank_score"] < trained["low"]["value"]
    code, out, _ = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "-q")
    assert code == 0 and "low bound" in out
    card = artifact.verify(model)
    entry = card["thresholds"][card["scores"]["default"]]  # calibrate sets the card's default score
    assert entry["low"]["value"] < entry["low"]["min"] and entry["low"]["n_good"] == entry["n_good"]
    assert Scorer(model, device="cpu", warmup=False).low == entry["low"]["value"]


def test_a_card_without_a_low_bound_still_loads_and_judges(model):
    artifact.update_card(model, lambda c: {**c, "thresholds": {k: {kk: vv for kk, vv in v.items() if kk != "low"}
                                                               for k, v in c["thresholds"].items()}})
    scorer = Scorer(model, device="cpu", warmup=False)
    assert scorer.low is None and scorer.threshold > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_calibrate_keeps_the_model_files_owner_group_and_mode(capsys, model, station):
    os.chown(model, 4321, 8765)
    model.chmod(0o640)
    code, _, err = run_cli(capsys, "calibrate", model, "--good", station / "calib/good", "-q")
    assert code == 0, err
    st = model.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4321, 8765, 0o640)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_model_the_user_may_not_read_says_permission_not_truncated(model):
    import tempfile

    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with tempfile.TemporaryDirectory() as folder:  # in /tmp: a folder chain user nobody may enter
        Path(folder).chmod(0o755)
        readable_dir = Path(folder) / "m.pt"
        shutil.copy(model, readable_dir)
        for target in (readable_dir, model):  # the file itself 0600; a model under pytest's 0700 folder
            target.chmod(0o600)
            config = Path(folder) / "station.toml"  # what the service user meets: check-config, run
            config.write_text(f'[model]\npath = "{target}"\n[source]\nuri = "x.avi"\n[mqtt]\nhost = "b"\n')
            config.chmod(0o644)
            for argv in (["info", str(target)], ["check-config", str(config)]):
                done = subprocess.run([*nobody, sys.executable, "-m", "edge_agent.cli", *argv], capture_output=True,
                                      text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
                assert done.returncode == 2 and "Traceback" not in done.stderr and "internal" not in done.stderr
                assert "permission" in done.stderr and "truncated" not in done.stderr, done.stderr

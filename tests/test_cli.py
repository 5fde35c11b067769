"""The real CLI: happy paths and every error path on bad input (one line, non-zero exit, no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import artifact
from edge_agent.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("edge-agent: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_score_json_fields(capsys, vae_model, station):
    code, out, _ = run(capsys, "score", vae_model, station / "test/good", station / "test/defect/0000.png", "--json")
    assert code == 0
    rows = [json.loads(l) for l in out.splitlines()]
    assert len(rows) == 7
    for r in rows:
        assert {"image", "score", "threshold", "anomalous", "worst_patch", "patches_over_threshold"} <= set(r)
        assert r["anomalous"] == (r["score"] > r["threshold"])
        assert set(r["worst_patch"]) == {"x", "y", "w", "h"} and r["patches_total"] == 49


def test_score_other_score_and_heatmaps(capsys, vae_model, station, tmp_path):
    code, out, _ = run(capsys, "score", vae_model, station / "test/defect", "--json", "--score", "elbo",
                       "--heatmaps", tmp_path / "h")
    assert code == 0
    rows = [json.loads(l) for l in out.splitlines()]
    assert all(r["score_name"] == "elbo" for r in rows)
    pngs = sorted((tmp_path / "h").glob("*.png"))
    assert len(pngs) == 6
    import cv2

    assert cv2.imread(str(pngs[0])).shape == (128, 128, 3)


def test_threshold_override_decides(capsys, vae_model, station):
    code, out, _ = run(capsys, "score", vae_model, station / "test/good/0000.png", "--json", "--threshold", "-1")
    assert json.loads(out)["anomalous"] is True


def test_evaluate_report(capsys, vae_model, ae_model, station, tmp_path):
    code, out, err = run(capsys, "evaluate", vae_model, ae_model, "--good", station / "test/good", "--defect",
                         station / "test/defect", "--masks", station / "test/masks", "--report", tmp_path / "r", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert [m["family"] for m in report["models"]] == ["vae", "ae"]
    vae = report["models"][0]["scores"]
    assert set(vae) == {"m", "elbo", "d", "a", "m_map"}
    assert 0 <= vae["m"]["image_auroc"] <= 1 and 0 <= vae["m"]["pixel_auroc"] <= 1
    assert vae["m_map"]["at_frr_1pct"]["false_reject_rate"] <= 0.01  # 6 good images: none may be over it
    kinds = dict(line.split(",") for line in (station / "test/defect/kinds.csv").read_text().split()[1:])
    assert set(vae["m"]["by_kind"]) == set(kinds.values())
    assert sum(k["images"] for k in vae["m"]["by_kind"].values()) == 6
    images = report["models"][0]["images"]
    assert len(images) == 12 and {i["label"] for i in images} == {"good", "defect"}
    assert max(i["scores"]["m"] for i in images) == vae["m"]["defect_scores"]["max"] or \
        max(i["scores"]["m"] for i in images) == vae["m"]["good_scores"]["max"]
    assert (tmp_path / "r/roc.png").stat().st_size > 1000 and (tmp_path / "r/histograms.png").exists()
    assert "image AUROC" in out and "recall@FRR1%" in out and "by kind" in out


def test_info_prints_card(capsys, vae_model):
    code, out, _ = run(capsys, "info", vae_model)
    assert code == 0 and json.loads(out)["family"] == "vae"


def test_synth_writes_station(capsys, tmp_path):
    code, _, err = run(capsys, "synth", tmp_path / "s", "--train", "2", "--calib", "1", "--test-good", "1",
                       "--test-defect", "2", "--video", tmp_path / "v.avi", "--frames", "4", "--defect-every", "2")
    assert code == 0
    assert len(list((tmp_path / "s/test/masks").glob("*.png"))) == 2
    assert (tmp_path / "v.avi").stat().st_size > 0 and "2 defective" in err


def _tampered(vae_model, tmp_path):
    """One flipped byte inside a weight tensor's bytes (a byte in the zip's alignment padding changes nothing)."""
    import struct
    import zipfile

    p = tmp_path / "tampered.pt"
    raw = bytearray(vae_model.read_bytes())
    with zipfile.ZipFile(vae_model) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    return p


def _bad_inputs(tmp_path: Path, vae_model: Path, station: Path):
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "plain.txt").write_text("not a model")
    small = tmp_path / "small"
    small.mkdir(exist_ok=True)
    import cv2
    import numpy as np

    cv2.imwrite(str(small / "s.png"), np.zeros((10, 10), np.uint8))
    good, defect = station / "test/good", station / "test/defect"
    return [
        (["score", tmp_path / "missing.pt", good], ["missing.pt", "not found"]),
        (["score", tmp_path / "plain.txt", good], ["plain.txt"]),
        (["score", _tampered(vae_model, tmp_path), good], ["tampered.pt"]),
        (["score", vae_model, tmp_path / "nope"], ["nope", "does not exist"]),
        (["score", vae_model, tmp_path / "empty"], ["no images"]),
        (["score", vae_model, good, "--score", "zz"], ["'zz'", "m, elbo, d, a"]),
        (["score", vae_model, good, "--device", "tpu"], ["tpu"]),
        (["train", tmp_path / "empty", "--out", tmp_path / "o.pt"], ["no images"]),
        (["train", small, "--out", tmp_path / "o.pt"], ["smaller than the 32px patch"]),
        (["train", good, "--out", tmp_path / "o.pt", "--model", "gan9"], ["gan9", "vae"]),
        (["train", good, "--out", tmp_path / "o.pt", "--patch-size", "8"], ["patch-size 8"]),
        (["train", good, "--out", tmp_path / "o.pt", "--channels", "2"], ["--channels 2"]),
        (["train", good, "--out", tmp_path / "o.pt", "--latent", "grid"], ["--latent 'grid'", "fc", "conv"]),
        (["train", good, "--out", tmp_path / "o.pt", "--latent", "conv", "--patch-size", "16"],
         ["--latent conv", "--patch-size >= 28", "--latent fc"]),
        (["train", good, "--out", tmp_path / "o.pt", "--latent", "conv", "--model", "gmm"], ["--latent conv", "vae or ae"]),
        (["evaluate", vae_model, "--good", good, "--defect", tmp_path / "empty"], ["--defect", "no images"]),
        (["evaluate", vae_model, "--good", good, "--defect", defect, "--masks", tmp_path / "empty"], ["no mask"]),
        (["evaluate", vae_model, "--good", station / "train/good", "--defect", defect], ["were used to train"]),
        (["evaluate", vae_model, "--good", good, "--defect", defect, "--score", "zz"], ["'zz'"]),
        (["info", tmp_path / "plain.txt"], ["plain.txt"]),
    ]


def test_every_error_path_is_one_line(capsys, tmp_path, vae_model, station):
    for argv, needles in _bad_inputs(tmp_path, vae_model, station):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, *needles)


def test_unreadable_image_among_good_ones_is_reported_not_ok(capsys, tmp_path, vae_model, station):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    code, out, err = run(capsys, "score", vae_model, station / "test/good/0000.png", junk, "--json")
    assert code == 1
    rows = [json.loads(l) for l in out.splitlines()]
    assert rows[1]["image"] == str(junk) and "error" in rows[1] and rows[1]["anomalous"] is None
    assert "cannot read image" in err and "Traceback" not in err


def test_console_script_usage_errors(tmp_path):
    exe = [sys.executable, "-m", "edge_agent.cli"]
    r = subprocess.run(exe + ["score"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Missing argument" in r.stderr
    r = subprocess.run(exe + ["score", str(tmp_path / "m.pt"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout


def test_evaluate_several_models_takes_the_scores_each_has(capsys, vae_model, ae_model, station, tmp_path):
    code, out, err = run(capsys, "evaluate", vae_model, ae_model, "--score", "m", "--score", "l2", "--good",
                         station / "test/good", "--defect", station / "test/defect", "--report", tmp_path / "r", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert [set(m["scores"]) for m in report["models"]] == [{"m"}, {"l2"}]
    code, _, err = run(capsys, "evaluate", vae_model, "--score", "l2", "--good", station / "test/good", "--defect",
                       station / "test/defect")
    assert_one_line_error(code, err, "'l2'", "vae.pt")


def test_score_json_never_prints_nan(capsys, tmp_path, vae_model, station):
    from tests.daemon_helpers import planted_model

    nan_model = planted_model(vae_model, tmp_path / "nan.pt", nan=True)
    code, out, _ = run(capsys, "score", nan_model, station / "test/good/0000.png", "--json", "--score", "m")
    assert code == 1

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    row = json.loads(out, parse_constant=refuse)
    assert row["result"] == "ERROR" and row["score"] is None and row["error_reason"] == "scoring"


def test_score_and_evaluate_with_the_station_config_judge_as_the_station(capsys, tmp_path, vae_model, station):
    import cv2
    import numpy as np

    mask = np.full((128, 128), 255, np.uint8)
    mask[:, 64:] = 0  # the station ignores the right half
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    config = tmp_path / "station.toml"
    config.write_text(f'[model]\npath = "{vae_model}"\nscore = "elbo"\nthreshold = 12345.5\nprecision = "fp32"\n'
                      f'ignore_mask = "mask.png"\ndevice = "cpu"\n[source]\nuri = "x.avi"\n[mqtt]\nhost = "broker"\n')
    image = station / "test/defect/0000.png"
    code, out, err = run(capsys, "score", "--config", config, image, "--json")
    row = json.loads(out)
    assert (row["score_name"], row["threshold"]) == ("elbo", 12345.5), err
    assert row["worst_patch"]["x"] + row["worst_patch"]["w"] <= 64 + 16, "the station's mask: right half ignored"
    code, plain, _ = run(capsys, "score", vae_model, image, "--json")
    assert json.loads(plain)["score_name"] == artifact.verify(vae_model)["scores"]["default"] != "elbo"
    code, out, err = run(capsys, "evaluate", "--config", config, "--good", station / "test/good", "--defect",
                         station / "test/defect", "--report", tmp_path / "r", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert list(report["models"][0]["scores"]) == ["elbo"]
    assert report["models"][0]["scores"]["elbo"]["at_card_threshold"]["threshold"] == 12345.5
    code, _, err = run(capsys, "score", "--config", config, vae_model, image)
    assert_one_line_error(code, err, "leave", "out")


def test_synth_texture_and_frame_size(capsys, tmp_path):
    import cv2

    code, _, err = run(capsys, "synth", tmp_path / "t", "--kind", "texture", "--height", "48", "--width", "64",
                       "--train", "1", "--calib", "0", "--test-good", "0", "--test-defect", "6")
    assert code == 0, err
    image = cv2.imread(str(tmp_path / "t/train/good/0000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 64)
    lines = (tmp_path / "t/test/defect/kinds.csv").read_text().split()
    assert lines[0] == "image,kind" and len(lines) == 7
    from edge_agent.synth import TEXTURE_DEFECTS, make_texture

    assert {line.split(",")[1] for line in lines[1:]} <= set(TEXTURE_DEFECTS)
    for i in range(6):  # every defect leaves a mask where it is
        mask = cv2.imread(str(tmp_path / f"t/test/masks/{i:04d}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (48, 64) and mask.max() == 255
    with pytest.raises(ValueError, match="unknown defect"):
        make_texture(0, "dent")
    code, _, err = run(capsys, "synth", tmp_path / "x", "--kind", "wood")
    assert code == 2 and "'wood' is not a kind" in err and "Traceback" not in err

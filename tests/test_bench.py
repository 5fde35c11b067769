import json

import numpy as np
import pytest
import torch

from edge_agent.bench import SEED, station_frame, vae_flops_per_patch
from edge_agent.cli import app
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer, equal_batches, reduced_precision


def test_bench_tiny_json(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "--tiny", "--json", "--frames", "3", "--latency-frames", "2",
                                      "--test-frames", "2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    for key in ("matmul_gflops", "scorer_gflops", "scorer_fraction_of_matmul", "bf16_speedup",
                "bf16_max_rel_score_error", "bf16_verdicts_identical", "pipeline_frames_per_s",
                "pipeline_efficiency", "page_polled_frames_per_s", "page_overhead", "latency_p50_s", "latency_p99_s", "rss_growth_mb", "device", "torch",
                "threads", "load_average"):
        assert key in r, key
    assert set(r["scorer_patches_per_s"]) == {"fp32", "bf16"}
    assert r["page_polled_frames_per_s"] > 0 and isinstance(r["page_polls"], int)
    assert r["page_hook_us_per_verdict"] > 0 and r["page_server_cpu_ms_per_poll"] >= 0
    assert r["patches_per_frame"] == 49 and r["pipeline_frames"] == 3 and r["latency_frames"] == 2
    assert r["bf16_max_rel_score_error"] < 1e-2
    assert r["bf16_verdicts_identical"] is True
    # the reference is the best of several GEMM shapes and thread counts, per precision
    limit = r["matmul_limit"]
    assert len(limit["shapes"]) >= 3 and 1 in limit["thread_counts"]
    assert limit["fp32"]["gflops"] == r["matmul_gflops"] and limit["bf16"]["gflops"] == r["matmul_bf16_gflops"]
    assert r["fp32_fraction_of_fp32_matmul"] == pytest.approx(r["scorer_gflops"] / r["matmul_gflops"])
    assert r["bf16_fraction_of_bf16_matmul"] == pytest.approx(r["bf16_gflops"] / r["matmul_bf16_gflops"])
    assert set(r["per_core"]["fraction_of_own_matmul"]) == {"fp32", "bf16"}
    t = r["training"]
    for precision in ("fp32", "bf16"):
        assert t[precision]["crops_per_s"] == pytest.approx(t["batch_size"] * t[precision]["steps_per_s"])
        assert 0 < t[precision]["sampling_share_of_step"]
    assert t["sampling_crops_per_s"] > 0


def test_bench_runs_a_trained_model_whose_default_is_the_map_score(vae_model):
    # A trained model's default score is the anomaly map, which needs whole frames: the per-core timing used to
    # call score_patches on it and bench stopped with an internal error on every trained model.
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", str(vae_model), "--json", "--frames", "2", "--latency-frames", "2",
                                      "--test-frames", "2", "--repeats", "1", "--train-steps", "0"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["model"] == str(vae_model) and set(r["per_core"]["fraction_of_own_matmul"]) == {"fp32", "bf16"}
    assert r["bf16_verdicts_identical"] in (True, False) and r["scorer_patches_per_s"]["fp32"] > 0


def test_train_step_flops_are_three_forwards_less_the_first_input_gradient():
    from edge_agent.train.throughput import step_flops

    forward = vae_flops_per_patch(1, 96, 32, 100)
    first_conv = 2 * 48**2 * 32 * 1 * 16
    assert step_flops(1, 96, 32, 100, 64) == 64 * (3 * forward - first_conv)


def test_bench_rejects_bad_device():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "--tiny", "--device", "tpu"])
    assert result.exit_code != 0


def test_seed_vae_flops_match_the_issue():
    # 875 patches of a 640x480 frame at P=96, S=16: about 0.27 TFLOP per frame.
    per_patch = vae_flops_per_patch(1, SEED["patch_size"], SEED["nc"], SEED["nz"])
    conv = 48**2 * 32 * 1 * 16 + 4 * 18_874_368  # 1->32 at 48x48, then four layers of 18.9 M MACs
    linear = 4608 * 200 + 100 * 4608
    deconv = 4 * 18_874_368 + 48**2 * 32 * 2 * 16  # the mirror; the last gives mu_x and sigma_x
    assert per_patch == 2 * (conv + linear + deconv)
    assert 0.27e12 < per_patch * 875 < 0.275e12


@pytest.mark.parametrize("n, batch, sizes", [
    (0, 4, []),
    (875, 512, [438, 437]),
    (875, 875, [875]),
    (10, 4, [4, 3, 3]),
    (3, 8, [3]),
])
def test_equal_batches(n, batch, sizes):
    ranges = equal_batches(n, batch)
    assert [e - s for s, e in ranges] == sizes
    assert all(b[0] == a[1] for a, b in zip(ranges, ranges[1:]))


def _station_patches(scorer, station, n=4):
    images = [read_image(f) for f in list_images(station / "test/defect")[:n]]
    return torch.cat([scorer.patches(im)[1] for im in images])


@pytest.mark.parametrize("family", ["vae_model", "ae_model"])
def test_fast_path_scores_like_the_module(family, station, request):
    model = request.getfixturevalue(family)
    raw = {"vae_model": "m", "ae_model": "l2"}[family]  # a patch score; the map score's fast path: test_anomaly_map
    fast = Scorer(model, device="cpu", batch_size=7, warmup=False, score_name=raw)
    eager = Scorer(model, device="cpu", batch_size=7, warmup=False, fast=False, channels_last=False, score_name=raw)
    assert fast.fast is not None and eager.fast is None
    x = _station_patches(fast, station)
    np.testing.assert_allclose(fast.score_patches(x), eager.score_patches(x), rtol=1e-4, atol=1e-6)


def test_bf16_matches_fp32_on_a_trained_model(vae_model, station):
    fp32 = Scorer(vae_model, device="cpu", precision="fp32", warmup=False, score_name="m")
    bf16 = Scorer(vae_model, device="cpu", precision="bf16", warmup=False, score_name="m")
    x = _station_patches(fp32, station)
    a, b = fp32.score_patches(x).astype(np.float64), bf16.score_patches(x)
    assert np.max(np.abs(b - a) / np.abs(a)) < 1e-2
    # Same decisions at the card's threshold on every test image (the any-patch rule).
    for f in list_images([station / "test/good", station / "test/defect"]):
        image = read_image(f)
        assert (fp32.score_image(image).scores.max() > fp32.threshold) == (
            bf16.score_image(image).scores.max() > bf16.threshold)


def test_bf16_policy_keeps_the_output_layer_float32(vae_model):
    module = torch.jit.load(str(vae_model))
    reduced_precision(module, torch.bfloat16)
    dtypes = [(name, m.weight.dtype) for name, m in module.named_modules() if hasattr(m, "weight")]
    assert dtypes[-1][1] == torch.float32
    assert {d for _, d in dtypes[:-1]} == {torch.bfloat16}


def test_station_frame_is_a_station_image():
    frame = station_frame(1, "scratch", 640, 480)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # parts, not a flat frame


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_fast_path_matches_cpu(vae_model, station, precision):
    cpu = Scorer(vae_model, device="cpu", warmup=False, score_name="m")
    # batch 5 does not divide the patch count: the last CUDA-graph batch is padded.
    gpu = Scorer(vae_model, device="cuda", precision=precision, batch_size=5, score_name="m")
    assert gpu._cuda is not None
    x = _station_patches(cpu, station, n=2)
    tol = 1e-3 if precision == "fp32" else 1e-2
    np.testing.assert_allclose(gpu.score_patches(x), cpu.score_patches(x), rtol=tol, atol=1e-5)


def test_bench_cameras_reports_the_shared_scorer_against_its_own_rate():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "--tiny", "--json", "--cameras", "1,2", "--frames", "2",
                                      "--repeats", "1"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["scorer_frames_per_s"] > 0 and r["frames_per_camera"] == 2 and r["patches_per_frame"] == 49
    assert [row["cameras"] for row in r["cameras"]] == [1, 2]
    for row in r["cameras"]:
        assert row["efficiency"] == pytest.approx(row["frames_per_s"] / r["scorer_frames_per_s"])
        assert row["per_camera_frames_per_s"] == pytest.approx(row["frames_per_s"] / row["cameras"])
        assert row["frames_per_pass"] >= 1


def test_bench_cameras_refuses_a_count_that_is_not_one_with_one_line():
    import subprocess

    from tests.test_daemon import agent, env

    done = subprocess.run(agent("bench", "--cameras", "two"), env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["edge-agent: error: --cameras 'two' must be camera counts >= 1, e.g. 1,2,4"]

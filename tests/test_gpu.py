import logging

import pytest
import torch

from edge_agent import gpu, scoring


@pytest.mark.parametrize("device_type, capability, cpu_bf16, want", [
    ("cuda", (9, 0), False, "bf16"),  # H100
    ("cuda", (8, 0), False, "bf16"),  # A100: the first with fast bf16
    ("cuda", (8, 7), False, "bf16"),  # Jetson Orin
    ("cuda", (7, 5), True, "fp16"),  # T4
    ("cuda", (7, 2), False, "fp16"),  # Jetson Xavier
    ("cuda", None, False, "fp16"),
    ("cpu", None, True, "bf16"),
    ("cpu", None, False, "fp32"),
])
def test_auto_precision_by_capability(device_type, capability, cpu_bf16, want):
    assert gpu.auto_precision(device_type, capability, cpu_bf16) == want


@pytest.mark.parametrize("flag, fp32_s, bf16_s, want", [
    (True, 1.0, 0.14, True),  # AMX: bf16 GEMM 7x fp32
    (True, 1.0, 0.24, True),  # EPYC AVX512-BF16: 4.2x
    (True, 1.0, 1.9, False),  # a Xeon whose AVX512-BF16 oneDNN did not use: 0.53x
    (True, 1.0, 0.9, False),  # 1.1x: below BF16_MIN_GAIN, not worth bf16's rounding
    (False, 1.0, 0.1, False),  # no bf16 instructions: not even probed
])
def test_auto_precision_on_cpu_takes_bf16_only_where_a_gemm_measures_it_faster(monkeypatch, flag, fp32_s, bf16_s, want):
    probed = []

    def gemm(dtype):
        probed.append(dtype)
        return fp32_s if dtype == torch.float32 else bf16_s

    monkeypatch.setattr(scoring, "cpu_has_bf16", lambda: flag)
    monkeypatch.setattr(scoring, "_gemm_seconds", gemm)
    scoring.cpu_bf16_pays.cache_clear()
    try:
        assert scoring.cpu_bf16_pays() is want
        assert scoring.pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if want else torch.float32)
        assert len(probed) == (2 if flag else 0)  # measured once per process, then cached
    finally:
        scoring.cpu_bf16_pays.cache_clear()  # the next caller measures this machine, not the fakes


def test_gemm_probe_times_real_gemms():
    assert 0 < scoring._gemm_seconds(torch.float32, n=64, repeats=2) < 5
    assert 0 < scoring._gemm_seconds(torch.bfloat16, n=64, repeats=2) < 5


def test_pinned_results_stay_bounded_by_the_largest_frame():
    results = gpu.PinnedResults(pin=False)
    first = results.get(875)
    assert first.shape == (875,)
    for n in (10, 300, 875, 874, 1):  # smaller frames reuse the one buffer
        assert results.get(n).shape == (n,)
        assert results.get(n).data_ptr() == first.data_ptr()
    assert results.buffer.numel() == 875
    assert results.get(1200).shape == (1200,)
    assert results.buffer.numel() == 1200
    maps = results.get(10, (32, 32))  # pixel maps share the buffer, grown to the largest request
    assert maps.shape == (10, 32, 32) and results.buffer.numel() == 10 * 32 * 32


def test_auto_device_falls_back_loudly_when_a_gpu_is_expected(monkeypatch, caplog, vae_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "gpu_expected", lambda: "/dev/nvidia0 exists")
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring"):
        s = scoring.Scorer(vae_model, device="auto", warmup=False)
    assert s.device.type == "cpu"
    assert s.device_fallback and "nvidia" in s.device_fallback.lower()
    assert any("GPU is expected" in r.getMessage() for r in caplog.records)

    from prometheus_client import CollectorRegistry

    from edge_agent.daemon import _model_info
    from edge_agent.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)

    class _Model:
        scorer = s

    _model_info(metrics, _Model())
    assert registry.get_sample_value("edge_agent_device_fallback") == 1.0


def test_auto_device_without_a_gpu_is_quiet(monkeypatch, caplog, vae_model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "gpu_expected", lambda: None)
    with caplog.at_level(logging.WARNING):
        s = scoring.Scorer(vae_model, device="auto", warmup=False)
    assert s.device.type == "cpu" and s.device_fallback is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_calibrated_precision_mismatch_warns(tmp_path, caplog, vae_model):
    import shutil

    from edge_agent import artifact

    model = tmp_path / "m.pt"
    shutil.copy(vae_model, model)

    def record(card):
        card["thresholds"][card["scores"]["default"]]["scored_with"] = {"precision": "bf16", "device": "cpu"}
        return card

    artifact.update_card(model, record)
    with caplog.at_level(logging.WARNING, logger="edge_agent.scoring"):
        s = scoring.Scorer(model, device="cpu", precision="fp32", warmup=False)
    assert s.scored_with() == {"precision": "fp32", "device": "cpu"}
    assert any("calibrated in bf16" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_checked_against_eager_and_capture_on_another_thread(vae_model):
    import threading

    built = {}
    busy = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def infer_thread():  # allocates and computes on the device while the other thread captures
        # No random numbers: the daemon's inference draws none, and torch refuses an RNG offset
        # increment on another thread while a graph captures (seen on an H200: "Offset increment
        # outside graph capture encountered unexpectedly").
        x = torch.ones(1024, 1024, device="cuda")
        try:
            while not done.is_set():
                (x * 2.0).sum().item()
                busy.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            busy.set()

    t = threading.Thread(target=infer_thread)
    t.start()
    busy.wait(30)
    try:
        built["s"] = scoring.Scorer(vae_model, device="cuda", precision="fp32", batch_size=5)
    finally:
        done.set()
        t.join(30)
    assert not t.is_alive()
    assert not errors, f"the other thread's device work failed during capture: {errors[0]!r}"
    runner = built["s"]._cuda
    assert runner is not None and runner.graphs is not None, runner.graph_fallback
    assert runner.host[0].is_pinned()
    assert runner.host[0].stride() == runner.dev[0].stride()  # no transpose per upload

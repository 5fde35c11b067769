import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.metrics import DROP_REASONS, STAGES, Metrics, score_buckets
from edge_agent.verdict import ERROR_REASONS


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry(), threshold=0.5)


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


@pytest.mark.parametrize(
    "call, name, labels, expected",
    [
        (lambda m: m.camera_up(True), "edge_agent_camera_up", {}, 1.0),
        (lambda m: (m.camera_up(True), m.camera_up(False)), "edge_agent_camera_up", {}, 0.0),
        (lambda m: m.camera_reconnect(), "edge_agent_camera_reconnects_total", {}, 1.0),
        (lambda m: m.frame_rejected("wrong_size"), "edge_agent_bad_frames_total", {"reason": "wrong_size"}, 1.0),
        (lambda m: m.frame_rejected("bad_frame"), "edge_agent_dropped_total", {"reason": "bad_frame"}, None),
        (lambda m: m.frame_result("ERROR", "uniform"), "edge_agent_error_verdicts_total", {"reason": "uniform"}, 1.0),
        (lambda m: m.frame_result("ERROR", "uniform"), "edge_agent_frames_total", {"result": "ERROR"}, 1.0),
        (lambda m: m.frame_result("NG"), "edge_agent_error_verdicts_total", {"reason": "internal"}, 0.0),
        (lambda m: m.dropped("queue_full"), "edge_agent_dropped_total", {"reason": "queue_full"}, 1.0),
        (lambda m: m.dropped("verdict_outbox_full"), "edge_agent_dropped_total", {"reason": "verdict_outbox_full"}, 1.0),
        (lambda m: m.broker_connected(True), "edge_agent_broker_connected", {}, 1.0),
        (lambda m: m.outbox_depth(7), "edge_agent_outbox_depth", {}, 7.0),
        (lambda m: m.outbox_bytes(4096), "edge_agent_outbox_bytes", {}, 4096.0),
        (lambda m: m.published("verdict"), "edge_agent_verdicts_published_total", {}, 1.0),
        (lambda m: m.published("heatmap"), "edge_agent_verdicts_published_total", {}, 0.0),
        (lambda m: m.published("heatmap"), "edge_agent_messages_published_total", {"kind": "heatmap"}, 1.0),
        (lambda m: m.trigger_accepted(), "edge_agent_triggers_total", {"result": "accepted"}, 1.0),
        (lambda m: m.trigger_rejected("busy"), "edge_agent_triggers_total", {"result": "rejected"}, 1.0),
        (lambda m: m.frame_result("NG"), "edge_agent_frames_total", {"result": "NG"}, 1.0),
        (lambda m: m.error("inference"), "edge_agent_errors_total", {"stage": "inference"}, 1.0),
        (lambda m: m.patches_scored(96), "edge_agent_patches_scored_total", {}, 96.0),
        (lambda m: m.stage("inference", 0.03), "edge_agent_stage_seconds_count", {"stage": "inference"}, 1.0),
        (lambda m: m.stage("inference", 0.03), "edge_agent_stage_seconds_bucket", {"stage": "inference", "le": "0.05"}, 1.0),
        (lambda m: m.stages({"capture": 0.001, "publish": 2.0}), "edge_agent_stage_seconds_sum", {"stage": "publish"}, 2.0),
        (lambda m: m.latency_s(0.25), "edge_agent_latency_seconds_sum", {}, 0.25),
        (lambda m: m.image_score(0.5), "edge_agent_image_score_bucket", {"le": "0.5"}, 1.0),
        (lambda m: m.image_score(0.75), "edge_agent_image_score_bucket", {"le": "0.5"}, 0.0),
    ],
)
def test_hook_changes_sample(metrics, call, name, labels, expected):
    call(metrics)
    assert value(metrics, name, **labels) == expected


def test_known_label_values_exist_at_zero(metrics):
    for stage in STAGES:
        assert value(metrics, "edge_agent_stage_seconds_count", stage=stage) == 0.0
        assert value(metrics, "edge_agent_errors_total", stage=stage) == 0.0
    for reason in DROP_REASONS:
        assert value(metrics, "edge_agent_dropped_total", reason=reason) == 0.0
    for result in ("OK", "NG", "ERROR"):
        assert value(metrics, "edge_agent_frames_total", result=result) == 0.0
    for reason in ERROR_REASONS:
        assert value(metrics, "edge_agent_error_verdicts_total", reason=reason) == 0.0


def test_model_info(metrics):
    metrics.model_info("vae-3f2a", "sha256:abc", "mse", 0.75, "cpu", "fp32")
    labels = dict(model_id="vae-3f2a", checksum="sha256:abc", score_name="mse", threshold="0.75", device="cpu", precision="fp32")
    assert value(metrics, "edge_agent_model_info", **labels) == 1.0


def test_calibration_exports_threshold_and_good_score_quantiles(metrics):
    metrics.calibration(0.75, {"n": 40, "p50": 0.25, "p90": 0.375, "p99": 0.5, "max": 0.625, "mean": 0.3})
    assert value(metrics, "edge_agent_threshold") == 0.75
    for stat, expected in (("p50", 0.25), ("p90", 0.375), ("p99", 0.5), ("max", 0.625)):
        assert value(metrics, "edge_agent_good_image_score", stat=stat) == expected
    # A reloaded model whose card has no quantiles leaves no stale baseline behind.
    metrics.calibration(0.5, None)
    assert value(metrics, "edge_agent_threshold") == 0.5
    assert value(metrics, "edge_agent_good_image_score", stat="p99") is None


@pytest.mark.parametrize(
    "threshold, expected_in, lowest, highest",
    [(0.5, 0.5, 0.05, 1.5), (2.0, 2.0, 0.2, 6.0), (None, 1.0, 0.001, 1000.0), (-4.0, -4.0, -7.6, 4.0)],
)
def test_score_buckets_bracket_threshold(threshold, expected_in, lowest, highest):
    buckets = score_buckets(threshold)
    assert list(buckets) == sorted(set(buckets))
    assert expected_in in buckets
    assert buckets[0] == lowest and buckets[-1] == highest


@pytest.mark.parametrize("threshold, good", [
    (737.0, {"p50": 420.0, "p90": 560.0, "p99": 700.0, "max": 730.0}),  # m: positive scores
    (-4000.0, {"p50": -4600.0, "p90": -4300.0, "p99": -4100.0, "max": -4050.0}),  # elbo: negative
    (-12.5, {"p50": -40.0, "p90": -25.0, "p99": -15.0, "max": -13.0}),  # GMM nll: negative
])
def test_score_buckets_from_the_cards_good_scores_resolve_the_drift_alert_for_any_sign(threshold, good):
    buckets = score_buckets(threshold, good)
    assert list(buckets) == sorted(set(buckets))
    for stat in ("p50", "p90", "p99", "max"):
        assert good[stat] in buckets, stat  # the drift alert compares the median against p99 exactly
    assert threshold in buckets
    # The good scores spread over several buckets, not one: a median can move between them.
    inside = [b for b in buckets if good["p50"] - (threshold - good["p50"]) <= b <= threshold]
    assert len(inside) >= 8
    # A drifted median (halfway between p99 and the threshold) is told apart from the calibrated p99.
    m = Metrics(CollectorRegistry(), threshold=threshold, good_image_scores=good)
    drifted = (good["p99"] + threshold) / 2
    for _ in range(10):
        m.image_score(drifted)
    assert value(m, "edge_agent_image_score_bucket", le=repr(float(good["p99"]))) == 0.0
    assert value(m, "edge_agent_image_score_bucket", le=repr(float(threshold))) == 10.0


def test_registries_are_independent():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.camera_reconnect()
    assert b.registry.get_sample_value("edge_agent_camera_reconnects_total") == 0.0


def test_serve_scrape_and_promtool(metrics, tmp_path):
    metrics.frame_result("OK")
    metrics.stage("capture", 0.002)
    metrics.model_info("m", "c", "s", 0.5, "cpu", "fp32")
    server, port = metrics.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'edge_agent_frames_total{result="OK"} 1.0' in text
    assert "edge_agent_camera_up 0.0" in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("edge_agent_") for n in names)
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    # promtool exits 0 when clean; lint remarks (if any) are printed, and we want none.
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


@pytest.mark.parametrize("threshold, good", [
    (737.0, {"p50": 557.0, "p90": 613.5, "p99": 675.0, "max": 737.0}),  # the demo VAE's m
    (-4000.0, {"p50": -4600.0, "p90": -4300.0, "p99": -4100.0, "max": -4050.0}),  # elbo
    (-12.5, {"p50": -40.0, "p90": -25.0, "p99": -15.0, "max": -13.0}),  # GMM nll
])
def test_the_drift_alert_fires_on_the_buckets_the_daemon_exports_for_any_score(tmp_path, threshold, good):
    """promtool evaluates the real alerts.yml on histograms built from score_buckets: a station whose
    scores drifted between the calibrated p99 and the threshold fires, one at the good median does not."""
    import json

    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    buckets = [*score_buckets(threshold, good), float("inf")]
    drifted = (good["p99"] + threshold) / 2
    series = []
    for station, value in (("st1", drifted), ("st2", good["p50"])):
        labels = f'job="edge-agent", instance="{station}:9108", station="{station}"'
        series.append({"series": f'edge_agent_good_image_score{{{labels}, stat="p99"}}', "values": f"{good['p99']}x60"})
        for le in buckets:
            bound = "+Inf" if le == float("inf") else repr(le)
            series.append({"series": f'edge_agent_image_score_bucket{{{labels}, le="{bound}"}}',
                           "values": "0+10x60" if value <= le else "0x60"})
    upper = next(le for le in buckets if drifted <= le)
    lower = max([le for le in buckets if le < upper], default=0.0)
    median = lower + (upper - lower) * 0.5  # every observation in one bucket: histogram_quantile interpolates
    assert median > good["p99"]
    value = repr(median).removesuffix(".0")
    root = Path(__file__).parent.parent
    tests = {
        "rule_files": [str(root / "deploy/prometheus/alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [{
            "eval_time": "45m", "alertname": "EdgeAgentImageScoreDrift",
            "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "edge-agent", "instance": "st1:9108",
                                           "station": "st1"},
                            "exp_annotations": {
                                "summary": "Image scores on st1 drifted above the calibration distribution",
                                "description": f"Median image score over 1 h is {value}, above the calibrated p99 of "
                                               "good parts: lighting, focus, camera position or the parts changed; "
                                               "verdicts will soon flip to NG.",
                                "runbook": "docs/OPERATIONS.md#edgeagentimagescoredrift"}}]}]}],
    }
    (tmp_path / "drift_test.yml").write_text(json.dumps(tests, indent=1))  # JSON is YAML
    done = subprocess.run(["promtool", "test", "rules", "drift_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_cameras_stages_go_to_its_own_histogram_and_the_one_camera_series_stay_as_they_were():
    metrics = Metrics()
    top, side = metrics.for_camera("top"), metrics.for_camera("side")
    top.stages({"inference": 0.5, "queue": 0.25})
    side.stages({"inference": 0.75})
    get = metrics.registry.get_sample_value
    assert get("edge_agent_camera_stage_seconds_count", {"camera": "top", "stage": "inference"}) == 1
    assert get("edge_agent_camera_stage_seconds_sum", {"camera": "side", "stage": "inference"}) == 0.75
    assert get("edge_agent_camera_stage_seconds_count", {"camera": "side", "stage": "publish"}) == 0, \
        "known stages start at 0 for every camera"
    # The series one-camera dashboards and alerts read: same name, same labels, every camera's frames.
    assert get("edge_agent_stage_seconds_count", {"stage": "inference"}) == 2
    assert get("edge_agent_stage_seconds_sum", {"stage": "inference"}) == 1.25

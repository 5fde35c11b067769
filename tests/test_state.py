"""StationState: what the pipeline hands over after each verdict, and what readers get back."""

import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from referencing import Registry, Resource

from edge_agent.state import RATE_WINDOW_S, StationState

ROOT = Path(__file__).parent.parent
VERDICT_SCHEMA = json.loads((ROOT / "deploy" / "verdict.schema.json").read_text())
API_SCHEMA = json.loads((ROOT / "deploy" / "station-api.schema.json").read_text())
REGISTRY = Registry().with_resources([(s["$id"], Resource.from_contents(s)) for s in (VERDICT_SCHEMA, API_SCHEMA)])


def validate_api(document: dict, definition: str) -> None:
    """Check a /api/* answer against deploy/station-api.schema.json#/$defs/<definition>."""
    schema = {"$ref": f"{API_SCHEMA['$id']}#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(document)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def verdict(seq: int, result: str = "OK", captured_at: float = 1000.0, score: float | None = 0.5) -> dict:
    """A verdict document as the pipeline builds it (deploy/verdict.schema.json)."""
    doc = {
        "version": 1, "station": "st1", "seq": seq, "message_id": f"st1:boot1:{seq}", "captured_at": captured_at,
        "part_id": None, "trigger_id": None, "recipe": None, "job_id": None, "result": result,
        "anomalous": result != "OK", "score": None if result == "ERROR" else score, "threshold": 0.75,
        "score_name": "m", "worst_patch": None if result == "ERROR" else {"x": 16, "y": 0, "w": 32, "h": 32},
        "patches_over_threshold": int(result == "NG"), "patches_total": 49,
        "error": "scorer returned 3 non-finite patch scores" if result == "ERROR" else None,
        "model": {"id": "tiny", "checksum": "sha256:" + "0" * 64}, "latency_s": {"inference": 0.01},
        "heatmap": result == "NG",
    }
    if "error_reason" in VERDICT_SCHEMA["properties"]:  # the ERROR reasons (issue 12b) where the schema has them
        doc["error_reason"] = "internal" if result == "ERROR" else None
    return doc


def frame(value: int = 100) -> np.ndarray:
    return np.full((32, 48, 3), value, np.uint8)


class FakeScorer:
    model_id = "tiny"
    checksum = "sha256:" + "0" * 64
    score_name = "m"
    threshold = 0.75
    device = "cpu"
    dtype = "torch.float32"
    card = {"thresholds": {"m": {"value": 0.75, "method": "frr", "description": "k-th highest good image score",
                                 "target_frr": 0.01, "frr_upper_bound": 0.0075, "confidence": 0.95, "n_good": 400,
                                 "observed_frr": 0.005, "chosen_at": "2026-11-30T10:00:00+00:00"}}}


def test_counters_rate_and_latency_from_what_the_pipeline_hands_over():
    clock = Clock()
    state = StationState("st1", "Line 3", clock=clock)
    results = ["OK", "OK", "NG", "ERROR", "OK", "NG", "OK", "OK"]
    for seq, result in enumerate(results, start=1):
        clock.t = 1000.0 + seq * 0.5  # two verdicts a second, each 0.25 s after its capture
        state.verdict(verdict(seq, result, captured_at=clock.t - 0.25), b"jpeg" if result == "NG" else None, frame())
    snap = state.snapshot()
    c = snap["counters"]
    assert (c["inspected"], c["ok"], c["ng"], c["error"]) == (8, 5, 2, 1)
    assert c["ng_rate"] == 0.25
    assert c["frames_per_s"] == 2.0
    assert c["latency_p50_s"] == 0.25 and c["latency_p99_s"] == 0.25 and c["latency_samples"] == 8
    assert snap["last_seq"] == 8 and snap["latest"]["verdict"]["seq"] == 8
    assert snap["station"] == {"id": "st1", "name": "Line 3"}
    clock.t += RATE_WINDOW_S + 1
    assert state.snapshot()["counters"]["frames_per_s"] == 0.0, "a stopped line shows 0 frames/s, not the old rate"


def test_before_the_first_verdict_the_snapshot_says_so():
    snap = StationState("st1").snapshot()
    assert snap["latest"] is None and snap["last_seq"] == 0
    c = snap["counters"]
    assert c["inspected"] == 0 and c["ng_rate"] is None and c["latency_p50_s"] is None
    assert snap["health"]["camera_up"] is None


def test_only_the_newest_raw_frame_is_held_and_encoded_once_when_asked():
    state = StationState("st1")
    state.verdict(verdict(1), None, frame(10))
    state.verdict(verdict(2, "NG"), b"heatmap-jpeg", frame(20))
    state.verdict(verdict(3), None, frame(30))
    assert state.image(1) is None, "an older OK frame that no page asked for is not kept"
    assert state.image(2) == (b"heatmap-jpeg", "heatmap")
    jpeg, kind = state.image(3)
    assert kind == "frame"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (32, 48, 3) and abs(int(decoded.mean()) - 30) <= 2
    state.verdict(verdict(4), None, frame(40))
    assert state.image(3) == (jpeg, "frame"), "a frame encoded for a page stays with its verdict"
    views = {v["verdict"]["seq"]: v for v in state.verdicts()["verdicts"]}
    assert [views[s]["image_kind"] for s in (1, 2, 3, 4)] == [None, "heatmap", "frame", "frame"]
    assert views[1]["image"] is None and views[2]["image"] == "/api/image/2.jpg"
    assert state.image(99) is None


def test_an_unreadable_frame_has_no_image():
    state = StationState("st1")
    state.verdict(verdict(1, "ERROR"), None, np.zeros((0, 0), np.uint8))
    assert state.image(1) is None and state.snapshot()["latest"]["image_kind"] is None


@pytest.mark.parametrize("since, limit, seqs", [
    (0, None, [3, 4, 5]),  # only the newest `recent` are kept
    (3, None, [4, 5]),
    (5, None, []),
    (9, None, [3, 4, 5]),  # since ahead of the agent: it restarted, so everything kept
    (0, 2, [4, 5]),
    (0, 0, []),
])
def test_verdicts_since(since, limit, seqs):
    state = StationState("st1", recent=3)
    for seq in range(1, 6):
        state.verdict(verdict(seq))
    page = state.verdicts(since, limit)
    assert [v["verdict"]["seq"] for v in page["verdicts"]] == seqs and page["last_seq"] == 5


def test_health_changes_are_stamped_when_they_change_only():
    clock = Clock(50.0)
    state = StationState("st1", clock=clock)
    state.camera_up(True)
    state.broker_connected(True)
    clock.t = 60.0
    state.broker_connected(True)
    state.outbox_depth(0)
    clock.t = 70.0
    state.broker_connected(False)
    state.outbox_depth(4)
    h = state.snapshot()["health"]
    assert (h["camera_up"], h["broker_connected"], h["outbox_depth"]) == (True, False, 4)
    assert h["changed_at"] == {"camera_up": 50.0, "broker_connected": 70.0, "outbox_depth": 70.0}


def test_model_says_how_the_threshold_was_chosen():
    state = StationState("st1")
    state.model(FakeScorer())
    m = state.snapshot()["model"]
    assert m["calibration"]["method"] == "frr" and m["calibration"]["frr_upper_bound"] == 0.0075
    assert m["calibration"]["chosen_at"].startswith("2026-11-30")
    assert (m["device"], m["precision"], m["threshold"]) == ("cpu", "float32", 0.75)
    state.model(FakeScorer(), threshold_from_config=True)
    cal = state.snapshot()["model"]["calibration"]
    assert cal["method"] == "config" and "frr threshold 0.75" in cal["description"]


def test_snapshot_and_verdicts_match_the_documented_schema():
    clock = Clock()
    state = StationState("st1", clock=clock)
    state.model(FakeScorer())
    state.camera_up(True)
    for seq, result in enumerate(["OK", "NG", "ERROR"], start=1):
        clock.t += 0.2
        state.verdict(verdict(seq, result, captured_at=clock.t - 0.1), b"j" if result == "NG" else None, frame())
    validate_api(json.loads(json.dumps(state.snapshot(), allow_nan=False)), "state")
    validate_api(json.loads(json.dumps(state.verdicts(0))), "verdicts")
    broken = state.snapshot()
    del broken["counters"]["ng_rate"]
    with pytest.raises(jsonschema.ValidationError):
        validate_api(broken, "state")

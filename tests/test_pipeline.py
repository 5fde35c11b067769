import dataclasses
import json
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edge_agent.capture import EndOfStream
from edge_agent.config import Config, RetentionConfig
from edge_agent.errors import ModelError
from edge_agent.frames import Frame, Trigger
from edge_agent.metrics import Metrics
from edge_agent.patches import PatchGrid, to_tensor
from edge_agent.pipeline import Model, Pipeline
from edge_agent.retention import Retention

SCHEMA = json.loads((Path(__file__).parent.parent / "deploy" / "verdict.schema.json").read_text())
H = W = 64
P, S = 32, 16  # a 3x3 grid: patch 4 is the centre one


class FakeScorer:
    """Scorer's surface; scores come from score_fn(patches) so a test can plant NaN or a hot patch."""

    def __init__(self, score_fn=None, h=H, w=W, threshold=0.5):
        self.card = {"input": {"channels": 1, "frame_height": h, "frame_width": w}}
        self.channels = 1
        self.threshold = threshold
        self.score_name = "m"
        self.model_id = "fake"
        self.checksum = "sha256:fake"
        self.path = Path("fake.pt")
        self.score_fn = score_fn or (lambda x: np.full(len(x), 0.25, np.float32))
        self.low = None  # the card's low bound; None like a card from before two-sided scores
        self.good_image_scores = None

    def grid(self, h, w):
        return PatchGrid.for_frame(h, w, P, S)

    def patches(self, image):
        grid = self.grid(*image.shape[:2])
        return grid, grid.extract(to_tensor(image, 1))

    def score_patches(self, patches):
        return self.score_fn(patches)

    def score_frame(self, grid, patches, name=None):
        return self.score_fn(patches)


def textured(shape, seed=0):
    """A frame that passes the quality gate: mid-grey with noise, like a part under good light."""
    return np.random.default_rng(seed).integers(60, 190, shape, dtype=np.uint8)


class FakeSource:
    """`n` textured frames, then EndOfStream; finite=True makes Capture pace by back-pressure."""

    def __init__(self, n=3, finite=True, shape=(H, W, 3)):
        self.n, self.finite, self.shape, self.i = n, finite, shape, 0

    def open(self):
        pass

    def read(self):
        if self.i >= self.n:
            raise EndOfStream("fake")
        self.i += 1
        return textured(self.shape, self.i)

    def close(self):
        pass

    def describe(self):
        return "fake source"


class RecordingPublisher:
    def __init__(self):
        self.verdicts = []
        self.heatmaps = []

    def publish_verdict(self, verdict, heatmap_jpeg=None):
        self.verdicts.append(dict(verdict, heatmap=heatmap_jpeg is not None))
        self.heatmaps.append(heatmap_jpeg)


def make_config(**sections):
    base = {"station": {"id": "st1"}, "source": {"kind": "file", "uri": "x.avi"}, "mqtt": {"host": "127.0.0.1"}}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return Config.model_validate(base)


def make_pipeline(scorer=None, source=None, mask=None, **sections):
    metrics = Metrics()
    publisher = RecordingPublisher()
    stop = threading.Event()
    pipeline = Pipeline(make_config(**sections), Model(scorer or FakeScorer(), mask), source or FakeSource(),
                        publisher, metrics, stop, boot_id="b00t")
    return pipeline, publisher, metrics


def frame(seq, shape=(H, W, 3)):
    return Frame(seq, textured(shape, seq), captured_at=1_700_000_000.0 + seq, stage_s={"capture": 0.001})


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def validate(verdict):
    jsonschema.validate(verdict, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_latest_frame_wins_and_drops_are_counted():
    pipeline, _, metrics = make_pipeline(source=FakeSource(finite=False), inspection={"queue_size": 2})
    assert pipeline.capture.pace == "live"
    for seq in range(1, 6):
        pipeline._on_frame(frame(seq))
    assert [pipeline.queue.get_nowait().seq for _ in range(2)] == [4, 5]
    assert sample(metrics, "edge_agent_dropped_total", reason="queue_full") == 3


def test_every_stored_frame_gets_exactly_one_verdict():
    pipeline, publisher, metrics = make_pipeline(source=FakeSource(n=7), inspection={"queue_size": 1})
    pipeline.start()
    assert pipeline.stop.wait(10), "the end of the file stops the pipeline"
    assert pipeline.drain(10)
    assert [v["seq"] for v in publisher.verdicts] == list(range(1, 8))
    assert sample(metrics, "edge_agent_dropped_total", reason="queue_full") == 0
    assert sample(metrics, "edge_agent_frames_total", result="OK") == 7
    for v in publisher.verdicts:
        validate(v)
        assert v["message_id"] == f"st1:b00t:{v['seq']}"
        assert v["part_id"] is None and v["result"] == "OK"
        assert {"capture", "preprocess", "inference", "decision"} <= set(v["latency_s"])


@pytest.mark.parametrize("fail", ["nan", "raise"])
def test_scorer_nan_or_exception_gives_an_error_verdict_and_the_next_frame_is_fine(fail):
    calls = []

    def score(x):
        calls.append(1)
        if len(calls) == 1:
            if fail == "raise":
                raise RuntimeError("CUDA error: device-side assert")
            return np.full(len(x), np.nan, np.float32)
        return np.full(len(x), 0.25, np.float32)

    pipeline, publisher, metrics = make_pipeline(FakeScorer(score), mqtt={"heatmap": "all"})
    bad, good = pipeline.inspect(frame(1)), pipeline.inspect(frame(2))
    assert bad["result"] == "ERROR" and bad["score"] is None and bad["worst_patch"] is None
    assert ("non-finite" if fail == "nan" else "device-side assert") in bad["error"]
    assert publisher.heatmaps[0] is None, "no heatmap from scores that cannot be trusted"
    assert good["result"] == "OK" and good["error"] is None
    for v in publisher.verdicts:
        validate(v)
    assert sample(metrics, "edge_agent_frames_total", result="ERROR") == 1
    assert sample(metrics, "edge_agent_errors_total", stage="inference") == 1


def hot_centre(x):
    scores = np.full(len(x), 0.25, np.float32)
    scores[4] = 0.75
    return scores


def test_ng_frame_gets_a_heatmap_and_the_worst_box():
    pipeline, publisher, metrics = make_pipeline(FakeScorer(hot_centre))
    v = pipeline.inspect(frame(1))
    validate(publisher.verdicts[0])
    assert v["result"] == "NG" and v["anomalous"] and v["score"] == 0.75
    assert v["worst_patch"] == {"x": 16, "y": 16, "w": 32, "h": 32}
    assert v["patches_over_threshold"] == 1 and v["patches_total"] == 9
    assert publisher.heatmaps[0][:2] == b"\xff\xd8", "a JPEG"
    assert "encode" in v["latency_s"]
    assert sample(metrics, "edge_agent_image_score_count") == 1


def test_ignore_mask_keeps_patches_there_from_counting():
    mask = np.full((H, W), 255, np.uint8)
    mask[28:36, 28:36] = 0  # the centre patch's centre pixel
    pipeline, _, _ = make_pipeline(FakeScorer(hot_centre), mask=mask)
    v = pipeline.inspect(frame(1))
    assert v["result"] == "OK" and v["score"] == 0.25 and v["patches_over_threshold"] == 0


def test_score_at_the_threshold_is_ok():
    pipeline, _, _ = make_pipeline(FakeScorer(lambda x: np.full(len(x), 0.5, np.float32), threshold=0.5))
    assert pipeline.inspect(frame(1))["result"] == "OK"


def test_wrong_size_frame_is_counted_never_scored_and_gets_an_error_verdict():
    calls = []
    pipeline, publisher, metrics = make_pipeline(
        FakeScorer(lambda x: calls.append(1) or np.zeros(len(x), np.float32)), source=FakeSource(finite=False))
    pipeline._on_frame(frame(1, shape=(H, W + 8, 3)))
    pipeline._on_frame(frame(2, shape=(H, W)))  # grey frames fit a grey model
    first, second = (pipeline.inspect(pipeline.queue.get_nowait()) for _ in range(2))
    assert (first["seq"], first["result"], second["seq"], second["result"]) == (1, "ERROR", 2, "OK")
    assert "72x64x3" in first["error"] and first["score"] is None
    validate(first)
    assert sample(metrics, "edge_agent_bad_frames_total", reason="wrong_size") == 1
    assert sample(metrics, "edge_agent_error_verdicts_total", reason="wrong_size") == 1
    assert first["error_reason"] == "wrong_size"
    assert sample(metrics, "edge_agent_dropped_total", reason="wrong_size") == 0, "a frame with a verdict is no drop"
    assert sample(metrics, "edge_agent_frames_total", result="ERROR") == 1
    assert len(calls) == 1, "only the frame that fits is scored"


def test_triggers_pair_with_the_next_frames_in_order():
    pipeline, publisher, metrics = make_pipeline(source=FakeSource(n=50), inspection={"mode": "triggered"})
    pipeline.start()
    pipeline.trigger(Trigger("t1", "P1", recipe="r", received_at=1.0))
    pipeline.trigger(Trigger("t2", "P2", job_id="j9", received_at=2.0))
    while len(publisher.verdicts) < 2:
        pipeline.stop.wait(0.01)
    pipeline.stop.set()
    assert pipeline.drain(10)
    v1, v2 = publisher.verdicts
    assert (v1["part_id"], v1["trigger_id"], v1["recipe"], v1["job_id"]) == ("P1", "t1", "r", None)
    assert (v2["part_id"], v2["trigger_id"], v2["job_id"]) == ("P2", "t2", "j9")
    assert v1["seq"] < v2["seq"]
    validate(v1)
    assert sample(metrics, "edge_agent_triggers_total", result="accepted") == 2


def live_frame(seq):
    """A live frame whose read began now."""
    return dataclasses.replace(frame(seq), read_started_mono=time.monotonic())


def test_frames_without_a_trigger_are_not_inspected_in_triggered_mode():
    pipeline, _, _ = make_pipeline(source=FakeSource(finite=False), inspection={"mode": "triggered"})
    pipeline._on_frame(live_frame(1))
    assert pipeline.queue.empty()
    pipeline.trigger(Trigger("t1", "P1"))
    pipeline._on_frame(live_frame(2))
    paired = pipeline.queue.get_nowait()
    assert paired.trigger.part_id == "P1" and paired.frame_age_s >= 0


def test_a_live_frame_read_before_the_trigger_arrived_is_never_paired_with_it():
    pipeline, _, _ = make_pipeline(source=FakeSource(finite=False), inspection={"mode": "triggered"})
    stale = live_frame(1)  # its read began before the trigger arrived: the previous part
    pipeline.trigger(Trigger("t1", "P1"))
    pipeline._on_frame(stale)
    assert pipeline.queue.empty() and pipeline.pending.waiting == 1
    pipeline._on_frame(live_frame(2))
    assert pipeline.queue.get_nowait().seq == 2


def test_a_live_source_is_never_blocked_while_inference_is_busy():
    pipeline, _, _ = make_pipeline(source=FakeSource(finite=False), inspection={"mode": "triggered", "queue_size": 1})
    pipeline.trigger(Trigger("t1", "P1"))
    pipeline._on_frame(live_frame(1))
    pipeline.trigger(Trigger("t2", "P2"))
    pipeline._on_frame(live_frame(2))  # the queue is full: returns at once; frame 2, read after t2, waits for room
    assert pipeline.pending.waiting == 0 and pipeline.queue.qsize() == 1
    assert pipeline.queue.get_nowait().trigger.trigger_id == "t1"
    pipeline._on_frame(live_frame(3))  # the camera is read on; t2 keeps the frame taken right after it
    paired = pipeline.queue.get_nowait()
    assert (paired.trigger.trigger_id, paired.seq) == ("t2", 2)
    assert pipeline.queue.empty()


class DeadCamera(FakeSource):
    """Delivers `n` frames, then every read fails: the camera is gone."""

    def read(self):
        if self.i >= self.n:
            return None
        return super().read()


def test_a_trigger_still_pending_at_shutdown_gets_an_error_verdict():
    pipeline, publisher, metrics = make_pipeline(source=DeadCamera(n=0, finite=False),
                                                 inspection={"mode": "triggered"})
    pipeline.start()
    pipeline.trigger(Trigger("t1", "P1"))
    pipeline.trigger(Trigger("t2", "P2"))
    pipeline.stop.set()
    assert pipeline.drain(5)
    assert [(v["part_id"], v["result"]) for v in publisher.verdicts] == [("P1", "ERROR"), ("P2", "ERROR")]
    for v in publisher.verdicts:
        validate(v)
        assert "stopped before a frame" in v["error"] and v["score"] is None
    assert len({v["message_id"] for v in publisher.verdicts}) == 2
    assert sample(metrics, "edge_agent_frames_total", result="ERROR") == 2


def test_free_run_refuses_triggers_with_the_fix():
    pipeline, _, _ = make_pipeline()
    with pytest.raises(ValueError, match='mode = "triggered"'):
        pipeline.trigger(Trigger("t1", "P1"))


def test_swap_model_refuses_another_frame_size():
    pipeline, _, _ = make_pipeline()
    with pytest.raises(ModelError, match="restart"):
        pipeline.swap_model(Model(FakeScorer(h=128, w=128)))
    pipeline.swap_model(Model(FakeScorer(threshold=0.1)))
    assert pipeline.inspect(frame(1))["result"] == "NG"


def test_retention_keeps_ng_and_stays_under_its_bound(tmp_path):
    retention = Retention(RetentionConfig(enabled=True, dir=tmp_path, max_mb=0.01, ok_sample_rate=0.0))
    assert retention.wants("NG") and retention.wants("ERROR") and not retention.wants("OK")
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)  # ~12 kB as PNG
    for seq in range(1, 4):
        retention.save(image, {"seq": seq, "captured_at": 1_700_000_000.0 + seq, "result": "NG"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith("00000003_NG.json"), "only the newest frame is kept"
    assert json.loads((tmp_path / names[0]).read_text())["seq"] == 3


def test_an_unreadable_frame_gets_an_error_verdict_even_with_retention_on(tmp_path):
    pipeline, publisher, _ = make_pipeline()
    pipeline.retention = Retention(RetentionConfig(enabled=True, dir=tmp_path))
    unreadable = Frame(1, np.zeros((0, 0), np.uint8), captured_at=1.0, error="unreadable frame: x.png")
    verdict = pipeline.inspect(unreadable)
    assert (verdict["result"], verdict["error"]) == ("ERROR", "unreadable frame: x.png")
    assert publisher.verdicts[0]["seq"] == 1 and not list(tmp_path.iterdir())
    validate(verdict)


def test_an_exception_in_decide_still_publishes_an_error_verdict_and_the_next_frame_is_fine(monkeypatch):
    import edge_agent.pipeline as pipeline_module

    real_decide = pipeline_module.decide
    calls = []

    def flaky_decide(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("planted")
        return real_decide(*args, **kw)

    monkeypatch.setattr(pipeline_module, "decide", flaky_decide)
    pipeline, publisher, metrics = make_pipeline()
    first, second = pipeline.inspect(frame(1)), pipeline.inspect(frame(2))
    assert [v["result"] for v in publisher.verdicts] == ["ERROR", "OK"]
    assert first["error_reason"] == "internal" and "ZeroDivisionError: planted" in first["error"]
    validate(first)
    assert second["result"] == "OK"
    assert sample(metrics, "edge_agent_error_verdicts_total", reason="internal") == 1


def test_a_grey_frame_is_error_uniform_and_never_scored():
    calls = []
    pipeline, publisher, metrics = make_pipeline(FakeScorer(lambda x: calls.append(1) or np.zeros(len(x), np.float32)),
                                                 source=FakeSource(finite=False))
    grey = np.full((H, W, 3), 128, np.uint8)
    grey[::2, ::2] += 1  # a little decoder noise
    pipeline._on_frame(Frame(1, grey, captured_at=1.0))
    verdict = pipeline.inspect(pipeline.queue.get_nowait())
    assert (verdict["result"], verdict["error_reason"]) == ("ERROR", "uniform") and not calls
    validate(verdict)
    assert sample(metrics, "edge_agent_error_verdicts_total", reason="uniform") == 1
    assert sample(metrics, "edge_agent_image_score_count") == 0, "an ERROR frame's score stays out of the drift baseline"
class RecordingWatchdog:
    def __init__(self):
        self.calls = []

    def progress(self):
        self.calls.append("progress")

    def idle_ok(self, idle):
        self.calls.append(("idle_ok", idle))

    def stop(self, timeout=None):
        self.calls.append("stop")


def test_a_dead_capture_thread_stops_the_pipeline_and_the_watchdog_and_marks_it_fatal():
    class Buggy(FakeSource):
        def read(self):
            raise RuntimeError("planted bug")

    pipeline, _, _ = make_pipeline(source=Buggy(finite=False))
    pipeline.watchdog = RecordingWatchdog()
    pipeline.start()
    assert pipeline.stop.wait(10)
    assert pipeline.drain(10)
    assert "capture thread died (RuntimeError: planted bug)" in pipeline.fatal
    assert pipeline.watchdog.calls[-2:] == [("idle_ok", False), "stop"], "no more pings"


def test_paired_live_frames_waiting_for_room_are_all_judged_at_shutdown():
    slow = FakeScorer(score_fn=lambda x: (time.sleep(0.05), np.full(len(x), 0.25, np.float32))[1])
    pipeline, publisher, _ = make_pipeline(scorer=slow, source=FakeSource(finite=False),
                                           inspection={"mode": "triggered", "queue_size": 1})
    pipeline._infer.start()
    for i in range(1, 6):
        pipeline.trigger(Trigger(f"t{i}", f"P{i}"))
        pipeline._on_frame(live_frame(i))
    pipeline.stop.set()
    assert pipeline.drain(10)
    assert [v["trigger_id"] for v in publisher.verdicts] == ["t1", "t2", "t3", "t4", "t5"]
    assert [v["seq"] for v in publisher.verdicts] == [1, 2, 3, 4, 5]
    assert all(v["result"] == "OK" and v["frame_age_s"] is not None for v in publisher.verdicts)


def test_a_trigger_past_its_deadline_gets_one_error_verdict_and_no_frame_later():
    pipeline, publisher, metrics = make_pipeline(source=DeadCamera(n=0, finite=False),
                                                 inspection={"mode": "triggered"}, trigger={"deadline_s": 0.5})
    pipeline.start()
    pipeline.trigger(Trigger("t1", "P1"))
    deadline = time.monotonic() + 10
    while not publisher.verdicts and time.monotonic() < deadline:
        pipeline.stop.wait(0.01)
    pipeline._on_frame(live_frame(99))  # the camera is back: the expired trigger must not take this frame
    pipeline.stop.set()
    assert pipeline.drain(5)
    (v,) = publisher.verdicts
    assert (v["trigger_id"], v["result"]) == ("t1", "ERROR") and "trigger.deadline_s = 0.5 s" in v["error"]
    validate(v)
    assert sample(metrics, "edge_agent_errors_total", stage="trigger_deadline") == 1


def test_a_dead_infer_thread_stops_the_watchdog_marks_it_fatal_and_every_frame_read_still_gets_a_verdict():
    pipeline, publisher, metrics = make_pipeline(source=FakeSource(n=1000), inspection={"queue_size": 2})
    pipeline.camera = "side"
    pipeline.watchdog = RecordingWatchdog()
    real_feed = pipeline._feed_backlog

    def feed():  # a bug on the infer thread outside inspect(), after its first verdict
        if pipeline.inspected >= 1 and threading.current_thread().name == "infer":
            raise RuntimeError("planted bug")
        real_feed()

    pipeline._feed_backlog = feed
    pipeline.start()
    assert pipeline.stop.wait(10), "a dead infer thread stops the agent"
    pipeline.drain(10)
    assert pipeline.fatal.startswith("camera side: the infer thread died (RuntimeError: planted bug)")
    assert pipeline.watchdog.calls[-2:] == [("idle_ok", False), "stop"], "no more pings"
    read = pipeline.capture.counts["frames"]
    assert read >= 2
    assert sorted(v["seq"] for v in publisher.verdicts) == list(range(1, read + 1)), "no frame read is lost"
    first, *stranded = publisher.verdicts
    assert first["result"] == "OK"
    assert all(v["result"] == "ERROR" and v["error_reason"] == "internal" and "infer thread died" in v["error"]
               for v in stranded)
    for v in stranded:
        validate({k: x for k, x in v.items() if k != "camera"})  # the station wraps it into its camera's result
    assert sample(metrics, "edge_agent_error_verdicts_total", reason="internal") == len(stranded)


def test_a_dead_shared_scoring_service_is_fatal_and_its_frames_are_error():
    from edge_agent.shared_scorer import ScoringService

    pipeline, publisher, metrics = make_pipeline(source=FakeSource(n=1000), inspection={"queue_size": 2})
    pipeline.camera = "top"
    pipeline.watchdog = RecordingWatchdog()
    service = ScoringService()

    def serve():  # a bug on the station's shared `scorer` thread, outside any one forward pass
        raise RuntimeError("planted scorer bug")

    service._serve = serve
    pipeline.scoring = service.start()
    pipeline.start()
    assert pipeline.stop.wait(10), "a dead scoring service stops the agent: systemd restarts it"
    pipeline.drain(10)
    assert pipeline.fatal.startswith("camera top: the scorer thread died (the scoring service died "
                                     "(RuntimeError: planted scorer bug))")
    calls = pipeline.watchdog.calls
    stopped = calls.index("stop")  # the infer thread lives on to publish ERRORs, but the pings have ended
    assert calls[stopped - 1] == ("idle_ok", False) and "start" not in calls[stopped:], "no more pings"
    read = pipeline.capture.counts["frames"]
    assert sorted(v["seq"] for v in publisher.verdicts) == list(range(1, read + 1)), "no frame read is lost"
    assert publisher.verdicts and all(v["result"] == "ERROR" and v["error_reason"] == "internal"
                                      for v in publisher.verdicts)
    assert sample(metrics, "edge_agent_error_verdicts_total", reason="internal") == len(publisher.verdicts)

"""Every Prometheus metric of the daemon, in one class that takes a registry.

The stages call small hooks (`camera_up`, `dropped`, `published`...) and never touch
prometheus_client themselves; tests pass a fresh CollectorRegistry and read samples back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from edge_agent.verdict import ERROR_REASONS

logger = logging.getLogger(__name__)

STAGES = ("capture", "preprocess", "inference", "decision", "encode", "publish")
RESULTS = ("OK", "NG", "ERROR")
# Frames or messages lost without a verdict. A frame that got a verdict (ERROR included) is never a drop:
# unreadable and wrong-size frames are in edge_agent_bad_frames_total and edge_agent_error_verdicts_total.
DROP_REASONS = ("queue_full", "heatmap_outbox_full", "verdict_outbox_full", "outbox_error")
BAD_FRAME_REASONS = ("bad_frame", "wrong_size")
# 1 ms .. 10 s in 1-2-5 steps: a CPU patch pass takes tens of ms, a broker round trip can take seconds.
SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Image-score buckets as fractions of the threshold: dense around 1.0 so drift toward it shows
# before verdicts flip, up to 3x so real defects still land in a finite bucket.
THRESHOLD_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0)
# The card's good-score statistics exported as edge_agent_good_image_score{stat}. Not a `quantile`
# label: Prometheus reserves that for summaries (promtool check metrics rejects it).
GOOD_SCORE_STATS = ("p50", "p90", "p99", "max")
DEFAULT_SCORE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0)
# Steps of the gap between the median good image score and the threshold, around the threshold:
# -4 .. -1 cover the good parts (p50 at -1), 0 is the threshold, up to +8 for gross defects.
GAP_STEPS = (-4.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def score_buckets(threshold: float | None, good_image_scores: Mapping[str, float] | None = None) -> tuple[float, ...]:
    """Histogram buckets for image scores, from the model's own calibration scores when the card has them.

    With the card's good-score statistics: the threshold plus GAP_STEPS of the gap (threshold - p50),
    and the statistics themselves (p50, p90, p99, max) as bucket bounds, so the drift alert's median
    lands between known bounds for any score, negative ones (elbo, a, GMM nll) included. Without
    them: THRESHOLD_FRACTIONS of the threshold, mirrored around it when it is not positive.
    """
    if threshold is None or not math.isfinite(threshold):
        return DEFAULT_SCORE_BUCKETS
    stats = {k: v for k, v in (good_image_scores or {}).items()
             if k in GOOD_SCORE_STATS and isinstance(v, (int, float)) and math.isfinite(v)}
    p50 = stats.get("p50")
    if p50 is not None and threshold > p50:
        gap = threshold - p50
        bounds = {threshold + step * gap for step in GAP_STEPS} | set(stats.values())
    elif threshold > 0:
        bounds = {f * threshold for f in THRESHOLD_FRACTIONS}
    else:
        # A negative or zero threshold: the same fractions' distances from it, on either side.
        scale = abs(threshold) or 1.0
        bounds = {threshold + (f - 1.0) * scale for f in THRESHOLD_FRACTIONS}
    return tuple(sorted({round(b, 12) for b in bounds}))


class Metrics:
    """The daemon's metrics; `registry=None` creates a private registry (never the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None, threshold: float | None = None,
                 good_image_scores: Mapping[str, float] | None = None) -> None:
        """`threshold` and the card's `good_image_scores` shape the image-score buckets (score_buckets);
        build Metrics after the model is loaded to use them."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "edge_agent_latency_seconds",
            "End-to-end latency from frame capture to the broker's acknowledgement of its verdict.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "edge_agent_stage_seconds", "Time spent per pipeline stage.", ["stage"], buckets=SECONDS_BUCKETS, registry=r
        )
        self.frames = Counter("edge_agent_frames", "Frames inspected, by verdict.", ["result"], registry=r)
        self.error_verdicts = Counter(
            "edge_agent_error_verdicts", "ERROR verdicts, by reason (frame quality, unreadable, scoring...).", ["reason"],
            registry=r,
        )
        self.bad_frames = Counter(
            "edge_agent_bad_frames",
            "Frames the source delivered unreadable (bad_frame) or of the wrong size; inspected ones get ERROR verdicts.",
            ["reason"],
            registry=r,
        )
        self.verdicts_published = Counter(
            "edge_agent_verdicts_published", "Verdicts acknowledged by the broker.", registry=r
        )
        self.messages_published = Counter(
            "edge_agent_messages_published", "MQTT messages acknowledged by the broker, by kind.", ["kind"], registry=r
        )
        self.dropped_total = Counter(
            "edge_agent_dropped", "Frames or messages dropped, by reason.", ["reason"], registry=r
        )
        self.camera_up_gauge = Gauge("edge_agent_camera_up", "1 while the frame source delivers frames.", registry=r)
        self.camera_reconnects = Counter(
            "edge_agent_camera_reconnects", "Attempts to reopen the frame source after an outage.", registry=r
        )
        self.broker_connected_gauge = Gauge(
            "edge_agent_broker_connected", "1 while connected to the MQTT broker.", registry=r
        )
        self.outbox_depth_gauge = Gauge("edge_agent_outbox_depth", "Messages waiting in the durable outbox.", registry=r)
        self.outbox_bytes_gauge = Gauge("edge_agent_outbox_bytes", "Bytes held by the durable outbox.", registry=r)
        self.model = Info("edge_agent_model", "The loaded model and how it runs.", registry=r)
        self.image_score_hist = Histogram(
            "edge_agent_image_score",
            "Image anomaly score (max patch score) of OK and NG frames; buckets from the model's calibration scores.",
            buckets=score_buckets(threshold, good_image_scores),
            registry=r,
        )
        self.threshold_gauge = Gauge(
            "edge_agent_threshold", "Image-score threshold in use: a frame is NG when its score is above it.", registry=r
        )
        self.good_image_score_gauge = Gauge(
            "edge_agent_good_image_score",
            "Image scores of good parts at calibration (model card): p50, p90, p99, max; the baseline for drift alerts.",
            ["stat"],
            registry=r,
        )
        self.triggers = Counter("edge_agent_triggers", "PLC triggers, by outcome.", ["result"], registry=r)
        self.errors = Counter("edge_agent_errors", "Steady-state errors, by stage.", ["stage"], registry=r)
        self.patches_scored_total = Counter("edge_agent_patches_scored", "Patches scored.", registry=r)
        self.device_fallback_gauge = Gauge(
            "edge_agent_device_fallback", "1 while scoring runs on the CPU although a GPU was expected (see the log).",
            registry=r)
        # Stations with [[cameras]]: the per-camera series (CameraMetrics) and one result per part.
        self.camera_source_up = Gauge("edge_agent_camera_source_up", "1 while this camera delivers frames.",
                                      ["camera"], registry=r)
        self.camera_frames = Counter("edge_agent_camera_frames", "Frames of this camera inspected, by verdict.",
                                     ["camera", "result"], registry=r)
        self.camera_source_reconnects = Counter(
            "edge_agent_camera_source_reconnects", "Attempts to reopen this camera after an outage.", ["camera"],
            registry=r)
        # A second family, not a camera label on edge_agent_stage_seconds: one-camera dashboards keep their series.
        self.camera_stage_seconds = Histogram(
            "edge_agent_camera_stage_seconds", "Time spent per pipeline stage, by camera (stations with [[cameras]]).",
            ["camera", "stage"], buckets=SECONDS_BUCKETS, registry=r)
        self.parts = Counter("edge_agent_parts", "Triggered parts answered with one verdict over their cameras, by "
                             "verdict.", ["result"], registry=r)
        self._cameras_up: dict[str, bool] = {}
        # Known label values start at 0 so rate() and alerts work before the first event.
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
            self.errors.labels(stage=stage)
        for result in RESULTS:
            self.frames.labels(result=result)
        for reason in DROP_REASONS:
            self.dropped_total.labels(reason=reason)
        for reason in ERROR_REASONS:
            self.error_verdicts.labels(reason=reason)
        for reason in BAD_FRAME_REASONS:
            self.bad_frames.labels(reason=reason)
        for result in ("accepted", "rejected", "duplicate"):
            self.triggers.labels(result=result)

    _health_listeners: tuple[Any, ...] = ()  # camera, broker and outbox changes go to these too

    def watch_health(self, listener: Any) -> None:
        """Also hand camera_up, broker_connected and outbox_depth to listener (the station page's state)."""
        self._health_listeners = (*self._health_listeners, listener)

    # Capture
    def camera_up(self, up: bool) -> None:
        self.camera_up_gauge.set(1 if up else 0)
        for listener in self._health_listeners:
            listener.camera_up(up)

    def camera_reconnect(self) -> None:
        self.camera_reconnects.inc()

    def frame_rejected(self, reason: str) -> None:
        """A captured frame that cannot be judged (bad_frame, wrong_size); not a drop: it is passed on for
        an ERROR verdict, counted by frame_result."""
        self.bad_frames.labels(reason=reason).inc()

    # Pipeline
    def stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def stages(self, stage_s: Mapping[str, float]) -> None:
        """Observe a Frame's per-stage timings at once."""
        for stage, seconds in stage_s.items():
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def frame_result(self, result: str, reason: str | None = None) -> None:
        """Count an inspected frame: OK, NG or ERROR (with its reason, verdict.ERROR_REASONS)."""
        self.frames.labels(result=result).inc()
        if result == "ERROR":
            self.error_verdicts.labels(reason=reason or "internal").inc()

    def image_score(self, score: float) -> None:
        self.image_score_hist.observe(score)

    def patches_scored(self, n: int) -> None:
        self.patches_scored_total.inc(n)

    def error(self, stage: str) -> None:
        self.errors.labels(stage=stage).inc()

    def model_info(
        self, model_id: str, checksum: str, score_name: str, threshold: float, device: str, precision: str
    ) -> None:
        self.model.info(
            {
                "model_id": model_id,
                "checksum": checksum,
                "score_name": score_name,
                "threshold": repr(float(threshold)),
                "device": device,
                "precision": precision,
            }
        )

    def device_fallback(self, fallback: bool) -> None:
        self.device_fallback_gauge.set(1 if fallback else 0)

    def calibration(self, threshold: float, good_image_scores: Mapping[str, float] | None) -> None:
        """The threshold and the card's good-score quantiles (p50, p90, p99, max), as numbers alerts can compare."""
        self.threshold_gauge.set(threshold)
        # A reloaded model without quantiles must not leave the previous model's baseline behind.
        self.good_image_score_gauge.clear()
        for stat in GOOD_SCORE_STATS:
            value = (good_image_scores or {}).get(stat)
            if value is not None and math.isfinite(value):
                self.good_image_score_gauge.labels(stat=stat).set(value)

    # MQTT
    def latency_s(self, seconds: float) -> None:
        """End-to-end latency of one verdict: broker ack time minus Frame.captured_at."""
        self.latency.observe(seconds)

    def published(self, kind: str) -> None:
        """A message the broker acknowledged; kind is 'verdict', 'heatmap' or 'status'."""
        self.messages_published.labels(kind=kind).inc()
        if kind == "verdict":
            self.verdicts_published.inc()

    def broker_connected(self, connected: bool) -> None:
        self.broker_connected_gauge.set(1 if connected else 0)
        for listener in self._health_listeners:
            listener.broker_connected(connected)

    def outbox_depth(self, depth: int) -> None:
        self.outbox_depth_gauge.set(depth)
        for listener in self._health_listeners:
            listener.outbox_depth(depth)

    def outbox_bytes(self, n_bytes: int) -> None:
        self.outbox_bytes_gauge.set(n_bytes)

    def dropped(self, reason: str) -> None:
        self.dropped_total.labels(reason=reason).inc()

    def trigger_accepted(self) -> None:
        self.triggers.labels(result="accepted").inc()

    def trigger_duplicate(self) -> None:
        """A repeated trigger_id (a PLC retry): answered, not inspected again."""
        self.triggers.labels(result="duplicate").inc()

    def trigger_rejected(self, reason: str) -> None:
        # The reason goes to the caller's log line, not a label: free-form text would explode cardinality.
        self.triggers.labels(result="rejected").inc()

    def part_result(self, result: str) -> None:
        self.parts.labels(result=result).inc()

    def for_camera(self, camera: str) -> CameraMetrics:
        for result in RESULTS:
            self.camera_frames.labels(camera=camera, result=result)
        self.camera_source_reconnects.labels(camera=camera)
        for stage in STAGES:
            self.camera_stage_seconds.labels(camera=camera, stage=stage)
        self.camera_source_up.labels(camera=camera).set(0)
        self._cameras_up[camera] = False
        return CameraMetrics(self, camera)

    def serve(self, bind: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, int]:
        """Serve /metrics on a daemon thread; returns (server, actual port). Stop with server.shutdown()."""
        server, _thread = start_http_server(port, addr=bind, registry=self.registry)
        actual = server.server_port
        logger.info("metrics served on http://%s:%d/metrics", bind, actual)
        return server, actual



class CameraMetrics:
    """One camera's view of the station's Metrics: its outages and results also counted under its `camera`
    label; edge_agent_camera_up is 1 only while every camera is up; triggers are counted once, by the station."""

    def __init__(self, station: Metrics, camera: str) -> None:
        self._station = station
        self.camera = camera

    def __getattr__(self, name: str) -> Any:
        return getattr(self._station, name)

    def camera_up(self, up: bool) -> None:
        s = self._station
        s.camera_source_up.labels(camera=self.camera).set(1 if up else 0)
        s._cameras_up[self.camera] = up
        for listener in s._health_listeners:
            camera_source_up = getattr(listener, "camera_source_up", None)
            if camera_source_up is not None:
                camera_source_up(self.camera, up)  # the station page shows each camera's up/down
        s.camera_up(all(s._cameras_up.values()))

    def stages(self, stage_s: Mapping[str, float]) -> None:
        """Each stage into the station's histogram and this camera's: a slow camera is found by its label."""
        for stage, seconds in stage_s.items():
            self._station.camera_stage_seconds.labels(camera=self.camera, stage=stage).observe(seconds)
        self._station.stages(stage_s)

    def camera_reconnect(self) -> None:
        self._station.camera_source_reconnects.labels(camera=self.camera).inc()
        self._station.camera_reconnect()

    def frame_result(self, result: str, reason: str | None = None) -> None:
        self._station.camera_frames.labels(camera=self.camera, result=result).inc()
        self._station.frame_result(result, reason)

    def trigger_accepted(self) -> None:
        pass  # the station counts the part's trigger once

    def trigger_duplicate(self) -> None:
        pass

"""A station with several cameras: one Pipeline per camera (capture and infer threads), one shared scorer.

In triggered mode a PLC trigger goes to every camera it needs (config trigger.cameras); each camera pairs it
with its own frame read after the trigger arrived, and the Part collects their results into one version 2
verdict: NG when any camera is NG, ERROR when any could not judge (a camera down runs into its deadline) and
none is NG. In free-run each camera's frame gets its own version 2 verdict. Heatmaps go to heatmap/<camera>.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.frames import Trigger
from edge_agent.triggers import Pending, TriggerError, answer_repeat, check_recipe, duplicate_of
from edge_agent.verdict import camera_result, cameras_document

logger = logging.getLogger(__name__)


@dataclass
class _Part:
    trigger: Trigger
    cameras: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    heatmaps: dict[str, bytes] = field(default_factory=dict)


class Station:
    """Routes triggers to cameras and camera verdicts to the publisher. Thread-safe: triggers arrive on the
    MQTT thread, camera verdicts on each camera's infer thread."""

    def __init__(self, config: Any, boot_id: str, metrics: Any, publisher: Any = None,
                 on_verdict: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.station = config.station.id
        self.boot_id = boot_id
        self.metrics = metrics
        self.publisher = publisher
        self.on_verdict = on_verdict
        self.triggered = config.inspection.mode == "triggered"
        self.trigger_cameras = config.trigger_cameras()
        self.pipelines: dict[str, Any] = {}
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._lock = threading.Lock()
        self._parts: dict[str, _Part] = {}
        self._ended: set[str] = set()
        # Station-level registry: de-duplicates PLC retries before any camera sees them.
        self.pending = Pending(float("inf"), 64, config.trigger.remember)

    def next_seq(self) -> int:
        """Station-wide: frames of every camera and part verdicts, so no two verdicts share a message_id."""
        with self._seq_lock:
            return next(self._seq)

    def add(self, camera: str, pipeline: Any) -> None:
        self.pipelines[camera] = pipeline
        pipeline.publisher = _CameraOutlet(self, camera)
        pipeline.on_source_end = lambda: self._source_ended(camera)

    def _source_ended(self, camera: str) -> None:
        with self._lock:
            self._ended.add(camera)
            every = len(self._ended) == len(self.pipelines)
        if every:
            logger.info("camera %s: the source ended, as every camera's has; stopping after the frames in flight",
                        camera)
            next(iter(self.pipelines.values())).stop.set()
        else:
            logger.info("camera %s: the source ended; the other cameras go on", camera)

    def heatmap_topic(self, camera: str) -> str:
        return f"{self.config.mqtt.prefix}/{self.station}/heatmap/{camera}"

    # MQTT thread

    def trigger(self, trigger: Trigger) -> dict[str, Any] | None:
        """One PLC trigger -> every camera it needs; returns extra answer fields (a duplicate), raises TriggerError."""
        if not self.triggered:
            raise ValueError('inspection.mode is "free-run"; set inspection.mode = "triggered" to use triggers')
        first = self.pipelines[self.trigger_cameras[0]]
        check_recipe(bool(self.config.recipes), first.recipes, trigger, first.default_recipe)
        with self._lock:
            state, verdict = self.pending.add(trigger)
            publisher = self.publisher
            repeat = answer_repeat(state, verdict, trigger, self.metrics, None if publisher is None else
                                   lambda v: publisher.publish_verdict(v, None, camera_heatmaps={}))
            if repeat is not None:
                return repeat
            self.pending.take()  # this one: station triggers wait for cameras, never for a frame
            self._parts[trigger.trigger_id] = _Part(trigger, list(self.trigger_cameras))
        self.metrics.trigger_accepted()
        for camera in self.trigger_cameras:
            try:
                self.pipelines[camera].trigger(trigger)
            except (TriggerError, ValueError) as e:  # this camera's backlog is full: the part cannot be judged
                logger.error("trigger %s: camera %s cannot take it: %s", trigger.trigger_id, camera, e)
                self._camera_error(camera, trigger, f"camera {camera} could not take the trigger: {e}")
        return None

    def _camera_error(self, camera: str, trigger: Trigger, error: str) -> None:
        pipe = self.pipelines[camera]
        pipe._unserved(trigger, error, "capture")  # publishes (to the part) an ERROR result for this camera

    # Camera infer threads

    def camera_verdict(self, camera: str, verdict: dict[str, Any], heatmap: bytes | None) -> None:
        if verdict.get("duplicate"):
            return  # retries are answered by the station, from the part's verdict
        topic = self.heatmap_topic(camera) if heatmap is not None else None
        result = camera_result(camera, verdict, topic)
        trigger_id = verdict.get("trigger_id")
        if not self.triggered or trigger_id is None:
            doc = cameras_document(self.station, self.boot_id, verdict["seq"], [result], camera=camera)
            self._publish(doc, {camera: heatmap} if heatmap is not None else {})
            return
        with self._lock:
            part = self._parts.get(trigger_id)
            if part is None or camera in part.results:
                logger.error("camera %s: a verdict for trigger %s that no part waits for; published alone",
                             camera, trigger_id)
                part = None
            else:
                part.results[camera] = result
                if heatmap is not None:
                    part.heatmaps[camera] = heatmap
                if len(part.results) < len(part.cameras):
                    return
                del self._parts[trigger_id]
        if part is None:  # never silently dropped
            doc = cameras_document(self.station, self.boot_id, verdict["seq"], [result], camera=camera)
            self._publish(doc, {camera: heatmap} if heatmap is not None else {})
            return
        results = [part.results[c] for c in part.cameras]
        doc = cameras_document(self.station, self.boot_id, self.next_seq(), results, trigger=part.trigger)
        self.metrics.part_result(doc["result"])
        self._publish(doc, part.heatmaps)
        waiting = self.pending.complete(part.trigger.trigger_id, doc)
        if waiting and self.publisher is not None:
            self.publisher.publish_verdict(duplicate_of(doc), None, camera_heatmaps={})

    def _publish(self, doc: dict[str, Any], heatmaps: dict[str, bytes]) -> None:
        if self.publisher is not None:
            self.publisher.publish_verdict(doc, None, camera_heatmaps=heatmaps)
        if self.on_verdict is not None:
            self.on_verdict(doc)

    def publish_info(self) -> None:
        publish_info = getattr(self.publisher, "publish_info", None)
        if publish_info is not None:
            publish_info()


class _CameraOutlet:
    """What a camera's Pipeline publishes to: its station (pipeline.Publisher)."""

    def __init__(self, station: Station, camera: str) -> None:
        self.station = station
        self.camera = camera

    def publish_verdict(self, verdict: dict[str, Any], heatmap_jpeg: bytes | None = None) -> None:
        self.station.camera_verdict(self.camera, verdict, heatmap_jpeg)

    def publish_info(self) -> None:
        self.station.publish_info()

"""The daemon's threads and bounded queue: capture -> (queue) -> infer -> publisher.

`capture:<source>` hands frames to a bounded queue (latest frame wins for live sources, drops
counted; back-pressure for stored frames and for triggered frames); the one `infer` thread
extracts patches, scores them, decides, renders the heatmap and hands the verdict to the
publisher, which never blocks. Only this module knows threads and queues.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import numpy as np

from edge_agent.capture import Capture, FrameSource
from edge_agent.config import Config
from edge_agent.errors import ModelError
from edge_agent.frames import Frame, Trigger
from edge_agent.metrics import Metrics
from edge_agent.patches import PatchGrid
from edge_agent.quality import Gate
from edge_agent.scoring import Scorer
from edge_agent.verdict import Decision, decide, document, failed, overlay

logger = logging.getLogger(__name__)

MAX_PENDING_TRIGGERS = 64
_END = object()  # queued after the last frame: the infer thread drains up to it, then ends


class _Unjudgeable(Exception):
    """A frame that arrived unreadable or of the wrong size (already counted where it was found)."""


class Publisher(Protocol):
    """Where verdicts go (mqtt.MqttPublisher); publish_verdict must not block on the network."""

    def publish_verdict(self, verdict: dict[str, Any], heatmap_jpeg: bytes | None = None) -> None: ...


class Progress(Protocol):
    """systemd.Watchdog's hooks."""

    def progress(self) -> None: ...

    def idle_ok(self, idle: bool) -> None: ...


@dataclasses.dataclass(frozen=True)
class Model:
    """What the infer thread scores with; replaced as a whole on reload, so a frame sees one model."""

    scorer: Scorer
    ignore_mask: np.ndarray | None = None  # HW uint8; black = patches there do not count
    counted: dict[PatchGrid, np.ndarray | None] = dataclasses.field(default_factory=dict)

    def counted_for(self, grid: PatchGrid) -> np.ndarray | None:
        if grid not in self.counted:
            self.counted[grid] = grid.counted(self.ignore_mask)
        return self.counted[grid]


def expected_frame(scorer: Scorer) -> tuple[int | None, int | None, int]:
    """(height, width, channels) the model's card says it takes; None = any size."""
    card_input = scorer.card.get("input", {})
    h, w = card_input.get("frame_height"), card_input.get("frame_width")
    return (int(h) if h else None, int(w) if w else None, int(card_input.get("channels", scorer.channels)))


class Pipeline:
    """Owns the capture and infer threads. start(), then stop.set() and drain() to shut down."""

    def __init__(
        self,
        config: Config,
        model: Model,
        source: FrameSource,
        publisher: Publisher | None,
        metrics: Metrics,
        stop: threading.Event,
        *,
        watchdog: Progress | None = None,
        retention: Any = None,
        boot_id: str | None = None,
        max_frames: int | None = None,
        on_verdict: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.source = source
        self.publisher = publisher
        self.metrics = metrics
        self.stop = stop
        self.watchdog = watchdog
        self.retention = retention
        self.boot_id = boot_id or uuid.uuid4().hex[:12]
        self.max_frames = max_frames
        self.on_verdict = on_verdict
        self.station = config.station.id
        self.triggered = config.inspection.mode == "triggered"
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=config.inspection.queue_size)
        self.capture = Capture(source, config.source, self._on_frame, stop, metrics,
                               on_end=self._on_end, on_camera=self._on_camera)
        self.accepted = 0  # frames queued for inference
        self.inspected = 0  # verdicts handed to the publisher
        self._triggers: deque[Trigger] = deque()
        self._trigger_cond = threading.Condition()
        self._next_due = 0.0  # monotonic time the next free-run frame may be taken (max_fps)
        self._first_frame = True
        self._warned_shapes: set[tuple] = set()
        self.quality = Gate(config.quality, live=not source.finite)
        self._errors_logged = 0
        self._infer = threading.Thread(target=self._infer_loop, name="infer", daemon=True)

    # Lifecycle

    def start(self) -> None:
        """Start inference, then capture (CameraError when the source cannot be opened)."""
        self._infer.start()
        if self.watchdog is not None and self.triggered:
            self.watchdog.idle_ok(True)
        self.capture.start()

    def drain(self, timeout_s: float = 30.0) -> bool:
        """After stop is set: wait for capture to end, then for inference of every queued frame."""
        deadline = time.monotonic() + timeout_s
        if not self.capture.join(timeout_s):
            logger.error("capture thread did not end within %.0f s; draining without it", timeout_s)
        while self._infer.is_alive():
            try:
                self.queue.put(_END, timeout=max(0.1, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._infer.join(max(0.1, deadline - time.monotonic()))
        self._answer_pending_triggers()
        if self._infer.is_alive():
            logger.error("inference did not drain within %.0f s; %d frames not inspected", timeout_s,
                         self.queue.qsize())
            return False
        logger.info("drained: %d frames inspected", self.inspected)
        return True

    def _answer_pending_triggers(self) -> None:
        """An accepted trigger is a promise of a verdict: at shutdown, those that saw no frame get ERROR."""
        with self._trigger_cond:
            pending, self._triggers = list(self._triggers), deque()
        if not pending:
            return
        logger.warning("stopping with %d accepted triggers that saw no frame; publishing ERROR verdicts for them",
                       len(pending))
        scorer = self.model.scorer
        error = "the agent stopped before a frame was captured for this trigger; send the trigger again"
        for i, trig in enumerate(pending, start=1):
            # Capture has ended, so seqs after its last one are still unique within this boot.
            frame = Frame(self.capture.last_seq + i, np.zeros((0, 0), np.uint8), captured_at=time.time(),
                          source=self.source.describe(), trigger=trig)
            verdict = document(frame, scorer, failed(error, "no_frame"), self.station, self.boot_id, {}, False)
            self.metrics.error("capture")
            self.metrics.frame_result("ERROR", "no_frame")
            if self.publisher is not None:
                self.publisher.publish_verdict(verdict, None)
            if self.on_verdict is not None:
                self.on_verdict(verdict)

    def swap_model(self, model: Model) -> None:
        """Use another model from the next frame on; ModelError if it does not take these frames."""
        old, new = expected_frame(self.model.scorer), expected_frame(model.scorer)
        if old != new:
            raise ModelError(f"{model.scorer.path} takes {new[1]}x{new[0]}x{new[2]} frames but the running model "
                             f"takes {old[1]}x{old[0]}x{old[2]}; restart the agent to change the frame size")
        self.model = model  # one reference assignment: the infer thread reads it once per frame

    # Callbacks from other threads

    def trigger(self, trigger: Trigger) -> None:
        """A PLC trigger (on the MQTT thread): the next frame captured is inspected for it."""
        if not self.triggered:
            raise ValueError('inspection.mode is "free-run"; set inspection.mode = "triggered" to use triggers')
        with self._trigger_cond:
            if len(self._triggers) >= MAX_PENDING_TRIGGERS:
                raise ValueError(f"{MAX_PENDING_TRIGGERS} triggers already wait for a frame; is the camera down?")
            self._triggers.append(trigger)
            self._trigger_cond.notify_all()
        self.metrics.trigger_accepted()
        if self.watchdog is not None:
            self.watchdog.idle_ok(False)
        logger.debug("trigger %s for part %s queued", trigger.trigger_id, trigger.part_id)

    def delivered(self, message: Any, latency_s: float) -> None:
        """The broker acknowledged a message (on the publish thread): observe capture -> ack latency."""
        if getattr(message, "kind", None) != "verdict":
            return
        try:
            captured_at = float(json.loads(message.payload)["captured_at"])
        except (ValueError, KeyError, TypeError):
            return
        self.metrics.latency_s(max(0.0, time.time() - captured_at))

    def _on_end(self) -> None:
        logger.info("the source ended; stopping after the frames in flight")
        self.stop.set()

    def _on_camera(self, up: bool) -> None:
        if self.watchdog is not None:
            # A camera outage or an idle trigger wait is no reason for systemd to restart us.
            self.watchdog.idle_ok(not up or (self.triggered and not self._triggers))

    # Capture thread

    def _on_frame(self, frame: Frame) -> None:
        if frame.error is None:
            misfit = self._misfit(frame.image)
            if misfit is not None:
                frame = dataclasses.replace(frame, error=misfit, error_reason="wrong_size")
            elif (problem := self.quality(frame.image)) is not None:
                # On the capture thread: the frozen detector must see every frame, not only the judged ones.
                frame = dataclasses.replace(frame, error=problem.message(), error_reason=problem.reason)
        back_pressure = self.capture.pace == "consumer"
        if self.triggered:
            trigger = self._take_trigger(wait=back_pressure)
            if trigger is None:
                return  # no part waiting for inspection: this frame is not wanted
            frame = dataclasses.replace(frame, trigger=trigger)
            back_pressure = True  # a triggered frame is a PLC's request: never dropped
        elif self.config.inspection.max_fps > 0:
            period_s = 1.0 / self.config.inspection.max_fps
            now = time.monotonic()
            if now < self._next_due:
                if not back_pressure:
                    return  # over the rate cap; not a drop, the cap asks for it
                if self.stop.wait(self._next_due - now):
                    return
            self._next_due = max(self._next_due + period_s, time.monotonic())
        if back_pressure:
            if not self._put_waiting(frame):
                return
        else:
            self._put_latest(frame)
        self.accepted += 1
        if self.max_frames is not None and self.accepted >= self.max_frames:
            logger.info("%d frames taken (--frames); stopping", self.accepted)
            self.stop.set()

    def _misfit(self, image: np.ndarray) -> str | None:
        """None when the frame has the model's size and usable channels; else why not (counted, logged)."""
        want_h, want_w, want_c = expected_frame(self.model.scorer)
        h, w = image.shape[:2]
        c = 1 if image.ndim == 2 else image.shape[2]
        ok = (
            image.dtype == np.uint8
            and (want_h is None or h == want_h)
            and (want_w is None or w == want_w)
            and (c == want_c or (want_c == 1 and c in (3, 4)) or (want_c == 3 and c == 4))
        )
        first, self._first_frame = self._first_frame, False
        if ok:
            if first:
                logger.info("first frame %dx%dx%d fits the model (%sx%sx%d)", w, h, c, want_w, want_h, want_c)
            return None
        self.metrics.frame_rejected("wrong_size")
        key = (h, w, c, image.dtype.str)
        if key not in self._warned_shapes:
            self._warned_shapes.add(key)
            logger.log(logging.ERROR if first else logging.WARNING,
                       "rejecting %dx%dx%d %s frames from %s: model %s takes %sx%sx%d uint8; set source.width/height "
                       "or use a model trained on these frames", w, h, c, image.dtype, self.source.describe(),
                       self.model.scorer.model_id, want_w, want_h, want_c)
        return (f"frame {w}x{h}x{c} {image.dtype} does not fit model {self.model.scorer.model_id} "
                f"({want_w}x{want_h}x{want_c} uint8); set source.width/height")

    def _take_trigger(self, wait: bool) -> Trigger | None:
        with self._trigger_cond:
            # Stored frames (file/folder replay) wait for the next trigger instead of running past it.
            while wait and not self._triggers and not self.stop.is_set():
                self._trigger_cond.wait(0.5)
            return self._triggers.popleft() if self._triggers else None

    def _put_waiting(self, frame: Frame) -> bool:
        while True:
            try:
                self.queue.put(frame, timeout=0.5)
                return True
            except queue.Full:
                if self._infer.ident is not None and not self._infer.is_alive():
                    return False  # nobody will ever take it

    def _put_latest(self, frame: Frame) -> None:
        while True:
            try:
                self.queue.put_nowait(frame)
                return
            except queue.Full:
                try:
                    old = self.queue.get_nowait()
                except queue.Empty:
                    continue
                if old is _END:  # shutting down; keep the end marker last
                    self.queue.put_nowait(_END)
                    return
                self.metrics.dropped("queue_full")
                logger.debug("dropped frame %d: inference is behind (queue_size %d)", old.seq, self.queue.maxsize)

    # Infer thread

    def _infer_loop(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is _END:
                return
            try:
                self.inspect(item)
            except Exception:
                # inspect() publishes an ERROR verdict for its own failures; this is a failure after publishing.
                logger.exception("after the verdict of frame %d", item.seq)
                self.metrics.error("publish")

    def inspect(self, frame: Frame) -> dict[str, Any]:
        """Score one frame, decide, render, publish; returns the verdict. A failure anywhere before the
        verdict is handed to the publisher still publishes one: ERROR, reason internal."""
        stage_s = dict(frame.stage_s)
        try:
            verdict, heatmap, decision = self._judge(frame, self.model, stage_s)
        except Exception as e:
            logger.exception("frame %d: judging failed", frame.seq)
            self.metrics.error("inference")
            decision = failed(f"internal error: {type(e).__name__}: {e}", "internal")
            verdict = document(frame, self.model.scorer, decision, self.station, self.boot_id, stage_s, False)
            heatmap = None
        t = time.perf_counter()
        if self.publisher is not None:
            self.publisher.publish_verdict(verdict, heatmap)
        stage_s["publish"] = time.perf_counter() - t
        self.metrics.stages(stage_s)
        self.metrics.frame_result(decision.result, decision.reason)
        if math.isfinite(decision.score) and decision.error is None:
            self.metrics.image_score(decision.score)
        self.inspected += 1
        if self.watchdog is not None:
            self.watchdog.progress()
            if self.triggered and not self._triggers:
                self.watchdog.idle_ok(True)
        self._retain(frame, verdict)
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict

    def _judge(self, frame: Frame, model: Model, stage_s: dict[str, float]) -> tuple[dict[str, Any], bytes | None,
                                                                                       Decision]:
        scorer = model.scorer
        stage_s["queue"] = max(0.0, time.time() - frame.captured_at)  # captured_at is stamped after the read
        grid: PatchGrid | None = None
        scores: np.ndarray | None = None
        t = time.perf_counter()
        try:
            if frame.error is not None:
                raise _Unjudgeable(frame.error)
            grid, patches = scorer.patches(frame.image)
            now = time.perf_counter()
            stage_s["preprocess"], t = now - t, now
            scores = scorer.score_patches(patches)
            now = time.perf_counter()
            stage_s["inference"], t = now - t, now
            self.metrics.patches_scored(len(scores))
        except _Unjudgeable as e:
            decision = failed(str(e), frame.error_reason or "unreadable")
        except Exception as e:
            self.metrics.error("inference")
            error = f"scoring failed: {type(e).__name__}: {e}"
            self._log_error("frame %d: %s", frame.seq, error)
            decision = failed(error, "scoring", grid.count if grid is not None else 0)
        else:
            decision = decide(grid, scores, scorer.threshold, model.counted_for(grid), scorer.low)
            if decision.error:
                if decision.reason == "scoring":
                    self.metrics.error("inference")
                self._log_error("frame %d: %s", frame.seq, decision.error)
        now = time.perf_counter()
        stage_s["decision"], t = now - t, now
        heatmap = self._heatmap(frame, grid, scores, scorer, decision)
        if heatmap is not None:
            stage_s["encode"] = time.perf_counter() - t
        verdict = document(frame, scorer, decision, self.station, self.boot_id, stage_s, heatmap is not None)
        return verdict, heatmap, decision

    def _heatmap(self, frame: Frame, grid: PatchGrid | None, scores: np.ndarray | None, scorer: Scorer,
                 decision: Decision) -> bytes | None:
        policy = self.config.mqtt.heatmap
        if grid is None or scores is None or decision.error or policy == "never":
            return None
        if policy == "ng" and decision.result != "NG":
            return None
        try:
            image = overlay(frame.image, grid, scores, scorer.threshold, decision,
                            good_image_scores=scorer.good_image_scores)
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.config.mqtt.heatmap_quality])
            if not ok:
                raise ValueError("cv2.imencode returned False")
        except Exception as e:
            self.metrics.error("encode")
            self._log_error("frame %d: heatmap not rendered: %s", frame.seq, e)
            return None
        return buf.tobytes()

    def _retain(self, frame: Frame, verdict: dict[str, Any]) -> None:
        if self.retention is None or not self.retention.wants(verdict["result"]):
            return
        if frame.image.size == 0:
            return  # an unreadable frame: there is no image to keep
        try:
            self.retention.save(frame.image, verdict)
        except (OSError, cv2.error) as e:
            self.metrics.error("retention")
            self._log_error("retention: frame %d not saved: %s", frame.seq, e)

    def _log_error(self, msg: str, *args: object) -> None:
        # Every error is counted in metrics; the log gets the first ten and then every hundredth.
        self._errors_logged += 1
        if self._errors_logged <= 10 or self._errors_logged % 100 == 0:
            logger.error(msg + " (%d errors so far)", *args, self._errors_logged)

"""The daemon's threads and bounded queue: capture -> (queue) -> infer -> publisher.

`capture:<source>` hands frames to a bounded queue (latest frame wins for live sources, drops
counted; back-pressure for stored frames). In triggered mode the capture thread pairs a frame with
a waiting trigger (triggers.Pending): a live frame only if its read began after the trigger arrived;
while the queue is full a paired live frame waits in a small backlog (one frame per outstanding
trigger) instead of blocking, so a live source is never left unread. The one `infer` thread
extracts patches, scores them, decides, renders the heatmap and hands the verdict to the
publisher, which never blocks; it also answers expired triggers. Only this module knows threads and queues.
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
from edge_agent.shared_scorer import ScoringServiceDied
from edge_agent.triggers import Pending, TriggerError, answer_repeat, check_recipe, duplicate_of
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
        recipes: dict[str, Model] | None = None,
        camera: str | None = None,
        scoring: Any = None,
        next_seq: Callable[[], int] | None = None,
    ) -> None:
        """model: the default recipe's model; recipes: every recipe's model (None: `model` for every trigger).

        camera: this pipeline's camera id in a station with several cameras (thread names, logs, the verdict);
        scoring: the station's shared_scorer.ScoringService (None: this thread runs the model itself);
        next_seq: the station-wide sequence, so verdicts of different cameras never share a message_id."""
        self.config = config
        self.model = model
        self.source = source
        self.publisher = publisher
        self.state: Any = None  # state.StationState, set by the daemon when the station page is served
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
        self.default_recipe = config.default_recipe_name()
        self.recipes: dict[str, Model] = dict(recipes) if recipes else {self.default_recipe: model}
        self.pending = Pending(config.trigger.deadline_s, MAX_PENDING_TRIGGERS, config.trigger.remember)
        self.fatal: str | None = None  # why the agent must exit non-zero (the capture thread died)
        self.camera = camera
        self.scoring = scoring
        self.on_source_end: Callable[[], None] | None = None
        self.capture = Capture(source, config.source, self._on_frame, stop, metrics, name=camera,
                               on_end=self._on_end, on_camera=self._on_camera, on_fatal=self._on_capture_died)
        if next_seq is not None:
            self.capture.next_seq = next_seq  # type: ignore[method-assign]
        self.accepted = 0  # frames queued for inference
        self.inspected = 0  # verdicts handed to the publisher
        self._next_due = 0.0  # monotonic time the next free-run frame may be taken (max_fps)
        self._first_frame = True
        self._warned_shapes: set[tuple] = set()
        self.quality = Gate(config.quality, live=not source.finite)
        # Live frames already paired with a trigger, waiting for room in the queue (bounded by Pending).
        self._backlog: deque[Frame] = deque()
        self._backlog_lock = threading.Lock()
        self._errors_logged = 0
        self._in_hand: Any = None  # the item the infer thread took from the queue and has not yet inspected
        self._infer = threading.Thread(target=self._infer_loop, name=f"infer:{camera}" if camera else "infer",
                                       daemon=True)

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
        with self._backlog_lock:  # held until _END is queued: nothing may follow it
            while self._infer.is_alive():
                item = self._backlog[0] if self._backlog else _END
                try:
                    self.queue.put(item, timeout=max(0.1, deadline - time.monotonic()))
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
                    continue
                if item is _END:
                    break
                self._backlog.popleft()
        self._infer.join(max(0.1, deadline - time.monotonic()))
        if self._infer.ident is not None and not self._infer.is_alive():
            self._answer_stranded_frames()
        self._answer_pending_triggers()
        if self._infer.is_alive():
            logger.error("inference did not drain within %.0f s; %d frames not inspected", timeout_s,
                         self.queue.qsize())
            return False
        logger.info("drained: %d frames inspected", self.inspected)
        return True

    def _answer_stranded_frames(self) -> None:
        """Frames left queued after the infer thread ended (it died): each still gets a verdict, ERROR."""
        stranded = [self._in_hand] if self._in_hand is not None and self._in_hand is not _END else []
        self._in_hand = None
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not _END:
                stranded.append(item)
        with self._backlog_lock:
            stranded += list(self._backlog)
            self._backlog.clear()
        if not stranded:
            return
        logger.error("%d frames were queued when inference ended; publishing ERROR verdicts for them", len(stranded))
        for frame in stranded:
            model = self._model_for(frame.trigger)
            decision = failed(f"not judged: {self.fatal or 'inference ended'}", "internal")
            verdict = self._document(frame, model.scorer, decision, {}, False)
            self.metrics.error("inference")
            self.metrics.frame_result("ERROR", "internal")
            if self.publisher is not None:
                self.publisher.publish_verdict(verdict, None)
            if frame.trigger is not None:
                self._completed(frame.trigger, verdict)
            if self.on_verdict is not None:
                self.on_verdict(verdict)

    def _answer_pending_triggers(self) -> None:
        """An accepted trigger is a promise of a verdict: at shutdown, those that saw no frame get ERROR."""
        pending = self.pending.all_waiting()
        if not pending:
            return
        logger.warning("stopping with %d accepted triggers that saw no frame; publishing ERROR verdicts for them",
                       len(pending))
        for trig in pending:
            self._unserved(trig, "the agent stopped before a frame was captured for this trigger; send the trigger again",
                           "capture")

    def _expire_triggers(self) -> None:
        for trig in self.pending.expired():
            waited_s = time.monotonic() - trig.arrived_mono
            self._log_error("trigger %s (part %s): no frame within trigger.deadline_s = %g s", trig.trigger_id,
                            trig.part_id, self.config.trigger.deadline_s)
            self._unserved(trig, f"no frame within trigger.deadline_s = {self.config.trigger.deadline_s:g} s "
                                 f"(waited {waited_s:.1f} s; camera down or stalled?); the part was not inspected, "
                                 "trigger again", "trigger_deadline")

    def _unserved(self, trig: Trigger, error: str, stage: str) -> None:
        """The ERROR verdict for a trigger that got no frame (deadline passed, or shutdown)."""
        frame = Frame(self.capture.next_seq(), np.zeros((0, 0), np.uint8), captured_at=time.time(),
                      source=self.source.describe(), trigger=trig)
        scorer = self._model_for(trig).scorer
        reason = "trigger_deadline" if stage == "trigger_deadline" else "no_frame"
        verdict = self._document(frame, scorer, failed(error, reason), {}, False)
        self.metrics.error(stage)
        self.metrics.frame_result("ERROR", reason)
        if self.publisher is not None:
            self.publisher.publish_verdict(verdict, None)
        self._completed(trig, verdict)
        if self.on_verdict is not None:
            self.on_verdict(verdict)

    def _completed(self, trig: Trigger, verdict: dict[str, Any]) -> None:
        if self.pending.complete(trig.trigger_id, verdict) and self.publisher is not None:
            # A PLC retried while this trigger was being judged: it gets the verdict again, marked.
            self.publisher.publish_verdict(duplicate_of(verdict), None)

    def swap_model(self, model: Model, recipes: dict[str, Model] | None = None) -> None:
        """Use other models from the next frame on; ModelError if one does not take these frames."""
        recipes = dict(recipes) if recipes else {self.default_recipe: model}
        self.check_models(recipes.values())
        # Reference assignments: the infer thread reads them once per frame.
        self.recipes = recipes
        self.model = model

    def check_models(self, models: Any) -> None:
        """ModelError unless every model takes the frames the running model takes."""
        old = expected_frame(self.model.scorer)
        for m in models:
            new = expected_frame(m.scorer)
            if old != new:
                camera = f"camera {self.camera}: " if self.camera is not None else ""
                raise ModelError(f"{camera}{m.scorer.path} takes {new[1]}x{new[0]}x{new[2]} frames but the running "
                                 f"model takes {old[1]}x{old[0]}x{old[2]}; restart the agent to change the frame size")

    def _model_for(self, trig: Trigger | None) -> Model:
        recipe = trig.recipe if trig is not None and trig.recipe in self.recipes else self.default_recipe
        return self.recipes.get(recipe, self.model)

    # Callbacks from other threads

    def trigger(self, trigger: Trigger) -> dict[str, Any] | None:
        """A PLC trigger (on the MQTT thread): a frame captured after it is inspected for it.

        Returns extra fields for the trigger's answer (a duplicate), raises TriggerError to refuse it.
        """
        if not self.triggered:
            raise ValueError('inspection.mode is "free-run"; set inspection.mode = "triggered" to use triggers')
        check_recipe(bool(self.config.recipes), self.recipes, trigger, self.default_recipe)
        state, verdict = self.pending.add(trigger)
        publisher = self.publisher
        repeat = answer_repeat(state, verdict, trigger, self.metrics,
                               None if publisher is None else lambda v: publisher.publish_verdict(v, None))
        if repeat is not None:
            return repeat
        self.metrics.trigger_accepted()
        if self.watchdog is not None:
            self.watchdog.idle_ok(False)
        logger.debug("trigger %s for part %s queued", trigger.trigger_id, trigger.part_id)
        return None

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
        if self.on_source_end is not None:
            self.on_source_end()  # a station with several cameras stops when every camera's file has ended
            return
        logger.info("the source ended; stopping after the frames in flight")
        self.stop.set()

    def _on_camera(self, up: bool) -> None:
        if self.watchdog is not None and self.fatal is None:
            # A camera outage or an idle trigger wait is no reason for systemd to restart us.
            self.watchdog.idle_ok(not up or (self.triggered and self.pending.idle()))
        publish_info = getattr(self.publisher, "publish_info", None)
        if publish_info is not None:
            publish_info()  # status/info says camera up/down

    def _on_capture_died(self, error: str) -> None:
        """The capture thread ended on a bug: nothing will be inspected, so the agent must exit non-zero."""
        self._died("capture", error)

    def _died(self, thread: str, error: str) -> None:
        """A capture or infer thread ended on a bug: stop feeding the watchdog, drain, exit non-zero.

        With several cameras one dead camera stops the whole station (a camera merely unplugged does not)."""
        camera = f"camera {self.camera}: " if self.camera is not None else ""
        if self.fatal is None:
            self.fatal = f"{camera}the {thread} thread died ({error}); exiting so that systemd restarts the agent"
        if self.watchdog is not None:
            self.watchdog.idle_ok(False)  # no more pings: a wedged shutdown is still caught by systemd
            stop_watchdog = getattr(self.watchdog, "stop", None)
            if stop_watchdog is not None:
                stop_watchdog(0)
        self.stop.set()

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
            trigger = self._take_trigger(frame, wait=back_pressure)
            if trigger is None:
                self._feed_backlog()
                return  # no part waiting for inspection: this frame is not wanted
            captured_mono = frame.read_started_mono + frame.stage_s.get("capture", 0.0)
            frame = dataclasses.replace(frame, trigger=trigger,
                                        frame_age_s=max(0.0, time.monotonic() - captured_mono))
            if self.capture.pace == "live":
                # Never block a live source: the paired frame waits for room; the camera is read on.
                with self._backlog_lock:
                    self._backlog.append(frame)
                self._feed_backlog()
                self._taken()
                return
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
        self._taken()

    def _taken(self) -> None:
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

    def _take_trigger(self, frame: Frame, wait: bool) -> Trigger | None:
        if self.capture.pace == "live":
            # Only a frame whose read began after the trigger arrived shows the part it was sent for.
            return self.pending.take(read_started=frame.read_started_mono)
        # Stored frames (file/folder replay) wait for the next trigger instead of running past it.
        while True:
            trigger = self.pending.take(wait_s=0.5 if wait else 0.0, stop=self.stop)
            if trigger is not None or not wait or self.stop.is_set():
                return trigger

    def _feed_backlog(self) -> None:
        """Move paired live frames into the queue while it has room (capture and infer threads)."""
        if not self._backlog or self.stop.is_set():
            return  # after stop, drain() queues the rest before the end marker
        with self._backlog_lock:
            while self._backlog and not self.stop.is_set():
                try:
                    self.queue.put_nowait(self._backlog[0])
                except queue.Full:
                    return
                self._backlog.popleft()

    def _put_waiting(self, frame: Frame) -> bool:
        while True:
            try:
                self.queue.put(frame, timeout=0.5)
                return True
            except queue.Full:
                if self._infer.ident is not None and not self._infer.is_alive():
                    with self._backlog_lock:  # nobody will ever take it: drain() answers it with ERROR
                        self._backlog.append(frame)
                    return False

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
        try:
            self._infer_frames()
        except Exception as e:
            # A bug outside inspect() (which answers its own failures): nothing more is judged here.
            logger.exception("the infer thread ends on a bug")
            self._died("infer", f"{type(e).__name__}: {e}")

    def _infer_frames(self) -> None:
        while True:
            if self.triggered:
                self._expire_triggers()
            try:
                # Short waits in triggered mode: a trigger's deadline is answered within ~0.2 s of passing.
                item = self.queue.get(timeout=0.2 if self.triggered else 1.0)
            except queue.Empty:
                self._feed_backlog()  # the camera may be down: nobody else moves the backlog on
                continue
            self._in_hand = item  # until inspect() owns it: a death in between must not lose the frame
            self._feed_backlog()
            if item is _END:
                return
            self._in_hand = None
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
        model = self._model_for(frame.trigger)
        try:
            verdict, heatmap, decision = self._judge(frame, model, stage_s)
        except Exception as e:
            logger.exception("frame %d: judging failed", frame.seq)
            self.metrics.error("inference")
            decision = failed(f"internal error: {type(e).__name__}: {e}", "internal")
            verdict = self._document(frame, model.scorer, decision, stage_s, False)
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
        if frame.trigger is not None:
            self._completed(frame.trigger, verdict)
        if self.watchdog is not None:
            self.watchdog.progress()
            if self.triggered and self.pending.idle():
                self.watchdog.idle_ok(True)
        self._retain(frame, verdict)
        if self.state is not None:
            self.state.verdict(verdict, heatmap, frame.image)
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
            if self.scoring is not None:
                scores = self.scoring.score_frame(scorer, grid, patches)
            else:
                scores = scorer.score_frame(grid, patches)
            now = time.perf_counter()
            stage_s["inference"], t = now - t, now
            self.metrics.patches_scored(len(scores))
        except _Unjudgeable as e:
            decision = failed(str(e), frame.error_reason or "unreadable")
        except ScoringServiceDied as e:  # the station's shared scorer thread is gone: this frame and every
            self.metrics.error("inference")  # later one is ERROR, and the agent exits 1 for systemd to restart it
            decision = failed(f"not judged: {e}", "internal", grid.count if grid is not None else 0)
            self._died("scorer", str(e))
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
        verdict = self._document(frame, scorer, decision, stage_s, heatmap is not None)
        return verdict, heatmap, decision

    def _document(self, frame: Frame, scorer: Scorer, decision: Decision, stage_s: dict[str, float],
                  heatmap: bool) -> dict[str, Any]:
        verdict = document(frame, scorer, decision, self.station, self.boot_id, stage_s, heatmap)
        if self.camera is not None:
            verdict["camera"] = self.camera  # the station (station.py) turns it into its camera's result
        return verdict

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

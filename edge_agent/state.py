"""What the station page shows: a snapshot the daemon publishes, read by web.py on its own threads.

The infer thread hands over what it already has after each verdict (the verdict, the heatmap JPEG it
encoded, the frame); health arrives from where it changes (the metrics hooks). Writers only append
under a short lock; readers copy out and do the work (percentiles, JPEG encoding) on their thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

STATE_VERSION = 1
LATENCY_WINDOW = 1000  # verdicts behind p50/p99
RATE_WINDOW_S = 30.0  # frames/s over the verdicts of the last 30 s


@dataclass
class _Entry:
    verdict: dict[str, Any]
    heatmap_jpeg: bytes | None  # the overlay the publisher sent over MQTT
    image: np.ndarray | None  # HWC uint8; kept for each camera's newest entry only, encoded when a page asks
    frame_jpeg: bytes | None = None
    camera: str | None = None  # with [[cameras]]: whose frame


class StationState:
    """Thread-safe: verdict() and the health hooks from the daemon's threads, snapshot() and the rest from readers."""

    def __init__(self, station: str, name: str = "", recent: int = 60, clock: Callable[[], float] = time.time,
                 jpeg_quality: int = 80) -> None:
        self.station = station
        self.name = name
        self.jpeg_quality = jpeg_quality
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[_Entry] = deque(maxlen=recent)
        self._counts = {"OK": 0, "NG": 0, "ERROR": 0}
        self._arrivals: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._health: dict[str, Any] = {"camera_up": None, "broker_connected": None, "outbox_depth": None}
        self._changed_at: dict[str, float | None] = {k: None for k in self._health}
        self._model: dict[str, Any] = {}
        self._latest: dict[str | None, _Entry] = {}  # camera (None: the one camera) -> its newest entry
        self._cameras: dict[str, dict[str, Any]] = {}  # with [[cameras]]: id -> {"up", "changed_at"}
        self.started_at = clock()

    def cameras(self, ids: list[str]) -> None:
        """A station with [[cameras]]: the page shows each camera's latest verdict and up/down."""
        with self._lock:
            self._cameras = {cid: {"up": None, "changed_at": None} for cid in ids}

    # Writers

    def verdict(self, verdict: dict[str, Any], heatmap_jpeg: bytes | None = None,
                image: np.ndarray | None = None) -> None:
        """After each verdict (infer thread): O(1) under the lock, no copies of images, no encoding."""
        now = self._clock()
        result = verdict.get("result", "ERROR")
        keep_frame = heatmap_jpeg is None and image is not None and image.size > 0  # a page may ask to see it
        doc = dict(verdict)
        camera = doc.pop("camera", None)  # the view carries it; the verdict stays a version 1 document
        entry = _Entry(doc, heatmap_jpeg, image if keep_frame else None, camera=camera)
        with self._lock:
            previous = self._latest.get(camera)
            if previous is not None:
                previous.image = None  # only each camera's newest raw frame is held
            self._latest[camera] = entry
            self._recent.append(entry)
            self._counts[result] = self._counts.get(result, 0) + 1
            self._arrivals.append(now)
            captured_at = verdict.get("captured_at")
            if isinstance(captured_at, (int, float)):
                self._latency_s.append(max(0.0, now - captured_at))

    def camera_up(self, up: bool) -> None:
        self._set("camera_up", bool(up))  # with [[cameras]]: up only while every camera is

    def camera_source_up(self, camera: str, up: bool) -> None:
        with self._lock:
            cam = self._cameras.setdefault(camera, {"up": None, "changed_at": None})
            if cam["up"] != bool(up):
                cam["changed_at"] = self._clock()
            cam["up"] = bool(up)

    def broker_connected(self, connected: bool) -> None:
        self._set("broker_connected", bool(connected))

    def outbox_depth(self, depth: int) -> None:
        self._set("outbox_depth", int(depth))

    def _set(self, key: str, value: Any) -> None:
        with self._lock:
            if self._health[key] != value:
                self._changed_at[key] = self._clock()
            self._health[key] = value

    def model(self, scorer: Any, threshold_from_config: bool = False) -> None:
        """The model in use (at start and after each reload): id, checksum, threshold and how it was chosen."""
        entry = scorer.card.get("thresholds", {}).get(scorer.score_name, {})
        calibration = {k: entry.get(k) for k in ("method", "description", "target_frr", "frr_upper_bound",
                                                  "confidence", "n_good", "observed_frr", "chosen_at")}
        if threshold_from_config:
            calibration = {**calibration, "method": "config", "description": "model.threshold in the station config "
                           f"overrides the card's {entry.get('method')} threshold {entry.get('value')}"}
        info = {
            "id": scorer.model_id, "checksum": scorer.checksum, "score_name": scorer.score_name,
            "threshold": float(scorer.threshold), "calibration": calibration, "device": str(scorer.device),
            "precision": str(scorer.dtype).removeprefix("torch."),
        }
        with self._lock:
            self._model = info

    # Readers

    def snapshot(self) -> dict[str, Any]:
        """/api/state: the latest verdict, shift counters, health, the model."""
        now = self._clock()
        with self._lock:
            latest = self._recent[-1] if self._recent else None
            counts = dict(self._counts)
            arrivals = list(self._arrivals)
            latency = list(self._latency_s)
            health = dict(self._health)
            changed = dict(self._changed_at)
            model = dict(self._model) if self._model else None
            latest_view = self._view(latest) if latest else None
            cameras = {cid: {**cam, "latest": self._view(self._latest[cid]) if cid in self._latest else None}
                       for cid, cam in self._cameras.items()}
        inspected = sum(counts.values())
        recent = [t for t in arrivals if t >= now - RATE_WINDOW_S]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
        return {
            "version": STATE_VERSION,
            "station": {"id": self.station, "name": self.name},
            "now": now,
            "started_at": self.started_at,
            "latest": latest_view,
            "last_seq": latest_view["verdict"]["seq"] if latest_view else 0,
            "counters": {
                "inspected": inspected, "ok": counts.get("OK", 0), "ng": counts.get("NG", 0),
                "error": counts.get("ERROR", 0), "ng_rate": counts.get("NG", 0) / inspected if inspected else None,
                "frames_per_s": fps,
                "latency_p50_s": float(np.percentile(latency, 50)) if latency else None,
                "latency_p99_s": float(np.percentile(latency, 99)) if latency else None,
                "latency_samples": len(latency),
            },
            "health": {**health, "changed_at": changed},
            "model": model,
            **({"cameras": cameras} if cameras else {}),
        }

    def verdicts(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        """/api/verdicts: the kept verdicts with seq > since, oldest first (all when since is ahead: a restart)."""
        with self._lock:
            entries = list(self._recent)
            views = [self._view(e) for e in entries]
        last = views[-1]["verdict"]["seq"] if views else 0
        if since <= last:
            views = [v for v in views if v["verdict"]["seq"] > since]
        if limit is not None:
            views = views[-limit:] if limit else []
        return {"version": STATE_VERSION, "last_seq": last, "verdicts": views}

    def image(self, seq: int) -> tuple[bytes, str] | None:
        """(JPEG, "heatmap" | "frame") for a kept verdict; a frame without a heatmap is encoded here, once."""
        with self._lock:
            # A camera's newest verdict stays viewable after busier cameras pushed it out of the recent ones.
            kept = [*self._recent, *self._latest.values()]
            entry = next((e for e in reversed(kept) if e.verdict.get("seq") == seq), None)
            if entry is None:
                return None
            if entry.heatmap_jpeg is not None:
                return entry.heatmap_jpeg, "heatmap"
            if entry.frame_jpeg is not None:
                return entry.frame_jpeg, "frame"
            image = entry.image
        if image is None:
            return None
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            return None
        with self._lock:
            entry.frame_jpeg = buf.tobytes()
            entry.image = None
            return entry.frame_jpeg, "frame"

    @staticmethod
    def _view(entry: _Entry) -> dict[str, Any]:
        seq = entry.verdict.get("seq")
        if entry.heatmap_jpeg is not None:
            kind: str | None = "heatmap"
        elif entry.frame_jpeg is not None or entry.image is not None:
            kind = "frame"
        else:
            kind = None
        view = {"verdict": entry.verdict, "image": f"/api/image/{seq}.jpg" if kind else None, "image_kind": kind}
        if entry.camera is not None:
            view["camera"] = entry.camera
        return view

"""Frame sources (video file, V4L2 device, RTSP/HTTP URL, GStreamer pipeline, image folder)
and the Capture thread that reads one, stamps Frames, rejects bad ones and reconnects.

First stage of the flow: capture -> patches -> scoring -> verdict -> mqtt/metrics.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.errors import CameraError
from edge_agent.frames import Frame

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class EndOfStream(Exception):
    """A finite, non-looping source has delivered its last frame."""


class SourceUnusable(CameraError):
    """A source that cannot work as configured (no GStreamer, no appsink): a config fix, not an outage to wait out."""


class BadFrame(Exception):
    """One unreadable frame (a corrupt image file); counted and skipped, the source stays open."""


class FrameSource(Protocol):
    """Where images come from. Images are HWC uint8 BGR numpy arrays, as OpenCV delivers them."""

    finite: bool  # replays stored frames (file, folder): paced by fps or the consumer, can end

    def open(self) -> None:
        """Open or reopen; raises CameraError naming the source and the fix."""

    def read(self) -> np.ndarray | None:
        """The next image; None or CameraError (with the reason) on a failure: the caller reconnects.
        Raises EndOfStream when a non-looping finite source is done, BadFrame for one unreadable frame."""

    def close(self) -> None: ...

    def describe(self) -> str:
        """The source for log lines, credentials removed."""


class CaptureMetrics(Protocol):
    """The hooks Capture calls; metrics.Metrics implements them."""

    def camera_up(self, up: bool) -> None: ...

    def camera_reconnect(self) -> None: ...

    def frame_rejected(self, reason: str) -> None: ...


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


class _OpenCvSource:
    """Shared open/read/close over a cv2.VideoCapture; subclasses say how to create it."""

    finite = False

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self._cap: cv2.VideoCapture | None = None

    def _create(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _hint(self) -> str:
        return "check the source.uri"

    def open(self) -> None:
        self.close()
        cap = self._create()
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open {self.describe()}; {self._hint()}")
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, image = self._cap.read()
        return image if ok else None

    @staticmethod
    def _smallest_buffer(cap: cv2.VideoCapture) -> None:
        # A live frame must be of now: ask the backend to hold one frame, where it can (V4L2 can; FFmpeg ignores it).
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class DeviceSource(_OpenCvSource):
    """A V4L2 camera by index ("0") or path ("/dev/video0"); width/height/fps are requested."""

    def _create(self) -> cv2.VideoCapture:
        uri = self.cfg.uri
        target: int | str = int(uri) if uri.isdigit() else uri
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = cv2.VideoCapture(target, api)
        if cap.isOpened():
            self._smallest_buffer(cap)
            for prop, value in (
                (cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width),
                (cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height),
                (cv2.CAP_PROP_FPS, self.cfg.fps),
            ):
                if value is not None:
                    cap.set(prop, value)
            logger.info(
                "%s opened at %dx%d %.1f fps",
                self.describe(),
                cap.get(cv2.CAP_PROP_FRAME_WIDTH),
                cap.get(cv2.CAP_PROP_FRAME_HEIGHT),
                cap.get(cv2.CAP_PROP_FPS),
            )
        return cap

    def _hint(self) -> str:
        return "check that the camera is plugged in, `v4l2-ctl --list-devices`, and that the user is in group video"

    def describe(self) -> str:
        return f"device {self.cfg.uri}"


class UrlSource(_OpenCvSource):
    """An RTSP/HTTP stream through OpenCV's FFmpeg backend."""

    def _create(self) -> cv2.VideoCapture:
        # FFmpeg would otherwise block forever on a dead stream; these make read() return and count as a failure.
        timeout_ms = int(self.cfg.stall_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        cap = cv2.VideoCapture(self.cfg.uri, cv2.CAP_FFMPEG, params)
        self._smallest_buffer(cap)
        return cap

    def _hint(self) -> str:
        return "check the URL, the network and the credentials (try it with ffplay)"

    def describe(self) -> str:
        return f"stream {_redact(self.cfg.uri)}"


@functools.cache
def gstreamer_available() -> bool:
    return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None


class GStreamerSource(_OpenCvSource):
    """A GStreamer pipeline ending in appsink; needs an OpenCV built with GStreamer."""

    def open(self) -> None:
        if not gstreamer_available():
            raise SourceUnusable(
                f"source.kind = \"gstreamer\" but this OpenCV {cv2.__version__} was built without GStreamer "
                "(cv2.getBuildInformation() says GStreamer: NO); install an OpenCV with GStreamer "
                "(e.g. the distro's python3-opencv) or use kind = \"url\" / \"device\""
            )
        if "appsink" not in self.cfg.uri:
            raise SourceUnusable(
                f"GStreamer pipeline {self.cfg.uri!r} has no appsink; end it with '! videoconvert ! appsink'"
            )
        super().open()

    def _create(self) -> cv2.VideoCapture:
        # Bound the buffer in the pipeline itself: end it with `appsink max-buffers=1 drop=true`.
        return cv2.VideoCapture(self.cfg.uri, cv2.CAP_GSTREAMER)

    def _hint(self) -> str:
        return "test the pipeline with gst-launch-1.0 (replace appsink with fakesink)"

    def describe(self) -> str:
        return f"gstreamer {self.cfg.uri}"


class VideoFileSource(_OpenCvSource):
    """A video file, replayed once or in a loop (reopened at the end, so a replaced file is picked up)."""

    finite = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self._frames_this_pass = 0

    def _create(self) -> cv2.VideoCapture:
        if not Path(self.cfg.uri).is_file():
            raise CameraError(f"video file {self.cfg.uri} not found; fix source.uri")
        self._frames_this_pass = 0
        return cv2.VideoCapture(self.cfg.uri)

    def _hint(self) -> str:
        if not Path(self.cfg.uri).is_file():  # removed between the check in _create and OpenCV's open
            return "the file was not found; fix source.uri"
        return "the file is not a video OpenCV can decode; convert it, e.g. ffmpeg -i in -c:v mjpeg out.avi"

    def read(self) -> np.ndarray | None:
        image = super().read()
        if image is not None:
            self._frames_this_pass += 1
            return image
        if not self.cfg.loop:
            raise EndOfStream(self.describe())
        if self._frames_this_pass == 0:
            return None  # an empty pass would loop without end; treat it as a failure and back off
        self.open()  # a CameraError here (file removed) is an outage with its reason
        return self.read()

    def describe(self) -> str:
        return f"file {self.cfg.uri}"


class FolderSource:
    """Images in a folder, in sorted name order; the listing is refreshed at each loop."""

    finite = True

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self._files: list[Path] = []
        self._next = 0
        self._good_this_pass = 0

    def _list(self) -> list[Path]:
        folder = Path(self.cfg.uri)
        if not folder.is_dir():
            raise CameraError(f"image folder {folder} not found; fix source.uri")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CameraError(f"image folder {folder} has no {'/'.join(sorted(IMAGE_SUFFIXES))} files; add images")
        return files

    def open(self) -> None:
        self._files = self._list()
        self._next = 0
        self._good_this_pass = 0

    def read(self) -> np.ndarray | None:
        if self._next >= len(self._files):
            if not self.cfg.loop:
                raise EndOfStream(self.describe())
            if self._good_this_pass == 0:
                return None
            self.open()
        path = self._files[self._next]
        self._next += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise BadFrame(f"{path} cannot be read as an image")
        self._good_this_pass += 1
        return image

    def close(self) -> None:
        self._files = []

    def describe(self) -> str:
        return f"folder {self.cfg.uri}"


_SOURCES: dict[str, Callable[[SourceConfig], FrameSource]] = {
    "file": VideoFileSource,
    "device": DeviceSource,
    "url": UrlSource,
    "gstreamer": GStreamerSource,
    "folder": FolderSource,
}


def make_source(cfg: SourceConfig) -> FrameSource:
    """The FrameSource for source.kind (not yet opened)."""
    return _SOURCES[cfg.kind](cfg)


Pace = Literal["live", "fps", "consumer"]


class Capture:
    """Reads a FrameSource on its own thread and hands each Frame to on_frame.

    Pacing (`self.pace`):
    - "live" (device, URL, GStreamer): read continuously, frames are passed on as the camera makes
      them and on_frame must not block (the backend's buffer would fill with old frames);
      the pipeline's queue keeps the latest and counts the drops.
    - "fps" (file/folder with source.fps): replay at that rate, on a deadline so it does not drift.
    - "consumer" (file/folder without fps): back-pressure. on_frame is expected to block until
      the consumer has room (e.g. queue.put with a timeout in a loop that checks stop), so
      every stored frame is inspected and none is dropped. Capture never drops on its own.

    A read that returns None, raises CameraError or takes longer than stall_timeout_s is an outage: the source is
    closed and reopened with exponential backoff (stop.wait, so shutdown is prompt). A blocking
    read is bounded by the backend (URL sources set FFmpeg's read timeout from stall_timeout_s).
    A live source that cannot be opened at start is retried the same way (camera down); a file or
    folder that cannot be opened at start is a CameraError from start(). An unexpected exception on the
    thread (a bug) calls on_fatal(reason): nothing is captured any more, so the agent must exit.
    """

    def __init__(
        self,
        source: FrameSource,
        cfg: SourceConfig,
        on_frame: Callable[[Frame], None],
        stop: threading.Event,
        metrics: CaptureMetrics | None = None,
        *,
        name: str | None = None,
        on_end: Callable[[], None] | None = None,
        on_camera: Callable[[bool], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """on_end: called once when a non-looping file/folder is done. on_camera: camera up/down changes
        (the first call says the state at start). on_fatal: the thread died of a bug."""
        self.source = source
        self.cfg = cfg
        self.on_frame = on_frame
        self.stop = stop
        self.metrics = metrics
        self.name = name or source.describe()
        self.on_end = on_end
        self.on_camera = on_camera
        self.on_fatal = on_fatal
        self.pace: Pace = ("fps" if cfg.fps else "consumer") if source.finite else "live"
        self.counts: Counter[str] = Counter()  # frames, reconnects, bad_frame, stalls
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._up: bool | None = None  # None until the first up/down is known
        self._down_since: float | None = None
        self._delay_s = cfg.reconnect_min_s
        self._warned: set[tuple[str, object]] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the source, then start the thread. A live camera that is not there yet is retried on the
        thread (camera down); a file or folder that cannot be opened raises CameraError."""
        try:
            self.source.open()
            opened = True
        except CameraError as e:
            if self.source.finite or isinstance(e, SourceUnusable):
                raise
            self._set_down(str(e))
            opened = False
        logger.info("capturing from %s (pace: %s)", self.source.describe(), self.pace)
        self._thread = threading.Thread(target=self._run, args=(opened,), name=f"capture:{self.name}", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        """True while the source delivers frames."""
        return bool(self._up)

    def next_seq(self) -> int:
        """A new seq, unique within this process (frames, and verdicts of triggers that got no frame)."""
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self, opened: bool = True) -> None:
        try:
            while True:
                if opened:
                    if self._pump() != "outage":
                        return
                    self.source.close()
                if self.stop.wait(self._delay_s):
                    return
                self._delay_s = min(self._delay_s * 2, self.cfg.reconnect_max_s)
                opened = self._reopen()
        except Exception as e:
            # A bug, not a camera fault: nothing is captured any more, so the agent must not look alive.
            logger.exception("capture from %s failed; the capture thread ends", self.source.describe())
            if self.on_fatal is not None:
                self.on_fatal(f"{type(e).__name__}: {e}")
        finally:
            self.source.close()
            self._set_up(False)

    def _reopen(self) -> bool:
        self.counts["reconnects"] += 1
        if self.metrics is not None:
            self.metrics.camera_reconnect()
        try:
            self.source.open()
            return True
        except CameraError as e:
            self._set_down(str(e))
            return False

    def _pump(self) -> str:
        """Read until stop ("stop"), end of stream ("end") or an outage ("outage")."""
        period_s = 1.0 / self.cfg.fps if self.pace == "fps" and self.cfg.fps else 0.0
        due = time.monotonic()
        # The first read after an open may wait for a stream's key frame; it is not a stall.
        first_read = True
        while not self.stop.is_set():
            if period_s:
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return "stop"
                # Deadline pacing; after a long hiccup restart the schedule instead of bursting.
                due = max(due + period_s, time.monotonic())
            started = time.monotonic()
            try:
                image = self.source.read()
            except EndOfStream:
                logger.info("%s ended after %d frames", self.source.describe(), self.counts["frames"])
                if self.on_end is not None:
                    self.on_end()
                return "end"
            except BadFrame as e:
                # Counted, and still handed on: a part was there, so it gets an ERROR verdict, never silence.
                self._reject("bad_frame", str(e), "unreadable frame: %s", e)
                self.on_frame(Frame(self.next_seq(), np.zeros((0, 0), np.uint8), captured_at=time.time(),
                                    source=self.source.describe(), error=f"unreadable frame: {e}",
                                    read_started_mono=started))
                continue
            except CameraError as e:
                self._set_down(str(e))
                return "outage"
            read_s = time.monotonic() - started
            if image is None:
                self._set_down("read failed")
                return "outage"
            if read_s > self.cfg.stall_timeout_s and not first_read:
                self.counts["stalls"] += 1
                self._set_down(f"read stalled for {read_s:.1f} s (stall_timeout_s={self.cfg.stall_timeout_s})")
                return "outage"
            first_read = False
            self._frame_arrived()
            self.counts["frames"] += 1
            frame = Frame(self.next_seq(), image, captured_at=time.time(), source=self.source.describe(),
                          stage_s={"capture": read_s}, read_started_mono=started)
            self.on_frame(frame)
        return "stop"

    def _reject(self, reason: str, key: object, msg: str, *args: object) -> None:
        # One WARNING per new kind of bad frame (a shape, a file); repeats go to DEBUG and the counter.
        level = logging.DEBUG if (reason, key) in self._warned else logging.WARNING
        self._warned.add((reason, key))
        self.counts[reason] += 1
        if self.metrics is not None:
            self.metrics.frame_rejected(reason)
        logger.log(level, msg, *args)

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if self.metrics is not None:
            self.metrics.camera_up(up)
        if self.on_camera is not None:
            self.on_camera(up)

    def _frame_arrived(self) -> None:
        if self._down_since is not None:
            logger.info("camera %s up again after %.1f s", self.source.describe(), time.monotonic() - self._down_since)
            self._down_since = None
        elif not self._up:
            logger.info("camera %s up", self.source.describe())
        self._delay_s = self.cfg.reconnect_min_s
        self._set_up(True)

    def _set_down(self, why: str) -> None:
        # WARNING once per outage; the failed reads and reopen attempts that follow are DEBUG.
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "camera %s down: %s; reconnecting with backoff %g..%g s",
                self.source.describe(), why, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s,
            )
        else:
            logger.debug("camera %s still down: %s", self.source.describe(), why)
        self._set_up(False)

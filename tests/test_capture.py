import logging
import queue
import shutil
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.capture import (
    Capture,
    DeviceSource,
    FolderSource,
    GStreamerSource,
    UrlSource,
    VideoFileSource,
    gstreamer_available,
    make_source,
)
from edge_agent.config import SourceConfig
from edge_agent.errors import CameraError
from edge_agent.metrics import Metrics

H, W = 24, 32
FAST = dict(stall_timeout_s=0.5, reconnect_min_s=0.01, reconnect_max_s=0.04)


def write_video(path, n, size=(W, H)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), i * 20, np.uint8))
    writer.release()
    return path


@pytest.fixture
def video(tmp_path):
    return write_video(tmp_path / "parts.avi", 5)


def image_folder(tmp_path, n_good, corrupt=()):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n_good):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((H, W, 3), i, np.uint8))
    for name in corrupt:
        (folder / name).write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


class Run:
    """A Capture wired to recording callbacks and a fresh Metrics registry."""

    def __init__(self, source, cfg, on_frame=None, stop=None, keep=None, on_fatal=None):
        self.frames = []
        self.camera = []
        self.ended = threading.Event()
        self.stop = stop or threading.Event()
        self.keep = keep
        self.metrics = Metrics(CollectorRegistry())
        self.capture = Capture(
            source, cfg, on_frame or self._record, self.stop, self.metrics,
            name="test", on_end=self.ended.set, on_camera=self.camera.append, on_fatal=on_fatal,
        )

    def _record(self, frame):
        self.frames.append(frame if self.keep is None else self.keep(frame))

    def sample(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def __enter__(self):
        self.capture.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        assert self.capture.join(2.0), "capture thread did not stop"


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_video_file_every_frame_once(video):
    cfg = SourceConfig(kind="file", uri=str(video))
    with Run(make_source(cfg), cfg) as run:
        assert run.capture.pace == "consumer"
        assert run.ended.wait(5)
        assert run.capture.join(2)
    assert [f.seq for f in run.frames] == [1, 2, 3, 4, 5]
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in run.frames)
    assert all("capture" in f.stage_s and f.captured_at > 0 for f in run.frames)
    assert run.camera == [True, False]
    assert run.sample("edge_agent_camera_up") == 0.0


def test_video_loop(video):
    cfg = SourceConfig(kind="file", uri=str(video), loop=True)
    with Run(make_source(cfg), cfg, keep=lambda f: f.seq) as run:
        wait_for(lambda: len(run.frames) >= 12)
    assert run.frames[:12] == list(range(1, 13))
    assert not run.ended.is_set()
    assert run.capture.counts["reconnects"] == 0


def test_consumer_pace_drops_nothing(video):
    """Without fps a file is paced by back-pressure: on_frame blocks until the consumer has room."""
    cfg = SourceConfig(kind="file", uri=str(video))
    frames: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put_blocking(frame):
        while not stop.is_set():
            try:
                frames.put(frame, timeout=0.05)
                return
            except queue.Full:
                continue

    got = []
    with Run(make_source(cfg), cfg, on_frame=put_blocking, stop=stop) as run:
        while len(got) < 5:
            got.append(frames.get(timeout=5).seq)
            time.sleep(0.02)  # a slow consumer
        assert run.ended.wait(5)
    assert got == [1, 2, 3, 4, 5]


def test_fps_paces_replay(video):
    cfg = SourceConfig(kind="file", uri=str(video), fps=50.0)
    started = time.monotonic()
    with Run(make_source(cfg), cfg) as run:
        assert run.capture.pace == "fps"
        assert run.ended.wait(5)
    # Five frames at 50 fps are four periods apart; only the lower bound is meaningful.
    assert time.monotonic() - started >= 4 / 50 * 0.9
    assert len(run.frames) == 5


@pytest.mark.parametrize("loop", [False, True])
def test_folder_replay_counts_corrupt_file(tmp_path, caplog, loop):
    folder = image_folder(tmp_path, 3, corrupt=["001b.jpg"])
    cfg = SourceConfig(kind="folder", uri=str(folder), loop=loop)
    with caplog.at_level(logging.DEBUG, logger="edge_agent.capture"):
        # The unreadable file is handed on as a frame with an error (it gets an ERROR verdict).
        with Run(make_source(cfg), cfg, keep=lambda f: f.error or int(f.image[0, 0, 0])) as run:
            if loop:
                wait_for(lambda: len(run.frames) >= 12)
            else:
                assert run.ended.wait(5)
    passes = len(run.frames) // 4
    assert [-1 if isinstance(f, str) else f for f in run.frames[: 4 * passes]] == [0, 1, -1, 2] * passes
    assert all("001b.jpg" in f for f in run.frames[2 : 4 * passes : 4])
    assert run.capture.counts["bad_frame"] >= passes
    assert run.sample("edge_agent_bad_frames_total", reason="bad_frame") == run.capture.counts["bad_frame"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "001b.jpg" in r.getMessage()]
    assert len(warnings) == 1  # once, even when the loop meets the file again


class FakeSource:
    """A live source driven by a script: 'frame', 'fail' (read returns None), 'stall' (slow read),
    'closed' (open raises CameraError). After the script it yields frames forever."""

    finite = False

    def __init__(self, script, stall_s=0.0):
        self.script = list(script)
        self.stall_s = stall_s
        self.opens = 0

    def _next(self):
        return self.script.pop(0) if self.script else "frame"

    def open(self):
        self.opens += 1
        if self.script and self.script[0] == "closed":
            self.script.pop(0)
            raise CameraError("fake camera unplugged")

    def read(self):
        step = self._next()
        if step == "stall":
            threading.Event().wait(self.stall_s)
        if step == "fail":
            return None
        time.sleep(0.001)  # a camera makes frames at some rate; keeps the test's lists small
        return np.zeros((H, W, 3), np.uint8)

    def close(self):
        pass

    def describe(self):
        return "fake camera"


class RecordingStop(threading.Event):
    """The stop event, recording every wait so backoff delays can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return super().wait(timeout)


@pytest.mark.parametrize(
    "script, reconnects, waits",
    [
        (["frame", "fail"], 1, [0.01]),
        (["frame", "fail", "closed", "closed", "closed", "closed"], 5, [0.01, 0.02, 0.04, 0.04, 0.04]),
        (["frame", "stall"], 1, [0.01]),
        (["frame", "fail", "fail", "fail"], 3, [0.01, 0.02, 0.04]),
    ],
)
def test_outage_reconnects_with_backoff(caplog, script, reconnects, waits):
    cfg = SourceConfig(kind="device", uri="0", **FAST)
    source = FakeSource(script, stall_s=0.6)
    stop = RecordingStop()
    with caplog.at_level(logging.DEBUG, logger="edge_agent.capture"):
        with Run(source, cfg, stop=stop, keep=lambda f: f.seq) as run:
            wait_for(lambda: run.capture.counts["reconnects"] == reconnects and len(run.frames) >= 3)
    assert stop.waits == waits
    assert run.sample("edge_agent_camera_reconnects_total") == reconnects
    assert run.camera[:3] == [True, False, True]
    assert run.frames[:3] == [1, 2, 3]  # seq continues across reconnects
    downs = [r for r in caplog.records if r.levelno == logging.WARNING and "down" in r.getMessage()]
    assert len(downs) == 1
    assert any(r.levelno == logging.INFO and "up again" in r.getMessage() for r in caplog.records)


def test_removed_file_reconnects_and_recovers(video, tmp_path, caplog):
    cfg = SourceConfig(kind="file", uri=str(video), loop=True, **FAST)
    hidden = tmp_path / "hidden.avi"
    with Run(make_source(cfg), cfg, keep=lambda f: f.seq) as run:
        wait_for(lambda: len(run.frames) >= 1)
        video.rename(hidden)
        wait_for(lambda: run.capture.counts["reconnects"] >= 3)
        assert run.camera[-1] is False
        count = len(run.frames)
        hidden.rename(video)
        wait_for(lambda: len(run.frames) >= count + 5)
    assert run.camera[:3] == [True, False, True]
    assert run.sample("edge_agent_camera_reconnects_total") >= 3
    downs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(downs) == 1 and "not found" in downs[0]  # the outage says why, once


def test_file_removed_between_check_and_open_says_not_found(video, tmp_path, monkeypatch):
    # The race CI once hit: the file exists at the check in _create and is gone when OpenCV opens it.
    cfg = SourceConfig(kind="file", uri=str(video), loop=True, **FAST)
    source = make_source(cfg)
    real = cv2.VideoCapture

    def vanish_then_open(path):
        video.rename(tmp_path / "gone.avi")
        return real(path)

    monkeypatch.setattr(cv2, "VideoCapture", vanish_then_open)
    with pytest.raises(CameraError, match="not found") as err:
        source.open()
    assert "cannot decode" not in str(err.value)


@pytest.mark.parametrize("phase", ["backoff", "fps_wait"])
def test_stop_ends_thread_promptly(video, phase):
    if phase == "backoff":
        cfg = SourceConfig(kind="device", uri="0", reconnect_min_s=30.0, reconnect_max_s=60.0)
        source = FakeSource(["frame", "fail"])
    else:
        cfg = SourceConfig(kind="file", uri=str(video), fps=0.1)
        source = make_source(cfg)
    run = Run(source, cfg)
    run.capture.start()
    wait_for(lambda: len(run.frames) >= 1)
    started = time.monotonic()
    run.stop.set()
    assert run.capture.join(2.0)
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "capture:test" for t in threading.enumerate())


def test_thread_is_named(video):
    cfg = SourceConfig(kind="file", uri=str(video), fps=1.0)
    with Run(make_source(cfg), cfg):
        assert "capture:test" in [t.name for t in threading.enumerate()]


@pytest.mark.parametrize(
    "kind, uri, cls",
    [
        ("file", "a.mp4", VideoFileSource),
        ("device", "0", DeviceSource),
        ("url", "rtsp://cam/stream", UrlSource),
        ("gstreamer", "videotestsrc ! appsink", GStreamerSource),
        ("folder", "imgs", FolderSource),
    ],
)
def test_make_source(kind, uri, cls):
    assert type(make_source(SourceConfig(kind=kind, uri=uri))) is cls


def test_url_describe_hides_password():
    source = make_source(SourceConfig(kind="url", uri="rtsp://admin:s3cret@10.0.0.7:554/live"))
    assert "s3cret" not in source.describe() and "10.0.0.7:554/live" in source.describe()


@pytest.mark.parametrize(
    "kind, name, message",
    [
        ("file", "missing.avi", "not found"),
        ("folder", "missing", "not found"),
        ("folder", "empty", "has no"),
        ("file", "garbage.avi", "cannot open"),
    ],
)
def test_open_errors_name_the_path(tmp_path, kind, name, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.avi").write_bytes(b"\0" * 100)
    uri = str(tmp_path / name)
    with pytest.raises(CameraError, match=message) as err:
        Capture(make_source(SourceConfig(kind=kind, uri=uri)), SourceConfig(kind=kind, uri=uri), print, threading.Event()).start()
    assert name in str(err.value)


def test_url_source_reads_through_ffmpeg(video):
    """The URL path goes through CAP_FFMPEG with timeouts; a local file stands in for a stream."""
    source = UrlSource(SourceConfig(kind="url", uri=str(video)))
    source.open()
    try:
        images = [source.read() for _ in range(6)]
    finally:
        source.close()
    assert [i is not None for i in images] == [True] * 5 + [False]


def test_missing_device_is_camera_error():
    with pytest.raises(CameraError, match="/dev/video-none"):
        DeviceSource(SourceConfig(kind="device", uri="/dev/video-none")).open()


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gstreamer_missing_is_clear_error():
    with pytest.raises(CameraError, match="built without GStreamer"):
        make_source(SourceConfig(kind="gstreamer", uri="videotestsrc ! appsink")).open()
    cfg = SourceConfig(kind="gstreamer", uri="videotestsrc ! appsink")
    with pytest.raises(CameraError, match="built without GStreamer"):  # a config fix, not retried like a camera
        Capture(make_source(cfg), cfg, print, threading.Event()).start()


@pytest.mark.skipif(not gstreamer_available(), reason="OpenCV built without GStreamer")
def test_gstreamer_pipeline_reads():
    cfg = SourceConfig(kind="gstreamer", uri=f"videotestsrc num-buffers=3 ! video/x-raw,width={W},height={H} ! videoconvert ! appsink")
    source = make_source(cfg)
    source.open()
    try:
        assert source.read().shape == (H, W, 3)
    finally:
        source.close()


def test_slow_first_read_after_open_is_not_a_stall():
    cfg = SourceConfig(kind="device", uri="0", **FAST)
    with Run(FakeSource(["stall"], stall_s=0.6), cfg, keep=lambda f: f.seq) as run:
        wait_for(lambda: len(run.frames) >= 3)
    assert run.capture.counts["reconnects"] == 0 and run.capture.counts["stalls"] == 0


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_encoded_video_frames_counted_exactly(tmp_path):
    path = tmp_path / "h264.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=10", "-frames:v", "7",
         "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=60,
    )
    cfg = SourceConfig(kind="file", uri=str(path))
    with Run(make_source(cfg), cfg, keep=lambda f: f.seq) as run:
        assert run.ended.wait(5)
    assert run.frames == list(range(1, 8))


def test_a_camera_missing_at_start_is_retried_like_an_outage(caplog):
    cfg = SourceConfig(kind="device", uri="0", **FAST)
    source = FakeSource(["closed", "closed"])
    with caplog.at_level(logging.INFO, logger="edge_agent.capture"):
        with Run(source, cfg, keep=lambda f: f.seq) as run:  # start() does not raise
            wait_for(lambda: len(run.frames) >= 2)
    assert run.camera[:2] == [False, True], "down at start is reported, then up"
    assert run.capture.counts["reconnects"] == 2 and source.opens == 3
    assert any("unplugged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_bug_on_the_capture_thread_is_reported_as_fatal():
    class Buggy(FakeSource):
        def read(self):
            raise KeyError("planted bug")

    died = []
    cfg = SourceConfig(kind="device", uri="0", **FAST)
    with Run(Buggy([]), cfg, on_fatal=died.append) as run:
        wait_for(lambda: died)
        assert run.capture.join(2.0)
    assert died == ["KeyError: 'planted bug'"] and not run.frames

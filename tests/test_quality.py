"""The frame-quality gate: pure checks, the frozen detector, and the real daemon judging what a broken
camera sends (a real video file, a real live MJPEG-over-HTTP stream, a real mosquitto, a real scrape)."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from edge_agent.broker import find_mosquitto, free_port
from edge_agent.config import QualityConfig
from edge_agent.quality import REASONS, FrozenDetector, Gate, check
from edge_agent.synth import make_part
from tests.daemon_helpers import RunningAgent, wait_until
from tests.test_daemon import metric, scrape, write_config

CFG = QualityConfig()
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (apt install mosquitto)")


def part(i: int = 0) -> np.ndarray:
    return make_part(900 + i).image


def grey_with_noise(level: int = 128, noise: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.integers(-noise, noise + 1, (128, 128)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image, reason", [
    (np.zeros((128, 128), np.uint8), "blank"),
    (np.full((128, 128, 3), 128, np.uint8), "blank"),
    (np.zeros((0, 0), np.uint8), "blank"),
    (grey_with_noise(128, 1), "uniform"),  # a broken stream's grey frame, with a little decoder noise
    (np.clip(part().astype(np.int16) // 16, 0, 255).astype(np.uint8), "underexposed"),  # the lamp is off
    (np.clip(part().astype(np.int16) * 4, 0, 255).astype(np.uint8), "overexposed"),
])
def test_frames_that_show_nothing_are_named(image, reason):
    problem = check(image, CFG)
    assert problem is not None and problem.reason == reason and problem.reason in REASONS
    assert problem.message().startswith(f"frame quality: {reason} (")


@pytest.mark.parametrize("i", range(8))
def test_good_parts_pass_the_gate_in_grey_and_colour(i):
    assert check(part(i), CFG) is None
    assert check(cv2.cvtColor(part(i), cv2.COLOR_GRAY2BGR), CFG) is None


def test_thresholds_come_from_the_config():
    dim = grey_with_noise(128, 3)
    assert check(dim, CFG) is None
    assert check(dim, QualityConfig(min_std=5.0)).reason == "uniform"


def test_frozen_after_n_identical_live_frames_and_a_new_frame_resets():
    det = FrozenDetector(3, live=True)
    a, b = part(0), part(1)
    assert [det.observe(a) for _ in range(2)] == [None, None]
    assert det.observe(a.copy()).reason == "frozen"  # the 3rd identical frame, equal bytes in another array
    assert det.observe(b) is None
    assert det.observe(b) is None and det.observe(b).reason == "frozen"


def test_a_stored_source_and_frozen_frames_0_are_never_frozen():
    for det in (FrozenDetector(3, live=False), FrozenDetector(0, live=True)):
        assert all(det.observe(part(0)) is None for _ in range(20))


def test_disabled_gate_lets_every_frame_through():
    assert Gate(QualityConfig(enabled=False), live=True)(np.zeros((8, 8), np.uint8)) is None
    assert Gate(QualityConfig(), live=True)(np.zeros((8, 8), np.uint8)).reason == "blank"


# ---- the real daemon


def lossless_video(path, frames):
    """A lossless (FFV1) .avi, so a uniform or black frame stays exactly what the test wrote."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (128, 128))
    assert writer.isOpened(), "OpenCV cannot write FFV1"
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f)
    writer.release()
    return path


@needs_mosquitto
@pytest.mark.integration
def test_daemon_judges_blank_grey_dark_and_foreign_frames_error_with_reasons_and_counts_them(tmp_path, vae_model,
                                                                                          mosquitto):
    stripes = (100 + 20 * ((np.mgrid[0:128, 0:128][1] // 32) % 2)).astype(np.uint8)  # passes the gate; no part
    frames = [part(0), np.zeros((128, 128), np.uint8), grey_with_noise(128, 1), part(1),
              np.clip(part(2).astype(np.int16) // 16, 0, 255).astype(np.uint8), part(3), stripes]
    expected = ["OK", "ERROR blank", "ERROR uniform", "OK", "ERROR underexposed", "OK", "ERROR unlike_station"]
    video = lossless_video(tmp_path / "broken.avi", frames)
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, video, mosquitto.port, metrics_port=metrics_port, loop=True, fps=20)
    # Score m: the one write_config's threshold (120) is set for; its card low bound is the blank-third rule.
    agent = RunningAgent(config, "--set", "model.score=m")
    try:
        agent.wait_printed(2 * len(frames))  # two passes over the broken camera's video
        before = _reasons(agent)
        wait_until(lambda: _sum_errors(metrics_port) >= 8, 30, "the ERROR verdicts counted by reason")
        text = scrape(metrics_port)
        after = _reasons(agent)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    got = _reasons(agent)
    for seq, label in enumerate(got, start=1):
        assert label == expected[(seq - 1) % len(frames)], "\n".join(line for _, _, line in agent.printed())
    for reason in (*REASONS, "unlike_station"):
        # The scrape is taken between two reads of the printed verdicts: its count lies between theirs.
        counted = metric(text, f'edge_agent_error_verdicts_total{{reason="{reason}"}}')
        assert before.count(f"ERROR {reason}") <= counted <= after.count(f"ERROR {reason}"), reason
    assert metric(text, 'edge_agent_dropped_total{reason="queue_full"}') == 0
    assert "frozen" not in " ".join(got), "a stored file is never judged frozen"
    counts = {r: metric(text, 'edge_agent_error_verdicts_total{reason="%s"}' % r) for r in (*REASONS, "unlike_station")}
    print(f"\nQUALITY broken_video: {len(got)} verdicts, {got[:len(frames)]} per pass; scrape: {counts}")


def _reasons(agent) -> list[str]:
    out = []
    for _, result, line in agent.printed():
        reason = next((r for r in REASONS if f"frame quality: {r}" in line), None)
        if "does not look like this station" in line:
            reason = "unlike_station"
        out.append(f"{result} {reason}" if reason else result)
    return out


def _sum_errors(port: int) -> float:
    try:
        text = scrape(port)
        return sum(metric(text, f'edge_agent_error_verdicts_total{{reason="{r}"}}') for r in (*REASONS, "unlike_station"))
    except (OSError, AssertionError):
        return 0.0


class MjpegCamera:
    """A live MJPEG-over-HTTP camera on loopback sending `jpeg_for(i)` every 50 ms, like an IP camera."""

    def __init__(self, jpeg_for) -> None:
        self.sent = 0
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while True:
                        jpg = jpeg_for(camera.sent)
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg + b"\r\n")
                        camera.sent += 1
                        time.sleep(0.05)  # a camera's frame period, not a test synchronisation
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/cam"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


@needs_mosquitto
@pytest.mark.integration
def test_a_live_camera_stuck_on_one_frame_is_frozen_and_a_replayed_still_video_is_not(tmp_path, vae_model,
                                                                                       mosquitto):
    still = _jpeg(part(5))
    moving = [_jpeg(part(10 + i)) for i in range(4)]
    # Live: four different frames (a camera working), then the decoder sticks on one image.
    camera = MjpegCamera(lambda i: moving[i] if i < 4 else still)
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, tmp_path / "unused.avi", mosquitto.port, metrics_port=metrics_port)
    agent = RunningAgent(config, "--set", "source.kind=url", "--set", f"source.uri={camera.url}",
                         "--set", "quality.frozen_frames=5", "--set", "inspection.queue_size=64")
    try:
        wait_until(lambda: any("frame quality: frozen" in line for _, _, line in agent.printed())
                   or agent.proc.poll() is not None, 60, "a frozen verdict")
        text = scrape(metrics_port)
    finally:
        rc, _ = agent.terminate()
        camera.close()
    assert rc == 0, agent.stderr
    printed = agent.printed()
    frozen = [line for _, _, line in printed if "frozen" in line]
    assert frozen and all(" ERROR " in f" {line} " for line in frozen)
    assert metric(text, 'edge_agent_error_verdicts_total{reason="frozen"}') >= 1
    print(f"\nQUALITY frozen_live: {len(printed)} verdicts, first frozen at seq {next(s for s, _, l in printed if 'frozen' in l)}"
          f" (quality.frozen_frames 5)")

    # Stored: the same still image 12 times in a file replayed in a loop; a static scene, never frozen.
    video = lossless_video(tmp_path / "still.avi", [part(5)] * 12)
    replay_dir = tmp_path / "replay"
    replay_dir.mkdir()
    config = write_config(replay_dir, vae_model, video, mosquitto.port, loop=True, fps=50)
    agent = RunningAgent(config, "--set", "quality.frozen_frames=5")
    try:
        agent.wait_printed(30)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    results = {r for _, r, _ in agent.printed()}
    assert results == {"OK"}, "a replayed still scene is judged, never frozen"

"""Several cameras under one station: the real daemon with two real sources against a real mosquitto,
the config's mistakes through the real CLI, and the pure parts (part verdict, shared batching)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from edge_agent.broker import free_port
from edge_agent.frames import Trigger
from edge_agent.patches import PatchGrid
from edge_agent.shared_scorer import ScoringService
from edge_agent.verdict import part_result
from tests.daemon_helpers import RunningAgent, wait_until
from tests.live_camera import LiveCamera
from tests.test_daemon import ROOT, THRESHOLD, Subscriber, agent, env, station_video, stop_daemon, subscriber  # noqa: F401

SCHEMA_V2 = json.loads((ROOT / "deploy" / "verdict.v2.schema.json").read_text())


def validate_v2(verdict: dict) -> None:
    jsonschema.validate(verdict, SCHEMA_V2, cls=jsonschema.Draft202012Validator)


def camera_toml(cid: str, uri: str, kind: str = "file", extra: str = "") -> str:
    return f'[[cameras]]\nid = "{cid}"\n{extra}\n[cameras.source]\nkind = "{kind}"\nuri = "{uri}"\nloop = true\n' \
           "stall_timeout_s = 1.0\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n"


def station_config(tmp_path: Path, model: Path, cameras: str, broker_port: int, *, mode: str = "triggered",
                   metrics_port: int = 0, trigger: str = "deadline_s = 2.0") -> Path:
    text = f"""
[station]
id = "st1"
[model]
path = "{model}"
threshold = {THRESHOLD}
score = "m"
device = "cpu"
[inspection]
mode = "{mode}"
[trigger]
{trigger}
[mqtt]
host = "127.0.0.1"
port = {broker_port}
protocol = "5"
[outbox]
dir = "{tmp_path / 'outbox'}"
[metrics]
port = {metrics_port}
[web]
enabled = false
[retention]
enabled = true
dir = "{tmp_path / 'retention'}"
{cameras}
"""
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def trigger(sub: Subscriber, part_id: str) -> None:
    sub.client.publish("edge-agent/st1/trigger", json.dumps({"part_id": part_id, "trigger_id": part_id}), qos=1)


def by_camera(verdict: dict) -> dict[str, dict]:
    return {c["camera"]: c for c in verdict["cameras"]}


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_one_trigger_gives_one_verdict_over_both_cameras_and_a_defect_one_camera_sees_makes_the_part_ng(
        tmp_path, vae_model, mosquitto, subscriber):
    # Stored files without fps: each trigger takes each camera's next frame, so part 1 sees frames 0, part 2 frames 1.
    top = station_video(tmp_path / "top.avi", 2)
    side = station_video(tmp_path / "side.avi", 2, defective={1})
    config = station_config(tmp_path, vae_model, camera_toml("top", str(top)) + camera_toml("side", str(side)),
                            mosquitto.port)
    proc = subprocess.Popen(agent("run", str(config)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert subscriber.wait_for("status", 1)[-1].payload == b"online"
        trigger(subscriber, "P1")
        subscriber.wait_for("verdict", 1)
        trigger(subscriber, "P2")
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 2)]
        heatmaps = subscriber.wait_for("heatmap/side", 1)
    finally:
        rc, _out, err = stop_daemon(proc)
    assert rc == 0 and "Traceback" not in err, err
    assert "2 cameras, 1 models loaded" in err, "a model two cameras use is loaded once"
    for v in verdicts:
        validate_v2(v)
    p1, p2 = verdicts
    assert (p1["part_id"], p1["camera"], p1["result"]) == ("P1", None, "OK")
    assert [c["camera"] for c in p1["cameras"]] == ["top", "side"]
    assert {c: r["result"] for c, r in by_camera(p1).items()} == {"top": "OK", "side": "OK"}
    assert (p2["part_id"], p2["result"]) == ("P2", "NG")
    cams = by_camera(p2)
    assert cams["top"]["result"] == "OK" and cams["side"]["result"] == "NG" and cams["side"]["score"] > THRESHOLD
    assert cams["side"]["heatmap_topic"] == "edge-agent/st1/heatmap/side" and cams["top"]["heatmap_topic"] is None
    props = dict(heatmaps[0].properties.UserProperty)
    assert (props["message_id"], props["camera"]) == (p2["message_id"], "side"), "heatmap pairs with its camera's result"
    assert subscriber.on("heatmap") == [], "no heatmap on the single-camera topic"
    assert len({v["message_id"] for v in verdicts} | {c["seq"] for v in verdicts for c in v["cameras"]}) == 6
    assert (tmp_path / "retention" / "side").is_dir(), "each camera retains into its own folder"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_an_unplugged_camera_makes_its_parts_error_while_the_other_camera_keeps_judging(
        tmp_path, vae_model, mosquitto, subscriber):
    top = station_video(tmp_path / "top.avi", 3)
    live = LiveCamera(free_port(), fps=20).start()
    metrics_port = free_port()
    config = station_config(tmp_path, vae_model, camera_toml("top", str(top)) + camera_toml("side", live.url, "url"),
                            mosquitto.port, metrics_port=metrics_port)
    proc = subprocess.Popen(agent("run", str(config)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert subscriber.wait_for("status", 1)[-1].payload == b"online"
        trigger(subscriber, "P1")
        p1 = json.loads(subscriber.wait_for("verdict", 1)[0].payload)
        live.stop()  # unplugged
        infos = lambda: [json.loads(m.payload) for m in subscriber.on("status/info")]  # noqa: E731
        subscriber_wait(subscriber, lambda: any(i["cameras"]["side"]["camera"] == "down" for i in infos()))
        text = scrape(metrics_port)
        trigger(subscriber, "P2")
        p2 = json.loads(subscriber.wait_for("verdict", 2)[1].payload)
    finally:
        live.stop()
        rc, _out, err = stop_daemon(proc)
    assert rc == 0 and "Traceback" not in err, err
    validate_v2(p1)
    validate_v2(p2)
    assert by_camera(p1)["side"]["error_reason"] not in ("trigger_deadline", "no_frame"), "both cameras judged P1"
    assert by_camera(p1)["side"]["frame_age_s"] is not None
    assert (p2["part_id"], p2["result"], p2["error_reason"]) == ("P2", "ERROR", "trigger_deadline")
    assert by_camera(p2)["top"]["result"] == "OK", "the camera that works still judged the part"
    assert by_camera(p2)["side"]["result"] == "ERROR" and "camera side" in p2["error"]
    assert 'edge_agent_camera_source_up{camera="side"} 0.0' in text
    assert 'edge_agent_camera_source_up{camera="top"} 1.0' in text
    assert "edge_agent_camera_up 0.0" in text, "the station's camera gauge says a camera is missing"


def subscriber_wait(sub: Subscriber, predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with sub._cond:
        while not predicate():
            assert sub._cond.wait(max(0.0, deadline - time.monotonic())) or predicate(), "condition not reached"


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_free_run_cameras_publish_their_own_verdicts(tmp_path, vae_model, mosquitto, subscriber):
    top = station_video(tmp_path / "top.avi", 2)
    side = station_video(tmp_path / "side.avi", 2, defective={0, 1})
    config = station_config(tmp_path, vae_model, camera_toml("top", str(top)) + camera_toml("side", str(side)),
                            mosquitto.port, mode="free-run")
    config.write_text(config.read_text().replace("loop = true", "loop = false"))
    agent_run = RunningAgent(config)
    assert agent_run.wait() == 0, agent_run.stderr
    verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 4)]
    for v in verdicts:
        validate_v2(v)
        assert v["part_id"] is None and [c["camera"] for c in v["cameras"]] == [v["camera"]]
    results = sorted((v["camera"], v["result"]) for v in verdicts)
    assert results == [("side", "NG"), ("side", "NG"), ("top", "OK"), ("top", "OK")]
    printed = sorted(line.split(" ", 2)[2].split(" ", 1)[0] for _, _, line in agent_run.printed())
    assert printed == ["cameras=side:NG"] * 2 + ["cameras=top:OK"] * 2, "--print-verdicts prints version 2 verdicts"
    assert len(subscriber.wait_for("heatmap/side", 2)) == 2


@pytest.mark.parametrize("cameras, trigger_line, needle", [
    ('[[cameras]]\nid = "a"\n[cameras.source]\nuri = "a.avi"\n[[cameras]]\nid = "a"\n[cameras.source]\nuri = "b.avi"\n',
     "", "id 'a' is used twice"),
    ('[[cameras]]\nid = "a"\n[cameras.source]\nuri = "a.avi"\n', 'cameras = ["a", "b"]',
     "trigger.cameras names camera 'b', which does not exist"),
    ('[[cameras]]\nid = "a"\n[cameras.recipes]\nhousing = "m.pt"\n[cameras.source]\nuri = "a.avi"\n', "",
     "recipe 'housing' is not in [recipes]"),
    ('[[cameras]]\nid = "a"\nmodel = "missing.pt"\n[cameras.source]\nuri = "a.avi"\n', "", "camera 'a': model.path"),
])
def test_a_bad_camera_config_is_one_line_and_exit_2(tmp_path, vae_model, cameras, trigger_line, needle):
    config = station_config(tmp_path, vae_model, cameras, 1883, trigger=trigger_line)
    done = subprocess.run(agent("check-config", str(config)), env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


@pytest.mark.parametrize("results, expected", [
    (["OK", "OK"], "OK"),
    (["OK", "NG"], "NG"),
    (["ERROR", "NG"], "NG"),
    (["OK", "ERROR"], "ERROR"),
    (["ERROR", "ERROR"], "ERROR"),
    ([], "ERROR"),
])
def test_a_part_is_ng_when_any_camera_is_and_error_when_one_could_not_judge(results, expected):
    cams = [{"camera": f"c{i}", "result": r, "error": "x" if r == "ERROR" else None,
             "error_reason": "frozen" if r == "ERROR" else None} for i, r in enumerate(results)]
    result, error, reason = part_result(cams)
    assert result == expected
    assert (error is None) == (expected != "ERROR") and (reason is None) == (expected != "ERROR")


class _CountingScorer:
    """A fake scorer: score = patch mean; records the size of every forward pass; its first pass is held at a gate."""

    score_name = "m"

    def __init__(self) -> None:
        self.module = object()
        self.passes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def score_frames(self, frames):
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        self.passes.append(sum(p.shape[0] for _, p in frames))
        return [p.flatten(1).mean(1).numpy() for _, p in frames]


def test_frames_of_cameras_that_share_a_model_go_through_one_forward_pass():
    scorer = _CountingScorer()
    service = ScoringService().start()
    grid = PatchGrid.for_frame(64, 64, 32, 32, True)
    out: dict[int, np.ndarray] = {}

    def camera(i: int) -> threading.Thread:
        frame = torch.full((4, 1, 32, 32), float(i))
        t = threading.Thread(target=lambda: out.__setitem__(i, service.score_frame(scorer, grid, frame)))
        t.start()
        return t

    threads = [camera(0)]
    assert scorer.entered.wait(30), "the first frame's pass did not start"
    threads += [camera(i) for i in (1, 2, 3)]  # queued while the first pass runs
    deadline = time.monotonic() + 30
    while service._queue.qsize() < 3:
        assert time.monotonic() < deadline, "the other cameras' frames were not queued"
        threading.Event().wait(0.01)  # polling a queue length; no event exposes it
    scorer.gate.set()
    for t in threads:
        t.join(30)
    service.close()
    assert scorer.passes == [4, 12], "the three frames queued during a pass share the next one"
    assert [float(out[i][0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0], "each camera gets its own frame's scores"


# The daemon with one planted bug: camera side's infer thread, after two verdicts, wedges until the watchdog
# withholds its pings (top keeps judging meanwhile), then dies. Everything else is the real agent.
SIDE_WEDGES_THEN_DIES = """
import logging, sys, threading, time
from edge_agent import pipeline
withheld = threading.Event()
class Spy(logging.Handler):
    def emit(self, record):
        if "withholding watchdog pings" in record.getMessage():
            withheld.set()
logging.getLogger("edge_agent.systemd").addHandler(Spy())
real_feed = pipeline.Pipeline._feed_backlog
def feed(self):
    if self.camera == "side" and self.inspected >= 2 and threading.current_thread().name == "infer:side":
        withheld.wait(60)
        deadline = time.monotonic() + 60
        while self.queue.empty() and time.monotonic() < deadline:
            self.stop.wait(0.05)  # so that a frame is left queued for drain() to answer
        raise RuntimeError("planted bug in the infer thread")
    return real_feed(self)
pipeline.Pipeline._feed_backlog = feed
from edge_agent.cli import main
main(sys.argv[1:])
"""


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_a_stuck_then_dead_camera_is_not_hidden_by_a_working_one_the_watchdog_starves_and_the_agent_exits_1(
        tmp_path, vae_model, mosquitto, subscriber):
    import socket
    import sys

    top = station_video(tmp_path / "top.avi", 3)
    side = station_video(tmp_path / "side.avi", 3)
    config = station_config(tmp_path, vae_model, camera_toml("top", str(top)) + camera_toml("side", str(side)),
                            mosquitto.port, mode="free-run")
    config.write_text(config.read_text().replace("loop = true", "loop = true\nfps = 20"))
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    daemon_env = dict(env(), NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="1000000")
    daemon_env.pop("WATCHDOG_PID", None)
    try:
        proc = subprocess.Popen([sys.executable, "-c", SIDE_WEDGES_THEN_DIES, "run", str(config)], env=daemon_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        notes = []
        while "WATCHDOG=1" not in notes:
            notes.append(sock.recv(4096).decode())  # pings flow while both cameras judge
        _out, err = proc.communicate(timeout=120)  # ends by itself, no signal sent
    finally:
        sock.close()
    assert proc.returncode == 1, err
    assert "no pipeline progress of side for 0.5 s; withholding watchdog pings" in err, \
        "the wedged camera starved the watchdog although top kept judging"
    assert "no pipeline progress of top" not in err
    last = err.strip().splitlines()[-1]
    assert last == ("edge-agent: error: camera side: the infer thread died (RuntimeError: planted bug in the infer "
                    "thread); exiting so that systemd restarts the agent"), last
    subscriber_wait(subscriber, lambda: subscriber.on("status")[-1].payload == b"offline")
    verdicts = [json.loads(m.payload) for m in subscriber.on("verdict")]
    for v in verdicts:
        validate_v2(v)
    side_results = [(v["cameras"][0]["result"], v["error_reason"]) for v in verdicts if v["camera"] == "side"]
    assert side_results[:2] == [("OK", None), ("OK", None)]
    assert side_results[2:] and all(r == ("ERROR", "internal") for r in side_results[2:]), \
        "frames queued when side's infer thread died still got a verdict, ERROR"
    top_results = [v["result"] for v in verdicts if v["camera"] == "top"]
    assert len(top_results) > 2 and set(top_results) == {"OK"}, "top judged on while side was stuck"


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_sighup_reloads_every_cameras_threshold_and_a_failed_reload_keeps_the_running_models(
        tmp_path, vae_model, mosquitto, subscriber):
    import signal

    top = station_video(tmp_path / "top.avi", 3)
    side = station_video(tmp_path / "side.avi", 3)
    config = station_config(tmp_path, vae_model, camera_toml("top", str(top)) +
                            camera_toml("side", str(side), extra=f"threshold = {THRESHOLD}"), mosquitto.port)
    text = config.read_text()
    proc = subprocess.Popen(agent("run", str(config)), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()

    def reload(new_text: str, outcome: str) -> None:
        config.write_text(new_text)
        seen = "".join(err).count(outcome)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "".join(err).count(outcome) > seen or proc.poll() is not None, what=outcome)

    try:
        assert subscriber.wait_for("status", 1)[-1].payload == b"online"
        trigger(subscriber, "P1")
        subscriber.wait_for("verdict", 1)
        reload(text.replace(f'id = "side"\nthreshold = {THRESHOLD}', 'id = "side"\nmodel = "missing.pt"'),
               "reload failed")
        trigger(subscriber, "P2")
        subscriber.wait_for("verdict", 2)
        reload(text.replace(f'id = "side"\nthreshold = {THRESHOLD}', 'id = "side"\nthreshold = 0.5'),
               "reloaded the models of 2 cameras")
        trigger(subscriber, "P3")
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 3)]
        side_thresholds = lambda: [json.loads(m.payload)["cameras"]["side"]["recipes"][""]["threshold"]  # noqa: E731
                                   for m in subscriber.on("status/info")]
        subscriber_wait(subscriber, lambda: 0.5 in side_thresholds())  # status/info says what now runs
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.join(10)
    log = "".join(err)
    assert rc == 0 and "Traceback" not in log, log
    failed = next(line for line in log.splitlines() if "reload failed" in line)
    assert "keeping every camera's running models" in failed and "missing.pt" in failed, failed
    for v in verdicts:
        validate_v2(v)
    thresholds = [{c: (r["threshold"], r["result"]) for c, r in by_camera(v).items()} for v in verdicts]
    assert thresholds[0] == thresholds[1] == {"top": (THRESHOLD, "OK"), "side": (THRESHOLD, "OK")}, \
        "a failed reload keeps the running models"
    assert thresholds[2] == {"top": (THRESHOLD, "OK"), "side": (0.5, "NG")}, "the new threshold judges after SIGHUP"
    assert verdicts[2]["result"] == "NG"

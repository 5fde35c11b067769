"""The trigger contract (edge_agent/triggers.py): parsing, the pending registry (deadline, de-duplication,
pairing order) and the answers; then the same contract against the real daemon, mosquitto and a live camera."""

import json
import re
import threading
import time
from pathlib import Path

import cv2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.broker import free_port
from edge_agent.frames import Trigger
from edge_agent.triggers import (Pending, TokenBucket, TriggerDesk, TriggerError, duplicate_of, parse_trigger,
                                 readable_ids)
from tests.daemon_helpers import RunningAgent, planted_model, wait_until
from tests.live_camera import LiveCamera, read_stamp
from tests.test_daemon import THRESHOLD, Subscriber, metric, scrape, station_video, subscriber, validate  # noqa: F401


# parse_trigger


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b'{"part_id": "A1", "trigger_id": "t9"}', ("t9", "A1", None, None)),
        (b'{"part_id": "A1", "trigger_id": "t9", "recipe": "r", "job_id": "j"}', ("t9", "A1", "r", "j")),
        (b'{"part_id": "A1", "recipe": null, "job_id": null, "trigger_id": "t"}', ("t", "A1", None, None)),
        ('{"part_id": "Ä-1", "trigger_id": "t"}'.encode(), ("t", "Ä-1", None, None)),
    ],
)
def test_parse_trigger_accepts(payload, expected):
    t = parse_trigger(payload, received_at=5.0)
    assert (t.trigger_id, t.part_id, t.recipe, t.job_id, t.received_at) == (*expected, 5.0)


def test_parse_trigger_generates_trigger_id():
    a, b = parse_trigger(b'{"part_id": "A1"}'), parse_trigger(b'{"part_id": "A1", "trigger_id": null}')
    assert len(a.trigger_id) == 32 and a.trigger_id != b.trigger_id


@pytest.mark.parametrize(
    "payload, reason, words",
    [
        (b"", "json", "not UTF-8 JSON"),
        (b"{part_id: 1}", "json", "not UTF-8 JSON"),
        (b"\xff\xfe", "json", "not UTF-8 JSON"),
        (b"[" * 3000, "json", "not UTF-8 JSON"),
        (b'"A1"', "type", "JSON object"),
        (b'["A1"]', "type", "JSON object"),
        (b"{}", "missing_part_id", "no part_id"),
        (b'{"part_id": null}', "missing_part_id", "no part_id"),
        (b'{"part_id": 5}', "type", "part_id must be a non-empty string"),
        (b'{"part_id": ""}', "type", "non-empty string"),
        (b'{"part_id": "A", "recipe": 1}', "type", "recipe"),
        (b'{"part_id": "A", "partid": "B"}', "unknown_field", "valid fields"),
        (b'{"part_id": "' + b"x" * 300 + b'"}', "type", "limit is 256"),
        (b'{"part_id": "' + b"x" * 5000 + b'"}', "too_large", "limit is 4096"),
    ],
)
def test_parse_trigger_rejects(payload, reason, words):
    with pytest.raises(TriggerError, match=words) as e:
        parse_trigger(payload)
    assert e.value.reason == reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
trigger_like = st.dictionaries(st.sampled_from(["part_id", "trigger_id", "recipe", "job_id", "x"]), json_values)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | trigger_like.map(lambda d: json.dumps(d).encode()))
def test_parse_trigger_only_raises_trigger_error(payload):
    try:
        t = parse_trigger(payload)
    except TriggerError:
        return
    assert isinstance(t, Trigger) and t.part_id and t.trigger_id


def test_token_bucket_refills():
    now = [0.0]
    bucket = TokenBucket(2.0, 2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert [bucket.take() for _ in range(2)] == [True, False]


# the pending registry


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def trig(tid, arrived, part="P"):
    return Trigger(tid, part, arrived_mono=arrived)


def test_a_live_frame_takes_only_a_trigger_that_arrived_before_its_read_began():
    clock = Clock()
    pending = Pending(deadline_s=5.0, clock=clock)
    pending.add(trig("t1", 100.5))
    assert pending.take(read_started=100.4) is None, "read began before the trigger: the previous part"
    assert pending.take(read_started=100.5).trigger_id == "t1"
    assert pending.take(read_started=101.0) is None


def test_triggers_are_taken_in_arrival_order_and_stored_frames_take_any():
    pending = Pending(deadline_s=5.0, clock=Clock())
    pending.add(trig("t1", 100.0))
    pending.add(trig("t2", 100.1))
    assert [pending.take().trigger_id, pending.take().trigger_id] == ["t1", "t2"]


def test_an_expired_trigger_is_answered_once_and_never_paired_later():
    clock = Clock()
    pending = Pending(deadline_s=2.0, clock=clock)
    pending.add(trig("t1", 100.0))
    pending.add(trig("t2", 101.5))
    assert pending.next_deadline() == 102.0
    clock.now = 102.0
    assert pending.take(read_started=102.0).trigger_id == "t2", "t1 is past its deadline: skipped"
    assert [t.trigger_id for t in pending.expired()] == ["t1"]
    assert pending.expired() == [] and pending.take() is None


def test_a_repeated_trigger_id_is_a_duplicate_pending_then_done():
    pending = Pending(deadline_s=5.0, clock=Clock())
    assert pending.add(trig("t1", 100.0)) == (None, None)
    assert pending.add(trig("t1", 100.1)) == ("waiting", None)
    taken = pending.take()
    assert pending.add(trig("t1", 100.2)) == ("taken", None)
    assert pending.waiting == 0 and not pending.idle()
    verdict = {"trigger_id": "t1", "result": "OK", "message_id": "st:b:1"}
    assert pending.complete(taken.trigger_id, verdict) == 2, "two retries wait for the verdict"
    assert pending.add(trig("t1", 100.3)) == ("done", verdict)
    assert pending.complete("t1", verdict) == 0 and pending.idle()
    assert duplicate_of(verdict) == {**verdict, "duplicate": True}


def test_memory_of_trigger_ids_is_bounded_but_never_forgets_one_owed_a_verdict():
    pending = Pending(deadline_s=5.0, remember=3, clock=Clock())
    for i in range(3):
        pending.add(trig(f"t{i}", 100.0))
        pending.complete(pending.take().trigger_id, {"seq": i})
    pending.add(trig("open", 100.0))  # waiting: t0 (done) is forgotten to keep 3
    assert pending.add(trig("t0", 100.1)) == (None, None), "t0 forgotten: a new inspection"
    pending.add(trig("t9", 100.2))
    pending.add(trig("t10", 100.2))  # "open" is now the oldest id, and still owed a verdict
    assert pending.add(trig("open", 100.3))[0] == "waiting", "an id still owed a verdict is kept"


def test_too_many_waiting_triggers_are_refused_with_the_reason():
    pending = Pending(deadline_s=5.0, max_waiting=2, clock=Clock())
    pending.add(trig("a", 100.0))
    pending.add(trig("b", 100.0))
    with pytest.raises(TriggerError, match="camera down") as e:
        pending.add(trig("c", 100.0))
    assert e.value.reason == "busy"


def test_take_waits_for_a_trigger_until_stop():
    pending = Pending(deadline_s=5.0)
    stop = threading.Event()
    threading.Timer(0.05, lambda: pending.add(Trigger("t1", "P"))).start()
    assert pending.take(wait_s=10.0, stop=stop).trigger_id == "t1"
    stop.set()
    assert pending.take(wait_s=10.0, stop=stop) is None


@pytest.mark.parametrize(
    "payload, ids",
    [
        (b'{"part_id": "A1", "trigger_id": "T1", "colour": "red"}', {"part_id": "A1", "trigger_id": "T1"}),
        (b'{"part_id": 7, "trigger_id": "T1"}', {"trigger_id": "T1"}),
        (b'{not json', {}),
        (b'["A1"]', {}),
        (b'\xff', {}),
    ],
)
def test_readable_ids_of_a_rejected_trigger(payload, ids):
    assert readable_ids(payload) == ids


def test_the_desk_answers_accepted_duplicate_and_refused_triggers():
    calls = []
    seen = set()

    def on_trigger(t):
        if t.recipe == "nope":
            raise TriggerError("unknown_recipe", "recipe 'nope' is not configured; known recipes: ['a', 'b']")
        dup = t.trigger_id in seen
        seen.add(t.trigger_id)
        return {"duplicate": True} if dup else None

    desk = TriggerDesk(100.0, on_trigger, lambda *a: calls.append(a))
    first = desk.receive(b'{"part_id": "A1", "trigger_id": "T1"}')
    again = desk.receive(b'{"part_id": "A1", "trigger_id": "T1"}')
    refused = desk.receive(json.dumps({"part_id": "A2", "trigger_id": "T2", "recipe": "nope"}).encode())
    bad = desk.receive(b'{"part_id": "A3", "trigger_id": "T3", "colour": "red"}')
    assert first == {"ok": True, "trigger_id": "T1", "part_id": "A1"}
    assert again == {"ok": True, "trigger_id": "T1", "part_id": "A1", "duplicate": True}
    assert (refused["ok"], refused["reason"], refused["trigger_id"], refused["part_id"]) == (
        False, "unknown_recipe", "T2", "A2")
    assert "known recipes: ['a', 'b']" in refused["error"]
    assert (bad["reason"], bad["trigger_id"], bad["part_id"]) == ("unknown_field", "T3", "A3")
    assert calls == [("trigger_rejected", "unknown_recipe"), ("trigger_rejected", "unknown_field")]


# ---- against the real daemon, a real mosquitto and a real live camera (MJPEG over HTTP)


def station_config(tmp_path: Path, model: Path, broker_port: int, *, uri: str, kind: str = "url",
                   extra: str = "", metrics_port: int = 0, loop: bool = False, fps: float | None = None) -> Path:
    source_extra = ("loop = true\n" if loop else "") + (f"fps = {fps}\n" if fps else "")
    text = f"""
[station]
id = "st1"
[model]
path = "{model}"
threshold = {THRESHOLD}
device = "cpu"
[source]
kind = "{kind}"
uri = "{uri}"
reconnect_min_s = 0.2
reconnect_max_s = 0.5
{source_extra}
[inspection]
mode = "triggered"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
heatmap = "never"
[outbox]
dir = "{tmp_path / 'outbox'}"
[metrics]
port = {metrics_port}
[retention]
enabled = true
ok_sample_rate = 1.0
dir = "{tmp_path / 'retention'}"
{extra}
"""
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def wait_online(sub: Subscriber, agent: RunningAgent) -> None:
    try:
        wait_until(lambda: sub.on("status") and sub.on("status")[-1].payload == b"online", what="online")
    except AssertionError as e:
        raise AssertionError(f"{e}; agent exit code {agent.proc.poll()}, stderr:\n{agent.stderr}") from None


def send(sub: Subscriber, body: dict) -> float:
    """Publish a trigger; returns the wall-clock time just before it left (the frame must be sent after it)."""
    sent_at = time.time()
    sub.client.publish("edge-agent/st1/trigger", json.dumps(body), qos=1)
    return sent_at


def retained_frames(folder: Path) -> dict[str, tuple[dict, Path]]:
    """trigger_id -> (verdict JSON, PNG) of every retained frame."""
    out = {}
    for meta in folder.glob("*.json"):
        verdict = json.loads(meta.read_text())
        out[verdict["trigger_id"]] = (verdict, meta.with_suffix(".png"))
    return out


@pytest.mark.integration
def test_every_trigger_is_judged_on_a_live_frame_sent_after_it_while_the_agent_is_slow(tmp_path, vae_model,
                                                                                         mosquitto, subscriber):
    # A scorer that spends ~0.1-0.5 s a frame on this CPU, against a camera sending 25 frames/s: a reader
    # that stops reading while inference is busy would hand the next trigger a frame from before it.
    slow = planted_model(vae_model, tmp_path / "slow.pt", spin=4000)
    camera = LiveCamera(free_port(), fps=25).start()
    config = station_config(tmp_path, slow, mosquitto.port, uri=camera.url, extra="[trigger]\ndeadline_s = 60\n")
    agent = RunningAgent(config)
    sent_at: dict[str, float] = {}
    try:
        wait_online(subscriber, agent)
        wait_until(lambda: re.search(r"camera stream \S+ up", agent.stderr), what="camera up")
        # A trigger every 5 camera frames (~5/s) against an agent that judges ~2/s: triggers keep arriving
        # while inference is backlogged, which is when a blocked reader hands out frames from before them.
        for i in range(12):
            frames_before = camera.sent
            wait_until(lambda: camera.sent >= frames_before + 5, what="5 more camera frames")
            sent_at[f"T{i}"] = send(subscriber, {"part_id": f"P{i}", "trigger_id": f"T{i}"})
        assert all(r["ok"] for r in (json.loads(m.payload) for m in subscriber.wait_for("trigger/response", 12)))
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", len(sent_at))]
        wait_until(lambda: len(retained_frames(tmp_path / "retention")) >= len(sent_at), what="retained frames")
    finally:
        rc, _ = agent.terminate()
        camera.stop()
    assert rc == 0, agent.stderr
    assert sorted(v["trigger_id"] for v in verdicts) == sorted(sent_at), "one verdict per trigger"
    ages, leads = [], []
    for tid, (verdict, png) in retained_frames(tmp_path / "retention").items():
        validate(verdict)
        assert verdict["result"] != "ERROR", verdict["error"]
        frame_sent_at = read_stamp(cv2.imread(str(png))) / 1000
        leads.append(frame_sent_at - sent_at[tid])
        assert frame_sent_at >= sent_at[tid] - 0.001, f"{tid}: frame sent {sent_at[tid] - frame_sent_at:.3f} s " \
                                                      "before its trigger: the previous part"
        ages.append(verdict["frame_age_s"])
    assert all(a is not None and a >= 0 for a in ages)
    inference = [v["latency_s"]["inference"] for v in verdicts]
    print(f"\nLIVE pairing: {len(verdicts)} triggers, one per 5 camera frames, inference {min(inference):.2f}-"
          f"{max(inference):.2f} s/frame, camera {camera.sent} frames at 25 fps: every frame sent after its trigger "
          f"(by {min(leads) * 1000:.0f}-{max(leads) * 1000:.0f} ms); frame_age_s at pairing max "
          f"{max(ages) * 1000:.1f} ms")


def info(sub: Subscriber) -> dict:
    return json.loads(sub.on("status/info")[-1].payload)


@pytest.mark.integration
def test_a_camera_missing_at_start_is_retried_and_a_trigger_past_its_deadline_gets_error_never_a_later_frame(
        tmp_path, vae_model, mosquitto, subscriber):
    camera_port, metrics_port = free_port(), free_port()
    camera = None  # nothing listens on camera_port yet: the camera is unplugged when the agent starts
    url = f"http://127.0.0.1:{camera_port}/stream.mjpg"
    config = station_config(tmp_path, vae_model, mosquitto.port, uri=url, metrics_port=metrics_port,
                            extra="[trigger]\ndeadline_s = 2.0\n")
    agent = RunningAgent(config)
    try:
        wait_online(subscriber, agent)
        wait_until(lambda: subscriber.on("status/info") and info(subscriber)["camera"] == "down", what="info: down")
        assert metric(scrape(metrics_port), "edge_agent_camera_up") == 0
        assert agent.proc.poll() is None, "a missing camera is an outage, not an exit"
        send(subscriber, {"part_id": "D1", "trigger_id": "T-D1"})
        (late,) = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 1)]
        reconnects_while_down = metric(scrape(metrics_port), "edge_agent_camera_reconnects_total")
        camera = LiveCamera(camera_port, fps=25).start()
        wait_until(lambda: info(subscriber)["camera"] == "up", what="info: camera up")
        sent = send(subscriber, {"part_id": "D2", "trigger_id": "T-D2"})
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 2)]
        wait_until(lambda: "T-D2" in retained_frames(tmp_path / "retention"), what="D2's frame retained")
        text = scrape(metrics_port)
    finally:
        rc, _ = agent.terminate()
        if camera is not None:
            camera.stop()
    assert rc == 0, agent.stderr
    assert reconnects_while_down >= 1 and re.search(r"camera stream \S+ down: cannot open", agent.stderr)
    assert (late["part_id"], late["trigger_id"], late["result"]) == ("D1", "T-D1", "ERROR")
    assert "trigger.deadline_s = 2 s" in late["error"] and late["frame_age_s"] is None
    validate(late)
    assert [v["trigger_id"] for v in verdicts[1:]] == ["T-D2"] and verdicts[1]["result"] != "ERROR", \
        "the expired trigger is never matched to the frame the camera sends when it comes back"
    _, png = retained_frames(tmp_path / "retention")["T-D2"]
    assert read_stamp(cv2.imread(str(png))) / 1000 >= sent - 0.001
    assert len(subscriber.on("verdict")) == 2
    assert metric(text, 'edge_agent_errors_total{stage="trigger_deadline"}') == 1
    assert metric(text, "edge_agent_camera_up") == 1
    assert agent.stderr.count("ready: station") == 1, "the model was loaded once: no restart loop"
    print(f"\nDEADLINE: camera missing at start, {reconnects_while_down:g} reconnect attempts while the first "
          f"trigger waited; trigger D1 answered ERROR after "
          f"the 2 s deadline ({late['error']!r}); D2 after the camera came up: judged on a frame sent after it")


@pytest.mark.integration
def test_a_repeated_trigger_id_is_answered_with_the_first_verdict_never_inspected_twice(tmp_path, vae_model,
                                                                                        mosquitto, subscriber):
    slow = planted_model(vae_model, tmp_path / "slow.pt", spin=1500)
    video = station_video(tmp_path / "parts.avi", 5)
    metrics_port = free_port()
    config = station_config(tmp_path, slow, mosquitto.port, uri=str(video), kind="file", loop=True, fps=20,
                            metrics_port=metrics_port)
    agent = RunningAgent(config)
    try:
        wait_online(subscriber, agent)
        send(subscriber, {"part_id": "A1", "trigger_id": "T1"})
        subscriber.wait_for("verdict", 1)
        send(subscriber, {"part_id": "A1", "trigger_id": "T1"})  # a PLC retry after the verdict
        subscriber.wait_for("verdict", 2)
        send(subscriber, {"part_id": "A2", "trigger_id": "T2"})
        send(subscriber, {"part_id": "A2", "trigger_id": "T2"})  # a retry while T2 is still being judged
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 4)]
        responses = [json.loads(m.payload) for m in subscriber.wait_for("trigger/response", 4)]
        text = scrape(metrics_port)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    assert [(r["trigger_id"], r.get("duplicate", False), r.get("verdict")) for r in responses] == [
        ("T1", False, None), ("T1", True, "resent"), ("T2", False, None), ("T2", True, "pending")]
    assert [(v["trigger_id"], v.get("duplicate", False)) for v in verdicts] == [
        ("T1", False), ("T1", True), ("T2", False), ("T2", True)]
    for first, again in (verdicts[0:2], verdicts[2:4]):
        validate(again)
        assert again == {**first, "duplicate": True, "published_at": again["published_at"]}, "the same verdict"
    assert len(agent.printed()) == 2, "two inspections, not four"
    assert metric(text, 'edge_agent_triggers_total{result="duplicate"}') == 2
    assert metric(text, 'edge_agent_triggers_total{result="accepted"}') == 2
    assert sum(metric(text, f'edge_agent_frames_total{{result="{r}"}}') for r in ("OK", "NG", "ERROR")) == 2
    print("\nDUPLICATES: T1 repeated after its verdict -> verdict re-sent (duplicate: true, same message_id); "
          "T2 repeated while judged -> answered when done; 4 triggers, 2 inspections, triggers_total{duplicate} 2")


@pytest.mark.integration
def test_recipes_pick_the_model_per_trigger_reject_unknown_ones_and_reload_on_sighup(tmp_path, vae_model, ae_model,
                                                                                      mosquitto, subscriber):
    video = station_video(tmp_path / "parts.avi", 5)
    recipes = f"""
[recipes.a]
model = "{vae_model}"
threshold = {THRESHOLD}
[recipes.b]
model = "{ae_model}"
threshold = 99.0
"""
    config = station_config(tmp_path, vae_model, mosquitto.port, uri=str(video), kind="file", loop=True, fps=20,
                            extra=recipes)
    text = config.read_text().replace('mode = "triggered"', 'mode = "triggered"\ndefault_recipe = "a"')
    config.write_text(text)
    agent = RunningAgent(config)
    try:
        wait_online(subscriber, agent)
        status = info(subscriber)
        for body in ({"part_id": "P1", "trigger_id": "R1", "recipe": "a"},
                     {"part_id": "P2", "trigger_id": "R2", "recipe": "b"},
                     {"part_id": "P3", "trigger_id": "R3"},
                     {"part_id": "P4", "trigger_id": "R4", "recipe": "zzz"}):
            send(subscriber, body)
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 3)]
        responses = [json.loads(m.payload) for m in subscriber.wait_for("trigger/response", 4)]
        config.write_text(text.replace("threshold = 99.0", "threshold = 77.0"))
        agent.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: "reloaded model" in agent.stderr, what="reload")
        send(subscriber, {"part_id": "P5", "trigger_id": "R5", "recipe": "b"})
        after = json.loads(subscriber.wait_for("verdict", 4)[-1].payload)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    assert status["boot_id"] == agent.boot_id() and status["mode"] == "triggered"
    assert status["default_recipe"] == "a"
    assert {n: r["model_id"] for n, r in status["recipes"].items()} == {"a": "vae", "b": "ae"}
    assert all(r["checksum"].startswith("sha256:") or len(r["checksum"]) >= 32 for r in status["recipes"].values())
    assert subscriber.on("status")[0].payload == b"online", "plain payload contract unchanged"
    by_id = {v["trigger_id"]: v for v in verdicts}
    assert set(by_id) == {"R1", "R2", "R3"}, "the unknown recipe got no inspection"
    assert [(by_id[t]["model"]["id"], by_id[t]["threshold"]) for t in ("R1", "R2", "R3")] == [
        ("vae", THRESHOLD), ("ae", 99.0), ("vae", THRESHOLD)]
    refused = responses[3]
    assert (refused["ok"], refused["reason"], refused["trigger_id"], refused["part_id"]) == (
        False, "unknown_recipe", "R4", "P4")
    assert "known recipes: ['a', 'b']" in refused["error"]
    assert (after["trigger_id"], after["model"]["id"], after["threshold"]) == ("R5", "ae", 77.0)
    print(f"\nRECIPES: a -> vae, b -> ae, none -> default a; 'zzz' refused ({refused['error']!r}); "
          "SIGHUP reloaded recipe b's threshold 99 -> 77")


# The daemon with one planted bug: the file source's 6th read raises. Everything else is the real agent.
CAPTURE_BUG = """
import sys
from edge_agent import capture
real_read, reads = capture.VideoFileSource.read, [0]
def read(self):
    reads[0] += 1
    if reads[0] == 6:
        raise RuntimeError("planted bug in the capture thread")
    return real_read(self)
capture.VideoFileSource.read = read
from edge_agent.cli import main
main(sys.argv[1:])
"""


@pytest.mark.integration
def test_the_agent_exits_non_zero_when_its_capture_thread_dies(tmp_path, vae_model, mosquitto, subscriber):
    import subprocess
    import sys

    from tests.test_daemon import env

    config = station_config(tmp_path, vae_model, mosquitto.port, uri=str(station_video(tmp_path / "p.avi", 10)),
                            kind="file", loop=True, fps=20)
    config.write_text(config.read_text().replace('mode = "triggered"', 'mode = "free-run"'))
    done = subprocess.run([sys.executable, "-c", CAPTURE_BUG, "run", str(config), "--print-verdicts"], env=env(),
                          capture_output=True, text=True, timeout=120)  # ends by itself, no signal sent
    assert done.returncode == 1, done.stderr
    assert "planted bug in the capture thread" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent: error: the capture thread died (RuntimeError: planted bug"), last
    assert "systemd restarts" in last
    printed = len(done.stdout.splitlines())
    assert printed == 5, "the frames read before the bug were judged"
    assert len(subscriber.wait_for("verdict", printed)) == printed, "and their verdicts delivered"
    assert subscriber.wait_for("status", 2)[-1].payload == b"offline"
    print(f"\nCAPTURE DEATH: bug on read 6 -> {printed} verdicts delivered, status offline, exit 1: {last!r}")

"""Fault injection against the real daemon process and a real mosquitto (docs/RELIABILITY.md).

Each test prints one `FAULT <name>: ...` line with what it observed; `pytest -s` shows them.
EDGE_FAULT_OUTAGE_S sets the broker outage (3 s here; the documented run uses 10 s).
"""

import ast
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import cli
from edge_agent.broker import find_mosquitto, free_port
from edge_agent.config import Config, MetricsConfig, load_config
from edge_agent.errors import ConfigError, ModelError
from edge_agent.synth import make_part
from tests.daemon_helpers import (
    PersistentBroker,
    RunningAgent,
    VerdictSubscriber,
    first_arrivals,
    outbox_rows,
    planted_model,
    wait_until,
)
from tests.test_daemon import env, metric, scrape, station_video, validate, write_config

ROOT = Path(__file__).parent.parent
OUTAGE_S = float(os.environ.get("EDGE_FAULT_OUTAGE_S", "3"))
UNIT = (ROOT / "systemd" / "edge-agent.service").read_text()

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (apt install mosquitto)")


def unit_setting(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)$", UNIT, re.M)
    assert m, f"{name} not in systemd/edge-agent.service"
    return m.group(1)


def live_metric(port: int, name: str) -> float:
    """A sample from the running agent's endpoint; NaN (compares false) until it serves one."""
    try:
        return metric(scrape(port), name)
    except (OSError, AssertionError):
        return float("nan")


@pytest.fixture
def broker(tmp_path):
    b = PersistentBroker(tmp_path / "broker", free_port()).start()
    yield b
    b.stop()


@pytest.fixture
def consumer(broker):
    sub = VerdictSubscriber(broker.port)
    yield sub
    sub.close()


def part_png(path: Path, i: int, size: int = 128) -> Path:
    image = make_part(700 + i).image
    if size != image.shape[0]:
        image = cv2.resize(image, (size, size))
    cv2.imwrite(str(path), image)
    return path


# 1. Broker killed mid-stream and restarted


@needs_mosquitto
@pytest.mark.integration
def test_broker_restart_delivers_every_verdict_in_order(tmp_path, vae_model, broker, consumer):
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 5), broker.port, loop=True,
                          fps=10)
    agent = RunningAgent(config)
    try:
        wait_until(lambda: len(consumer.verdicts()) >= 3, what="3 verdicts before the outage")
        broker.stop()
        before = len(agent.seqs())
        time.sleep(OUTAGE_S)  # the outage itself
        during = len(agent.seqs()) - before
        broker.start()
        produced = agent.seqs()
        wait_until(lambda: {v["seq"] for v in consumer.verdicts()} >= set(produced), what="backlog delivered")
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    produced = agent.seqs()
    wait_until(lambda: {v["seq"] for v in consumer.verdicts()} >= set(produced), 10, "last verdicts delivered")
    delivered = consumer.verdicts()
    assert [v["seq"] for v in first_arrivals(delivered)] == produced, "every verdict, once, in order"
    assert during >= OUTAGE_S * 10 * 0.5, "verdicts kept coming during the outage"
    assert "Traceback" not in agent.stderr
    print(f"\nFAULT broker_restart: outage {OUTAGE_S:g} s, {during} verdicts produced during it, "
          f"{len(produced)} produced in all, {len(delivered)} deliveries, "
          f"{len(first_arrivals(delivered))} unique, in order")


# 2. Agent SIGKILLed while the broker is down


@needs_mosquitto
@pytest.mark.integration
def test_sigkill_while_broker_down_loses_no_verdict(tmp_path, vae_model, broker, consumer):
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 5), broker.port, loop=True,
                          fps=10)
    first = RunningAgent(config)
    try:
        wait_until(lambda: len(consumer.verdicts()) >= 2, what="2 verdicts before the outage")
        broker.stop()
        n = len(first.seqs())
        first.wait_printed(n + 5)
    finally:
        first.kill()
    boot1 = first.boot_id()
    printed = {f"st1:{boot1}:{s}" for s in first.seqs()}
    waiting = {p["message_id"] for kind, p in outbox_rows(tmp_path / "outbox") if kind == "verdict"}
    assert waiting, "the killed agent left verdicts in its outbox"
    delivered_before = {v["message_id"] for v in consumer.verdicts()}
    produced = printed | waiting
    assert waiting <= produced and delivered_before <= produced

    broker.start()
    second = RunningAgent(config)
    try:
        wait_until(lambda: {v["message_id"] for v in consumer.verdicts()} >= produced, what="boot 1 verdicts")
    finally:
        rc, _ = second.terminate()
    assert rc == 0, second.stderr
    of_boot1 = [v for v in consumer.verdicts() if v["message_id"].split(":")[1] == boot1]
    unique = first_arrivals(of_boot1)
    assert {v["message_id"] for v in unique} == produced, "a consumer de-duplicating by message_id sees each once"
    assert [v["seq"] for v in unique] == sorted(v["seq"] for v in unique), "in order"
    for v in unique:
        validate(v)
    duplicates = len(of_boot1) - len(unique)
    assert duplicates <= 16, "QoS 1 redelivers at most the in-flight window"  # mqtt.INFLIGHT_WINDOW
    print(f"\nFAULT sigkill_broker_down: {len(produced)} verdicts produced by the killed agent, "
          f"{len(waiting)} waiting in its outbox at the kill, all {len(unique)} delivered after both returned, "
          f"{duplicates} QoS 1 duplicates")


# 3. Camera source disappears and returns


@pytest.mark.integration
def test_camera_gone_and_back_reconnects_and_judges_no_frame_twice(tmp_path, vae_model):
    video = station_video(tmp_path / "parts.avi", 5)
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, video, free_port(), metrics_port=metrics_port, loop=True, fps=20)
    agent = RunningAgent(config, "--set", "source.reconnect_min_s=0.1", "--set", "source.reconnect_max_s=0.4",
                         "--set", "mqtt.host=", "--set", "mqtt.embedded=true")  # embedded broker: only the camera is at fault here
    hidden = tmp_path / "unplugged.avi"
    try:
        agent.wait_printed(3)
        video.rename(hidden)
        wait_until(lambda: live_metric(metrics_port, "edge_agent_camera_up") == 0, 15, "camera_up 0")
        wait_until(lambda: live_metric(metrics_port, "edge_agent_camera_reconnects_total") >= 3, 15,
                   "3 reconnect attempts")
        down = scrape(metrics_port)
        during = len(agent.seqs())
        hidden.rename(video)
        wait_until(lambda: live_metric(metrics_port, "edge_agent_camera_up") == 1, 15, "camera_up 1")
        agent.wait_printed(during + 3)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    seqs = agent.seqs()
    assert seqs == sorted(set(seqs)), "no frame judged twice"
    assert metric(down, "edge_agent_camera_up") == 0
    reconnects = metric(down, "edge_agent_camera_reconnects_total")
    assert re.search(r"camera file .* down: .*not found", agent.stderr)
    assert "up again after" in agent.stderr
    print(f"\nFAULT camera_gone: camera_up 1 -> 0 -> 1, {reconnects:g} reconnect attempts while unplugged, "
          f"{len(seqs)} verdicts, {len(seqs)} unique seqs")


# 4. Corrupt input


@pytest.mark.integration
def test_corrupt_and_wrong_size_frames_get_error_verdicts_and_the_agent_goes_on(tmp_path, vae_model):
    folder = tmp_path / "frames"
    folder.mkdir()
    good = [part_png(folder / f"{i}-good.png", i) for i in range(3)]
    (folder / "3-truncated.png").write_bytes(good[0].read_bytes()[:300])
    (folder / "4-garbage.png").write_bytes(os.urandom(2000))
    part_png(folder / "5-small.png", 5, size=96)
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, tmp_path / "unused.avi", free_port(), metrics_port=metrics_port,
                          loop=True, fps=20)
    agent = RunningAgent(config, "--set", "source.kind=folder", "--set", f"source.uri={folder}",
                         "--set", "mqtt.host=", "--set", "mqtt.embedded=true")
    try:
        agent.wait_printed(6 * 3)  # three passes over the folder
        text = scrape(metrics_port)
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    printed = agent.printed()
    by_position = {}
    for seq, result, line in printed:
        by_position.setdefault((seq - 1) % 6, set()).add(result)
    assert by_position[3] == by_position[4] == by_position[5] == {"ERROR"}, "never OK"
    assert all(by_position[i] <= {"OK", "NG"} for i in range(3)), "the good frames are still judged"
    errors = [line for _, result, line in printed if result == "ERROR"]
    assert sum("unreadable frame" in e for e in errors) == 2 * sum("does not fit" in e for e in errors)
    bad, wrong = (metric(text, f'edge_agent_bad_frames_total{{reason="{r}"}}') for r in ("bad_frame", "wrong_size"))
    assert bad >= 4 and wrong >= 2
    assert metric(text, 'edge_agent_frames_total{result="ERROR"}') >= bad + wrong - 3  # scrape raced a frame or so
    assert metric(text, 'edge_agent_error_verdicts_total{reason="unreadable"}') >= bad - 2
    assert metric(text, 'edge_agent_error_verdicts_total{reason="wrong_size"}') >= wrong - 1
    assert not re.search(r'^edge_agent_dropped_total\{reason="(bad_frame|wrong_size)"\}', text, re.M), \
        "a frame with a verdict is no drop"
    assert "Traceback" not in agent.stderr
    print(f"\nFAULT corrupt_frames: {len(printed)} verdicts, {len(errors)} ERROR "
          f"(truncated + garbage PNGs: {sum('unreadable' in e for e in errors)}, 96x96 frames: "
          f"{sum('does not fit' in e for e in errors)}), 0 OK among them; scrape: bad_frames bad_frame {bad:g}, "
          f"wrong_size {wrong:g}")


@pytest.mark.integration
def test_a_model_returning_nan_gives_error_verdicts_never_ok(tmp_path, vae_model):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        part_png(folder / f"{i}.png", i)
    nan_model = planted_model(vae_model, tmp_path / "nan.pt", nan=True)
    config = write_config(tmp_path, nan_model, tmp_path / "unused.avi", free_port())
    agent = RunningAgent(config, "--set", "source.kind=folder", "--set", f"source.uri={folder}",
                         "--set", "mqtt.host=", "--set", "mqtt.embedded=true", "--set", "outbox.flush_timeout_s=5")
    rc = agent.wait()  # a non-looping folder ends the run by itself
    assert rc == 0, agent.stderr
    results = [r for _, r, _ in agent.printed()]
    assert results == ["ERROR"] * 4
    assert "non-finite patch scores" in "".join(agent.out)
    assert "Traceback" not in agent.stderr
    print(f"\nFAULT nan_model: {len(results)} frames, {results.count('ERROR')} ERROR verdicts, 0 OK, exit {rc}")


# 5. Bad config and bad model files: one line, exit 2 (systemd RestartPreventExitStatus)


def _tamper(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if "/data/" in item.filename and data:
                data = bytes([data[0] ^ 1]) + data[1:]
            zout.writestr(item, data)
    return dst


def _bad_setups(tmp_path: Path, vae_model: Path):
    video = station_video(tmp_path / "parts.avi", 1)
    good = write_config(tmp_path, vae_model, video, free_port()).read_text()

    def cfg(name: str, text: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return path

    (tmp_path / "notamodel.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return {
        "toml_syntax": (cfg("syntax", good + "\n[station\n"), "not valid TOML"),
        "unknown_key": (cfg("unknown", good.replace("[station]", "[station]\nidd = 1")), "station.idd"),
        "bad_value": (cfg("value", good.replace('mode = "free-run"', 'mode = "sometimes"')), "inspection.mode"),
        "topic_wildcard": (cfg("topic", good.replace('id = "st1"', 'id = "st/#"')), "station.id"),
        "missing_model": (cfg("missing", good.replace(str(vae_model), str(tmp_path / "gone.pt"))), "gone.pt"),
        "tampered_model": (cfg("tampered", good.replace(str(vae_model), str(_tamper(vae_model, tmp_path / "t.pt")))),
                           "checksum"),
        "not_a_model": (cfg("notamodel", good.replace(str(vae_model), str(tmp_path / "notamodel.pt"))),
                        "notamodel.pt"),
        "frame_size_mismatch": (cfg("size", good.replace('loop = false', 'loop = false\nwidth = 64\nheight = 64')),
                                "source.width"),
        "missing_config": (tmp_path / "nowhere.toml", "not found"),
    }


def test_bad_config_or_model_is_one_line_and_exit_2(tmp_path, vae_model, capsys):
    assert int(unit_setting("RestartPreventExitStatus")) == 2 == ConfigError.exit_code == ModelError.exit_code
    for name, (config, words) in _bad_setups(tmp_path, vae_model).items():
        with pytest.raises(SystemExit) as done:
            cli.main(["run", str(config)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert done.value.code == 2, f"{name}: exit {done.value.code}: {err}"
        assert len(lines) == 1 and lines[0].startswith("edge-agent: error:"), f"{name}: {err}"
        assert words in lines[0], f"{name}: {lines[0]}"
    print(f"\nFAULT bad_config: {len(_bad_setups(tmp_path, vae_model))} bad configs/models, each one line, exit 2")


# 6. Trigger payloads against the running daemon; fuzzing parse_trigger is in test_triggers.py


@needs_mosquitto
@pytest.mark.integration
def test_bad_and_flooding_triggers_are_rejected_counted_and_rate_limited(tmp_path, vae_model, broker):
    import json

    sub = VerdictSubscriber(broker.port, ("verdict", "trigger/response"), client_id="plc")
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 3), broker.port,
                          metrics_port=metrics_port, mode="triggered", loop=True, fps=20)
    agent = RunningAgent(config, "--set", "mqtt.trigger_rate_per_s=10")
    bad = [b"{not json", b'"A1"', b'{"part_id": 7}', b'{"part_id": "A", "colour": "red"}',
           b'{"part_id": "' + b"x" * 5000 + b'"}', b"\xff\xfe"]
    try:
        wait_until(lambda: "announced online" in agent.stderr, what="online (trigger subscription acknowledged)")
        for payload in bad:
            sub.client.publish("edge-agent/st1/trigger", payload, qos=1)
        wait_until(lambda: len(sub.on("trigger/response")) >= len(bad), what="replies to bad triggers")
        time.sleep(1.5)  # let the bucket refill
        for i in range(60):  # a flood: 60 triggers at once against 10/s
            sub.client.publish("edge-agent/st1/trigger", json.dumps({"part_id": f"F{i}"}), qos=1)
        wait_until(lambda: len(sub.on("trigger/response")) >= len(bad) + 60, what="replies to the flood")
        replies = [json.loads(p) for p in sub.on("trigger/response")]
        accepted = [r["part_id"] for r in replies if r["ok"]]
        wait_until(lambda: len(sub.verdicts()) >= len(accepted), what="a verdict per accepted trigger")
        text = scrape(metrics_port)
    finally:
        rc, _ = agent.terminate()
        sub.close()
    assert rc == 0, agent.stderr
    reasons = [r["reason"] for r in replies[: len(bad)]]
    assert reasons == ["json", "type", "type", "unknown_field", "too_large", "json"]
    flood = replies[len(bad):]
    limited = sum(1 for r in flood if not r["ok"] and r["reason"] == "rate")
    assert 10 <= len(accepted) <= 20 and limited == 60 - len(accepted)
    assert sorted(v["part_id"] for v in sub.verdicts()) == sorted(accepted)
    rejected = metric(text, 'edge_agent_triggers_total{result="rejected"}')
    assert rejected == len(bad) + limited
    assert "Traceback" not in agent.stderr
    print(f"\nFAULT triggers: {len(bad)} malformed rejected ({', '.join(reasons)}); flood of 60 at 10/s: "
          f"{len(accepted)} accepted and judged, {limited} rate-limited; triggers_total{{rejected}} {rejected:g}")


toml_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=12), st.lists(st.integers(), max_size=3))
sections = st.sampled_from(["station", "model", "source", "inspection", "mqtt", "outbox", "metrics", "retention",
                            "logging", "bogus"])
keys = st.sampled_from(["id", "path", "uri", "kind", "mode", "port", "host", "prefix", "max_mb", "bind", "level",
                        "threshold", "fps", "loop", "queue_size", "max_fps", "tls", "x"])
configs = st.dictionaries(sections, st.dictionaries(keys, toml_scalars, max_size=5), max_size=6)


def _toml(data: dict) -> str:
    import json

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    return "\n".join(f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) for s, kv in data.items())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=configs, raw=st.text(max_size=80), overrides=st.lists(st.text(max_size=20), max_size=3))
def test_config_loader_fuzz_gives_a_config_or_a_config_error(tmp_path, data, raw, overrides):
    for text, sets in ((_toml(data), []), (raw, []), (_toml(data), overrides)):
        path = tmp_path / "fuzz.toml"
        path.write_text(text)
        try:
            assert isinstance(load_config(path, sets), Config)
        except ConfigError as e:
            assert str(e).strip()


# 7. SIGTERM during inference


@needs_mosquitto
@pytest.mark.integration
def test_sigterm_during_inference_finishes_in_flight_frames_and_exits_0(tmp_path, vae_model, broker, consumer):
    slow = planted_model(vae_model, tmp_path / "slow.pt", spin=400)
    config = write_config(tmp_path, slow, station_video(tmp_path / "parts.avi", 40), broker.port)
    agent = RunningAgent(config)  # a file without fps: back-pressure keeps the queue (2) full behind inference
    agent.wait_printed(2)
    at_signal = len(agent.seqs())
    rc, elapsed = agent.terminate()
    stop_timeout_s = float(unit_setting("TimeoutStopSec"))
    assert rc == 0, agent.stderr
    assert elapsed < stop_timeout_s
    produced = agent.seqs()
    after = len(produced) - at_signal
    assert after >= 1, "frames in flight at SIGTERM were finished"
    assert len(produced) < 40, "capture stopped; the run did not just play the file to its end"
    wait_until(lambda: {v["seq"] for v in consumer.verdicts()} >= set(produced), 10, "all delivered")
    assert [v["seq"] for v in first_arrivals(consumer.verdicts())] == produced
    assert "SIGTERM received" in agent.stderr and "Traceback" not in agent.stderr
    print(f"\nFAULT sigterm_inference: {at_signal} verdicts before SIGTERM, {after} in-flight frames finished and "
          f"delivered after it, exit {rc} in {elapsed:.1f} s (TimeoutStopSec={stop_timeout_s:g})")


@needs_mosquitto
@pytest.mark.integration
def test_sigterm_taken_by_a_worker_thread_still_stops_the_agent(tmp_path, vae_model, broker):
    # The kernel hands a process-directed signal to any thread that does not block it; Python runs the handler
    # in the main thread only when that thread next runs bytecode. A main thread parked in an untimed wait
    # never does: the agent ignored SIGTERM until systemd's SIGKILL (seen once in ~60 loaded runs).
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 10), broker.port, loop=True,
                          fps=20)
    agent = RunningAgent(config)
    agent.wait_printed(2)
    rc, elapsed = agent.terminate_via_thread(timeout_s=30)
    assert rc == 0, agent.stderr
    assert "SIGTERM received" in agent.stderr and "Traceback" not in agent.stderr
    print(f"\nFAULT sigterm_worker_thread: exit {rc} {elapsed:.1f} s after a SIGTERM delivered to a worker thread")


@needs_mosquitto
@pytest.mark.integration
def test_an_agent_stopped_by_sigabrt_leaves_every_threads_stack_in_its_log(tmp_path, vae_model, broker):
    # systemd's watchdog, and a stop that overruns TimeoutStopSec (TimeoutStopFailureMode=abort), send SIGABRT:
    # the journal must then say where each thread was. Without PYTHONFAULTHANDLER: the agent enables it itself.
    assert unit_setting("TimeoutStopFailureMode") == "abort"
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 10), broker.port, loop=True,
                          fps=20)
    environ = {k: v for k, v in env().items() if k != "PYTHONFAULTHANDLER"}
    agent = RunningAgent(config, environ=environ)
    agent.wait_printed(2)
    agent.proc.send_signal(signal.SIGABRT)
    rc = agent.wait(30)
    assert rc == -signal.SIGABRT
    err = agent.stderr
    assert "Fatal Python error: Aborted" in err, err[-3000:]
    assert "in _wait_for_stop" in err and "in _infer_loop" in err and "in _run" in err, err[-3000:]
    print(f"\nFAULT sigabrt_stacks: {err.count('Thread 0x') + 1} thread stacks in the log after SIGABRT")


# 8. Outbox full


@needs_mosquitto
@pytest.mark.integration
def test_full_outbox_drops_heatmaps_first_raises_the_alarm_and_keeps_verdicts(tmp_path, vae_model, broker, consumer):
    broker.stop()  # the consumer's session is kept; the agent starts into an outage
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, station_video(tmp_path / "parts.avi", 5), broker.port,
                          metrics_port=metrics_port, loop=True, fps=20)
    max_bytes = int(0.03 * 1024 * 1024)
    agent = RunningAgent(config, "--set", "mqtt.heatmap=all", "--set", "outbox.max_mb=0.03")
    try:
        wait_until(lambda: live_metric(metrics_port, 'edge_agent_dropped_total{reason="verdict_outbox_full"}')
                   >= 3, what="the outbox to overflow with verdicts")
        text = scrape(metrics_port)
        rows = outbox_rows(tmp_path / "outbox")
        broker.start()
        wait_until(lambda: live_metric(metrics_port, "edge_agent_broker_connected") == 1, what="reconnect")
    finally:
        rc, _ = agent.terminate()
    assert rc == 0, agent.stderr
    produced = agent.seqs()
    wait_until(lambda: {v["seq"] for v in consumer.verdicts()} >= {produced[-1]}, 10, "the last verdict")
    delivered = [v["seq"] for v in first_arrivals(consumer.verdicts())]
    heatmaps_dropped = metric(text, 'edge_agent_dropped_total{reason="heatmap_outbox_full"}')
    verdicts_dropped = metric(text, 'edge_agent_dropped_total{reason="verdict_outbox_full"}')
    assert heatmaps_dropped > verdicts_dropped > 0
    assert metric(text, "edge_agent_broker_connected") == 0
    assert 0 < metric(text, "edge_agent_outbox_bytes") <= max_bytes
    assert metric(text, "edge_agent_outbox_depth") > 0
    assert "dropped a heatmap to keep room for verdicts" in agent.stderr
    assert re.search(r"ERROR .*dropped a verdict", agent.stderr)
    kept = [int(p["seq"]) for kind, p in rows if kind == "verdict"]
    assert kept == list(range(kept[0], kept[0] + len(kept))), "the outbox keeps the newest verdicts, no holes"
    assert delivered == produced[produced.index(delivered[0]):], "from the oldest kept one on, every verdict arrives"
    assert delivered[0] > 1, "the oldest were dropped"
    print(f"\nFAULT outbox_full: outbox {max_bytes} bytes, broker down: {heatmaps_dropped:g} heatmaps dropped before "
          f"{verdicts_dropped:g} verdicts; outbox held {len(kept)} verdicts and "
          f"{sum(k == 'heatmap' for k, _ in rows)} heatmaps; after the broker returned, verdicts "
          f"{delivered[0]}..{delivered[-1]} delivered ({len(delivered)}), the {delivered[0] - 1} oldest lost")


def test_outbox_on_a_full_tmpfs_refuses_heatmaps_first_and_never_raises(tmp_path):
    from edge_agent.outbox import Outbox

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        box = Outbox(disk / "outbox", 100 * 1024 * 1024)  # the byte bound is not what stops it: the disk is
        events = []
        for i in range(20_000):
            v = box.put("verdict", "t", b"v" * 400, properties={"seq": str(i)})
            h = box.put("heatmap", "t", os.urandom(8000))
            events.append((v is not None, h is not None))
            if v is None:
                break
        first_heatmap_refused = next(i for i, (_, h) in enumerate(events) if not h)
        first_verdict_refused = next((i for i, (v, _) in enumerate(events) if not v), len(events))
        assert first_heatmap_refused < first_verdict_refused
        kept_verdicts = sum(1 for m in box.peek(10_000) if m.kind == "verdict")
        assert kept_verdicts == first_verdict_refused, "no verdict was dropped to make room, only refused at the end"
        assert box.dropped["heatmap"] >= first_heatmap_refused
        box.close()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    print(f"\nFAULT tmpfs_full: 2 MiB tmpfs; heatmaps refused from pair {first_heatmap_refused}, first verdict "
          f"refused at pair {first_verdict_refused}; {kept_verdicts} verdicts kept")


# Security


def test_nothing_is_unpickled():
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|import pickle|import dill")
    offenders = []
    for path in (ROOT / "edge_agent").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not re.search(r"torch\.load\(.*weights_only\s*=\s*True", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "unpickling can run code from a file:\n" + "\n".join(offenders)


def test_models_are_checksum_verified_before_torch_reads_them():
    tree = ast.parse((ROOT / "edge_agent" / "artifact.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    # load() returns what load_with_extras() (module, card and the archive's extra entries) read
    assert "load_with_extras" in [ast.unparse(c.func) for c in ast.walk(functions["load"]) if isinstance(c, ast.Call)]
    load = functions["load_with_extras"]
    calls = [ast.unparse(c.func) for c in ast.walk(load) if isinstance(c, ast.Call)]
    assert calls.index("read_bytes") < calls.index("verify_bytes") < calls.index("torch.jit.load")
    assert "path" not in ast.unparse(next(c for c in ast.walk(load) if isinstance(c, ast.Call)
                                          and ast.unparse(c.func) == "torch.jit.load").args[0]), \
        "torch loads the verified bytes, not the path again"
    jit_loads = [p for p in (ROOT / "edge_agent").rglob("*.py") if "jit.load(" in p.read_text()]
    assert jit_loads == [ROOT / "edge_agent" / "artifact.py"], "only artifact.load reads model files"


@pytest.mark.parametrize("station, prefix", [("a+b", "edge"), ("a#", "edge"), ("", "edge"), ("a/b", "edge"),
                                             ("st1", "edge/+"), ("st1", "edge//x"), ("st1", "/edge"),
                                             ("st1", "edge/"), ("st1", "#"), ("st1", "")])
def test_topic_levels_from_config_are_validated(tmp_path, station, prefix):
    path = tmp_path / "c.toml"
    path.write_text(f'[station]\nid = "{station}"\n[source]\nuri = "x.avi"\n[mqtt]\nhost = "b"\nprefix = "{prefix}"\n')
    with pytest.raises(ConfigError, match="station.id|mqtt.prefix"):
        load_config(path)


def test_valid_topic_levels_are_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[station]\nid = "line-3_st1"\n[source]\nuri = "x.avi"\n[mqtt]\nhost = "b"\nprefix = "plant/edge-agent"\n')
    assert load_config(path).mqtt.prefix == "plant/edge-agent"


def test_metrics_bind_loopback_by_default():
    from edge_agent.metrics import Metrics

    assert MetricsConfig().bind == "127.0.0.1"
    server, _port = Metrics().serve(MetricsConfig().bind, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_by_default_and_client_certificates_are_passed(tmp_path, monkeypatch):
    import ssl

    import paho.mqtt.client as paho

    from edge_agent.config import MqttConfig
    from edge_agent.mqtt import MqttPublisher
    from edge_agent.outbox import Outbox

    calls = {}
    monkeypatch.setattr(paho.Client, "tls_set", lambda self, **kw: calls.update(kw))
    monkeypatch.setattr(paho.Client, "tls_insecure_set", lambda self, v: calls.update(insecure=v))
    config = MqttConfig(host="broker", username="agent", password_env="EDGE_TEST_PW",  # holds s3cret-Pa55
                        tls={"enabled": True, "ca_file": tmp_path / "ca.pem", "cert_file": tmp_path / "c.pem",
                             "key_file": tmp_path / "c.key"})
    monkeypatch.setenv("EDGE_TEST_PW", "s3cret-Pa55")
    pub = MqttPublisher(config, "st1", Outbox(tmp_path / "box", 100_000))
    assert calls["cert_reqs"] == ssl.CERT_REQUIRED and "insecure" not in calls
    assert (calls["certfile"], calls["keyfile"]) == (str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
    assert pub.client._username == b"agent" and pub.client._password == b"s3cret-Pa55"
    assert "s3cret" not in repr(config), "the config holds where the secret is, not the secret"


# 6. A bug between scoring and publishing


FAULTY_DECIDE = '''
import edge_agent.verdict as verdict

_real, _calls = verdict.decide, []


def decide(*args, **kwargs):
    _calls.append(1)
    if len(_calls) == 2:
        raise RuntimeError("planted fault in decide")
    return _real(*args, **kwargs)


verdict.decide = decide
'''


@needs_mosquitto
@pytest.mark.integration
def test_an_exception_in_decide_still_answers_the_triggered_plc_with_an_error_verdict(tmp_path, vae_model,
                                                                                      mosquitto):
    from tests.test_daemon import Subscriber, agent, env

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULTY_DECIDE)  # the real daemon, with decide() failing once
    video = station_video(tmp_path / "parts.avi", 3)
    config = write_config(tmp_path, vae_model, video, mosquitto.port, mode="triggered", loop=True, fps=20)
    subscriber = Subscriber(mosquitto.port)
    proc = subprocess.Popen(agent("run", str(config)), env=dict(env(), PYTHONPATH=f"{hook}:{ROOT}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert subscriber.wait_for("status", 1)[-1].payload == b"online"
        for i in range(3):
            subscriber.client.publish("edge-agent/st1/trigger", f'{{"part_id": "P{i}", "trigger_id": "T{i}"}}', qos=1)
            subscriber.wait_for("verdict", i + 1)  # each PLC waits for its answer before the next part
        verdicts = subscriber.verdicts()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        subscriber.close()
    assert proc.returncode == 0, err
    assert [(v["trigger_id"], v["result"]) for v in verdicts] == [("T0", "OK"), ("T1", "ERROR"), ("T2", "OK")]
    assert verdicts[1]["error_reason"] == "internal" and "planted fault in decide" in verdicts[1]["error"]
    for v in verdicts:
        validate(v)
    assert "planted fault in decide" in err
    print(f"\nFAULT decide_raises: 3 triggers, 3 verdicts: {[v['result'] for v in verdicts]}")

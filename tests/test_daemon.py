"""The real daemon as a subprocess against a real mosquitto, a real video file and a real metrics scrape."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import typing
import urllib.request
import zipfile
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel

from edge_agent.broker import free_port
from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError
from edge_agent.synth import make_part

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "deploy" / "verdict.schema.json").read_text())
TIMEOUT_S = 60.0  # a generous ceiling: waits end on events; a loaded 2-core runner can take 30 s to start the agent
# Between the tiny test model's good-part scores (up to ~80) and a 30x30 white block (~170).
THRESHOLD = 120.0  # on the raw score m (a gross white block scores far over it, good parts under)


def station_video(path: Path, n: int, defective: set[int] = frozenset()) -> Path:
    """n synthetic parts (MJPG .avi); frames whose index is in `defective` carry a gross white block."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 128))
    assert writer.isOpened()
    for i in range(n):
        image = make_part(500 + i).image.copy()
        if i in defective:
            image[10:40, 80:110] = 255
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def write_config(tmp_path: Path, model: Path, video: Path, broker_port: int, *, metrics_port: int = 0,
                 web_port: int = 0, protocol: str = "3.1.1", mode: str = "free-run", loop: bool = False, fps: float | None = None) -> Path:
    fps_line = f"fps = {fps}" if fps else ""
    text = f"""
[station]
id = "st1"
[model]
path = "{model}"
threshold = {THRESHOLD}
score = "m"
device = "cpu"
[source]
kind = "file"
uri = "{video}"
loop = {str(loop).lower()}
{fps_line}
[inspection]
mode = "{mode}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
protocol = "{protocol}"
[outbox]
dir = "{tmp_path / 'outbox'}"
[metrics]
port = {metrics_port}
[web]
port = {web_port}
[retention]
enabled = true
dir = "{tmp_path / 'retention'}"
"""
    path = tmp_path / "station.toml"
    path.write_text(text)
    return path


def agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent.cli", *args]


def env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: a daemon that hangs is sent SIGABRT by the tests and prints every thread's stack.
    return dict(os.environ, PYTHONPATH=str(ROOT), EDGE_AGENT_LOG_LEVEL="INFO", PYTHONFAULTHANDLER="1")


class Subscriber:
    """Collects every message under edge-agent/st1/# in arrival order."""

    def __init__(self, port: int, protocol: str = "3.1.1") -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        v5 = protocol == "5"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge-agent/st1/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def on(self, suffix: str) -> list[paho.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic == f"edge-agent/st1/{suffix}"]

    def verdicts(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.on("verdict")]

    def wait_for(self, suffix: str, n: int, timeout_s: float = TIMEOUT_S) -> list[paho.MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.on(suffix)) < n:
                if not self._cond.wait(deadline - time.monotonic()) and time.monotonic() > deadline:
                    raise AssertionError(f"{len(self.on(suffix))} of {n} messages on {suffix} within {timeout_s} s")
            return self.on(suffix)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber(mosquitto, request):
    sub = Subscriber(mosquitto.port, getattr(request, "param", "3.1.1"))
    yield sub
    sub.close()


def validate(verdict: dict) -> None:
    jsonschema.validate(verdict, SCHEMA, cls=jsonschema.Draft202012Validator)


def stop_daemon(proc: subprocess.Popen) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


@pytest.mark.integration
@pytest.mark.parametrize("subscriber", ["5"], indirect=True)
def test_one_verdict_per_frame_and_the_defect_is_ng_with_its_heatmap(tmp_path, vae_model, mosquitto, subscriber):
    video = station_video(tmp_path / "parts.avi", 6, defective={3})
    config = write_config(tmp_path, vae_model, video, mosquitto.port)
    # --set as anyone would type it: 5, not "5" (a value valid for its field as a string is accepted).
    done = subprocess.run(agent("run", str(config), "--print-verdicts", "--set", "mqtt.protocol=5"), env=env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 6)]
    assert len(done.stdout.splitlines()) == 6
    assert sorted(v["seq"] for v in verdicts) == [1, 2, 3, 4, 5, 6]
    for v in verdicts:
        validate(v)
    by_seq = {v["seq"]: v for v in verdicts}
    ng = by_seq[4]
    assert ng["result"] == "NG" and ng["heatmap"] is True and ng["score"] > THRESHOLD
    assert {r for s, r in ((s, v["result"]) for s, v in by_seq.items()) if s != 4} == {"OK"}
    heatmaps = subscriber.wait_for("heatmap", 1)
    assert len(heatmaps) == 1, "heatmap = ng: only the NG frame has one"
    props = dict(heatmaps[0].properties.UserProperty)
    assert props["message_id"] == ng["message_id"]
    image = cv2.imdecode(np.frombuffer(heatmaps[0].payload, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (128, 128, 3)
    retained = sorted(p.name for p in (tmp_path / "retention").iterdir())
    assert len(retained) == 2 and retained[0].endswith("00000004_NG.json")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in the scrape"
    return float(m.group(1))


@pytest.mark.integration
def test_sigterm_delivers_every_verdict_and_metrics_pass_promtool(tmp_path, vae_model, mosquitto, subscriber):
    video = station_video(tmp_path / "parts.avi", 5, defective={2})
    metrics_port = free_port()
    config = write_config(tmp_path, vae_model, video, mosquitto.port, metrics_port=metrics_port, loop=True, fps=20)
    proc = subprocess.Popen(agent("run", str(config), "--print-verdicts"), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        subscriber.wait_for("verdict", 4)
        text = scrape(metrics_port)
    finally:
        rc, out, err = stop_daemon(proc)
    assert rc == 0, err
    assert "SIGTERM received" in err and "Traceback" not in err
    printed = [int(m) for m in re.findall(r"^seq=(\d+) ", out, re.M)]
    assert printed == sorted(printed) and len(printed) >= 4
    delivered = subscriber.wait_for("verdict", len(printed), timeout_s=5)
    assert sorted(json.loads(m.payload)["seq"] for m in delivered) == printed, "every verdict delivered, once"
    assert subscriber.on("status")[-1].payload == b"offline"

    assert metric(text, "edge_agent_broker_connected") == 1
    assert metric(text, "edge_agent_camera_up") == 1
    assert metric(text, 'edge_agent_frames_total{result="OK"}') >= 1
    assert metric(text, "edge_agent_latency_seconds_count") >= 1, "end-to-end latency from broker acks"
    assert metric(text, 'edge_agent_stage_seconds_count{stage="inference"}') >= 1
    assert 'edge_agent_model_info{' in text
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed; the scrape was checked without it")
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.integration
def test_triggered_mode_echoes_part_ids_and_answers_a_malformed_trigger(tmp_path, vae_model, mosquitto, subscriber):
    video = station_video(tmp_path / "parts.avi", 3)
    config = write_config(tmp_path, vae_model, video, mosquitto.port, mode="triggered", loop=True, fps=20)
    proc = subprocess.Popen(agent("run", str(config)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert subscriber.wait_for("status", 1)[-1].payload == b"online"
        plc = subscriber.client
        plc.publish("edge-agent/st1/trigger", json.dumps({"part_id": "A1", "recipe": "r7"}), qos=1)
        subscriber.wait_for("verdict", 1)
        plc.publish("edge-agent/st1/trigger", b"{not json", qos=1)
        plc.publish("edge-agent/st1/trigger", json.dumps({"part_id": "A2", "trigger_id": "T2", "job_id": "J9"}),
                    qos=1)
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 2)]
        responses = [json.loads(m.payload) for m in subscriber.wait_for("trigger/response", 3)]
    finally:
        rc, _out, err = stop_daemon(proc)
    assert rc == 0, err
    assert [(v["part_id"], v["recipe"], v["job_id"]) for v in verdicts] == [("A1", "r7", None), ("A2", None, "J9")]
    assert verdicts[1]["trigger_id"] == "T2" and verdicts[0]["trigger_id"]
    for v in verdicts:
        validate(v)
    assert [r["ok"] for r in responses] == [True, False, True]
    assert responses[1]["reason"] == "json"
    assert len(subscriber.on("verdict")) == 2, "no verdicts without a trigger"


@pytest.mark.integration
def test_check_config_names_the_bad_key_and_exits_2(tmp_path, vae_model):
    good = write_config(tmp_path, vae_model, tmp_path / "parts.avi", 1883)
    ok = subprocess.run(agent("check-config", str(good)), env=env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('mode = "free-run"', 'mod = "free-run"\nmax_fps = -1'))
    done = subprocess.run(agent("check-config", str(bad)), env=env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert "inspection.mod" in done.stderr and "inspection.max_fps" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 2 and "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_tampered_model_exits_2_with_one_line(tmp_path, vae_model):
    tampered = tmp_path / "tampered.pt"
    with zipfile.ZipFile(vae_model) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/data/" in item.filename and data:
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.writestr(item, data)
    config = write_config(tmp_path, tampered, station_video(tmp_path / "parts.avi", 1), free_port())
    done = subprocess.run(agent("run", str(config)), env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "checksum" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        elif typing.get_origin(ann) is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            yield from _fields(args[1], f"{prefix}{name}.<name>.")  # a table per entry, e.g. [recipes.<name>]
        elif typing.get_origin(ann) is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            yield from _fields(args[0], f"{prefix}{name}.")  # an array of tables, e.g. [[cameras]]
        else:
            yield f"{prefix}{name}", field


def test_config_example_documents_every_key_and_loads():
    path = ROOT / "deploy" / "config.example.toml"
    text = path.read_text()
    section = None
    keys = set()
    for line in text.splitlines():
        if m := re.match(r"^#? ?\[\[?([^\[\]]+)\]\]?$", line):  # a commented table shows the shape of one entry
            section = m.group(1)
        elif m := re.match(r"^#? ?([a-z_]+) = ", line):
            keys.add(f"{section}.{m.group(1)}")
    for key, field in _fields(Config):
        assert key in keys, f"{key} missing from deploy/config.example.toml"
        assert field.description and field.description.split(";")[0] in text, f"{key}: description missing"
    config = load_config(path)
    assert config.inspection.mode == "free-run"
    assert config.mqtt.host and not config.mqtt.embedded, "a station names its broker; the embedded one is a choice"


def test_demo_config_loads():
    config = load_config(ROOT / "deploy" / "demo.toml")
    assert config.station.id == "demo" and config.mqtt.host == "" and config.mqtt.embedded and config.source.loop
    assert config.model.path.resolve() == (ROOT / "models" / "demo-vae.pt").resolve()
    assert config.metrics.port == 9108 and config.metrics.bind == "127.0.0.1"


def test_sighup_reload_swaps_model_and_threshold_and_keeps_the_old_on_a_bad_file(tmp_path, vae_model, caplog):
    import threading as th

    from edge_agent.capture import make_source
    from edge_agent.daemon import load_model
    from edge_agent.reload import Reloader as _Reloader
    from edge_agent.metrics import Metrics
    from edge_agent.pipeline import Pipeline

    path = write_config(tmp_path, vae_model, tmp_path / "parts.avi", 1883)
    config = load_config(path)
    metrics = Metrics()
    pipeline = Pipeline(config, load_model(config.model, warmup=False), make_source(config.source), None, metrics,
                         th.Event())
    reloader = _Reloader(path, [], config, pipeline, metrics)
    before = pipeline.model

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    path.write_text(path.read_text().replace(str(vae_model), str(bad)))
    assert not reloader.reload()
    assert pipeline.model is before
    assert any(r.levelname == "ERROR" and "keeping model" in r.getMessage() for r in caplog.records)

    path.write_text(path.read_text().replace(str(bad), str(vae_model)).replace(f"threshold = {THRESHOLD}",
                                                                               "threshold = 50.0"))
    assert reloader.reload()
    assert pipeline.model is not before and pipeline.model.scorer.threshold == 50.0
    assert metrics.registry.get_sample_value("edge_agent_model_info", {
        "model_id": "vae", "checksum": before.scorer.checksum, "score_name": before.scorer.score_name,
        "threshold": "50.0", "device": "cpu", "precision": "float32"}) == 1


def test_set_takes_a_value_valid_for_its_field_as_a_string(tmp_path, vae_model):
    config = write_config(tmp_path, vae_model, tmp_path / "parts.avi", 1883)
    loaded = load_config(config, ["mqtt.protocol=5", "station.id=42", "mqtt.port=1884", "model.threshold=0.5"])
    assert (loaded.mqtt.protocol, loaded.station.id, loaded.mqtt.port, loaded.model.threshold) == ("5", "42", 1884, 0.5)
    with pytest.raises(ConfigError, match="mqtt.protocol = '4'"):
        load_config(config, ["mqtt.protocol=4"])


@pytest.mark.parametrize("mqtt, needle", [("", "mqtt.host is empty"), ('host = ""', "mqtt.host is empty"),
                                          ('host = "b"\nembedded = true', "contradict")])
def test_a_station_config_without_a_broker_is_a_config_error(tmp_path, mqtt, needle):
    path = tmp_path / "station.toml"
    path.write_text(f'[source]\nuri = "x.avi"\n' + (f"[mqtt]\n{mqtt}\n" if mqtt else ""))
    done = subprocess.run(agent("check-config", str(path)), env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and needle in done.stderr and "embedded" in done.stderr


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_the_readmes_check_config_of_the_example_exits_0_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=120)
    readme = (clone / "README.md").read_text()
    assert "edge-agent check-config deploy/config.example.toml" in readme
    done = subprocess.run(agent("check-config", "deploy/config.example.toml"), cwd=clone, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

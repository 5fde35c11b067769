import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.config import MqttConfig
from edge_agent.mqtt import MqttPublisher, Topics
from edge_agent.outbox import Outbox

SCHEMA = json.loads((Path(__file__).parent.parent / "deploy" / "verdict.schema.json").read_text())
TIMEOUT_S = 5.0


def validate_verdict(d: dict) -> None:
    jsonschema.validate(d, SCHEMA, cls=jsonschema.Draft202012Validator)


def sample_verdict(seq: int = 1, **changes) -> dict:
    v = {
        "version": 1,
        "station": "st1",
        "seq": seq,
        "message_id": f"st1:b00t:{seq}",
        "captured_at": 1_700_000_000.25,
        "part_id": "A123",
        "trigger_id": "t1",
        "recipe": None,
        "job_id": None,
        "result": "NG",
        "anomalous": True,
        "score": 12.5,
        "threshold": 10.0,
        "score_name": "vae_m",
        "worst_patch": {"x": 16, "y": 32, "w": 96, "h": 96},
        "patches_over_threshold": 3,
        "patches_total": 120,
        "error": None,
        "error_reason": None,
        "model": {"id": "demo-vae", "checksum": "sha256:abc"},
        "latency_s": {"capture": 0.001, "inference": 0.02},
        "heatmap": False,
    }
    v.update(changes)
    return v


# the verdict schema


def test_schema_accepts_sample_verdicts():
    validate_verdict(sample_verdict())
    validate_verdict(sample_verdict(result="OK", anomalous=False, part_id=None, trigger_id=None, published_at=1.5))
    validate_verdict(sample_verdict(result="ERROR", error="camera frame is empty", error_reason="unreadable", score=None,
                                    worst_patch=None))


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 0},
        {"result": "MAYBE"},
        {"extra": 1},
        {"result": "OK"},  # OK but anomalous
        {"result": "ERROR"},  # ERROR without an error message
        {"error": "x"},  # an error on an NG verdict
        {"error_reason": "uniform"},  # a reason on an NG verdict
        {"result": "ERROR", "error": "x", "error_reason": "bored"},  # not a documented reason
        {"worst_patch": {"x": 1, "y": 2}},
        {"latency_s": {"inference": "fast"}},
    ],
)
def test_schema_rejects_bad_verdicts(change):
    with pytest.raises(jsonschema.ValidationError):
        validate_verdict(sample_verdict(**change))


def test_schema_rejects_a_missing_field():
    v = sample_verdict()
    del v["message_id"]
    with pytest.raises(jsonschema.ValidationError, match="message_id"):
        validate_verdict(v)


# integration with a real mosquitto


class Subscriber:
    """A plain paho client as an integrator would write it; records (topic, payload, properties, retain)."""

    def __init__(self, port: int, topic: str, protocol: str = "3.1.1") -> None:
        v5 = protocol == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.messages: list[paho.MQTTMessage] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(TIMEOUT_S), "subscriber did not get SUBACK"

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait_for(self, n: int, topic_suffix: str = "") -> list[paho.MQTTMessage]:
        def matching():
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

        with self.cond:
            assert self.cond.wait_for(lambda: len(matching()) >= n, TIMEOUT_S), (
                f"got {len(matching())} of {n} messages on *{topic_suffix}: {[m.topic for m in self.messages]}"
            )
            return matching()

    def wait_until_seq(self, seq: int) -> list[paho.MQTTMessage]:
        """Verdicts received until one with this seq (QoS 1 may repeat earlier ones)."""

        def seen():
            return any(m.topic.endswith("/verdict") and json.loads(m.payload)["seq"] == seq for m in self.messages)

        with self.cond:
            assert self.cond.wait_for(seen, TIMEOUT_S), f"no verdict seq={seq}"
            return [m for m in self.messages if m.topic.endswith("/verdict")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_publisher(tmp_path):
    made = []

    def make(port: int, protocol: str = "3.1.1", outbox_dir: Path | None = None, **kwargs):
        config = MqttConfig(host="127.0.0.1", port=port, prefix="test", protocol=protocol,
                            **kwargs.pop("config", {}))
        pub = MqttPublisher(config, "st1", Outbox(outbox_dir or tmp_path / "outbox", 10_000_000), **kwargs)
        pub.start()
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.stop(timeout_s=0.5)
        pub.outbox.close()


TOPICS = Topics.for_station("test", "st1")


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_verdicts_and_heatmaps_arrive_in_order(mosquitto, make_publisher, protocol):
    sub = Subscriber(mosquitto.port, "test/st1/#", protocol)
    delivered = []
    pub = make_publisher(mosquitto.port, protocol, on_delivered=lambda m, lat: delivered.append((m.kind, lat)))
    assert pub.wait_connected(TIMEOUT_S)
    for seq in range(1, 21):
        pub.publish_verdict(sample_verdict(seq), heatmap_jpeg=b"\xff\xd8jpeg%d" % seq if seq % 4 == 0 else None)
    verdicts = sub.wait_for(20, "/verdict")
    heatmaps = sub.wait_for(5, "/heatmap")
    assert [json.loads(m.payload)["seq"] for m in verdicts] == list(range(1, 21))
    assert all(m.qos == 1 and not m.retain for m in verdicts + heatmaps)
    for m in verdicts:
        validate_verdict(json.loads(m.payload))
        if protocol == "5":
            assert m.properties.ContentType == "application/json"
    # 3.1.1 pairing rule: a heatmap belongs to the last verdict with "heatmap": true before it.
    last_with_heatmap = None
    for m in sub.messages:
        if m.topic == TOPICS.verdict and json.loads(m.payload)["heatmap"]:
            last_with_heatmap = json.loads(m.payload)
        elif m.topic == TOPICS.heatmap:
            assert m.payload == b"\xff\xd8jpeg%d" % last_with_heatmap["seq"]
            if protocol == "5":
                props = dict(m.properties.UserProperty)
                assert props == {"message_id": last_with_heatmap["message_id"], "seq": str(last_with_heatmap["seq"])}
                assert m.properties.ContentType == "image/jpeg"
    assert pub.flush(TIMEOUT_S)
    assert len(delivered) == 25 and all(lat >= 0 for _, lat in delivered)
    sub.close()


@pytest.mark.integration
def test_status_online_retained_then_offline_on_clean_stop(mosquitto, make_publisher):
    pub = make_publisher(mosquitto.port)
    assert pub.wait_connected(TIMEOUT_S)
    sub = Subscriber(mosquitto.port, TOPICS.status)
    assert sub.wait_for(1)[0].payload == b"online"
    retained = Subscriber(mosquitto.port, TOPICS.status)  # subscribes after `online` reached the broker
    (online,) = retained.wait_for(1)
    assert (online.payload, online.retain) == (b"online", True)
    retained.close()
    pub.stop(timeout_s=TIMEOUT_S)
    assert sub.wait_for(2)[1].payload == b"offline"
    late = Subscriber(mosquitto.port, TOPICS.status)
    assert late.wait_for(1)[0].payload == b"offline"
    sub.close()
    late.close()


PUBLISHER_SCRIPT = """
import sys, time
from pathlib import Path
from edge_agent.config import MqttConfig
from edge_agent.mqtt import MqttPublisher
from edge_agent.outbox import Outbox
pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), prefix="test"), "st1",
                    Outbox(Path(sys.argv[2]), 1_000_000))
pub.start()
assert pub.wait_connected(5)
print("connected", flush=True)
time.sleep(60)
"""


@pytest.mark.integration
def test_last_will_offline_when_publisher_is_killed(mosquitto, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER_SCRIPT, str(mosquitto.port), str(tmp_path)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"connected"
        sub = Subscriber(mosquitto.port, TOPICS.status)
        assert sub.wait_for(1)[0].payload == b"online"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    offline = sub.wait_for(2)[1]
    assert offline.payload == b"offline"
    late = Subscriber(mosquitto.port, TOPICS.status)
    assert late.wait_for(1)[0].payload == b"offline"  # the will is retained too
    sub.close()
    late.close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_verdicts_published_during_an_outage_arrive_in_order(mosquitto, make_publisher, protocol):
    pub = make_publisher(mosquitto.port, protocol)
    assert pub.wait_connected(TIMEOUT_S)
    pub.publish_verdict(sample_verdict(1))
    mosquitto.stop()
    for seq in range(2, 12):
        pub.publish_verdict(sample_verdict(seq), heatmap_jpeg=b"h%d" % seq)
    assert pub.outbox_depth >= 20  # nothing lost, nothing acked while the broker is gone
    mosquitto.start()
    # paho waits reconnect_delay (1 s) before retrying, so this subscriber is in place first.
    sub = Subscriber(mosquitto.port, "test/st1/#", protocol)
    seqs = [json.loads(m.payload)["seq"] for m in sub.wait_until_seq(11)]
    # Verdict 1 may be delivered again (QoS 1); consumers de-duplicate on message_id.
    assert [s for s in seqs if s != 1] == list(range(2, 12))
    assert [m.payload for m in sub.wait_for(10, "/heatmap")] == [b"h%d" % s for s in range(2, 12)]
    assert pub.connected
    sub.close()


@pytest.mark.integration
def test_outbox_survives_a_new_publisher(mosquitto, make_publisher, tmp_path):
    mosquitto.stop()
    first = make_publisher(mosquitto.port, outbox_dir=tmp_path / "box")
    for seq in range(1, 6):
        first.publish_verdict(sample_verdict(seq))
    first.stop(timeout_s=0.1)
    first.outbox.close()
    mosquitto.start()
    sub = Subscriber(mosquitto.port, TOPICS.verdict)
    second = make_publisher(mosquitto.port, outbox_dir=tmp_path / "box")
    assert [json.loads(m.payload)["seq"] for m in sub.wait_for(5)] == [1, 2, 3, 4, 5]
    assert second.flush(TIMEOUT_S)
    sub.close()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_triggers_accepted_and_rejected(mosquitto, make_publisher, protocol):
    got = []
    pub = make_publisher(mosquitto.port, protocol, on_trigger=got.append, config={"trigger_rate_per_s": 2.0})
    # `online` follows the SUBACK of the trigger subscription, as a PLC waits for it; CONNACK alone raced it
    # (a CI run lost all three triggers to the broker: nobody was subscribed yet).
    assert pub.online.wait(TIMEOUT_S)
    sub = Subscriber(mosquitto.port, TOPICS.trigger_response, protocol)
    plc = sub.client
    plc.publish(TOPICS.trigger, b'{"part_id": "A1", "recipe": "r7"}', qos=1)
    plc.publish(TOPICS.trigger, b'{"part": "A1"', qos=1)
    plc.publish(TOPICS.trigger, b'{"part_id": "A2"}', qos=1)  # third within a second: over the rate of 2/s
    ok, bad, limited = [json.loads(m.payload) for m in sub.wait_for(3)]
    assert ok["ok"] and ok["part_id"] == "A1" and ok["trigger_id"] == got[0].trigger_id
    assert (got[0].part_id, got[0].recipe) == ("A1", "r7") and len(got) == 1
    assert (bad["ok"], bad["reason"], bad["input"]) == (False, "json", '{"part": "A1"')
    assert "not UTF-8 JSON" in bad["error"]
    assert (limited["ok"], limited["reason"]) == (False, "rate")
    sub.close()


@pytest.mark.integration
def test_a_trigger_the_pipeline_refuses_is_a_counted_rejection_without_traceback(mosquitto, make_publisher,
                                                                                  caplog):
    def refuse(trigger):
        raise ValueError('inspection.mode is "free-run"; set inspection.mode = "triggered" to use triggers')

    metrics = RecordingMetrics()
    pub = make_publisher(mosquitto.port, on_trigger=refuse, metrics=metrics)
    assert pub.online.wait(TIMEOUT_S)  # the trigger subscription is active (see test_triggers_accepted_and_rejected)
    sub = Subscriber(mosquitto.port, TOPICS.trigger_response)
    sub.client.publish(TOPICS.trigger, b'{"part_id": "A1"}', qos=1)
    (reply,) = [json.loads(m.payload) for m in sub.wait_for(1)]
    assert (reply["ok"], reply["reason"]) == (False, "refused") and "free-run" in reply["error"]
    assert ("trigger_rejected", "refused") in metrics.calls
    assert not [r for r in caplog.records if r.exc_info], "a refusal is not a bug: no traceback"
    sub.close()


class RecordingMetrics:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.mark.integration
def test_metrics_hooks_called(mosquitto, make_publisher):
    metrics = RecordingMetrics()
    pub = make_publisher(mosquitto.port, metrics=metrics)
    assert pub.wait_connected(TIMEOUT_S)
    sub = Subscriber(mosquitto.port, TOPICS.verdict)
    pub.publish_verdict(sample_verdict(1))
    sub.wait_for(1)
    assert pub.flush(TIMEOUT_S)
    assert ("published", "verdict") in metrics.calls
    assert ("broker_connected", True) in metrics.calls
    assert ("outbox_depth", 1) in metrics.calls
    sub.close()


def test_publish_verdict_does_not_wait_for_a_missing_broker(make_publisher, tmp_path):
    from edge_agent.broker import free_port

    pub = make_publisher(free_port())  # nothing listens there
    pub.publish_verdict(sample_verdict(1), heatmap_jpeg=b"h")
    assert pub.outbox_depth == 2 and not pub.connected


def test_tls_with_a_missing_ca_file_is_a_config_error(tmp_path):
    from edge_agent.errors import ConfigError

    config = MqttConfig(host="broker", tls={"enabled": True, "ca_file": tmp_path / "missing-ca.pem"})
    with pytest.raises(ConfigError, match="mqtt.tls"):
        MqttPublisher(config, "st1", Outbox(tmp_path / "box", 1_000_000))


@pytest.mark.integration
def test_password_never_logged(mosquitto, make_publisher, monkeypatch, caplog):
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", "s3cret-Pa55")
    caplog.set_level("DEBUG")
    pub = make_publisher(mosquitto.port, config={"username": "agent", "password_env": "EDGE_TEST_MQTT_PASSWORD"})
    assert pub.wait_connected(TIMEOUT_S)
    pub.stop(timeout_s=1.0)
    assert "Sending CONNECT" in caplog.text  # paho's own debug lines were captured too
    assert "s3cret-Pa55" not in caplog.text


def test_outbox_drops_are_counted_in_metrics(tmp_path):
    metrics = RecordingMetrics()
    outbox = Outbox(tmp_path / "box", 4000)  # room for 3 verdicts and one 1.5 kB heatmap
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=1), "st1", outbox, metrics=metrics)
    for seq in range(1, 4):  # not started: everything stays in the outbox
        pub.publish_verdict(sample_verdict(seq), heatmap_jpeg=b"h" * 1500)
    assert metrics.calls.count(("dropped", "heatmap_outbox_full")) == 2
    kept = [(m.kind, json.loads(m.properties["seq"])) for m in outbox.peek(10)]
    assert kept == [("verdict", 1), ("verdict", 2), ("verdict", 3), ("heatmap", 3)]


def _make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, strict enough for Python's X509 checks."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    for args in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=edge-test-ca",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "1", "-extfile", "server.ext"],
        ["req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.pem", "-days", "1", "-subj", "/CN=other"],
    ):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path):
    import getpass
    import shutil

    from edge_agent.broker import find_mosquitto, free_port

    if find_mosquitto() is None or shutil.which("openssl") is None:
        pytest.skip("needs mosquitto and openssl")
    d = tmp_path / "tls"
    d.mkdir()
    _make_certs(d)
    port = free_port()
    (d / "mosquitto.conf").write_text(
        # `user`: started as root, mosquitto would switch to user mosquitto, who cannot read tmp_path.
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {getpass.getuser()}\n"
        f"cafile {d / 'ca.pem'}\ncertfile {d / 'server.pem'}\nkeyfile {d / 'server.key'}\n"
    )
    proc = subprocess.Popen([find_mosquitto(), "-c", str(d / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "TLS mosquitto did not start"
            time.sleep(0.02)
    yield port, d
    proc.terminate()
    proc.wait()


@pytest.mark.integration
def test_tls_verifies_the_broker_certificate(tls_broker, make_publisher, tmp_path):
    port, d = tls_broker
    good = make_publisher(port, outbox_dir=tmp_path / "a", config={"tls": {"enabled": True, "ca_file": d / "ca.pem"}})
    assert good.wait_connected(TIMEOUT_S)
    wrong = make_publisher(port, outbox_dir=tmp_path / "b",
                           config={"client_id": "wrong-ca", "tls": {"enabled": True, "ca_file": d / "other-ca.pem"}})
    assert not wrong.wait_connected(1.0)


@pytest.mark.integration
def test_online_comes_after_the_trigger_subscription_so_a_trigger_sent_on_online_is_answered(mosquitto,
                                                                                            make_publisher):
    got = []
    sub = Subscriber(mosquitto.port, TOPICS.status)
    answers = Subscriber(mosquitto.port, TOPICS.trigger_response)

    def trigger_on_online(client, userdata, msg):  # a PLC that triggers the moment it sees `online`
        if msg.payload == b"online":
            client.publish(TOPICS.trigger, b'{"part_id": "A1", "trigger_id": "first"}', qos=1)

    sub.client.on_message = trigger_on_online
    info = {"boot_id": "b00t", "mode": "triggered"}
    pub = make_publisher(mosquitto.port, on_trigger=got.append, info=lambda: info)
    (answer,) = [json.loads(m.payload) for m in answers.wait_for(1)]
    assert (answer["ok"], answer["trigger_id"]) == (True, "first") and got[0].trigger_id == "first"
    assert pub.online.is_set()
    late = Subscriber(mosquitto.port, TOPICS.status_info)  # retained: a late reader sees it
    assert json.loads(late.wait_for(1)[0].payload) == info
    for s in (sub, answers, late):
        s.close()

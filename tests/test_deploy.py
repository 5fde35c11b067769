"""The station deployment: deploy/install.sh into a staging root, the systemd unit as installed,
the plant broker's ACL on a real mosquitto, Prometheus rules under promtool, and the installed
daemon against a real broker."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.broker import free_port
from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
PREFIX = "/opt/edge-agent"
BASE_VENV = Path(sys.prefix)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed; this deployment check needs it")
    return path


def install(destdir: Path, *args: str) -> subprocess.CompletedProcess:
    """deploy/install.sh into a staging root, reusing this venv's torch (seconds, not a download)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", str(DEPLOY / "install.sh"), "--destdir", str(destdir), "--prefix", PREFIX,
                           "--venv-from", str(BASE_VENV), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    result = install(root)
    assert result.returncode == 0, result.stderr
    return root


# ---- mqtt.password_file and systemd credentials


def test_password_file_expands_the_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = MqttConfig(host="broker", username="st1", password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")
    assert cfg.password() == "s3cret"


def test_password_file_with_an_unset_variable_names_the_fix(monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = MqttConfig(host="broker", username="st1", password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")
    with pytest.raises(ConfigError, match="LoadCredential"):
        cfg.password()


# ---- install.sh


def test_install_stages_config_state_venv_and_unit(staged):
    assert (staged / "etc/edge-agent/station.toml").read_text() == (DEPLOY / "config.example.toml").read_text()
    assert (staged / "etc/edge-agent/models").is_dir()
    assert (staged / "etc/edge-agent/mqtt-password").stat().st_mode & 0o077 == 0
    for sub in ("outbox", "retention"):
        assert (staged / "var/lib/edge-agent" / sub).is_dir()
    unit = (staged / "etc/systemd/system/edge-agent.service").read_text()
    assert f"ExecStart={PREFIX}/venv/bin/edge-agent run /etc/edge-agent/station.toml" in unit
    # The installed entry point runs the package copied into the venv, not this checkout.
    out = subprocess.run([str(staged / "opt/edge-agent/venv/bin/python"), "-c",
                          "import edge_agent; print(edge_agent.__file__)"],
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=staged, check=True)
    assert out.stdout.startswith(str(staged / "opt/edge-agent/venv/"))


def test_install_again_keeps_the_config_and_prefix_rewrites_the_unit(tmp_path):
    first = install(tmp_path, "--no-venv")
    assert first.returncode == 0, first.stderr
    config = tmp_path / "etc/edge-agent/station.toml"
    config.write_text("# edited by the station engineer\n")
    again = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--destdir", str(tmp_path), "--prefix",
                            "/srv/inspect", "--no-venv"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "kept the existing" in again.stdout and "systemctl enable --now edge-agent" in again.stdout
    assert config.read_text() == "# edited by the station engineer\n"
    unit = (tmp_path / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/srv/inspect/venv/bin/edge-agent run" in unit and "/opt/edge-agent" not in unit


def test_uninstall_keeps_config_and_state_unless_purged(tmp_path):
    assert install(tmp_path, "--no-venv").returncode == 0
    removed = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--destdir", str(tmp_path), "--uninstall"],
                             capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert not (tmp_path / "etc/systemd/system/edge-agent.service").exists()
    assert not (tmp_path / "opt/edge-agent").exists()
    assert (tmp_path / "etc/edge-agent/station.toml").exists() and (tmp_path / "var/lib/edge-agent/outbox").is_dir()
    subprocess.run(["bash", str(DEPLOY / "install.sh"), "--destdir", str(tmp_path), "--uninstall", "--purge"],
                   capture_output=True, check=True, timeout=60)
    assert not (tmp_path / "etc/edge-agent").exists() and not (tmp_path / "var/lib/edge-agent").exists()


# ---- the systemd unit


def os_base(root: Path) -> None:
    """What a station's OS brings and a staging root lacks: the systemd targets and /bin/kill."""
    if (root / "usr/lib/systemd/system").exists():
        return
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr/bin/kill")
    for link in ("bin", "lib"):
        if not (root / link).exists():
            (root / link).symlink_to(f"usr/{link}")


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("systemd-analyze"), *args], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_passes_on_the_installed_unit(staged):
    os_base(staged)
    unit = staged / "etc/systemd/system/edge-agent.service"
    result = analyze("verify", f"--root={staged}", str(unit))
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt directives are only warnings to verify; they must not be there either.
    assert result.stderr == "", result.stderr


def test_systemd_analyze_verify_catches_a_missing_entry_point(staged):
    os_base(staged)
    unit = staged / "etc/systemd/system/edge-agent-broken.service"
    unit.write_text((staged / "etc/systemd/system/edge-agent.service").read_text()
                    .replace(f"{PREFIX}/venv/bin/edge-agent", f"{PREFIX}/venv/bin/no-such-agent"))
    result = analyze("verify", f"--root={staged}", str(unit))
    unit.unlink()
    assert result.returncode != 0 and "no-such-agent" in result.stderr


def test_unit_keeps_camera_gpu_and_network_and_scores_low_exposure(staged):
    unit = (staged / "etc/systemd/system/edge-agent.service").read_text()
    assert "\nPrivateDevices=" not in unit and "\nMemoryDenyWriteExecute=" not in unit
    for needed in ("DeviceAllow=char-video4linux rw", "DeviceAllow=char-drm rw", "SupplementaryGroups=video render",
                   "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "RestartPreventExitStatus=2", "Type=notify"):
        assert needed in unit
    result = analyze("security", "--offline=true", f"--root={staged}",
                     str(staged / "etc/systemd/system/edge-agent.service"))
    line = next(x for x in result.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    documented = (ROOT / "docs/OPERATIONS.md").read_text()
    assert score <= 2.0 and f"exposure level {score}" in documented, line


# ---- the plant broker: TLS, per-station passwords, the ACL


class Client:
    """A paho client over TLS that records what it receives."""

    def __init__(self, port: int, ca: Path, user: str | None, password: str | None = None) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{port}")
        self.client.tls_set(ca_certs=str(ca))
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        (self.refused if reason_code.is_failure else self.connected).set()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait_for(self, payload: bytes, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while payload not in [p for _, p in self.messages]:
            assert time.monotonic() < deadline, f"{payload!r} never arrived; got {self.messages}"
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def plant_broker(tmp_path):
    """deploy/mosquitto/edge-broker.conf and acl on a free port, with throwaway certs and passwords."""
    import getpass

    from tests.test_mqtt import _make_certs

    mosquitto, passwd = require("mosquitto"), require("mosquitto_passwd")
    require("openssl")
    _make_certs(tmp_path)
    for i, user in enumerate(("st1", "st2", "mes")):
        create = ["-c"] if i == 0 else []
        subprocess.run([passwd, *create, "-b", str(tmp_path / "passwd"), user, f"pw-{user}"], check=True)
    port = free_port()
    conf = (DEPLOY / "mosquitto/edge-broker.conf").read_text()
    for old, new in (("listener 8883", f"listener {port} 127.0.0.1"),
                     ("/etc/mosquitto/certs/plant-ca.pem", f"{tmp_path}/ca.pem"),
                     ("/etc/mosquitto/certs/broker.pem", f"{tmp_path}/server.pem"),
                     ("/etc/mosquitto/certs/broker.key", f"{tmp_path}/server.key"),
                     ("/etc/mosquitto/edge-passwd", f"{tmp_path}/passwd"), ("/var/lib/mosquitto/", f"{tmp_path}/"),
                     ("/etc/mosquitto/edge-acl", str(DEPLOY / "mosquitto/acl"))):
        assert old in conf, old
        conf = conf.replace(old, new)
    # Started as root, mosquitto would switch to user mosquitto, who cannot read tmp_path.
    (tmp_path / "broker.conf").write_text(conf + f"user {getpass.getuser()}\nlog_dest stderr\n")
    log = open(tmp_path / "broker.log", "wb")
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "broker.conf")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "broker.log").read_text()
            assert time.monotonic() < deadline, "plant broker did not start"
            time.sleep(0.05)
    yield port, tmp_path / "ca.pem"
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.mark.integration
def test_plant_broker_keeps_each_station_under_its_own_prefix(plant_broker):
    port, ca = plant_broker
    mes, st1, st2 = (Client(port, ca, user, f"pw-{user}") for user in ("mes", "st1", "st2"))
    anonymous = Client(port, ca, None)
    try:
        for client in (mes, st1, st2):
            assert client.connected.wait(10)
        assert anonymous.refused.wait(10)
        mes.subscribe("edge-agent/#")
        st1.subscribe("edge-agent/st1/trigger")
        st2.subscribe("edge-agent/st1/trigger")
        # A station cannot forge another station's verdict; its own arrives (after the forgery, same connection).
        st1.publish("edge-agent/st2/verdict", b"forged")
        st1.publish("edge-agent/st1/verdict", b"real")
        mes.wait_for(b"real")
        assert b"forged" not in [p for _, p in mes.messages]
        # The MES triggers st1; st2 cannot read st1's triggers.
        mes.publish("edge-agent/st1/trigger", b'{"part_id": "P1"}')
        st1.wait_for(b'{"part_id": "P1"}')
        time.sleep(0.2)
        assert st2.messages == []
    finally:
        for client in (mes, st1, st2, anonymous):
            client.close()


# ---- Prometheus: the scrape config, the alert rules and their unit tests


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")])
def test_promtool_accepts_the_plant_prometheus_files(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_metric_names() -> set[str]:
    """Every metric and sample name the daemon exports (_bucket, _total...), the calibration gauges included."""
    from prometheus_client import generate_latest

    from edge_agent.metrics import Metrics

    metrics = Metrics()
    metrics.calibration(1.0, {"p99": 0.5})
    metrics.for_camera("top")  # a station with [[cameras]] exports the per-camera series too
    text = generate_latest(metrics.registry).decode()
    return set(re.findall(r"^(edge_agent_\w+)", text, re.M)) | set(re.findall(r"^# HELP (edge_agent_\w+)", text, re.M))


def test_every_alert_uses_real_metrics_is_tested_and_has_a_runbook_entry():
    exported = exported_metric_names()
    rules = (DEPLOY / "prometheus/alerts.yml").read_text()
    tests = (DEPLOY / "prometheus/alerts_test.yml").read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    runbook = (ROOT / "docs/OPERATIONS.md").read_text()
    for name in re.findall(r"edge_agent_\w+", rules):
        assert name in exported, f"alerts.yml uses {name}, which edge_agent.metrics does not export"
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert len(alerts) >= 8
    for alert in alerts:
        assert alert in firing, f"{alert} has no firing case in alerts_test.yml"
        assert f"### {alert}" in runbook, f"{alert} has no section in docs/OPERATIONS.md"


def test_grafana_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana/edge-agent.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = exported_metric_names()
    for name in re.findall(r"edge_agent_\w+", " ".join(exprs)):
        assert name in exported, f"the dashboard queries {name}, which edge_agent.metrics does not export"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("latency per stage", "throughput", "ng rate", "score distribution", "outbox", "camera", "broker"):
        assert needed in titles


# ---- end to end: the installed entry point with the installed config against a real broker


@pytest.mark.integration
def test_installed_daemon_runs_the_installed_config_against_a_real_broker(tmp_path, vae_model, mosquitto):
    from tests.test_daemon import THRESHOLD, Subscriber, station_video

    root = tmp_path / "root"
    result = install(root)
    assert result.returncode == 0, result.stderr
    etc = root / "etc/edge-agent"
    shutil.copy(vae_model, etc / "models/demo-vae.pt")  # the model the example config names
    station_video(etc / "parts.avi", 3, defective={1})  # the source the example config names
    (etc / "mqtt-password").write_text("pw-st1\n")
    # What a station engineer edits: who the station is and where the plant broker is.
    config = etc / "station.toml"
    text = config.read_text()
    for old, new in (('id = "station-1"', 'id = "st1"'), ('host = "127.0.0.1"', 'host = "127.0.0.1"'),
                     ("port = 1883", f"port = {mosquitto.port}"), ('username = ""', 'username = "st1"'),
                     ("# password_file = (unset by default)",
                      'password_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"'),
                     ('device = "auto"', 'device = "cpu"'), ("port = 9108", "port = 0"), ("port = 8108", "port = 0"),
                     ('dir = "/var/lib/edge-agent/outbox"', f'dir = "{root}/var/lib/edge-agent/outbox"'),
                     ('dir = "/var/lib/edge-agent/retention"', f'dir = "{root}/var/lib/edge-agent/retention"'),
                     ("# threshold = (unset by default)", f"threshold = {THRESHOLD}"),
                     ("# score = (unset by default)", 'score = "m"')):  # THRESHOLD is on m's scale
        assert old in text, f"{old!r} not in the installed config"
        text = text.replace(old, new, 1)
    config.write_text(text)

    # What systemd gives the service: the credential directory and a notify socket for READY=1.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    env = {"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(etc), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    subscriber = Subscriber(mosquitto.port)
    proc = None
    try:
        entry_point = root / "opt/edge-agent/venv/bin/edge-agent"
        proc = subprocess.Popen([str(entry_point), "run", str(config)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        notices = []
        while not any(n.startswith("READY=1") for n in notices):
            notices.extend(notify.recv(4096).decode().splitlines())
        verdicts = [json.loads(m.payload) for m in subscriber.wait_for("verdict", 3, timeout_s=60)]
        _, err = proc.communicate(timeout=60)  # a non-looping file ends the run
        assert proc.returncode == 0, err
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        subscriber.close()
        notify.close()
    assert sorted(v["seq"] for v in verdicts) == [1, 2, 3]
    assert {v["seq"]: v["result"] for v in verdicts} == {1: "OK", 2: "NG", 3: "OK"}
    assert "Traceback" not in err

"""Embedded MQTT broker, an explicit choice (mqtt.embedded = true, as in the demo): the agent runs
mosquitto on 127.0.0.1 itself, for demos and a PLC on the same machine.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or in the usual sbin folders (not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _FALLBACK_PATHS if Path(p).is_file()), None)


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like mosquitto itself, so a port in TIME_WAIT after a restart counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = HOST) -> int:
    """A free port below the kernel's ephemeral range.

    A port from that range can be handed to a client's own outgoing socket: a client retrying a
    broker that is down on such a port can connect to itself (TCP self-connect) and hold the port
    the broker must come back on.
    """
    lo, _hi = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(lo, 10001))
        if port_is_free(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A mosquitto child process listening on 127.0.0.1:port only, anonymous, no persistence.

    start() returns once the port accepts connections; stop() then start() reuses the port.
    """

    def __init__(self, port: int, start_timeout_s: float = 5.0) -> None:
        self.host = HOST
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        binary = find_mosquitto()
        if binary is None:
            raise ConfigError(
                "mqtt.embedded = true, so the agent would start an embedded broker, but mosquitto is not installed;"
                " install it (apt install mosquitto) or set mqtt.host to your broker"
            )
        if not port_is_free(self.port):
            raise ConfigError(
                f"embedded broker: port {HOST}:{self.port} is already in use;"
                " set mqtt.host to the broker listening there or choose another mqtt.port"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="edge-agent-mosquitto-")
        workdir = Path(self._dir.name)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        log_path = workdir / "mosquitto.log"
        # The log goes to a file we opened, not a pipe: a pipe nobody reads would stall mosquitto.
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                out = log_path.read_text(errors="replace").strip().splitlines()
                self._cleanup()
                raise ConfigError(
                    f"embedded broker on {HOST}:{self.port} exited at start: {out[-1] if out else 'no message'}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.02)  # polling a child we cannot get an event from
        else:
            self.stop()
            raise ConfigError(f"embedded broker on {HOST}:{self.port} did not accept connections within "
                              f"{self.start_timeout_s:g} s")
        logger.info("embedded broker %s listening on %s:%d", binary, HOST, self.port)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logger.info("embedded broker on %s:%d stopped", HOST, self.port)
        self._cleanup()

    def _cleanup(self) -> None:
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded_if_needed(config: MqttConfig) -> EmbeddedBroker | None:
    """Start the embedded broker when mqtt.embedded is set; the caller stops it after the publisher."""
    if not config.embedded:
        return None
    return EmbeddedBroker(config.port).start()

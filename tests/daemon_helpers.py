"""Helpers for fault-injection tests against the real daemon process and a real mosquitto.

A broker that keeps sessions across restarts (so a test subscriber misses nothing the agent
delivers after an outage), a persistent-session subscriber, a running agent whose stdout and
stderr are read as they come, tiny TorchScript artifacts with planted behaviour.
"""

from __future__ import annotations

import ctypes
import getpass
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import torch
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import artifact
from edge_agent.broker import find_mosquitto
from tests.test_daemon import agent, env

TIMEOUT_S = 60.0


def wait_until(predicate, timeout_s: float = TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.05)  # polling other processes' output


class PersistentBroker:
    """mosquitto on a fixed loopback port with persistence: stop() (SIGTERM) then start() keeps sessions."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        # `user`: started as root, mosquitto would switch to user mosquitto, who cannot write here.
        (self.dir / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir}/\nautosave_interval 1\nuser {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> PersistentBroker:
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "mosquitto did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


class VerdictSubscriber:
    """A consumer with a persistent session (clean_session=False, QoS 1) on <prefix>/st1/<topics>."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("verdict",), client_id: str = "fault-consumer") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.topics = topics
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber did not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(f"edge-agent/st1/{t}", 1) for t in self.topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed.set()  # the broker has the subscription: nothing published from now on is missed

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == f"edge-agent/st1/{suffix}"]

    def verdicts(self) -> list[dict]:
        return [json.loads(p) for p in self.on("verdict")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def first_arrivals(verdicts: list[dict]) -> list[dict]:
    """Verdicts in arrival order without QoS 1 redeliveries (de-duplicated by message_id)."""
    seen: set[str] = set()
    out = []
    for v in verdicts:
        if v["message_id"] not in seen:
            seen.add(v["message_id"])
            out.append(v)
    return out


VERDICT_LINE = re.compile(r"^seq=(\d+) (OK|NG|ERROR) .*$", re.M)


class RunningAgent:
    """`edge-agent run CONFIG --print-verdicts` as a child process; stdout/stderr read on threads."""

    def __init__(self, config: Path, *args: str, environ: dict[str, str] | None = None) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(agent("run", str(config), "--print-verdicts", *args), env=environ or env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def printed(self) -> list[tuple[int, str, str]]:
        """(seq, result, whole line) of every verdict the agent produced so far."""
        return [(int(m.group(1)), m.group(2), m.group(0)) for m in VERDICT_LINE.finditer("".join(self.out))]

    def seqs(self) -> list[int]:
        return [s for s, _, _ in self.printed()]

    def boot_id(self) -> str:
        m = re.search(r"boot (\w+)", self.stderr)
        assert m, "no ready line with the boot id:\n" + self.stderr
        return m.group(1)

    def wait_printed(self, n: int, timeout_s: float = TIMEOUT_S) -> None:
        wait_until(lambda: len(self.printed()) >= n or self.proc.poll() is not None, timeout_s, f"{n} verdicts")
        assert len(self.printed()) >= n, f"agent exited with {self.proc.poll()}:\n{self.stderr}"

    def terminate(self, timeout_s: float = TIMEOUT_S) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds from the signal to the exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return self._exit_after(t0, timeout_s, "SIGTERM")

    def terminate_via_thread(self, timeout_s: float = TIMEOUT_S) -> tuple[int, float]:
        """SIGTERM to one of the agent's worker threads (tgkill), not to its main thread, as the kernel may do
        with kill(pid) when the main thread already has a signal pending; returns (exit code, seconds)."""
        libc = ctypes.CDLL(None, use_errno=True)
        workers = [int(t) for t in os.listdir(f"/proc/{self.proc.pid}/task") if int(t) != self.proc.pid]
        assert workers, "the agent has no worker threads"
        t0 = time.monotonic()
        if libc.tgkill(self.proc.pid, workers[-1], signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "tgkill")
        return self._exit_after(t0, timeout_s, "a SIGTERM taken by a worker thread")

    def _exit_after(self, t0: float, timeout_s: float, what: str) -> tuple[int, float]:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER) prints every thread's stack
            self.proc.wait(10)
            time.sleep(0.1)
            raise AssertionError(f"agent did not exit within {timeout_s} s of {what}; its stderr, "
                                 f"ending with every thread's stack:\n{self.stderr[-20000:]}") from None
        elapsed = time.monotonic() - t0
        time.sleep(0.1)  # let the reader threads take the last lines
        return rc, elapsed

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        time.sleep(0.1)

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        rc = self.proc.wait(timeout_s)
        time.sleep(0.1)
        return rc


def outbox_rows(outbox_dir: Path) -> list[tuple[str, dict]]:
    """(kind, properties) of every message in an outbox on disk, oldest first (the agent may be dead)."""
    db = sqlite3.connect(outbox_dir / "outbox.sqlite3")
    try:
        return [(k, json.loads(p)) for k, p in db.execute("SELECT kind, properties FROM messages ORDER BY id")]
    finally:
        db.close()


class PlantedScorer(torch.nn.Module):
    """A stand-in model: NaN scores (nan=True) or constant low scores after `spin` matrix products."""

    def __init__(self, nan: bool, spin: int) -> None:
        super().__init__()
        self.nan = nan
        self.spin = spin

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.eye(96) * 0.5
        for _ in range(self.spin):
            y = torch.tanh(y @ y + 0.1)
        base = x.flatten(1).mean(1) * 0.0 + 1.0 + y.mean() * 0.0
        return base * float("nan") if self.nan else base

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._score(x)

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"m": self._score(x)}

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """The score spread evenly over the patch's pixels, for cards whose default is the anomaly-map score."""
        n, _, h, w = x.shape
        return (self._score(x) / (h * w))[:, None, None].expand(n, h, w).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._score(x)


def planted_model(like: Path, out: Path, nan: bool = False, spin: int = 0) -> Path:
    """A valid, checksummed artifact with `like`'s card (patch size, frame size, scores) and planted scores."""
    card = artifact.verify(like)
    card["model_id"] = out.stem
    for entry in card["thresholds"].values():  # planted scores are not the trained model's: no low bound
        entry.pop("low", None)
    artifact.save(torch.jit.script(PlantedScorer(nan, spin)), card, out)
    return out

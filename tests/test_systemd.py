import os
import socket
import threading
import uuid

import pytest

from edge_agent import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A real unix datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.mark.parametrize(
    "send, expected",
    [
        (lambda: systemd.ready(), "READY=1"),
        (lambda: systemd.ready("inspecting cam1"), "READY=1\nSTATUS=inspecting cam1"),
        (lambda: systemd.stopping(), "STOPPING=1"),
        (lambda: systemd.status("camera down"), "STATUS=camera down"),
        (lambda: systemd.watchdog_ping(), "WATCHDOG=1"),
    ],
)
def test_messages_reach_socket(notify_socket, send, expected):
    assert send() is True
    assert received(notify_socket) == expected


def test_reloading_carries_monotonic_usec(notify_socket):
    assert systemd.reloading()
    first, second = received(notify_socket).split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_abstract_namespace(monkeypatch):
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert sock.recv(64) == b"READY=1"


def test_noop_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


def test_missing_socket_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.ready() is False


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert systemd.watchdog_interval_s(env) == expected


def test_watchdog_pings_only_on_progress():
    pings = []
    dog = systemd.Watchdog(interval_s=1.0, send=lambda: pings.append(1) or True)
    assert dog.beat() is False  # nothing done yet
    dog.progress()
    assert dog.beat() is True
    assert dog.beat() is False  # no progress since the last ping
    dog.progress()
    dog.progress()
    assert dog.beat() is True
    dog.idle_ok(True)
    assert dog.beat() is True and dog.beat() is True  # waiting for a trigger by design
    dog.idle_ok(False)
    assert dog.beat() is False
    assert len(pings) == 4


def test_watchdog_thread_sends_to_socket(notify_socket):
    dog = systemd.Watchdog(interval_s=0.02)
    dog.progress()
    dog.start()
    try:
        assert received(notify_socket) == "WATCHDOG=1"
        assert any(t.name == "watchdog" for t in threading.enumerate())
    finally:
        dog.stop()
    assert not any(t.name == "watchdog" for t in threading.enumerate())


def test_watchdog_without_interval_does_not_start(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = systemd.Watchdog()
    dog.start()
    assert not any(t.name == "watchdog" for t in threading.enumerate())
    dog.stop()


def test_a_camera_lane_that_stops_progressing_withholds_pings_though_another_camera_works(caplog):
    pings = []
    dog = systemd.Watchdog(interval_s=1.0, send=lambda: pings.append(1) or True, lanes=["top", "side"])
    top, side = dog.lane("top"), dog.lane("side")
    top.progress()
    side.progress()
    assert dog.beat() is True
    top.progress()
    assert dog.beat() is False, "side is stuck: top's progress must not hide it"
    assert "no pipeline progress of side for 1.0 s" in caplog.text
    side.idle_ok(True)  # unplugged (being retried) or waiting for a trigger: not stuck
    top.progress()
    assert dog.beat() is True
    top.idle_ok(True)
    assert dog.beat() is True, "both idle by design"
    side.idle_ok(False)
    assert dog.beat() is False
    assert len(pings) == 3


def test_a_lane_that_was_not_declared_is_refused():
    dog = systemd.Watchdog(interval_s=1.0, lanes=["top"])
    with pytest.raises(KeyError, match="lane 'side' was not declared"):
        dog.lane("side")


def test_stopping_one_lane_stops_every_ping(notify_socket):
    dog = systemd.Watchdog(interval_s=0.02, lanes=["top", "side"])
    dog.idle_ok(True, "top")
    dog.idle_ok(True, "side")
    dog.start()
    assert received(notify_socket) == "WATCHDOG=1"
    dog.lane("side").stop(5)
    assert not any(t.name == "watchdog" for t in threading.enumerate()), "a dead camera ends the heartbeat"

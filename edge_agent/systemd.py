"""sd_notify for Type=notify units: READY, WATCHDOG, STOPPING, STATUS, RELOADING.

No dependencies; every call is a no-op outside systemd. Watchdog pings only while the
pipeline makes progress, so a wedged inference loop gets the unit restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify datagram ("READY=1", "STATUS=..."); False when not under systemd or it failed."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        # Linux abstract namespace: systemd writes '@', the kernel wants a leading NUL byte.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as e:
        # A lost notification must not take the daemon down; systemd acts on the missing ping itself.
        logger.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], env["NOTIFY_SOCKET"], e)
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    # systemd >= 253 requires MONOTONIC_USEC with RELOADING=1 for Type=notify-reload units.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds (systemd's advice), or None when the watchdog is off or not ours."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Watchdog:
    """Pings WATCHDOG=1 every interval, but only if every lane made progress since the last ping
    or declared itself idle by design (idle_ok(True), e.g. waiting for a trigger or a camera).

    One lane by default (progress()/idle_ok() on the watchdog itself). A station with several cameras
    gives each camera its own lane (lanes=[...], lane(id)), so a wedged camera cannot hide behind
    a busy one.
    """

    def __init__(self, interval_s: float | None = None, send: Callable[[], bool] = watchdog_ping,
                 lanes: list[str] | None = None) -> None:
        """interval_s=None reads WATCHDOG_USEC; without it start() does nothing."""
        self.interval_s = watchdog_interval_s() if interval_s is None else interval_s
        self._send = send
        # lane -> [progress count, count at the last beat, idle by design]
        self._lanes: dict[str, list] = {name: [0, 0, False] for name in (lanes or [""])}
        self._starved: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lane(self, name: str) -> WatchdogLane:
        """The progress/idle_ok/stop hooks of one declared lane (a camera)."""
        if name not in self._lanes:
            raise KeyError(f"watchdog lane {name!r} was not declared; lanes: {sorted(self._lanes)}")
        return WatchdogLane(self, name)

    def progress(self, lane: str = "") -> None:
        """Call after each unit of real work (an inference batch)."""
        with self._lock:
            self._lanes[lane][0] += 1

    def idle_ok(self, idle: bool, lane: str = "") -> None:
        """True while no progress is expected (waiting for a trigger or a camera); pings continue."""
        with self._lock:
            self._lanes[lane][2] = idle

    def beat(self) -> bool:
        """One heartbeat: ping if every lane progressed since the last beat or is idle by design; True if pinged."""
        with self._lock:
            starved = []
            for name, state in self._lanes.items():
                advanced = state[0] != state[1]
                state[1] = state[0]
                if not (advanced or state[2]):
                    starved.append(name)
        if starved:
            if starved != self._starved:
                who = "" if starved == [""] else f" of {', '.join(starved)}"
                logger.warning("no pipeline progress%s for %.1f s; withholding watchdog pings", who,
                               self.interval_s or 0)
                self._starved = starved
            return False
        if self._starved:
            logger.info("pipeline progressing again; watchdog pings resumed")
            self._starved = []
        return self._send()

    def start(self) -> None:
        if not self.interval_s:
            logger.debug("systemd watchdog not enabled; no heartbeat thread")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class WatchdogLane:
    """One camera's hooks into the station's watchdog (pipeline.Progress)."""

    def __init__(self, watchdog: Watchdog, name: str) -> None:
        self.watchdog = watchdog
        self.name = name

    def progress(self) -> None:
        self.watchdog.progress(self.name)

    def idle_ok(self, idle: bool) -> None:
        self.watchdog.idle_ok(idle, self.name)

    def stop(self, timeout: float | None = 5.0) -> None:
        """No more pings for anyone: a dead camera thread makes the whole agent unhealthy."""
        self.watchdog.stop(timeout)

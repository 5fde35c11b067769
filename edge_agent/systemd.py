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
    """Pings WATCHDOG=1 every interval, but only if progress() was called since the last ping
    or the pipeline declared itself idle by design (idle_ok(True), e.g. waiting for a trigger).
    """

    def __init__(self, interval_s: float | None = None, send: Callable[[], bool] = watchdog_ping) -> None:
        """interval_s=None reads WATCHDOG_USEC; without it start() does nothing."""
        self.interval_s = watchdog_interval_s() if interval_s is None else interval_s
        self._send = send
        self._progress = 0
        self._seen = 0
        self._idle_ok = False
        self._starved = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self) -> None:
        """Call after each unit of real work (an inference batch)."""
        with self._lock:
            self._progress += 1

    def idle_ok(self, idle: bool) -> None:
        """True while no progress is expected (waiting for a trigger or a camera); pings continue."""
        with self._lock:
            self._idle_ok = idle

    def beat(self) -> bool:
        """One heartbeat: ping if progress happened since the last beat or idle is OK; True if pinged."""
        with self._lock:
            advanced = self._progress != self._seen
            self._seen = self._progress
            allowed = advanced or self._idle_ok
        if not allowed:
            if not self._starved:
                logger.warning("no pipeline progress for %.1f s; withholding watchdog pings", self.interval_s or 0)
                self._starved = True
            return False
        if self._starved:
            logger.info("pipeline progressing again; watchdog pings resumed")
            self._starved = False
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

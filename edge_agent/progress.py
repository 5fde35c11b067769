"""A dependency-free progress line on stderr: count, rate, ETA and whatever the caller adds."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


class Progress:
    """`with Progress(total, "scoring") as bar: bar.update(1, loss=...)`; redraws at most 4 times a second."""

    def __init__(self, total: int | None, label: str, stream=None, enabled: bool = True):
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.fields: dict[str, str] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.draw(final=True)

    def update(self, n: int = 1, eta_s: float | None = None, **fields: object) -> None:
        self.done += n
        self.fields.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fields.items()})
        now = time.monotonic()
        # Not a terminal (a log, CI): a line every 10 s instead of a redraw.
        if now - self._last_draw >= (0.25 if self._tty else 10.0):
            self.draw(eta_s=eta_s)

    def draw(self, final: bool = False, eta_s: float | None = None) -> None:
        if not self.enabled:
            return
        self._last_draw = time.monotonic()
        elapsed = self._last_draw - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        if eta_s is None and self.total and rate > 0:
            eta_s = (self.total - self.done) / rate
        extra = " ".join(f"{k} {v}" for k, v in self.fields.items())
        eta = f" ETA {_clock(eta_s)}" if eta_s is not None and not final else ""
        line = f"{self.label} {count} {rate:.1f}/s {_clock(elapsed)}{eta} {extra}".rstrip()
        if self._tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

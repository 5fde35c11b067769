"""The PLC trigger contract in one place: parse, rate-limit, the pending registry (deadline,
de-duplication by trigger_id) and the answers on trigger/response.

Flow: mqtt hands raw payloads to TriggerDesk (paho's thread) -> on_trigger (the pipeline) adds
them to Pending -> the capture thread takes one for a frame -> the infer thread completes it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from edge_agent.frames import Trigger

logger = logging.getLogger(__name__)

MAX_TRIGGER_BYTES = 4096
MAX_TRIGGER_FIELD_CHARS = 256
TRIGGER_FIELDS = ("part_id", "trigger_id", "recipe", "job_id")


class TriggerError(ValueError):
    """A trigger the agent cannot accept; `reason` is a short metric label, the message says the fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_trigger(payload: bytes, received_at: float | None = None) -> Trigger:
    """A PLC trigger from its MQTT payload; raises TriggerError saying what is wrong."""
    if len(payload) > MAX_TRIGGER_BYTES:
        raise TriggerError("too_large", f"trigger is {len(payload)} bytes; the limit is {MAX_TRIGGER_BYTES}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TriggerError("json", f"trigger is not UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise TriggerError("type", f"trigger must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TRIGGER_FIELDS))
    if unknown:
        raise TriggerError("unknown_field", f"unknown trigger field(s) {unknown}; valid fields: {list(TRIGGER_FIELDS)}")
    if data.get("part_id") is None:
        raise TriggerError("missing_part_id", 'trigger has no part_id; send e.g. {"part_id": "A123"}')
    for key, value in data.items():
        if value is None and key != "part_id":
            continue
        if not isinstance(value, str) or not value:
            raise TriggerError("type", f"trigger field {key} must be a non-empty string, got {value!r:.60}")
        if len(value) > MAX_TRIGGER_FIELD_CHARS:
            raise TriggerError("type", f"trigger field {key} is {len(value)} characters; the limit is "
                               f"{MAX_TRIGGER_FIELD_CHARS}")
    return Trigger(
        trigger_id=data.get("trigger_id") or uuid.uuid4().hex,
        part_id=data["part_id"],
        recipe=data.get("recipe"),
        job_id=data.get("job_id"),
        received_at=time.time() if received_at is None else received_at,
        arrived_mono=time.monotonic(),
    )


def readable_ids(payload: bytes) -> dict[str, str]:
    """trigger_id and part_id of a rejected payload, where they can be read, so the PLC can match the answer."""
    try:
        data = json.loads(payload[:MAX_TRIGGER_BYTES].decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("trigger_id", "part_id")
            if isinstance(data.get(k), str) and 0 < len(data[k]) <= MAX_TRIGGER_FIELD_CHARS}


class TokenBucket:
    """rate_per_s tokens a second, bursts up to `burst`; take() never waits."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst, self._clock = rate_per_s, burst, clock
        self._tokens, self._at = burst, clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


class TriggerDesk:
    """The trigger topic's front desk (on paho's thread): rate limit, parse, hand on, and the answer.

    on_trigger(trigger) returns extra fields for the answer (e.g. {"duplicate": true}) or None, and
    raises TriggerError (or ValueError) to refuse it.
    """

    def __init__(self, rate_per_s: float, on_trigger: Callable[[Trigger], dict[str, Any] | None] | None,
                 metric: Callable[..., None]) -> None:
        self.rate_per_s = rate_per_s
        self._bucket = TokenBucket(rate_per_s, max(1.0, rate_per_s))
        self._on_trigger = on_trigger
        self._metric = metric

    def receive(self, raw: bytes) -> dict[str, Any]:
        """The answer for trigger/response: {"ok": true, "trigger_id", "part_id", ...} or a rejection."""
        if not self._bucket.take():
            return self._reject("rate", f"more than {self.rate_per_s:g} triggers/s; trigger ignored", raw)
        try:
            trigger = parse_trigger(raw)
        except TriggerError as e:
            return self._reject(e.reason, str(e), raw)
        extra: dict[str, Any] | None = None
        if self._on_trigger is not None:
            try:
                extra = self._on_trigger(trigger)
            except TriggerError as e:
                return self._reject(e.reason, f"trigger not accepted: {e}", raw)
            except ValueError as e:
                # The pipeline refusing a trigger (free-run mode) is a PLC's mistake, not a bug: no traceback.
                return self._reject("refused", f"trigger not accepted: {e}", raw)
            except Exception as e:
                logger.exception("trigger handler failed for part_id=%s", trigger.part_id)
                return self._reject("handler", f"trigger not accepted: {e}", raw)
        return {"ok": True, "trigger_id": trigger.trigger_id, "part_id": trigger.part_id, **(extra or {})}

    def _reject(self, reason: str, error: str, raw: bytes) -> dict[str, Any]:
        # A flooding PLC must not flood the journal too: rate rejections are only counted.
        logger.log(logging.DEBUG if reason == "rate" else logging.WARNING, "rejected trigger (%s): %s", reason, error)
        self._metric("trigger_rejected", reason)
        return {"ok": False, "reason": reason, "error": error, **readable_ids(raw),
                "input": raw[:256].decode("utf-8", errors="replace")}


State = Literal["waiting", "taken", "done"]


@dataclass
class _Entry:
    trigger: Trigger
    deadline: float  # monotonic s
    state: State = "waiting"
    verdict: dict[str, Any] | None = None
    duplicates_waiting: int = 0


class Pending:
    """Accepted triggers until their verdict, and the verdicts of the last `remember` trigger_ids.

    A trigger is `waiting` (for a frame), `taken` (paired with a frame, being judged) or `done`.
    A waiting trigger past its deadline is expired: it is never paired with a frame after that.
    Thread-safe: added on the MQTT thread, taken on the capture thread, completed on the infer thread.
    """

    def __init__(self, deadline_s: float, max_waiting: int = 64, remember: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline_s = deadline_s
        self.max_waiting = max_waiting
        self.remember = remember
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._waiting: list[_Entry] = []  # in arrival order
        self._taken = 0  # paired with a frame (or expired), verdict not yet recorded
        self._cond = threading.Condition()

    def add(self, trigger: Trigger) -> tuple[State | None, dict[str, Any] | None]:
        """(None, None) for a new trigger; for a repeated trigger_id its state and, when done, its verdict.

        Raises TriggerError when max_waiting triggers already wait for a frame or a verdict.
        """
        with self._cond:
            entry = self._entries.get(trigger.trigger_id)
            if entry is not None:
                if entry.state != "done":
                    entry.duplicates_waiting += 1
                return entry.state, entry.verdict
            if len(self._waiting) + self._taken >= self.max_waiting:
                raise TriggerError("busy", f"{self.max_waiting} triggers already wait for a frame or a verdict; "
                                   "is the camera down or the PLC triggering faster than the agent judges?")
            arrived = trigger.arrived_mono or self._clock()
            entry = _Entry(replace(trigger, arrived_mono=arrived), arrived + self.deadline_s)
            self._entries[trigger.trigger_id] = entry
            self._waiting.append(entry)
            self._forget_old()
            self._cond.notify_all()
            return None, None

    def _forget_old(self) -> None:
        while len(self._entries) > self.remember:
            oldest_id = next(iter(self._entries))
            if self._entries[oldest_id].state != "done":
                break  # never forget a trigger still owed a verdict
            del self._entries[oldest_id]

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def take(self, read_started: float | None = None, wait_s: float = 0.0,
             stop: threading.Event | None = None) -> Trigger | None:
        """The oldest waiting trigger, now taken; None if there is none.

        read_started (monotonic): only a trigger that arrived before this frame's read began may take it
        (live sources); None: any waiting trigger (stored frames replay in trigger order).
        wait_s: wait up to this long for one (stored frames wait for the next trigger).
        """
        deadline = self._clock() + wait_s
        with self._cond:
            while True:
                now = self._clock()
                for entry in self._waiting:
                    if entry.deadline <= now:
                        continue  # expired: answered by expired(), never paired
                    if read_started is not None and entry.trigger.arrived_mono > read_started:
                        break
                    self._waiting.remove(entry)
                    entry.state = "taken"
                    self._taken += 1
                    return entry.trigger
                remaining = deadline - now
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    return None
                self._cond.wait(min(remaining, 0.5))

    def expired(self) -> list[Trigger]:
        """Waiting triggers past their deadline, now taken: each must get an ERROR verdict."""
        now = self._clock()
        with self._cond:
            gone = [e for e in self._waiting if e.deadline <= now]
            for entry in gone:
                self._waiting.remove(entry)
                entry.state = "taken"
            self._taken += len(gone)
            return [e.trigger for e in gone]

    def next_deadline(self) -> float | None:
        with self._cond:
            return min((e.deadline for e in self._waiting), default=None)

    def all_waiting(self) -> list[Trigger]:
        """Every waiting trigger, now taken (at shutdown: each gets an ERROR verdict)."""
        with self._cond:
            gone, self._waiting = self._waiting, []
            for entry in gone:
                entry.state = "taken"
            self._taken += len(gone)
            return [e.trigger for e in gone]

    def complete(self, trigger_id: str, verdict: dict[str, Any]) -> int:
        """Record a trigger's verdict; returns how many duplicates of it wait for that verdict."""
        with self._cond:
            entry = self._entries.get(trigger_id)
            if entry is None:
                return 0
            if entry.state == "taken":
                self._taken -= 1
            entry.state, entry.verdict = "done", verdict
            waiting, entry.duplicates_waiting = entry.duplicates_waiting, 0
            self._forget_old()
            self._cond.notify_all()
            return waiting

    def idle(self) -> bool:
        """No trigger waits for a frame or a verdict."""
        with self._cond:
            return not self._waiting and self._taken == 0


def duplicate_of(verdict: dict[str, Any]) -> dict[str, Any]:
    """A re-sent verdict for a repeated trigger: the same verdict and message_id, marked `duplicate`."""
    return dict(verdict, duplicate=True)


def check_recipe(configured: bool, recipes: dict[str, Any], trigger: Trigger, default_recipe: str | None) -> None:
    """Refuse a trigger whose recipe the station does not have (TriggerError unknown_recipe)."""
    if configured and (trigger.recipe or default_recipe) not in recipes:
        raise TriggerError("unknown_recipe", f"recipe {trigger.recipe!r} is not configured; known recipes: "
                                             f"{sorted(recipes)}")


def answer_repeat(state: Any, verdict: dict[str, Any] | None, trigger: Trigger, metrics: Any,
                  resend: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
    """After Pending.add: None for a new trigger; for a repeated trigger_id (a PLC retry) never a second
    inspection: the first verdict is re-sent (marked duplicate) when there is one, and the answer says so."""
    if state is None:
        return None
    metrics.trigger_duplicate()
    logger.info("trigger %s (part %s) repeated; %s", trigger.trigger_id, trigger.part_id,
                "re-sending its verdict" if verdict else "its verdict follows when judged")
    if verdict is not None and resend is not None:
        resend(duplicate_of(verdict))
    return {"duplicate": True, "verdict": "resent" if verdict is not None else "pending"}

"""The trigger contract: the pending registry (deadline, de-duplication, pairing order) and the answers."""

import json
import threading

import pytest

from edge_agent.frames import Trigger
from edge_agent.triggers import Pending, TriggerDesk, TriggerError, duplicate_of, readable_ids


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def trig(tid, arrived, part="P"):
    return Trigger(tid, part, arrived_mono=arrived)


def test_a_live_frame_takes_only_a_trigger_that_arrived_before_its_read_began():
    clock = Clock()
    pending = Pending(deadline_s=5.0, clock=clock)
    pending.add(trig("t1", 100.5))
    assert pending.take(read_started=100.4) is None, "read began before the trigger: the previous part"
    assert pending.take(read_started=100.5).trigger_id == "t1"
    assert pending.take(read_started=101.0) is None


def test_triggers_are_taken_in_arrival_order_and_stored_frames_take_any():
    pending = Pending(deadline_s=5.0, clock=Clock())
    pending.add(trig("t1", 100.0))
    pending.add(trig("t2", 100.1))
    assert [pending.take().trigger_id, pending.take().trigger_id] == ["t1", "t2"]


def test_an_expired_trigger_is_answered_once_and_never_paired_later():
    clock = Clock()
    pending = Pending(deadline_s=2.0, clock=clock)
    pending.add(trig("t1", 100.0))
    pending.add(trig("t2", 101.5))
    assert pending.next_deadline() == 102.0
    clock.now = 102.0
    assert pending.take(read_started=102.0).trigger_id == "t2", "t1 is past its deadline: skipped"
    assert [t.trigger_id for t in pending.expired()] == ["t1"]
    assert pending.expired() == [] and pending.take() is None


def test_a_repeated_trigger_id_is_a_duplicate_pending_then_done():
    pending = Pending(deadline_s=5.0, clock=Clock())
    assert pending.add(trig("t1", 100.0)) == (None, None)
    assert pending.add(trig("t1", 100.1)) == ("waiting", None)
    taken = pending.take()
    assert pending.add(trig("t1", 100.2)) == ("taken", None)
    assert pending.waiting == 0 and not pending.idle()
    verdict = {"trigger_id": "t1", "result": "OK", "message_id": "st:b:1"}
    assert pending.complete(taken.trigger_id, verdict) == 2, "two retries wait for the verdict"
    assert pending.add(trig("t1", 100.3)) == ("done", verdict)
    assert pending.complete("t1", verdict) == 0 and pending.idle()
    assert duplicate_of(verdict) == {**verdict, "duplicate": True}


def test_memory_of_trigger_ids_is_bounded_but_never_forgets_one_owed_a_verdict():
    pending = Pending(deadline_s=5.0, remember=3, clock=Clock())
    for i in range(3):
        pending.add(trig(f"t{i}", 100.0))
        pending.complete(pending.take().trigger_id, {"seq": i})
    pending.add(trig("open", 100.0))  # waiting: t0 (done) is forgotten to keep 3
    assert pending.add(trig("t0", 100.1)) == (None, None), "t0 forgotten: a new inspection"
    pending.add(trig("t9", 100.2))
    pending.add(trig("t10", 100.2))  # "open" is now the oldest id, and still owed a verdict
    assert pending.add(trig("open", 100.3))[0] == "waiting", "an id still owed a verdict is kept"


def test_too_many_waiting_triggers_are_refused_with_the_reason():
    pending = Pending(deadline_s=5.0, max_waiting=2, clock=Clock())
    pending.add(trig("a", 100.0))
    pending.add(trig("b", 100.0))
    with pytest.raises(TriggerError, match="camera down") as e:
        pending.add(trig("c", 100.0))
    assert e.value.reason == "busy"


def test_take_waits_for_a_trigger_until_stop():
    pending = Pending(deadline_s=5.0)
    stop = threading.Event()
    threading.Timer(0.05, lambda: pending.add(Trigger("t1", "P"))).start()
    assert pending.take(wait_s=10.0, stop=stop).trigger_id == "t1"
    stop.set()
    assert pending.take(wait_s=10.0, stop=stop) is None


@pytest.mark.parametrize(
    "payload, ids",
    [
        (b'{"part_id": "A1", "trigger_id": "T1", "colour": "red"}', {"part_id": "A1", "trigger_id": "T1"}),
        (b'{"part_id": 7, "trigger_id": "T1"}', {"trigger_id": "T1"}),
        (b'{not json', {}),
        (b'["A1"]', {}),
        (b'\xff', {}),
    ],
)
def test_readable_ids_of_a_rejected_trigger(payload, ids):
    assert readable_ids(payload) == ids


def test_the_desk_answers_accepted_duplicate_and_refused_triggers():
    calls = []
    seen = set()

    def on_trigger(t):
        if t.recipe == "nope":
            raise TriggerError("unknown_recipe", "recipe 'nope' is not configured; known recipes: ['a', 'b']")
        dup = t.trigger_id in seen
        seen.add(t.trigger_id)
        return {"duplicate": True} if dup else None

    desk = TriggerDesk(100.0, on_trigger, lambda *a: calls.append(a))
    first = desk.receive(b'{"part_id": "A1", "trigger_id": "T1"}')
    again = desk.receive(b'{"part_id": "A1", "trigger_id": "T1"}')
    refused = desk.receive(json.dumps({"part_id": "A2", "trigger_id": "T2", "recipe": "nope"}).encode())
    bad = desk.receive(b'{"part_id": "A3", "trigger_id": "T3", "colour": "red"}')
    assert first == {"ok": True, "trigger_id": "T1", "part_id": "A1"}
    assert again == {"ok": True, "trigger_id": "T1", "part_id": "A1", "duplicate": True}
    assert (refused["ok"], refused["reason"], refused["trigger_id"], refused["part_id"]) == (
        False, "unknown_recipe", "T2", "A2")
    assert "known recipes: ['a', 'b']" in refused["error"]
    assert (bad["reason"], bad["trigger_id"], bad["part_id"]) == ("unknown_field", "T3", "A3")
    assert calls == [("trigger_rejected", "unknown_recipe"), ("trigger_rejected", "unknown_field")]

import os
import signal
import subprocess
import sys
import threading

import pytest

from edge_agent.outbox import ROW_OVERHEAD_BYTES, Outbox


def size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic) + ROW_OVERHEAD_BYTES


def test_put_peek_ack_in_order(tmp_path):
    box = Outbox(tmp_path, 1_000_000)
    ids = [box.put("verdict", "p/s/verdict", b"%d" % i, 1, False) for i in range(5)]
    assert ids == sorted(ids)
    assert [m.payload for m in box.peek(10)] == [b"0", b"1", b"2", b"3", b"4"]
    assert [m.id for m in box.peek(2, after_id=ids[1])] == ids[2:4]
    assert box.ack(ids[0]) and not box.ack(ids[0])
    assert box.depth() == 4
    assert box.peek(1)[0].id == ids[1]


def test_fields_round_trip(tmp_path):
    box = Outbox(tmp_path, 1_000_000)
    box.put("heatmap", "p/s/heatmap", b"\xff\xd8jpeg", 1, True, {"seq": "7"})
    (m,) = box.peek(1)
    assert (m.kind, m.topic, m.payload, m.qos, m.retain, m.properties) == (
        "heatmap", "p/s/heatmap", b"\xff\xd8jpeg", 1, True, {"seq": "7"}
    )
    assert box.bytes() == m.size


def test_heatmaps_dropped_first_when_full(tmp_path):
    t = "t"
    box = Outbox(tmp_path, 3 * size(t, b"x" * 100) + 10)
    v1 = box.put("verdict", t, b"v" * 100)
    box.put("heatmap", t, b"h" * 100)
    v2 = box.put("verdict", t, b"w" * 100)
    v3 = box.put("verdict", t, b"z" * 100)  # evicts the heatmap, not v1
    assert [m.id for m in box.peek(10)] == [v1, v2, v3]
    assert box.dropped == {"heatmap": 1}
    assert box.bytes() <= box.max_bytes


def test_heatmap_refused_rather_than_dropping_a_verdict(tmp_path):
    t = "t"
    box = Outbox(tmp_path, 2 * size(t, b"x" * 100))
    box.put("verdict", t, b"v" * 100)
    box.put("verdict", t, b"w" * 100)
    assert box.put("heatmap", t, b"h" * 100) is None
    assert box.depth() == 2 and box.dropped == {"heatmap": 1}


def test_oldest_verdict_dropped_as_last_resort(tmp_path, caplog):
    t = "t"
    box = Outbox(tmp_path, 2 * size(t, b"x" * 100))
    box.put("verdict", t, b"1" * 100)
    box.put("verdict", t, b"2" * 100)
    box.put("verdict", t, b"3" * 100)
    assert [m.payload[:1] for m in box.peek(10)] == [b"2", b"3"]
    assert box.dropped == {"verdict": 1}
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_oversized_message_refused(tmp_path):
    box = Outbox(tmp_path, 1000)
    assert box.put("verdict", "t", b"x" * 2000) is None
    assert box.depth() == 0


def test_survives_reopen(tmp_path):
    box = Outbox(tmp_path, 1_000_000)
    a = box.put("verdict", "t", b"a")
    box.put("verdict", "t", b"b")
    box.ack(a)
    box.close()
    box = Outbox(tmp_path, 1_000_000)
    assert [m.payload for m in box.peek(10)] == [b"b"]
    c = box.put("verdict", "t", b"c")
    assert c > a and box.depth() == 2


def test_survives_sigkill(tmp_path):
    code = (
        "import sys, time\n"
        "from edge_agent.outbox import Outbox\n"
        "box = Outbox(sys.argv[1], 1_000_000)\n"
        "for i in range(20): box.put('verdict', 't', b'%d' % i)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    box = Outbox(tmp_path, 1_000_000)
    assert [m.payload for m in box.peek(100)] == [b"%d" % i for i in range(20)]


def test_concurrent_puts_and_acks(tmp_path):
    box = Outbox(tmp_path, 10_000_000)

    def producer(k: int) -> None:
        for i in range(50):
            box.put("verdict", "t", b"%d-%d" % (k, i))

    threads = [threading.Thread(target=producer, args=(k,), name=f"producer{k}") for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert box.depth() == 200
    for m in box.peek(200):
        assert box.ack(m.id)
    assert box.depth() == 0 and box.bytes() == 0


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_rejects_nonpositive_bound(tmp_path, max_bytes):
    with pytest.raises(ValueError):
        Outbox(tmp_path, max_bytes)


def test_low_disk_refuses_heatmaps_and_keeps_verdicts(tmp_path, monkeypatch):
    import shutil

    from edge_agent import outbox as outbox_module

    box = Outbox(tmp_path, 10_000_000)
    box.put("verdict", "t", b"v1")
    box.put("heatmap", "t", b"h1")
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(outbox_module, "MIN_FREE_BYTES", free + 1)  # the disk now counts as nearly full
    assert box.put("heatmap", "t", b"h2") is None
    assert box.put("verdict", "t", b"v2") is not None, "a verdict still goes in, in place of the old heatmap"
    assert [m.payload for m in box.peek(10)] == [b"v1", b"v2"]
    assert box.dropped == {"heatmap": 2}


def test_a_full_disk_refuses_with_a_count_instead_of_raising(tmp_path):
    import sqlite3

    box = Outbox(tmp_path, 10_000_000)

    class FullDb:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    box._db = FullDb(box._db)
    assert box.put("verdict", "t", b"v") is None
    assert box.dropped == {"verdict": 1} and box.depth() == 0

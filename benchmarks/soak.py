"""Soak: N frames through the real daemon (subprocess) and a real mosquitto; watch memory and threads.

    PYTHONPATH=. nice python benchmarks/soak.py --frames 10000

Trains a tiny model (or takes --model), writes a 100-frame 128x128 station video (every 10th
part defective, so heatmaps are published too), runs `edge-agent run --frames N` on it in a
loop without an fps (back-pressure: every frame is inspected), and samples the daemon's
/proc/<pid>/status each second. Prints one JSON line and exits 1 when a bound is broken:
RSS growth after warm-up above --max-growth-mb, a thread count that grows, verdicts lost,
or an outbox that is not empty at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.broker import EmbeddedBroker, free_port  # noqa: E402
from edge_agent.synth import make_part, write_dataset  # noqa: E402


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of a live process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def tiny_model(workdir: Path) -> Path:
    from edge_agent.train.fit import TrainOptions, fit

    data = workdir / "station"
    write_dataset(data, n_train=8, n_calib=2, n_test_good=1, n_test_defect=1, seed=1)
    out = workdir / "tiny.pt"
    fit(data / "train/good", out, TrainOptions(model="vae", patch_size=32, stride=16, nc=4, nz=4, batch_size=16,
                                               epochs=1, seed=0, device="cpu", precision="fp32", progress=False))
    return out


def video(path: Path, n: int = 100) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 128))
    for i in range(n):
        image = make_part(900 + i).image.copy()
        if i % 10 == 9:
            image[10:40, 80:110] = 255
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


class Counter:
    """Counts verdict and heatmap messages the broker delivers."""

    def __init__(self, port: int) -> None:
        self.verdicts = self.heatmaps = 0
        self.ids: set[str] = set()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-consumer")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge-agent/soak/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/verdict"):
            self.verdicts += 1
            self.ids.add(json.loads(msg.payload)["message_id"])
        elif msg.topic.endswith("/heatmap"):
            self.heatmaps += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--model", type=Path, help="model file; default: train a tiny one (about 20 s)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0, help="RSS growth bound after warm-up")
    ap.add_argument("--warmup-frames", type=int, default=500, help="frames before the baseline RSS sample")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="edge-soak-") as tmp:
        work = Path(tmp)
        model = args.model or tiny_model(work)
        port, metrics_port = free_port(), free_port()
        config = work / "soak.toml"
        config.write_text(f"""
[station]
id = "soak"
[model]
path = "{model}"
threshold = 120.0
device = "cpu"
[source]
kind = "file"
uri = "{video(work / 'parts.avi')}"
loop = true
[mqtt]
host = "127.0.0.1"
port = {port}
[outbox]
dir = "{work / 'outbox'}"
[metrics]
port = {metrics_port}
[web]
port = 0
""")
        with EmbeddedBroker(port):
            consumer = Counter(port)
            env = dict(os.environ, PYTHONPATH=str(ROOT), EDGE_AGENT_LOG_LEVEL="WARNING")
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", str(config), "--frames",
                                     str(args.frames)], env=env, stderr=subprocess.PIPE, text=True)
            err: list[str] = []
            threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
            samples = []  # (seconds, verdicts delivered, rss MB, threads)
            while proc.poll() is None:
                try:
                    rss, threads = proc_status(proc.pid)
                except (OSError, KeyError):
                    break
                samples.append((round(time.monotonic() - started, 1), consumer.verdicts, round(rss, 1), threads))
                time.sleep(1.0)  # sampling period
            rc = proc.wait()
            elapsed = time.monotonic() - started
            deadline = time.monotonic() + 10
            while consumer.verdicts < args.frames and time.monotonic() < deadline:
                time.sleep(0.1)
            consumer.client.loop_stop()
        db = sqlite3.connect(work / "outbox" / "outbox.sqlite3")
        depth = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        db.close()

    # Steady state: after warm-up and before the last verdict (shutdown ends threads on purpose).
    warm = [s for s in samples if args.warmup_frames <= s[1] < args.frames] or samples
    base, end = warm[0], warm[-1]
    peak_rss = max(s[2] for s in warm)
    result = {
        "frames": args.frames,
        "exit_code": rc,
        "seconds": round(elapsed, 1),
        "frames_per_s": round(args.frames / elapsed, 1),
        "verdicts_delivered": consumer.verdicts,
        "unique_message_ids": len(consumer.ids),
        "heatmaps_delivered": consumer.heatmaps,
        "rss_mb_after_warmup": base[2],
        "rss_mb_end": end[2],
        "rss_mb_peak": peak_rss,
        "rss_growth_mb": round(end[2] - base[2], 1),
        "threads_after_warmup": base[3],
        "threads_end": end[3],
        "threads_min_max": [min(s[3] for s in warm), max(s[3] for s in warm)],
        "outbox_depth_end": depth,
        "samples": len(samples),
    }
    print(json.dumps(result))
    broken = []
    if rc != 0:
        broken.append(f"exit code {rc}: {''.join(err)[-2000:]}")
    if result["rss_growth_mb"] > args.max_growth_mb:
        broken.append(f"RSS grew {result['rss_growth_mb']} MB > {args.max_growth_mb} MB")
    # Decoder threads come and go as the video is reopened each pass; a leak shows as growth.
    half = len(warm) // 2
    if half and max(s[3] for s in warm[half:]) > max(s[3] for s in warm[:half]):
        broken.append(f"thread count grew: {max(s[3] for s in warm[:half])} -> {max(s[3] for s in warm[half:])}")
    if len(consumer.ids) != args.frames:
        broken.append(f"{len(consumer.ids)} verdicts delivered for {args.frames} frames")
    if depth:
        broken.append(f"outbox holds {depth} messages at the end")
    for line in broken:
        print("soak: " + line, file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""The station page's cost to the pipeline, interleaved so load changes hit both sides alike.

Runs the real daemon (in-process, embedded mosquitto, heatmaps for every frame) on the same video
alternately without the page (A) and with the page served and polled every 0.25 s, 4x an open
page (B); prints frames/s and efficiency (frames/s x the infer stage's mean time) per run and the
mean of each side. docs/STATION_PAGE.md quotes one run:

    .venv/bin/python benchmarks/page_overhead.py --model models/demo-vae.pt --rounds 3 --frames 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent import bench  # noqa: E402
from edge_agent.broker import free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo-vae.pt")
    ap.add_argument("--rounds", type=int, default=3, help="A/B pairs (B first in odd rounds)")
    ap.add_argument("--frames", type=int, default=200, help="frames per daemon run")
    ap.add_argument("--poll-s", type=float, default=0.25, help="poll period of the simulated page")
    args = ap.parse_args()

    from edge_agent.scoring import Scorer

    card = Scorer(args.model.resolve(), device="cpu", warmup=False).card["input"]
    w, h = int(card.get("frame_width") or 640), int(card.get("frame_height") or 480)
    with tempfile.TemporaryDirectory(prefix="edge-agent-page-") as tmp:
        root = Path(tmp)
        video = root / "station.avi"
        bench._write_video(video, [bench.station_frame(200_000 + i, "random" if i % 2 else None, w, h)
                                   for i in range(6)])
        base = (f'[station]\nid = "bench"\n[model]\npath = "{args.model.resolve()}"\ndevice = "cpu"\n'
                f'[mqtt]\nhost = ""\nport = {free_port()}\nheatmap = "all"\n[outbox]\ndir = "{root / "outbox"}"\n'
                f'flush_timeout_s = 2.0\n[metrics]\nenabled = false\n[logging]\nlevel = "WARNING"\n'
                f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\n')
        config = root / "bench.toml"
        results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for r in range(args.rounds):
            for side in ("BA" if r % 2 == 0 else "AB"):
                port = free_port()
                config.write_text(base + ("[web]\nenabled = false\n" if side == "A" else f"[web]\nport = {port}\n"))
                stop, polls = threading.Event(), {"polls": 0, "errors": 0}
                poller = threading.Thread(target=bench._poll_page, args=(port, stop, args.poll_s, polls), daemon=True)
                if side == "B":
                    poller.start()
                try:
                    runs = bench._daemon_run(config, args.frames)
                finally:
                    stop.set()
                fps, infer_s = bench._rate(runs)
                row = {"fps": fps, "efficiency": fps * infer_s, "infer_ms": infer_s * 1e3, "polls": polls["polls"]}
                results[side].append(row)
                print(side, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
        mean = {side: {k: statistics.mean(row[k] for row in rows) for k in ("fps", "efficiency")}
                for side, rows in results.items()}
        print(json.dumps({"without_page": mean["A"], "page_polled": mean["B"],
                          "fps_change": mean["B"]["fps"] / mean["A"]["fps"] - 1,
                          "fps_spread_without_page": [min(r["fps"] for r in results["A"]),
                                                      max(r["fps"] for r in results["A"])]}, indent=1))


if __name__ == "__main__":
    main()

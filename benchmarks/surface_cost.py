"""What the surface filters (anomaly_map.SurfaceFilters) cost per frame: a model's map score on the same frames
with its filters and without them (the card's head with `surface` removed), and the filters alone.

    python benchmarks/surface_cost.py MODEL.pt FRAMES_DIR [--frames 8] [--rounds 5]

Median seconds per frame over the rounds (each round scores every frame once, after one warm-up round).
Used in docs/PERFORMANCE.md (round 16).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from edge_agent.anomaly_map import SurfaceFilters
from edge_agent.images import list_images, read_image
from edge_agent.scoring import Scorer


def per_frame(fn, frames: list, rounds: int) -> float:
    for f in frames:
        fn(f)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for f in frames:
            fn(f)
        times.append((time.perf_counter() - t0) / len(frames))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("frames", type=Path)
    ap.add_argument("--frames", dest="n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    scorer = Scorer(a.model, device="cpu")
    if scorer.head is None or scorer.head.surface is None:
        raise SystemExit(f"{a.model} has no surface filters (its card's anomaly_map.surface_check says why)")
    frames = [scorer.patches(read_image(f)) for f in list_images(a.frames)[:a.n]]
    with_filters = scorer.head
    with torch.inference_mode():
        t_with = per_frame(lambda f: scorer.score_frame(*f), frames, a.rounds)
        scorer.head = dataclasses.replace(with_filters, surface=None)
        t_without = per_frame(lambda f: scorer.score_frame(*f), frames, a.rounds)
        scorer.head = with_filters
        cache: dict = {}
        images = [SurfaceFilters.frame_of(grid, patches) for grid, patches in frames]
        t_alone = per_frame(lambda x: with_filters.surface.map(x, cache), images, a.rounds)
    h, w = images[0].shape
    print(f"{a.model.name}: {w}x{h} frames, {frames[0][0].count} patches, {len(with_filters.surface.shapes)} filters, "
          f"{torch.get_num_threads()} threads")
    print(f"seconds per frame: with the filters {t_with:.4f}, without {t_without:.4f}, the filters alone {t_alone:.4f} "
          f"(+{(t_with - t_without) / t_without:.1%})")


if __name__ == "__main__":
    main()

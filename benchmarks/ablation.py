"""What each scorer optimisation buys: eager -> BN folded -> frozen -> channels-last -> batch -> threads -> bf16.

Every step scores the same 640x480 station frame (875 patches of the seed VAE) through the real
Scorer with one setting changed; steps and a fp32 matmul are interleaved and the best of
--repeats is kept, so the ratios hold on a busy machine. Usage:

    PYTHONPATH=. python benchmarks/ablation.py --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from edge_agent.bench import SEED, export_seed, matmul_gflops, station_frame, vae_flops_per_patch
from edge_agent.scoring import Scorer
from edge_agent.train import fit

STEPS = [
    ("eager TorchScript, export without BN folding", dict(fast=False, channels_last=False, batch_size=512,
                                                         unfolded=True)),
    ("eager, decoder BN folded at export", dict(fast=False, channels_last=False, batch_size=512)),
    ("frozen + optimize_for_inference", dict(fast=True, channels_last=False, batch_size=512)),
    ("+ channels-last", dict(fast=True, channels_last=True, batch_size=512)),
    ("batch 64", dict(fast=True, channels_last=True, batch_size=64)),
    ("batch 128", dict(fast=True, channels_last=True, batch_size=128)),
    ("batch 256", dict(fast=True, channels_last=True, batch_size=256)),
    ("batch 875 (whole frame)", dict(fast=True, channels_last=True, batch_size=875)),
    ("1 thread (batch 512)", dict(fast=True, channels_last=True, batch_size=512, threads=1)),
    ("bf16, output layer fp32 (batch 512)", dict(fast=True, channels_last=True, batch_size=512, precision="bf16")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", type=Path, help="write the result here as well")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model, unfolded = Path(tmp) / "seed.pt", Path(tmp) / "seed-unfolded.pt"
        export_seed(model, False, 640, 480)
        fold, fit.fold_decoder_batchnorm = fit.fold_decoder_batchnorm, lambda m: m  # the export before folding
        try:
            export_seed(unfolded, False, 640, 480)  # same seed, same weights
        finally:
            fit.fold_decoder_batchnorm = fold
        scorers = []
        for _, kw in STEPS:
            kw = dict(kw)
            kw.pop("threads", None)
            path = unfolded if kw.pop("unfolded", False) else model
            scorers.append(Scorer(path, device="cpu", threshold=0.0, **kw))
        grid, patches = scorers[0].patches(station_frame(300_001, "random", 640, 480))
        flops = vae_flops_per_patch(1, SEED["patch_size"], SEED["nc"], SEED["nz"]) * grid.count
        best = [float("inf")] * len(STEPS)
        mm = []
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            mm.append(matmul_gflops(torch.device("cpu"), repeats=2))
            for i, ((label, kw), scorer) in enumerate(zip(STEPS, scorers)):
                torch.set_num_threads(kw.get("threads", threads))
                t0 = time.perf_counter()
                scorer.score_patches(patches)
                best[i] = min(best[i], time.perf_counter() - t0)
                torch.set_num_threads(threads)
                print(f"rep {rep} {label}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        load.append(os.getloadavg()[0])
    top = max(mm)
    rows = []
    for (label, kw), seconds in zip(STEPS, best):
        gf = flops / seconds / 1e9
        rows.append({"step": label, "settings": kw, "frame_s": seconds, "patches_per_s": grid.count / seconds,
                     "gflops": gf, "fraction_of_matmul": gf / top, "speedup_vs_eager": best[0] / seconds})
    result = {"repeats": args.repeats, "matmul_gflops": top, "matmul_gflops_runs": mm, "threads": threads, "load_average_1m": load,
              "patches": grid.count, "flops_per_frame": flops, "torch": torch.__version__, "steps": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""What each scorer change buys, fp32 and bf16, each against its own matmul limit.

Every row scores the same batch of the 640x480 station frame (438 patches of the seed VAE, one of the
frame's two equal batches) through the real Scorer with one setting changed. Timed on one thread by
CPU time (time.process_time), interleaved with the per-precision matmul limit (best of several GEMM
shapes, same clock): the machine is shared, and CPU time does not count the time other processes take,
so the ratios hold where wall-clock ones swing with the load. Usage:

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

from edge_agent.bench import SEED, export_seed, matmul_limit, station_frame, vae_flops_per_patch
from edge_agent.scoring import Scorer
from edge_agent.train import fit, nets

# (label, artifact, Scorer settings; batch 512, the previous default, unless said); artifacts: unfolded = export before BN folding, folded = BN folded
# (the previous export), output = + the output deconv as a sub-pixel conv (the export now), all = every deconv.
STEPS = [
    ("eager TorchScript, export without BN folding", "unfolded", dict(fast=False, channels_last=False)),
    ("eager, decoder BN folded at export", "folded", dict(fast=False, channels_last=False)),
    ("frozen + optimize_for_inference", "folded", dict(channels_last=False, mkldnn=True)),
    ("+ channels-last (the previous default)", "folded", dict(mkldnn=True)),
    ("frozen, channels-last, without optimize_for_inference", "folded", dict()),
    ("+ output deconv as a sub-pixel conv (the default now)", "output", dict()),
    ("every deconv as a sub-pixel conv", "all", dict()),
    ("sub-pixel output, with optimize_for_inference", "output", dict(mkldnn=True)),
    ("+ batch 64 (the default now)", "output", dict(batch_size=64)),
    ("bf16: the previous default (folded, optimize_for_inference)", "folded", dict(mkldnn=True, precision="bf16")),
    ("bf16: without optimize_for_inference", "folded", dict(precision="bf16")),
    ("bf16: + output deconv as a sub-pixel conv (the default now)", "output", dict(precision="bf16")),
    ("bf16: every deconv as a sub-pixel conv", "all", dict(precision="bf16")),
    ("bf16: sub-pixel output, with optimize_for_inference", "output", dict(mkldnn=True, precision="bf16")),
    ("bf16: + batch 32", "output", dict(precision="bf16", batch_size=32)),
    ("bf16: + batch 64 (the default now)", "output", dict(precision="bf16", batch_size=64)),
    ("bf16: + batch 128", "output", dict(precision="bf16", batch_size=128)),
]


def export_variants(root: Path) -> dict[str, Path]:
    """The seed VAE (same weights) exported four ways, by swapping what fit.export applies."""
    fold = fit.fold_decoder_batchnorm
    rewrites = {"unfolded": lambda m: m, "folded": fold, "output": lambda m: nets.subpixel_decoder(fold(m), "output"),
                "all": lambda m: nets.subpixel_decoder(fold(m), "all")}
    paths = {}
    try:
        for name, rewrite in rewrites.items():
            fit.fold_decoder_batchnorm, fit.subpixel_decoder = rewrite, lambda m: m
            paths[name] = root / f"seed-{name}.pt"
            export_seed(paths[name], False, 640, 480)
    finally:
        fit.fold_decoder_batchnorm, fit.subpixel_decoder = fold, nets.subpixel_decoder
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the result here as well")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_variants(Path(tmp))
        scorers = [Scorer(paths[art], device="cpu", threshold=0.0, **{"batch_size": 512, **kw}) for _, art, kw in STEPS]
        grid, patches = scorers[0].patches(station_frame(300_001, "random", 640, 480))
        patches = patches[: -(-grid.count // 2)]  # 438: one of the frame's two equal batches
        flops = vae_flops_per_patch(1, SEED["patch_size"], SEED["nc"], SEED["nz"]) * patches.shape[0]
        best = [float("inf")] * len(STEPS)
        limits: dict[str, list[float]] = {"fp32": [], "bf16": []}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            limits["fp32"].append(matmul_limit(cpu, torch.float32, 1, [1], time.process_time)["gflops"])
            limits["bf16"].append(matmul_limit(cpu, torch.bfloat16, 1, [1], time.process_time)["gflops"])
            for i, ((label, _, _), scorer) in enumerate(zip(STEPS, scorers)):
                t0 = time.process_time()
                scorer.score_patches(patches)
                best[i] = min(best[i], time.process_time() - t0)
                print(f"rep {rep} {label}: {best[i]:.2f} s", file=sys.stderr)
        load.append(os.getloadavg()[0])
    top = {k: max(v) for k, v in limits.items()}
    rows = []
    for (label, art, kw), seconds in zip(STEPS, best):
        precision = kw.get("precision", "fp32")
        gf = flops / seconds / 1e9
        rows.append({"step": label, "artifact": art, "settings": kw, "precision": precision, "cpu_s": seconds,
                     "patches_per_cpu_s": patches.shape[0] / seconds, "gflops": gf,
                     "fraction_of_own_matmul": gf / top[precision], "speedup_vs_eager": best[0] / seconds})
    result = {"repeats": args.repeats, "clock": "process_time", "threads": 1, "default_threads": threads,
              "matmul_limit_gflops": top, "matmul_limit_runs": limits, "load_average_1m": load,
              "patches": patches.shape[0], "flops": flops, "torch": torch.__version__, "steps": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

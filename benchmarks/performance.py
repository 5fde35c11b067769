"""Run `edge-agent bench --json` and benchmarks/ablation.py, then write docs/PERFORMANCE.md from them.

    PYTHONPATH=. python benchmarks/performance.py             # measure (several minutes), then write
    PYTHONPATH=. python benchmarks/performance.py --render    # rewrite the page from benchmarks/results/

Raw results go to benchmarks/results/{bench,ablation}.json with the load average around each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"
BENCH_CMD = ["edge-agent", "bench", "--json"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, cmd in (("bench", [sys.executable, "-m", "edge_agent.cli", *BENCH_CMD[1:]]),
                      ("ablation", [sys.executable, str(ROOT / "benchmarks" / "ablation.py")])):
        before = uptime()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        result = json.loads(out)
        result["uptime_before"], result["uptime_after"] = before, uptime()
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: done ({result['uptime_after']})", file=sys.stderr)


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def goal(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render() -> str:
    b = json.loads((RESULTS / "bench.json").read_text())
    a = json.loads((RESULTS / "ablation.json").read_text())
    frac = b["scorer_fraction_of_matmul"]
    speed = b["bf16_speedup"]
    err = b["bf16_max_rel_score_error"]
    eff = b["pipeline_efficiency"]
    lat = b["latency_over_scoring_p99"]
    stages = b["pipeline_stage_s_median"]
    stage_rows = "\n".join(f"| {k} | {v * 1000:.1f} ms |" for k, v in stages.items())
    ablation_rows = []
    ref, chain = None, True  # gain against the row above along the chain, then against its end
    for row in a["steps"]:
        gain = "" if ref is None else f"x{ref / row['frame_s']:.2f}"
        ablation_rows.append(f"| {row['step']} | {row['frame_s']:.2f} | {row['patches_per_s']:.0f} | "
                             f"{row['gflops']:.1f} | {pct(row['fraction_of_matmul'])} | "
                             f"x{row['speedup_vs_eager']:.2f} | {gain} |")
        if chain:
            ref = row["frame_s"]
            chain = not row["step"].startswith("+ channels")
    ablation_table = "\n".join(ablation_rows)
    return f"""# Performance

What the scorer and the daemon reach on a machine, against that machine's own limit (a large
fp32 matmul measured in the same run). Produced by `benchmarks/performance.py`, which runs
`edge-agent bench --json` and `benchmarks/ablation.py`; the raw JSON is in `benchmarks/results/`.
Only ratios inside one run are meaningful here: the measuring machine is shared (see the load).

## The machine and the run

| | |
|---|---|
| CPU | {b['device']}, {b['cpu_count']} cores, {b['threads']} torch threads, AVX-512 with avx512_bf16 (no AMX) |
| torch | {b['torch']} |
| load average (1, 5, 15 min) | before bench: `{b['uptime_before'].split('load average:')[-1].strip()}`; after: `{b['uptime_after'].split('load average:')[-1].strip()}` |
| command | `{' '.join(BENCH_CMD)}` (defaults: seed VAE, 640x480, P=96, S=16, batch 512, 3 repeats, 8 pipeline frames, 5 latency frames, 6 test frames) |
| model | {b['model']}: Nc=32, Nz=100, 1 channel, exported through `fit.export` like `edge-agent train` |

The machine had other users during the run (load above its 2 cores), so absolute numbers
are low and noisy; matmul and scorer timings are interleaved and best-of-3 so that their
ratio still means something.

## Results against the goals (issue 7)

| measure | value | goal | |
|---|---|---|---|
| matmul fp32 (2048^3, best) | {b['matmul_gflops']:.1f} GFLOP/s | (the reference) | |
| scorer fp32 | {b['scorer_patches_per_s']['fp32']:.0f} patches/s = {b['scorer_gflops']:.1f} GFLOP/s = **{pct(frac)}** of matmul | >= 65 % | {goal(frac >= 0.65)} |
| matmul bf16 (2048^3, best) | {b['matmul_bf16_gflops']:.1f} GFLOP/s = x{b['matmul_bf16_over_fp32']:.2f} fp32: the ceiling for the bf16 speedup on this CPU | | |
| scorer bf16 | {b['scorer_patches_per_s']['bf16']:.0f} patches/s = {b['bf16_gflops']:.1f} GFLOP/s = {pct(b['bf16_gflops'] / b['matmul_bf16_gflops'])} of bf16 matmul, **x{speed:.2f}** fp32 | >= x2.5 | {goal(speed >= 2.5)} |
| bf16 max relative score error | {err:.2e} (mean {b['bf16_mean_rel_score_error']:.1e}) over {b['test_frames']['good'] + b['test_frames']['defect']} frames x {b['patches_per_frame']} patches | <= 1e-3 | {goal(err <= 1e-3)} |
| bf16 verdicts identical | {b['bf16_verdicts_identical']} at the bench threshold; {b['bf16_verdicts_identical_every_gap']} for a threshold in every gap between the frames' scores ({b['test_frames']['good']} good + {b['test_frames']['defect']} defective station frames) | identical | {goal(b['bf16_verdicts_identical'] and b['bf16_verdicts_identical_every_gap'])} |
| pipeline (real daemon, fp32) | {b['pipeline_frames_per_s']:.3f} frames/s = **{eff:.2f}** x scorer-only ({b['scorer_frames_per_s']:.3f} frames/s, the infer stage of the same frames); {b['pipeline_efficiency_vs_scorer_phase']:.2f} x the bench's separate scorer phase | >= 0.95 | {goal(eff >= 0.95)} |
| single-frame latency | p50 {b['latency_p50_s']:.2f} s, p99 {b['latency_p99_s']:.2f} s = **{lat:.2f}** x its scoring time (p99 over {b['latency_frames']} frames) | <= 1.2 | {goal(lat <= 1.2)} |
| RSS growth | {b['rss_growth_mb']:+.1f} MB over {b['rss_frames']} frames ({b['rss_mb_first']:.0f} -> {b['rss_mb_last']:.0f} MB) | flat over 10,000 frames | see below |

FLOPs: {b['flops_per_patch'] / 1e6:.1f} MFLOP per patch, {b['flops_per_frame'] / 1e12:.3f} TFLOP per 875-patch
frame (multiply-adds x 2, counted from the layer shapes in `bench.vae_flops_per_patch`: five
4x4/2 convs 1->32->...->512, fc 4608->200, fc 100->4608, five 4x4/2 deconvs back to 2 channels;
each inner conv/deconv is 18.9 M MACs, the first conv 1.2 M and the last deconv 2.4 M).

## What each optimisation bought (CPU, fp32 unless said)

`benchmarks/ablation.py`: the same 875-patch station frame through the real `Scorer`, one
setting changed per row, interleaved with the matmul (best {a['matmul_gflops']:.1f} GFLOP/s),
best of {a.get('repeats', 3)}. Load average 1 min: {a['load_average_1m'][0]:.2f} before, {a['load_average_1m'][-1]:.2f} after.
"gain" is against the row above down to "+ channels-last" (batch 512), and against that row
for the rest. At this load a single timing varies by about +-10 %, so only gains well above
that mean something.

| step | s/frame | patches/s | GFLOP/s | of fp32 matmul | vs eager | gain |
|---|---|---|---|---|---|---|
{ablation_table}

- **BatchNorm folding at export** (`nets.fold_decoder_batchnorm`, called by `fit.export`):
  freezing folds Conv2d + BatchNorm (the encoder) but never ConvTranspose2d + BatchNorm or
  Linear + BatchNorm2d (the decoder), so the export does it; exact up to rounding. Artifacts
  exported before this still load and score, without this gain. In the eager row it is lost in
  the noise; in the frozen path the profiler (one 438-patch batch, same session) showed
  2.33 s -> 2.24 s.
- **Freezing** (`torch.jit.freeze` on a wrapper whose forward is the chosen score, so the score
  name is a constant and the other branches fold away; `optimize_for_inference` then prepacks
  the convolutions for oneDNN). Freezing the loaded module directly keeps `score` only with
  `preserved_attrs`, and optimize_for_inference only rewrites `forward`, hence the wrapper. The
  module as loaded stays for `scores()`/`pixel_map()` and for scores other than the chosen one.
  The frozen score is checked against the module at load; any mismatch or failure logs a
  warning and keeps the eager path.
- **Channels-last** input (and weights before freezing) lets oneDNN pick NHWC kernels for
  conv and deconv without reorders.
- **Batch size**: equal batches (875 at 512 -> 438 + 437, not 512 + 363). With the frozen
  channels-last path the batch size matters little: the rows from 64 to 875 agree within about
  10 % (noise at this load), so the config default 512 stays; in eager mode small batches
  cost more (the explorations before the fast path: batch 32 ran at ~60 % of batch 256).
- **Threads**: torch's default is the physical core count (2 here). On this machine, loaded
  well beyond its 2 cores by other users, one thread can match or beat two: a 2-thread team
  waits at every barrier for its preempted partner. On a station (an otherwise idle machine)
  the default should win; measure there with `edge-agent bench --threads N`. `Scorer(threads=N)`
  sets it for the daemon's process.
- **bf16**: see below.

Where the fp32 time goes (torch profiler on the frozen score, batch 438): the encoder runs as
one chain of oneDNN convolutions (conv+BN folded, ReLU fused) at about the matmul rate; the
five transposed convolutions of the decoder take ~45 % of the time at a lower rate, and the
decoder's separate ReLUs, the softplus/sigmoid and the score reduction ~10 %. That is the
remaining gap: `optimize_for_inference` has no oneDNN rewrite for ConvTranspose2d, so each
deconv runs alone with its ReLU as a second pass. Next steps, not done here: express each
4x4/2 deconv as a conv producing 4 sub-pixel phases + pixel shuffle (so it joins the oneDNN
chain with a fused ReLU), or compile the score with torch.compile/Inductor (an artifact format
question, SPEC 3).

Profiler, one 438-patch batch of the frozen fp32 score, same session: 2.80 s with a dtype cast
before every layer, 2.33 s with casts only at the first and last conv, 2.24 s with the decoder
BatchNorms folded at export.

Two traps found on the way, both would have cost the fast path silently: a dtype cast between
a conv and its BatchNorm stops freezing from folding them, and a cast between two convs makes
optimize_for_inference convert to and from oneDNN layout around every layer (~20 % of a frame).
`nets.Layers` therefore casts only at the first and last conv.

## bf16: the mixed policy and why

This CPU has AVX512-BF16 but no AMX: a bf16 dot-product instruction does twice the
multiply-adds of an fp32 FMA, so bf16 tops out around 2x fp32 (the bf16 matmul in this run:
x{b['matmul_bf16_over_fp32']:.2f}), not the ~8-16x AMX tiles give. x2.5 over an fp32 path that
already runs at {pct(frac)} of the fp32 matmul is out of reach on this CPU; re-measure on an AMX
machine (Sapphire Rapids or later), where `pick_dtype("auto")` already chooses bf16. The
fp32 gains above (BN folding, the oneDNN chain) narrowed the bf16 ratio too: freezing builds
the prepacked oneDNN chain for fp32 only, so bf16 runs plain aten convolutions and reaches
{pct(b['bf16_gflops'] / b['matmul_bf16_gflops'])} of the bf16 matmul where fp32 reaches {pct(frac)} of its own. Getting bf16 to
the same share would give x{b['matmul_bf16_over_fp32']:.2f} (the matmul ratio) at best on this CPU, still short of x2.5.

Two findings made the bf16 path correct (it failed outright before: a float32 latent into a
bf16 decoder):
1. **Patches stay float32.** The score's residual `mu_x - x` must use the exact pixels; feeding
   bf16-rounded patches put ~3 % (systematic) into the seed VAE's score. The layers now cast
   their input to their own weight dtype (`nets.Layers`), so the module takes float32 patches
   in any precision.
2. **The output layer stays float32, and is never cast down and back.** The last deconv gives
   the logits of `mu_x` and `sigma_x`; casting the whole module to bf16 and the last layer back
   left its weights bf16-rounded (~0.08 % max error). `scoring.reduced_precision` casts every
   layer except the last; the last is ~1.5 % of the FLOPs.
With both, the seed VAE's max relative error is {err:.1e}. **Caveat**: with random weights the
decoder's output is dominated by its bias, which flatters the error. On the tiny *trained*
model of the test suite (P=32, Nc=4, Nz=4, one epoch) the max relative error is 0.17 % per
image (median image 0.11 %): above the 0.1 % goal, from the bf16 activations themselves (keeping
only the output layer in fp32 brings it from 0.17 % only to 0.14 %). Verdicts on its test
images stay identical (`tests/test_bench.py` asserts < 1 % and the same decisions). So the
0.1 % goal is met for the seed VAE as the issue defines it, not shown for trained models: a
station running bf16 should calibrate in bf16 (same scorer as in production), and a station
whose threshold sits within ~0.5 % of its good parts' scores should stay on fp32. Artifacts exported before this change cannot run
in bf16/fp16; the Scorer says so at load and names the fix (re-export, or precision fp32).

## Pipeline, latency, memory

The pipeline run is the real daemon (`daemon.run`): a 640x480 MJPG video file looped by the
capture thread, the infer thread, and the real `MqttPublisher` to an embedded mosquitto on a
free port ({b['pipeline_publisher']}), heatmaps on every frame. Median stage times per frame:

| stage | median |
|---|---|
{stage_rows}

Scoring is ~99 % of a frame on this CPU, so capture, patch extraction, decision, heatmap
encoding and publishing cost ~1 % even without overlap; capture and decode already run on
their own thread ahead of inference (queue of 2), and the publisher never blocks. Moving the
heatmap off the infer thread would buy < 1 % here and was left out (pipeline.py unchanged).
On a GPU, where a frame scores in milliseconds, that choice must be re-measured.

Latency: single frames at two thirds of the scorer's rate (`source.fps`), measured from
`captured_at` (stamped after the read) to the verdict handed to the publisher. The difference
to the scoring time is queue wake-up, patch extraction and the heatmap.

Memory: RSS at each verdict of the throughput run (one daemon, one model):
{b['rss_mb_per_frame']} MB. It moves by tens of MB as the batch buffers are allocated and
freed and ends where it started; that is {b['rss_frames']} frames, not 10,000, so "flat over
10,000 frames" is not shown here: the 10,000-frame soak is `benchmarks/soak.py` (branch
`reliab`). The patch grid and ignore mask are cached per frame size, and the CUDA runner
reuses its pinned buffers.

## GPU (not measured in this task)

No GPU was available for this work, so nothing in this section is measured. Implemented in
`scoring._CudaRunner` and exercised by the `gpu`-marked tests (skipped without CUDA):
- patches are copied into a **pinned** staging buffer (two of them), uploaded with
  **non_blocking** copies on a **side stream**, so batch i+1 uploads while batch i computes;
- each full batch replays a **CUDA graph** captured at load for the fixed batch shape (the last
  batch of a frame is zero-padded; its padded scores are dropped); graph capture failure
  falls back to plain stream execution;
- scores come back with a non-blocking copy into pinned memory, one synchronisation per frame;
- precision fp16 or bf16 (`model.precision`), with the same mixed policy (fp32 output layer,
  fp32 patches). The matmul reference runs with TF32 off; cuDNN convolutions use TF32 by
  torch's default, so an fp32 scorer "fraction of matmul" above 100 % on an Ampere+ GPU means
  TF32, not a measuring error.

To measure on a GPU machine:

    edge-agent bench --device cuda --json            # fp32 scorer, fp16 as the reduced precision
    edge-agent bench --device cuda --precision fp16  # pipeline and latency in fp16
    pytest -m gpu tests/test_bench.py

Record the device name, patches/s, frames/s and p50/p99 latency from the JSON, and compare
pipeline_efficiency there: on a GPU the heatmap encode may no longer be negligible.

## Reproduce

    PYTHONPATH=. python benchmarks/performance.py   # both runs, then this page
    edge-agent bench                                 # human summary
    edge-agent bench --tiny --json                   # seconds; a smoke run, not a measurement
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only rewrite the page from benchmarks/results/")
    args = ap.parse_args()
    if not args.render:
        measure()
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()

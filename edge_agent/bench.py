"""`edge-agent bench`: how close the scorer and the daemon pipeline come to this machine's limits.

Everything is measured in one run so ratios (scorer / matmul, bf16 / fp32, pipeline / scorer) are
comparable even on a busy machine. Without a model it exports the seed VAE (random weights)
through the same code path as `edge-agent train`. docs/PERFORMANCE.md explains the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    model: Path | None = None
    device: str = "cpu"
    frames: int = 8  # through the daemon pipeline
    latency_frames: int = 5  # single frames at low load
    test_frames: int = 6  # synthetic test set (half good, half defective) for bf16 vs fp32
    repeats: int = 3  # best-of for matmul and scorer timings
    batch_size: int = 512
    threads: int | None = None
    precision: str = "fp32"  # of the pipeline and latency runs
    tiny: bool = False  # a tiny model and frame: tests and smoke runs, not a measurement
    frame_w: int = 640
    frame_h: int = 480


# Seed protocol (SPEC 2.1/2.5): VAE Nc=32, Nz=100 on 96x96 gray patches, stride 16.
SEED = dict(patch_size=96, stride=16, nc=32, nz=100)
TINY = dict(patch_size=32, stride=16, nc=4, nz=4)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int | None = None, repeats: int = 3,
                  dtype: torch.dtype = torch.float32) -> float:
    """Best-of n x n @ n x n: the machine's practical dense throughput (fp32: TF32 off on CUDA)."""
    n = n or (4096 if device.type == "cuda" else 2048)
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def vae_flops_per_patch(channels: int, patch_size: int, nc: int, nz: int) -> float:
    """Multiply-adds x 2 of the seed VAE from its layer shapes (conv/deconv 4x4, the two linear layers)."""
    from edge_agent.train.nets import encoder_sizes

    sizes = encoder_sizes(patch_size)
    macs, c_in = 0, channels
    for n in range(len(sizes) - 1):  # conv: every output pixel reads 4x4 x c_in
        c_out = nc * 2**n
        macs += sizes[n + 1] ** 2 * c_out * c_in * 16
        c_in = c_out
    flat = c_in * sizes[-1] ** 2
    macs += flat * 2 * nz + nz * flat  # encoder fc to (mu, logvar); decoder fc from z
    for n in range(len(sizes) - 2, -1, -1):  # deconv: every input pixel writes 4x4 x c_out
        c_out = 2 * channels if n == 0 else nc * 2 ** (n - 1)
        macs += sizes[n + 1] ** 2 * c_in * c_out * 16
        c_in = c_out
    return 2.0 * macs


def station_frame(seed: int, defect: str | None, w: int, h: int) -> np.ndarray:
    """A w x h BGR frame of synthetic parts (edge_agent.synth), so patches look like the station's."""
    from edge_agent.synth import make_part

    part = make_part(seed, defect, size=h).image
    filler = make_part(seed + 7_919, None, size=h).image
    row = np.hstack([part] + [filler] * (-(-w // h) - 1))[:, :w]
    return cv2.cvtColor(row, cv2.COLOR_GRAY2BGR)


def export_seed(out: Path, tiny: bool, frame_w: int, frame_h: int) -> dict[str, Any]:
    """The seed VAE with random weights, eval mode, exported like a trained artifact (threshold set later)."""
    from edge_agent.train.fit import TrainOptions, build_model, export

    torch.manual_seed(0)
    opts = TrainOptions(model="vae", channels=1, name="bench-seed-vae", **(TINY if tiny else SEED))
    training = {"data_dir": None, "images": 0, "note": "random weights: edge-agent bench, not trained"}
    return export(build_model(opts), opts, out, frame_h, frame_w, training,
                  thresholds={"m": {"value": 1e30, "method": "bench", "description": "placeholder; bench sets it"}})


def _time_frames(scorer, frames: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
    scores, seconds = [], []
    for image in frames:
        grid, patches = scorer.patches(image)
        _sync(scorer.device)
        t0 = time.perf_counter()
        scores.append(scorer.score_patches(patches))
        seconds.append(time.perf_counter() - t0)
    return scores, seconds


def _threshold_between(good_max: list[float], others: list[float]) -> float:
    """Midway in the gap above the highest good frame, as a calibrated threshold sits between samples."""
    top = max(good_max)
    above = [s for s in others if s > top]
    return (top + min(above)) / 2 if above else top * 1.01


def run_bench(opts: BenchOptions, workdir: Path | None = None) -> dict[str, Any]:
    from edge_agent.scoring import Scorer, pick_device

    device = pick_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    w, h = (128, 128) if opts.tiny else (opts.frame_w, opts.frame_h)
    tmp = tempfile.TemporaryDirectory(prefix="edge-agent-bench-") if workdir is None else None
    root = Path(tmp.name) if tmp else workdir
    try:
        model = opts.model
        if model is None:
            model = root / "seed-vae.pt"
            export_seed(model, opts.tiny, w, h)
        fp32 = Scorer(model, device=str(device), precision="fp32", batch_size=opts.batch_size, threshold=0.0)
        card = fp32.card
        w = int(card["input"].get("frame_width") or w)
        h = int(card["input"].get("frame_height") or h)
        reduced = "bf16" if device.type == "cpu" else "fp16"
        low = Scorer(model, device=str(device), precision=reduced, batch_size=opts.batch_size, threshold=0.0)
        half = opts.test_frames // 2
        good = [station_frame(200_000 + i, None, w, h) for i in range(opts.test_frames - half)]
        bad = [station_frame(300_000 + i, "random", w, h) for i in range(half)]
        frames = good + bad

        low_dtype = torch.bfloat16 if reduced == "bf16" else torch.float16
        mm, mm16, t32, t16 = [], [], [], []
        s32 = s16 = []
        for _ in range(opts.repeats):  # interleaved, so load changes hit all of them alike
            mm.append(matmul_gflops(device, repeats=2))
            mm16.append(matmul_gflops(device, repeats=2, dtype=low_dtype))
            s32, sec = _time_frames(fp32, frames)
            t32 += sec
            s16, sec = _time_frames(low, frames)
            t16 += sec
        grid = fp32.grid(h, w)
        flops = _flops(card)
        best = max(mm)
        pps32 = grid.count / min(t32)
        pps16 = grid.count / min(t16)
        a, b = np.concatenate(s32), np.concatenate(s16)
        rel = np.abs(b.astype(np.float64) - a) / np.maximum(np.abs(a.astype(np.float64)), 1e-12)
        threshold = _threshold_between([float(s.max()) for s in s32[: len(good)]], [float(s.max()) for s in s32])
        v32 = [bool(s.max() > threshold) for s in s32]
        v16 = [bool(s.max() > threshold) for s in s16]
        margins = [abs(float(s.max()) / threshold - 1) for s in s32]
        # Stricter than one threshold: the same decisions for a threshold in every gap between frames.
        tops32 = sorted(float(s.max()) for s in s32)
        gaps = [(x + y) / 2 for x, y in zip(tops32, tops32[1:])]
        every_gap = all([bool(s.max() > t) for s in s32] == [bool(s.max() > t) for s in s16] for t in gaps)

        result: dict[str, Any] = {
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "model": "seed VAE (random weights)" if opts.model is None else str(model),
            "frame": f"{w}x{h}", "patch_size": fp32.patch_size, "stride": fp32.stride,
            "patches_per_frame": grid.count, "batch_size": opts.batch_size,
            "flops_per_patch": flops, "flops_per_frame": flops * grid.count if flops else None,
            "matmul_gflops": best, "matmul_gflops_runs": mm,
            # The reduced-precision ceiling of this machine: bf16_speedup cannot beat this ratio.
            f"matmul_{reduced}_gflops": max(mm16), f"matmul_{reduced}_over_fp32": max(mm16) / best,
            "scorer_patches_per_s": {"fp32": pps32, reduced: pps16},
            "scorer_frame_s": {"fp32": min(t32), reduced: min(t16),
                               "fp32_median": statistics.median(t32), f"{reduced}_median": statistics.median(t16)},
            "scorer_gflops": pps32 * flops / 1e9 if flops else None,
            "scorer_fraction_of_matmul": pps32 * flops / 1e9 / best if flops else None,
            f"{reduced}_gflops": pps16 * flops / 1e9 if flops else None,
            f"{reduced}_speedup": pps16 / pps32,
            f"{reduced}_max_rel_score_error": float(rel.max()),
            f"{reduced}_mean_rel_score_error": float(rel.mean()),
            f"{reduced}_verdicts_identical": v32 == v16,
            f"{reduced}_verdicts_identical_every_gap": every_gap,
            "test_frames": {"good": len(good), "defect": len(bad), "threshold": threshold,
                            "closest_frame_to_threshold_rel": min(margins),
                            "fp32_anomalous": sum(v32), f"{reduced}_anomalous": sum(v16)},
        }
        del fp32, low
        if opts.model is None:  # the pipeline runs decide against this threshold, as a calibrated station would
            _set_threshold(model, threshold)
        result.update(_pipeline(model, frames, root, opts, median_frame_s=statistics.median(t32)
                                if opts.precision == "fp32" else statistics.median(t16)))
        return result
    finally:
        if tmp:
            tmp.cleanup()


def _set_threshold(model: Path, value: float) -> None:
    from edge_agent import artifact

    def change(card: dict[str, Any]) -> dict[str, Any]:
        card["thresholds"]["m"] = {"value": value, "method": "bench",
                                   "description": "midway above the highest good test frame (bench only)"}
        return card

    artifact.update_card(model, change)


def _flops(card: dict[str, Any]) -> float | None:
    arch = card.get("architecture", {})
    if card.get("family") != "vae" or "nc" not in arch:
        return None
    return vae_flops_per_patch(int(card["input"]["channels"]), int(card["patch"]["size"]), int(arch["nc"]),
                               int(arch["nz"]))


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()


def _daemon_run(config: Path, frames: int) -> list[tuple[float, dict[str, Any], float]]:
    """The real daemon (capture thread, infer thread, MqttPublisher, embedded mosquitto): (arrival, verdict, rss)."""
    from edge_agent.daemon import run

    got: list[tuple[float, dict[str, Any], float]] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        run(config, [], frames, lambda v: got.append((time.time(), v, rss_mb())))
    finally:
        for sig, handler in handlers.items():  # the daemon installs its own; give the caller's back
            signal.signal(sig, handler)
    return got


def _pipeline(model: Path, frames: list[np.ndarray], root: Path, opts: BenchOptions,
              median_frame_s: float) -> dict[str, Any]:
    from edge_agent.broker import find_mosquitto, free_port

    video = root / "station.avi"
    _write_video(video, frames)
    mqtt = f'embedded = true\nport = {free_port()}' if find_mosquitto() else 'host = "127.0.0.1"\nport = 1'
    base = (f'[station]\nid = "bench"\n[model]\npath = "{model}"\ndevice = "{opts.device}"\n'
            f'precision = "{opts.precision}"\nbatch_size = {opts.batch_size}\n[mqtt]\n{mqtt}\nheatmap = "all"\n'
            f'[outbox]\ndir = "{root / "outbox"}"\nflush_timeout_s = 2.0\n[metrics]\nenabled = false\n'
            f'[logging]\nlevel = "WARNING"\n')
    config = root / "bench.toml"
    config.write_text(base + f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\n')
    runs = _daemon_run(config, max(2, opts.frames))
    arrivals = [t for t, _, _ in runs]
    # Steady rate between the first and the last verdict: excludes start-up and the first frame.
    fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    inference = [v["latency_s"].get("inference", float("nan")) for _, v, _ in runs]
    # Scorer-only time of the same frames at the same moment: the infer stage (score_patches alone).
    in_run_s = sum(inference[1:]) / max(1, len(inference) - 1)
    stages = sorted({k for _, v, _ in runs for k in v["latency_s"]})
    stage_s = {k: statistics.median(v["latency_s"].get(k, 0.0) for _, v, _ in runs) for k in stages}
    # Low load: frames come at 1/1.5 of the scorer's rate, so none waits for another.
    period_s = 1.5 * median_frame_s
    config.write_text(base + f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\nfps = {1 / period_s:.6g}\n')
    single = _daemon_run(config, max(2, opts.latency_frames))
    latency = [t - v["captured_at"] for t, v, _ in single]
    scoring = [v["latency_s"].get("inference", float("nan")) for _, v, _ in single]
    rss = [r for _, _, r in runs]  # one daemon's frames; the latency run loads a second model
    ratio = [lat / s for lat, s in zip(latency, scoring)]
    return {
        "pipeline_frames": len(runs), "pipeline_precision": opts.precision,
        "pipeline_publisher": "MqttPublisher -> embedded mosquitto" if find_mosquitto() else
        "MqttPublisher -> no broker (outbox only; mosquitto not installed)",
        "pipeline_frames_per_s": fps,
        "scorer_frames_per_s": 1.0 / in_run_s,
        # pipeline fps / scorer-only fps, scorer-only = the infer stage of the same frames in the same
        # run (immune to load changes between bench phases); the bench's own scorer phase for reference.
        "pipeline_efficiency": fps * in_run_s,
        "pipeline_efficiency_vs_scorer_phase": fps * median_frame_s,
        "scorer_phase_frames_per_s": 1.0 / median_frame_s,
        "pipeline_inference_s_median": statistics.median(inference),
        "pipeline_stage_s_median": stage_s,
        "latency_frames": len(single),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "latency_scoring_p50_s": float(np.percentile(scoring, 50)),
        "latency_over_scoring_p99": float(np.percentile(ratio, 99)),
        "rss_mb_first": rss[0], "rss_mb_last": rss[-1],
        "rss_growth_mb": rss[-1] - rss[0],
        "rss_frames": len(rss),
        "rss_mb_per_frame": [round(r, 1) for r in rss],
        "rss_mb_after_latency_run": single[-1][2],
    }


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, default=float)


def summary(r: dict[str, Any]) -> str:
    red = "bf16" if r["device_type"] == "cpu" else "fp16"
    frac = r["scorer_fraction_of_matmul"]
    lines = [
        f"device {r['device']} ({r['threads']} threads), torch {r['torch']}, load {r['load_average'][0]:.2f}",
        f"matmul fp32        {r['matmul_gflops']:8.1f} GFLOP/s",
        f"scorer fp32        {r['scorer_patches_per_s']['fp32']:8.1f} patches/s"
        + (f"  {r['scorer_gflops']:.1f} GFLOP/s = {frac:.0%} of matmul" if frac else ""),
        f"scorer {red}        {r['scorer_patches_per_s'][red]:8.1f} patches/s  x{r[f'{red}_speedup']:.2f}, "
        f"max rel error {r[f'{red}_max_rel_score_error']:.2e}, verdicts identical: {r[f'{red}_verdicts_identical']}",
        f"pipeline           {r['pipeline_frames_per_s']:8.3f} frames/s = {r['pipeline_efficiency']:.0%} of scorer-only "
        f"({r['pipeline_publisher']})",
        f"latency            p50 {r['latency_p50_s']:.3f} s, p99 {r['latency_p99_s']:.3f} s "
        f"(p99 {r['latency_over_scoring_p99']:.2f} x scoring)",
        f"rss growth         {r['rss_growth_mb']:+.1f} MB over {r['rss_frames']} frames",
    ]
    return "\n".join(lines)

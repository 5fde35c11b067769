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
import threading
import time
import urllib.request
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
    batch_size: int = 64  # the config default: activations stay in cache on a CPU
    threads: int | None = None
    precision: str = "fp32"  # of the pipeline and latency runs
    tiny: bool = False  # a tiny model and frame: tests and smoke runs, not a measurement
    train_steps: int = 3  # timed VAE train steps per precision (0: skip the training measurement)
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


# GEMM shapes tried for the machine's limit: square, and the tall-skinny shapes convolutions lower to.
GEMM_SHAPES = {"cpu": ((1024, 1024, 1024), (2048, 2048, 2048), (8192, 512, 512), (4096, 1024, 2048)),
               "cuda": ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096))}


def gemm_gflops(device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, repeats: int = 2,
                clock=time.perf_counter) -> float:
    """Best-of (m x k) @ (k x n) in GFLOP/s; clock=time.process_time counts only the time this process ran."""
    m, k, n = shape
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - t0)
    return 2 * m * k * n / max(best, 1e-9) / 1e9


def matmul_limit(device: torch.device, dtype: torch.dtype, repeats: int = 2, thread_counts: list[int] | None = None,
                 clock=time.perf_counter) -> dict[str, Any]:
    """This machine's limit for dtype: the best GFLOP/s over GEMM_SHAPES and thread counts (1 and torch's
    default on CPU; under load one thread can beat two). The reference every scorer fraction divides by."""
    default = torch.get_num_threads()
    counts = thread_counts or (sorted({1, default}) if device.type == "cpu" else [default])
    runs = []
    try:
        for t in counts:
            torch.set_num_threads(t)
            for shape in GEMM_SHAPES[device.type]:
                runs.append({"shape": "x".join(map(str, shape)), "threads": t,
                             "gflops": gemm_gflops(device, shape, dtype, repeats, clock)})
    finally:
        torch.set_num_threads(default)
    best = max(runs, key=lambda r: r["gflops"])
    return {"gflops": best["gflops"], "shape": best["shape"], "threads": best["threads"], "runs": runs}


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
        scores.append(scorer.score_frame(grid, patches))
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
        model = opts.model.resolve() if opts.model is not None else None  # the daemon config lives in a temp dir
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
        lim32, lim16 = [], []
        s32 = s16 = []
        for _ in range(opts.repeats):  # interleaved, so load changes hit all of them alike
            lim32.append(matmul_limit(device, torch.float32, repeats=1))
            lim16.append(matmul_limit(device, low_dtype, repeats=1))
            mm.append(lim32[-1]["gflops"])
            mm16.append(lim16[-1]["gflops"])
            s32, sec = _time_frames(fp32, frames)
            t32 += sec
            s16, sec = _time_frames(low, frames)
            t16 += sec
        grid = fp32.grid(h, w)
        flops = _flops(card)
        best = max(mm)
        best16 = max(mm16)
        limit32 = max(lim32, key=lambda r: r["gflops"])
        limit16 = max(lim16, key=lambda r: r["gflops"])
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
            f"matmul_{reduced}_gflops": best16, f"matmul_{reduced}_over_fp32": best16 / best,
            "matmul_limit": {"fp32": {k: limit32[k] for k in ("gflops", "shape", "threads")},
                             reduced: {k: limit16[k] for k in ("gflops", "shape", "threads")},
                             "shapes": [r["shape"] for r in limit32["runs"] if r["threads"] == limit32["runs"][0]["threads"]],
                             "thread_counts": sorted({r["threads"] for r in limit32["runs"]})},
            "fp32_fraction_of_fp32_matmul": pps32 * flops / 1e9 / best if flops else None,
            f"{reduced}_fraction_of_{reduced}_matmul": pps16 * flops / 1e9 / best16 if flops else None,
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
        if device.type == "cpu" and flops:
            patches = fp32.patches(frames[0])[1][: -(-grid.count // 2)]  # half a frame (438 at 640x480)
            result["per_core"] = _per_core({"fp32": fp32, reduced: low}, patches, flops, opts.repeats)
        if opts.train_steps and device.type == "cpu":
            result["training"] = _training(good, opts, {"fp32": best, reduced: best16})
        del fp32, low
        if opts.model is None:  # the pipeline runs decide against this threshold, as a calibrated station would
            _set_threshold(model, threshold)
        result.update(_pipeline(model, frames, root, opts, median_frame_s=statistics.median(t32)
                                if opts.precision == "fp32" else statistics.median(t16)))
        return result
    finally:
        if tmp:
            tmp.cleanup()


def _per_core(scorers: dict[str, Any], patches: torch.Tensor, flops_per_patch: float, repeats: int) -> dict[str, Any]:
    """One thread timed by CPU time (time.process_time): the time other processes take from this one is not
    counted, so on a shared machine these fractions hold where wall-clock ones swing with the load."""
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    limits: dict[str, list[float]] = {k: [] for k in scorers}
    rates: dict[str, list[float]] = {k: [] for k in scorers}
    try:
        for _ in range(repeats):
            for name, scorer in scorers.items():
                limits[name].append(matmul_limit(torch.device("cpu"), scorer.dtype, 1, [1], time.process_time)["gflops"])
                t0 = time.process_time()
                scorer.forward_patches(patches)  # the network alone: a map model's head needs whole frames
                rates[name].append(patches.shape[0] * flops_per_patch / (time.process_time() - t0) / 1e9)
    finally:
        torch.set_num_threads(default)
    return {"threads": 1, "clock": "process_time", "patches": patches.shape[0],
            "matmul_gflops": {k: max(v) for k, v in limits.items()},
            "scorer_gflops": {k: max(v) for k, v in rates.items()},
            "fraction_of_own_matmul": {k: max(rates[k]) / max(limits[k]) for k in scorers}}


def _training(good: list[np.ndarray], opts: BenchOptions, limit: dict[str, float]) -> dict[str, Any]:
    """VAE train steps at the bench's patch size (seed: P=96, Nc=32, Nz=100, fit's default batch 64)."""
    from edge_agent.patches import to_tensor
    from edge_agent.train.fit import TrainOptions
    from edge_agent.train.throughput import train_throughput

    shape = TINY if opts.tiny else SEED
    train = TrainOptions(model="vae", channels=1, patch_size=shape["patch_size"], nc=shape["nc"], nz=shape["nz"])
    images = [to_tensor(f, 1) for f in good]
    return train_throughput(images, train, opts.train_steps, limit)


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


def _poll_once(base: str, since: int) -> int:
    """One poll of an open station page: the state, the verdicts after `since`, the latest image; returns last_seq."""
    with urllib.request.urlopen(base + "/api/state", timeout=5) as r:
        state = json.loads(r.read())
    if state["last_seq"] > since:
        with urllib.request.urlopen(f"{base}/api/verdicts?since={since}", timeout=5) as r:
            r.read()
        if state["latest"]["image"]:
            with urllib.request.urlopen(base + state["latest"]["image"], timeout=5) as r:
                r.read()
    return int(state["last_seq"])


def _poll_page(port: int, stop: threading.Event, period_s: float, counts: dict[str, int]) -> None:
    base, since = f"http://127.0.0.1:{port}", 0
    while not stop.wait(period_s if counts["polls"] else 0.02):  # at once when the page comes up, then periodic
        try:
            since = _poll_once(base, since)
            counts["polls"] += 1
        except (OSError, ValueError, KeyError):
            counts["errors"] += 1  # before the page is up, after it stops


def _page_cost(verdicts: list[dict[str, Any]], image: np.ndarray, polls: int = 100) -> dict[str, float]:
    """The page's cost apart from load noise: the infer thread's hook per verdict, the server's CPU per poll."""
    from edge_agent.state import StationState
    from edge_agent.web import StationPage

    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    state = StationState("bench")
    t0 = time.perf_counter()
    for v in verdicts:
        state.verdict(v, jpeg, image)
    hook_s = (time.perf_counter() - t0) / max(1, len(verdicts))
    page = StationPage(state, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{page.start()}"
    try:
        last = _poll_once(base, 0)
        client0, process0 = time.thread_time(), time.process_time()
        for _ in range(polls):
            _poll_once(base, last - 1)  # one new verdict per poll, as at one frame per second
        server_s = (time.process_time() - process0) - (time.thread_time() - client0)
    finally:
        page.stop()
    return {"page_hook_us_per_verdict": hook_s * 1e6, "page_server_cpu_ms_per_poll": server_s / polls * 1e3,
            "page_cost_polls": polls}


def _rate(runs: list[tuple[float, dict[str, Any], float]]) -> tuple[float, float]:
    """(steady frames/s between the first and the last verdict, mean infer-stage seconds after the first frame)."""
    arrivals = [t for t, _, _ in runs]
    fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    inference = [v["latency_s"].get("inference", float("nan")) for _, v, _ in runs]
    return fps, sum(inference[1:]) / max(1, len(inference) - 1)


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
    no_page = "[web]\nenabled = false\n"
    config = root / "bench.toml"
    source = f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\n'
    config.write_text(base + no_page + source)
    runs = _daemon_run(config, max(2, opts.frames))
    # The same run with the station page served and polled 4x as often as an open page polls.
    page_port, poll_period_s, polls = free_port(), 0.25, {"polls": 0, "errors": 0}
    config.write_text(base + f"[web]\nport = {page_port}\n" + source)
    stop = threading.Event()
    poller = threading.Thread(target=_poll_page, args=(page_port, stop, poll_period_s, polls), name="bench-page",
                              daemon=True)
    poller.start()
    try:
        polled = _daemon_run(config, max(2, opts.frames))
    finally:
        stop.set()
        poller.join(10)
    polled_fps, polled_in_run_s = _rate(polled)
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
    config.write_text(base + no_page + f'[source]\nkind = "file"\nuri = "{video}"\nloop = true\n'
                      f'fps = {1 / period_s:.6g}\n')
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
        # The station page's cost: the same pipeline run while a client polls the page every 0.25 s.
        "page_polled_frames_per_s": polled_fps,
        "page_polled_efficiency": polled_fps * polled_in_run_s,
        "page_overhead": 1.0 - (polled_fps * polled_in_run_s) / (fps * in_run_s),
        "page_polls": polls["polls"], "page_poll_period_s": poll_period_s,
        **_page_cost([v for _, v, _ in runs], frames[-1]),
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
        f"limit              fp32 {r['matmul_limit']['fp32']['gflops']:.1f}, {red} {r['matmul_limit'][red]['gflops']:.1f} GFLOP/s "
        f"(best GEMM shape and thread count); scorer fp32 {r['fp32_fraction_of_fp32_matmul'] or 0:.0%} of fp32, "
        f"{red} {r[f'{red}_fraction_of_{red}_matmul'] or 0:.0%} of {red}",
        *([f"per core (CPU time) fp32 {r['per_core']['fraction_of_own_matmul']['fp32']:.0%}, {red} "
           f"{r['per_core']['fraction_of_own_matmul'][red]:.0%} of their own matmul"] if "per_core" in r else []),
        *([f"training           {t['fp32']['steps_per_s']:.3f} steps/s fp32 ({t['fp32']['fraction_of_matmul']:.0%} of "
           f"matmul), {t['bf16']['steps_per_s']:.3f} bf16 autocast ({t['bf16']['fraction_of_matmul']:.0%}); "
           f"batch {t['batch_size']}, crop sampling {t['fp32']['sampling_share_of_step']:.1%} of a step"]
          if (t := r.get("training")) else []),
        f"pipeline           {r['pipeline_frames_per_s']:8.3f} frames/s = {r['pipeline_efficiency']:.0%} of scorer-only "
        f"({r['pipeline_publisher']})",
        f"page polled 4/s    {r['page_polled_frames_per_s']:8.3f} frames/s = {r['page_polled_efficiency']:.0%} of "
        f"scorer-only ({r['page_polls']} polls; overhead {r['page_overhead']:+.1%}); hook "
        f"{r['page_hook_us_per_verdict']:.1f} us/verdict, server {r['page_server_cpu_ms_per_poll']:.2f} ms CPU/poll",
        f"latency            p50 {r['latency_p50_s']:.3f} s, p99 {r['latency_p99_s']:.3f} s "
        f"(p99 {r['latency_over_scoring_p99']:.2f} x scoring)",
        f"rss growth         {r['rss_growth_mb']:+.1f} MB over {r['rss_frames']} frames",
    ]
    return "\n".join(lines)

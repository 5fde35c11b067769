"""Training throughput for `edge-agent bench`: steps/s and crops/s of the VAE train step (fit's own model, loss
and crop sampler), the step's FLOPs against the matmul limit, and crop sampling timed on its own."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from edge_agent.train.fit import CropSampler, TrainOptions, build_model, loss_fn


def step_flops(channels: int, patch_size: int, nc: int, nz: int, batch_size: int) -> float:
    """Forward + backward FLOPs of one VAE step: backward = input gradients + weight gradients = 2 x forward,
    less the first conv's input gradient (the patches need none). Adam's elementwise update is not counted."""
    from edge_agent.bench import vae_flops_per_patch
    from edge_agent.train.nets import encoder_sizes

    first_conv = 2.0 * encoder_sizes(patch_size)[1] ** 2 * nc * channels * 16
    return batch_size * (3 * vae_flops_per_patch(channels, patch_size, nc, nz) - first_conv)


def _steps(model, optim, sampler: CropSampler, batch_size: int, steps: int, bf16: bool) -> list[float]:
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = sampler.sample(batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        float(loss.detach())  # what fit does every step (the progress bar's loss)
        seconds.append(time.perf_counter() - t0)
    return seconds


def train_throughput(images: list[torch.Tensor], opts: TrainOptions, steps: int, matmul_limit: dict[str, float],
                     precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """Time `steps` train steps per precision (after one warm-up step) on CPU; median step time."""
    sampler = CropSampler(images, opts.patch_size, opts.seed)
    sampler.sample(opts.batch_size)
    sample_s = []
    for _ in range(max(5, steps)):
        t0 = time.perf_counter()
        sampler.sample(opts.batch_size)
        sample_s.append(time.perf_counter() - t0)
    flops = step_flops(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.batch_size)
    out: dict[str, Any] = {"patch_size": opts.patch_size, "nc": opts.nc, "nz": opts.nz, "batch_size": opts.batch_size,
                           "steps_timed": steps, "flops_per_step": flops, "threads": torch.get_num_threads(),
                           "sampling_s_median": statistics.median(sample_s),
                           "sampling_crops_per_s": opts.batch_size / statistics.median(sample_s)}
    for precision in precisions:
        torch.manual_seed(opts.seed)
        model = build_model(opts).train()
        optim = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        bf16 = precision == "bf16"
        _steps(model, optim, sampler, opts.batch_size, 1, bf16)
        step_s = statistics.median(_steps(model, optim, sampler, opts.batch_size, steps, bf16))
        gflops = flops / step_s / 1e9
        out[precision] = {"step_s_median": step_s, "steps_per_s": 1 / step_s,
                          "crops_per_s": opts.batch_size / step_s, "gflops": gflops,
                          "fraction_of_matmul": gflops / matmul_limit[precision],
                          "matmul_reference": f"{precision} matmul limit",
                          # sampling runs inside the step, on the same thread: its share of the step's time
                          "sampling_share_of_step": statistics.median(sample_s) / step_s}
    return out

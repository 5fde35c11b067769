"""The CUDA side of scoring: which precision a GPU gets, the TF32 policy, a loud CPU fallback, and the
runner that feeds a frozen score through pinned staging buffers and CUDA graphs.

scoring.Scorer owns one CudaRunner per loaded model; nothing here loads a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Fast bf16 tensor cores start with Ampere (sm_80). Before it (T4 = 7.5, Jetson Xavier = 7.2, V100 = 7.0)
# bf16 is emulated or missing while fp16 runs on tensor cores.
BF16_MIN_CAPABILITY = (8, 0)


def auto_precision(device_type: str, capability: tuple[int, int] | None = None, cpu_bf16: bool = False) -> str:
    """precision = "auto" as a pure function: bf16 on GPUs >= sm_80, fp16 below; bf16 on CPUs with bf16 units."""
    if device_type == "cuda":
        return "bf16" if capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def set_tf32_policy(dtype: torch.dtype) -> None:
    """TF32 off: "fp32" on a GPU then means IEEE fp32 like the CPU, so a threshold calibrated on either holds on
    the other (TF32 rounds inputs to 10 mantissa bits, ~1e-3 relative, the size of a threshold margin). Speed
    on a GPU comes from precision bf16/fp16, chosen explicitly and recorded in the card at calibration."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def gpu_expected() -> str | None:
    """Why this machine looks like it has an NVIDIA GPU (driver files present), or None."""
    for path in ("/proc/driver/nvidia/version", "/dev/nvidia0"):
        if Path(path).exists():
            return f"{path} exists"
    return None


def fallback_reason() -> str:
    """What most likely hides the GPU from this process, for the warning an operator reads."""
    if not Path("/dev/nvidia-uvm").exists():
        return ("/dev/nvidia-uvm is missing: under the hardened systemd unit (NoNewPrivileges, no capabilities) "
                "nvidia-modprobe cannot create it; load nvidia-uvm at boot (modprobe nvidia-uvm, "
                "nvidia-persistenced) or see docs/PERFORMANCE.md")
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    return "torch.cuda.is_available() is False (driver/runtime mismatch or CUDA_VISIBLE_DEVICES); run nvidia-smi"


class PinnedResults:
    """One pinned host buffer for scores, grown to the largest patch count seen and sliced: memory stays bounded
    by the largest frame however many frame sizes pass (a dict per size grew without bound)."""

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.buffer = torch.empty(0, dtype=torch.float32)

    def get(self, n: int, item: tuple[int, ...] = ()) -> torch.Tensor:
        """(n, *item) float32 view of the one buffer (item: () for scores, (P, P) for pixel maps)."""
        size = n * int(np.prod(item, dtype=np.int64))
        if size > self.buffer.numel():
            self.buffer = torch.empty(size, dtype=torch.float32, pin_memory=self.pin)
        return self.buffer[:size].view(n, *item)


class CudaRunner:
    """CUDA: patches go through a pinned channels-last staging buffer, are uploaded on a side stream while the
    previous batch computes, and each full batch replays a captured CUDA graph (fixed shapes).

    Graphs are captured in thread-local mode, so a SIGHUP reload may build a runner on the reload thread while
    the infer thread keeps scoring with the old one; after capture a probe batch is scored by the graph and by
    the eager function, and a mismatch drops the graphs with a warning (graph_fallback says why).
    Not measured in this project's CI (no GPU); tests with the `gpu` marker run it where CUDA exists.
    """

    def __init__(self, fn, batch_size: int, item_shape: tuple[int, int, int], dtype: torch.dtype,
                 channels_last: bool, graphs: bool, out_item: tuple[int, ...] = (), tolerance: float = 2e-2):
        self.fn = fn
        self.out_item = out_item  # () for scores, (P, P) for pixel maps
        self.batch_size = batch_size
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = (batch_size, *item_shape)
        # Host and device buffers share one layout, so an upload is a plain copy (no transpose or allocation).
        # float32 on the device too: the model casts to its own dtype and the score needs exact pixels.
        self.host = [torch.empty(shape, dtype=torch.float32, pin_memory=True, memory_format=self.memory_format)
                     for _ in range(2)]
        self.dev = [torch.empty(shape, device="cuda", memory_format=self.memory_format) for _ in range(2)]
        self.upload = torch.cuda.Stream()
        self.results = PinnedResults()
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.graph_out: list[torch.Tensor] = []
        self.graph_fallback: str | None = None if graphs else "disabled"
        if graphs:
            try:
                self._capture()
                self._check_graphs(tolerance)
            except Exception as e:  # graphs are an optimisation; eager CUDA still works
                self._drop_graphs(f"capture failed: {type(e).__name__}: {e}")

    def _drop_graphs(self, why: str) -> None:
        logger.warning("CUDA graphs not used (%s); scoring with plain stream execution", why)
        self.graphs, self.graph_out, self.graph_fallback = None, [], why

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for buf in self.dev:  # the profiling executor settles on a graph after a few runs
                for _ in range(3):
                    self.fn(buf)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.graph_out = [], []
        for buf in self.dev:
            g = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the infer thread during a reload) do not break capture
            with torch.cuda.graph(g, capture_error_mode="thread_local"), torch.inference_mode():
                out = self.fn(buf).float()
            self.graphs.append(g)
            self.graph_out.append(out)

    @torch.inference_mode()
    def _check_graphs(self, tolerance: float) -> None:
        """Replay each graph on a random probe batch and compare with the eager function."""
        for k, (g, out, dev) in enumerate(zip(self.graphs or [], self.graph_out, self.dev)):
            dev.copy_(torch.rand(dev.shape, device="cuda"))
            g.replay()
            got = out.clone()
            want = self.fn(dev).float()
            torch.cuda.synchronize()
            scale = float(want.abs().max().clamp(min=1.0))
            if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * scale, equal_nan=True):
                self._drop_graphs(f"graph {k} scores differ from eager: max |diff| "
                                  f"{float((got - want).abs().max()):.3g} at scale {scale:.3g}")
                return

    @torch.inference_mode()
    def score(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) float32 on the host -> (N,) (or (N, P, P)) float32 tensor; one synchronisation per call."""
        n = patches.shape[0]
        result = self.results.get(n, self.out_item)  # pinned allocation is slow: one buffer, grown to the largest
        compute = torch.cuda.current_stream()
        done = [torch.cuda.Event(), torch.cuda.Event()]
        for i, start in enumerate(range(0, n, self.batch_size)):
            end = min(start + self.batch_size, n)
            k = i % 2
            host, dev = self.host[k], self.dev[k]
            done[k].synchronize()  # batch i-2 has finished with these buffers (its upload, compute, download)
            host[: end - start].copy_(patches[start:end])  # NCHW -> channels-last here, on the CPU, in place
            if end - start < self.batch_size:
                host[end - start :].zero_()  # fixed graph shape: pad, then ignore the padded scores
            with torch.cuda.stream(self.upload):
                dev.copy_(host, non_blocking=True)
            compute.wait_stream(self.upload)
            if self.graphs is not None:
                self.graphs[k].replay()
                out = self.graph_out[k]
            else:
                out = self.fn(dev).float()
            result[start:end].copy_(out[: end - start], non_blocking=True)
            done[k].record(compute)
        compute.synchronize()
        return result.clone()  # the pinned buffer is reused by the next call

"""The only module that runs TorchScript: loads an artifact, checks it, picks device and precision, warms up.

Everything downstream gets numpy patch scores (N,) float32 and the patch grid they belong to.
The chosen score runs through a fast path (frozen, channels-last, equal batches; on CUDA pinned
staging, uploads overlapped with compute and CUDA graphs); docs/PERFORMANCE.md says what each buys.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent import artifact, gpu
from edge_agent.anomaly_map import MapHead
from edge_agent.errors import ConfigError, ModelError
from edge_agent.patches import PatchGrid, to_tensor

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True on CPUs that advertise native bf16 instructions (AMX or AVX512-BF16); whether bf16 is faster here is
    cpu_bf16_pays()."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


BF16_MIN_GAIN = 1.2  # bf16 must beat fp32 by this much on the probe GEMM to be chosen by precision "auto"


def _gemm_seconds(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN picks and JITs its kernel
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether precision "auto" should use bf16 on this CPU: the flag, and a 1024^3 GEMM that runs at least
    BF16_MIN_GAIN x faster in bf16 than in fp32 (~0.1 s, once per process). The flag alone is not enough:
    measured on three 2-core machines, bf16 GEMMs ran 7x fp32 with AMX, 4.2x on an EPYC with AVX512-BF16 and
    0.53x (slower) on a Xeon whose AVX512-BF16 oneDNN did not use (docs/PERFORMANCE.md)."""
    if not cpu_has_bf16():
        return False
    fp32, bf16 = _gemm_seconds(torch.float32), _gemm_seconds(torch.bfloat16)
    pays = fp32 / bf16 >= BF16_MIN_GAIN
    logger.info("precision auto on this CPU: a bf16 GEMM runs %.2fx fp32, so %s (bf16 needs >= %.1fx)",
                fp32 / bf16, "bf16" if pays else "fp32", BF16_MIN_GAIN)
    return pays


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        expected = gpu.gpu_expected()
        if expected:  # a station built for a GPU must not slow to CPU speed unnoticed
            logger.warning("device auto: a GPU is expected here (%s) but CUDA is unavailable, scoring on the CPU: %s",
                           expected, gpu.fallback_reason())
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use device = \"auto\" or \"cpu\"")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        precision = gpu.auto_precision(device.type, capability, device.type == "cpu" and cpu_bf16_pays())
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ConfigError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return table[precision]


def decode_ignore_mask(card: dict[str, Any]) -> np.ndarray | None:
    """The card's ignore mask as (H, W) uint8 (0 = patches there do not count), or None when it has none."""
    record = card.get("ignore_mask")
    if not record:
        return None
    import cv2

    data = base64.b64decode(record["png_base64"])
    if "sha256:" + hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise ModelError("the model card's ignore mask does not match its sha256; recalibrate with --ignore-mask")
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ModelError("the model card's ignore mask is not a readable PNG; recalibrate with --ignore-mask")
    return mask


WEIGHTED = ("Conv2d", "ConvTranspose2d", "Linear", "SubpixelConvTranspose2d")


def reduced_precision(module: torch.jit.ScriptModule, dtype: torch.dtype) -> torch.jit.ScriptModule:
    """Cast to bf16/fp16 in place, except the output layer, which stays float32 (never cast down and back).

    Measured on the seed VAE: bf16-rounded input patches put ~3 % into the score through the
    residual mu_x - x, so patches go in as float32 (the model casts them at its first conv); a
    bf16 output layer (the logits of mu_x and sigma_x) cost ~0.08 %, and it is ~1.5 % of the
    FLOPs. With both, bf16 scores match float32 to ~1e-6 (random weights; see PERFORMANCE.md).
    """
    # A combined model (combine.py) holds whole models as members: each keeps its own output layer in float32.
    members = getattr(module, "members", None)
    for part in (list(members.children()) if members is not None else [module]):
        leaves = [m for m in part.modules() if not list(m.children())]
        weighted = [m for m in leaves if getattr(m, "original_name", "") in WEIGHTED]
        for m in leaves:
            if not weighted or m is not weighted[-1]:
                m.to(dtype)
    return module


class _ChosenScore(torch.nn.Module):
    """forward(x) = module.score(x, name): a single method with the name constant, so freezing can fold it."""

    def __init__(self, module: torch.nn.Module, name: str):
        super().__init__()
        self.module = module
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.score(x, self.name)


class _PixelMap(torch.nn.Module):
    """forward(x) = module.pixel_map(x): (N, C, P, P) -> (N, P, P), for the anomaly-map head."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.pixel_map(x)


def pack_map_code(pixel_map: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(N, P, P) map and (N, D) code -> one (N, P*P + D) float32 tensor: one output for the fast path and CUDA graphs."""
    return torch.cat([pixel_map.float().flatten(1), code.float()], 1)


class _PixelMapCode(torch.nn.Module):
    """forward(x) = pack_map_code(*module.pixel_map_code(x)): the map and the patch's code from one pass, for a
    head with a place score."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel_map, code = self.module.pixel_map_code(x)
        return pack_map_code(pixel_map, code)  # TorchScript compiles the annotated function with it


def pack_map_residual(pixel_map: torch.Tensor, residual: torch.Tensor, code: torch.Tensor, with_code: bool) -> torch.Tensor:
    """(N, P, P) map, (N, P, P) signed residual [and (N, D) code] -> one (N, 2 P*P [+ D]) float32 tensor."""
    parts = [pixel_map.float().flatten(1), residual.float().flatten(1)]
    if with_code:
        parts.append(code.float())
    return torch.cat(parts, 1)


class _PixelMapResidual(torch.nn.Module):
    """forward(x) = pack_map_residual(*module.pixel_map_residual(x), False): the map and the signed residual from
    one pass, for a head that whitens the residual (anomaly_map.Whitening)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel_map, residual, code = self.module.pixel_map_residual(x)
        return pack_map_residual(pixel_map, residual, code, False)


class _PixelMapResidualCode(_PixelMapResidual):
    """The same with the code packed last, for a head that also has a place score."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel_map, residual, code = self.module.pixel_map_residual(x)
        return pack_map_residual(pixel_map, residual, code, True)


def optimise(module: torch.jit.ScriptModule, name: str | None, channels_last: bool = True, mkldnn: bool = False,
             with_code: bool = False, with_residual: bool = False):
    """The loaded module's score `name` (None: its pixel_map; with_code: map and code packed, pack_map_code;
    with_residual: map, signed residual [and code] packed, pack_map_residual) as a frozen TorchScript function
    of x (N, C, P, P).

    Freezing inlines the weights and folds conv + BatchNorm. mkldnn: also optimize_for_inference (oneDNN
    prepacked fp32 convolutions in oneDNN's blocked layout). Off by default: with channels-last aten
    convolutions already run on oneDNN, and the conversions into and out of the blocked layout (to_mkldnn at
    the output layer, to_dense around the sub-pixel shuffle) cost more than the prepacking saves, in fp32
    and far more in bf16 (PERFORMANCE.md). The caller checks the result against the module itself.
    """
    if name is not None:
        chosen: torch.nn.Module = _ChosenScore(module, name)
    elif with_residual:
        chosen = _PixelMapResidualCode(module) if with_code else _PixelMapResidual(module)
    else:
        chosen = _PixelMapCode(module) if with_code else _PixelMap(module)
    wrapper = torch.jit.script(chosen).eval()
    if channels_last:
        wrapper = wrapper.to(memory_format=torch.channels_last)
    frozen = torch.jit.freeze(wrapper)
    if not mkldnn:
        return frozen
    try:
        return torch.jit.optimize_for_inference(frozen)
    except RuntimeError as e:  # some graphs (or dtypes) have no oneDNN rewrite; frozen alone still helps
        logger.info("optimize_for_inference skipped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return frozen


def equal_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering n in ceil(n / batch_size) batches of equal size (+-1), not one runt."""
    count = -(-n // batch_size)
    if count == 0:
        return []
    base, extra = divmod(n, count)
    ranges, start = [], 0
    for i in range(count):
        end = start + base + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


@dataclass(frozen=True)
class FrameScores:
    """Patch scores of one frame: scores[i] belongs to grid.box(i)."""

    grid: PatchGrid
    scores: np.ndarray  # (N,) float32


class Scorer:
    """A loaded, verified, warmed-up model. Not thread-safe: one inference thread owns it."""

    def __init__(self, path: Path | str, device: str = "auto", precision: str = "fp32",
                 score_name: str | None = None, batch_size: int = 64, threshold: float | None = None,
                 warmup: bool = True, fast: bool = True, channels_last: bool = True, cuda_graphs: bool = True,
                 threads: int | None = None, mkldnn: bool = False):
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: the scorer is the process's one compute user
        self.path = Path(path)
        self.device = pick_device(device)
        # "auto" found no GPU where one was expected: the daemon reports it (log, metric, status)
        self.device_fallback = (gpu.fallback_reason() if device == "auto" and self.device.type == "cpu"
                                and gpu.gpu_expected() else None)
        self.dtype = pick_dtype(precision, self.device)
        if self.device.type == "cuda":
            gpu.set_tf32_policy(self.dtype)
        module, card, extras = artifact.load_with_extras(self.path, map_location=str(self.device))
        self.card: dict[str, Any] = card
        names = card["scores"]["names"]
        # The anomaly-map head (anomaly_map.py) adds a score computed from the model's pixel map; others are raw.
        self.head = MapHead.from_card(card, extras)
        self.head_name: str | None = card["anomaly_map"]["name"] if self.head is not None else None
        # A place score (anomaly_map.PlaceStats) needs each patch's code from the same forward pass as its map.
        self.with_code = self.head is not None and self.head.place is not None
        if self.with_code and not hasattr(module, "pixel_map_code"):
            raise ModelError(f"{self.path} has a place score but its module has no pixel_map_code; retrain the model")
        # Residual whitening (anomaly_map.Whitening) needs each patch's signed residual from the same pass.
        self.with_residual = self.head is not None and self.head.white is not None
        if self.with_residual and not hasattr(module, "pixel_map_residual"):
            raise ModelError(f"{self.path} whitens the residual but its module has no pixel_map_residual; retrain "
                             "the model")
        self.packed = self.with_code or self.with_residual
        self._head_cache: dict = {}
        self.score_name = score_name or card["scores"]["default"]
        if self.score_name not in names:
            raise ConfigError(f"score {self.score_name!r} is not in {self.path.name}; choose one of: {', '.join(names)}")
        entry = card.get("thresholds", {}).get(self.score_name)
        if threshold is None:
            if entry is None:
                raise ModelError(f"{self.path} has no threshold for score {self.score_name!r}; run `edge-agent calibrate`")
            threshold = float(entry["value"])
        self.threshold = float(threshold)
        # The low end of good image scores (calibrate.low_bound); None in cards written before it existed.
        low = ((entry or {}).get("low") or {}).get("value")
        self.low: float | None = float(low) if low is not None else None
        self.good_image_scores: dict[str, float] | None = (entry or {}).get("good_image_scores")
        if card["scores"].get("precision") == "fp32" and self.dtype != torch.float32:
            logger.info("model %s scores in fp32 only (card scores.precision); ignoring precision %s", self.path.name,
                        precision)
            self.dtype = torch.float32
        # Families that search a latent by gradient descent at score time (AnoGAN) need autograd inside the
        # model, which inference_mode forbids; no_grad still keeps every other graph off.
        self.needs_grad = bool(card["scores"].get("needs_grad", False))
        if self.dtype != torch.float32:
            module = reduced_precision(module, self.dtype)
        self.module = module
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.mkldnn = mkldnn
        self.fast = None  # the chosen score, frozen; None = the module's own score()
        self._cuda: gpu.CudaRunner | None = None
        self.patch_size = int(card["patch"]["size"])
        self.stride = int(card["patch"]["stride"])
        self.cover_edges = bool(card["patch"].get("cover_edges", True))
        self.channels = int(card["input"]["channels"])
        self._grids: dict[tuple[int, int], PatchGrid] = {}
        self.ignore_mask = decode_ignore_mask(card)
        self._counted: dict[tuple[int, int], np.ndarray | None] = {}
        if self.dtype != torch.float32:
            self._probe_reduced()
        self._check_calibrated_precision()
        if fast and not self.needs_grad:  # a latent search by autograd (AnoGAN) is not frozen
            self._use_fast_path(cuda_graphs)
        if warmup:
            self.warm_up()
        logger.info("model %s loaded: score %s, threshold %.6g, %s %s", self.model_id, self.score_name,
                    self.threshold, self.device, str(self.dtype).removeprefix("torch."))

    @property
    def model_id(self) -> str:
        return str(self.card.get("model_id", self.path.stem))

    @property
    def checksum(self) -> str:
        return str(self.card["checksum"])

    def grid(self, height: int, width: int) -> PatchGrid:
        key = (height, width)
        if key not in self._grids:
            self._grids[key] = PatchGrid.for_frame(height, width, self.patch_size, self.stride, self.cover_edges)
        return self._grids[key]

    def counted(self, grid: PatchGrid) -> np.ndarray | None:
        """(N,) bool: the patches of this grid outside the card's ignore mask; None when the card has no mask."""
        key = (grid.frame_h, grid.frame_w)
        if key not in self._counted:
            self._counted[key] = grid.counted(self.ignore_mask)
        return self._counted[key]

    @property
    def precision(self) -> str:
        """fp32 / bf16 / fp16: what the scores are computed in (TF32 is off on GPUs, see gpu.set_tf32_policy)."""
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def scored_with(self) -> dict[str, str]:
        """What calibration records next to a threshold, so the station can check it scores the same way."""
        return {"precision": self.precision, "device": self.device.type}

    def _check_calibrated_precision(self) -> None:
        entry = self.card.get("thresholds", {}).get(self.score_name) or {}
        calibrated = (entry.get("scored_with") or {}).get("precision")
        if calibrated and calibrated != self.precision:
            logger.warning("model %s: the threshold for %s was calibrated in %s but this scorer runs %s; scores "
                           "differ by rounding near the threshold: recalibrate with --precision %s or set "
                           "model.precision = \"%s\"", self.path.name, self.score_name, calibrated, self.precision,
                           self.precision, calibrated)

    def _probe_reduced(self) -> None:
        x = torch.rand(2, self.channels, self.patch_size, self.patch_size, device=self.device)
        try:
            with torch.inference_mode():
                self._module_fn(self.score_name)(x)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            precision = str(self.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
            raise ModelError(f"{self.path} cannot score in {precision} ({first}); it was exported before mixed "
                             f"precision support: re-export it with `edge-agent train` or set precision fp32") from None

    def _use_fast_path(self, cuda_graphs: bool) -> None:
        """Freeze the chosen score; keep it only if it scores like the module itself (else log and stay eager)."""
        probe = torch.rand(4, self.channels, self.patch_size, self.patch_size)
        try:
            fast = optimise(self.module, None if self.uses_map() else self.score_name, self.channels_last, self.mkldnn,
                            self.with_code and self.uses_map(), self.with_residual and self.uses_map())
            with torch.inference_mode():
                x = self._layout(probe.to(self.device))
                want = self._module_fn(self.score_name)(x).float()
                got = fast(x).float()
        except Exception as e:  # an artifact that cannot be frozen still scores, only slower
            logger.warning("model %s: fast path unavailable (%s: %s); scoring with the module as loaded",
                           self.path.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return
        tol = 1e-3 if self.dtype == torch.float32 else 2e-2
        if self.uses_map() and self.dtype != torch.float32:
            # A pixel map in bf16/fp16 differs pixel by pixel with the order of rounding (measured: up to 5 % of the
            # largest pixel between the frozen and the eager module, both equally close to fp32); the head
            # averages it over the overlapping patches. A broken freeze still shows in the per-patch means.
            if self.packed:  # the code is compared as it is, the map and the residual by their per-patch means
                got, want = (torch.cat([t.flatten(1).mean(1, keepdim=True) if t.dim() == 3 else t
                                        for t in self._unpack(out) if t is not None], 1) for out in (got, want))
            else:
                got, want = got.flatten(1).mean(1), want.flatten(1).mean(1)
        finite = want[torch.isfinite(want)]  # a broken model's NaN scores are for the verdict to report, not here
        scale = float(finite.abs().max().clamp(min=1.0)) if finite.numel() else 1.0
        if not torch.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True):
            logger.warning("model %s: the frozen score differs from the module's (max %.3g vs %.3g); not using it",
                           self.path.name, float((got - want).abs().max()), float(want.abs().max()))
            return
        self.fast = fast
        if self.device.type == "cuda":
            out_item: tuple[int, ...] = (self.patch_size, self.patch_size) if self.uses_map() else ()
            if self.uses_map() and self.packed:
                out_item = (self.packed_width(),)
            self._cuda = gpu.CudaRunner(fast, self.batch_size, (self.channels, self.patch_size, self.patch_size),
                                        self.dtype, self.channels_last, cuda_graphs, out_item)

    def uses_map(self, name: str | None = None) -> bool:
        """True when score `name` (default: the chosen one) comes from the anomaly-map head."""
        return self.head is not None and (name or self.score_name) == self.head_name

    def _module_fn(self, name: str):
        """The module's own function behind score `name`: its pixel_map for the head's score, else score()."""
        if self.uses_map(name):
            if self.with_residual:
                return lambda x: pack_map_residual(*self.module.pixel_map_residual(x), self.with_code)
            if self.with_code:
                return lambda x: pack_map_code(*self.module.pixel_map_code(x))
            return self.module.pixel_map
        return lambda x: self.module.score(x, name)

    def packed_width(self) -> int:
        """Values per patch of the head's packed forward output (map, [residual,] code)."""
        p2 = self.patch_size**2
        return (2 * p2 if self.with_residual else p2) + (self.head.place.dims if self.with_code else 0)

    def _unpack(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The head's forward output -> ((N, P, P) maps, (N, D) codes or None without a place score, (N, P, P)
        signed residuals or None without whitening)."""
        if not self.packed:
            return out, None, None
        p, p2 = self.patch_size, self.patch_size**2
        maps = out[:, :p2].reshape(-1, p, p)
        if not self.with_residual:
            return maps, out[:, p2:], None
        return maps, (out[:, 2 * p2 :] if self.with_code else None), out[:, p2 : 2 * p2].reshape(-1, p, p)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def warm_up(self, batches: int = 2) -> float:
        """Run a few batches so the first real frame does not pay for allocation and kernel selection."""
        # The batch shape a whole frame uses, so oneDNN and the JIT have met it before the first frame.
        n = min(self.batch_size, 64)
        h, w = self.card["input"].get("frame_height"), self.card["input"].get("frame_width")
        if self.fast is not None and h and w:
            n = max(e - s for s, e in equal_batches(self.grid(int(h), int(w)).count, self.batch_size))
        x = torch.rand(n, self.channels, self.patch_size, self.patch_size)
        t0 = time.perf_counter()
        for _ in range(batches):
            self._run(x, self.score_name)
        return time.perf_counter() - t0

    def _grad_mode(self):
        return torch.no_grad() if self.needs_grad else torch.inference_mode()

    def _run(self, patches: torch.Tensor, name: str) -> torch.Tensor:
        """The model over (N, C, P, P) patches in batches: (N,) scores, or (N, P, P) pixel maps for the head's
        score; float32, on the scorer's device (host memory for CUDA graphs)."""
        if self.fast is not None and name == self.score_name:
            if self._cuda is not None:
                return self._cuda.score(patches)
            run = self.fast
        else:
            run = self._module_fn(name)
        out = []
        with self._grad_mode():
            for start, end in equal_batches(patches.shape[0], self.batch_size):
                x = self._layout(patches[start:end].to(self.device, non_blocking=True))
                out.append(run(x).float())
        if not out:
            if self.uses_map(name) and self.packed:
                return torch.zeros((0, self.packed_width()))
            return torch.zeros((0, self.patch_size, self.patch_size) if self.uses_map(name) else 0)
        return torch.cat(out)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The chosen score's network passes over (N, C, P, P) patches, without the map head: what `bench` times
        per core (raw scores, or pixel maps and codes for the head's score)."""
        return self._run(patches, self.score_name)

    def score_patches(self, patches: torch.Tensor, name: str | None = None) -> np.ndarray:
        """(N, C, P, P) float32 in [0, 1] -> (N,) float32 raw model scores; the head's score needs the grid:
        use score_frame."""
        name = name or self.score_name
        if self.uses_map(name):
            raise ValueError(f"score {name!r} is an anomaly-map score; it needs the frame's grid (score_frame)")
        return self._run(patches, name).cpu().numpy()

    def score_frame(self, grid: PatchGrid, patches: torch.Tensor, name: str | None = None) -> np.ndarray:
        """All patches of one frame (grid.extract order) -> (N,) float32 patch scores of score `name`."""
        name = name or self.score_name
        if not self.uses_map(name):
            return self.score_patches(patches, name)
        maps, codes, residuals = self._unpack(self._run(patches, name).to(self.device))
        with torch.inference_mode():
            return self.head.patch_scores(grid, maps, self._head_cache, codes, residuals, patches).cpu().numpy()

    def score_frames(self, frames: list[tuple[PatchGrid, torch.Tensor]]) -> list[np.ndarray]:
        """Several frames' patches (each (N_i, C, P, P), grid.extract order) through the same batched forward
        passes -> each frame's (N_i,) float32 scores of the chosen score, as score_frame gives them."""
        if len(frames) == 1:
            return [self.score_frame(*frames[0])]
        counts = [patches.shape[0] for _, patches in frames]
        out = self._run(torch.cat([patches for _, patches in frames]), self.score_name)
        parts = torch.split(out, counts)
        if not self.uses_map(self.score_name):
            return [part.cpu().numpy() for part in parts]
        with torch.inference_mode():
            scored = []
            for (grid, patches), part in zip(frames, parts):
                maps, codes, residuals = self._unpack(part.to(self.device))
                scored.append(self.head.patch_scores(grid, maps, self._head_cache, codes, residuals,
                                                     patches).cpu().numpy())
            return scored

    def pixel_maps(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) -> (N, P, P) float32 on the device: the model's per-pixel map (for fitting the head)."""
        return self.pixel_maps_codes(patches)[0]

    def pixel_maps_codes(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(N, C, P, P) -> the (N, P, P) pixel maps, with a place score the (N, D) codes, with whitening the
        (N, P, P) signed residuals (else None)."""
        if self.head is None:
            raise ValueError(f"{self.path.name} has no anomaly-map score")
        return self._unpack(self._run(patches, self.head_name))

    def maps_residuals(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, P, P) -> (N, P, P) pixel maps, (N, P, P) signed residuals and (N, D) codes, float32 on the CPU,
        from the module's pixel_map_residual whatever the card's head uses (what anomaly_map.Whitening is fitted on)."""
        maps, residuals, codes = [], [], []
        with self._grad_mode():
            for start, end in equal_batches(patches.shape[0], self.batch_size):
                m, r, c = self.module.pixel_map_residual(self._layout(patches[start:end].to(self.device)))
                maps.append(m.float().cpu())
                residuals.append(r.float().cpu())
                codes.append(c.float().cpu())
        return torch.cat(maps), torch.cat(residuals), torch.cat(codes)

    def codes(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) -> (N, D) float32 on the CPU: each patch's code (module.latent_code; ScriptModule.code is its source), what PlaceStats is fitted on."""
        out = []
        with self._grad_mode():
            for start, end in equal_batches(patches.shape[0], self.batch_size):
                out.append(self.module.latent_code(self._layout(patches[start:end].to(self.device))).float().cpu())
        return torch.cat(out)

    def score_frame_all(self, grid: PatchGrid, patches: torch.Tensor) -> dict[str, np.ndarray]:
        """Every score of the model for one frame: name -> (N,) float32 (the head's from a second pass)."""
        out = self.score_patches_all(patches)
        if self.head is not None:
            out[self.head_name] = self.score_frame(grid, patches, self.head_name)
        return out

    def score_patches_all(self, patches: torch.Tensor) -> dict[str, np.ndarray]:
        """Every raw (per-patch) score of the model in one pass: name -> (N,) float32."""
        parts: dict[str, list[torch.Tensor]] = {}
        with self._grad_mode():
            for start in range(0, patches.shape[0], self.batch_size):
                # float32 in any precision: the model casts at its first conv (see reduced_precision)
                x = patches[start : start + self.batch_size].to(self.device, non_blocking=True)
                for k, v in self.module.scores(x).items():
                    parts.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v).numpy() for k, v in parts.items()}

    def patches(self, image: np.ndarray) -> tuple[PatchGrid, torch.Tensor]:
        """HWC/HW uint8 image -> (grid, (N, C, P, P) patches)."""
        h, w = image.shape[:2]
        grid = self.grid(h, w)
        return grid, grid.extract(to_tensor(image, self.channels))

    def score_image(self, image: np.ndarray, name: str | None = None) -> FrameScores:
        grid, patches = self.patches(image)
        return FrameScores(grid, self.score_frame(grid, patches, name))

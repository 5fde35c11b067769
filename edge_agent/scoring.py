"""The only module that runs TorchScript: loads an artifact, checks it, picks device and precision, warms up.

Everything downstream gets numpy patch scores (N,) float32 and the patch grid they belong to.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent import artifact
from edge_agent.errors import ConfigError, ModelError
from edge_agent.patches import PatchGrid, to_tensor

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use device = \"auto\" or \"cpu\"")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
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


@dataclass(frozen=True)
class FrameScores:
    """Patch scores of one frame: scores[i] belongs to grid.box(i)."""

    grid: PatchGrid
    scores: np.ndarray  # (N,) float32


class Scorer:
    """A loaded, verified, warmed-up model. Not thread-safe: one inference thread owns it."""

    def __init__(self, path: Path | str, device: str = "auto", precision: str = "fp32",
                 score_name: str | None = None, batch_size: int = 512, threshold: float | None = None,
                 warmup: bool = True):
        self.path = Path(path)
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        module, card = artifact.load(self.path, map_location=str(self.device))
        self.card: dict[str, Any] = card
        names = card["scores"]["names"]
        self.score_name = score_name or card["scores"]["default"]
        if self.score_name not in names:
            raise ConfigError(f"score {self.score_name!r} is not in {self.path.name}; choose one of: {', '.join(names)}")
        if threshold is None:
            entry = card.get("thresholds", {}).get(self.score_name)
            if entry is None:
                raise ModelError(f"{self.path} has no threshold for score {self.score_name!r}; run `edge-agent calibrate`")
            threshold = float(entry["value"])
        self.threshold = float(threshold)
        if card["scores"].get("precision") == "fp32" and self.dtype != torch.float32:
            logger.info("model %s scores in fp32 only (card scores.precision); ignoring precision %s", self.path.name,
                        precision)
            self.dtype = torch.float32
        # Families that search a latent by gradient descent at score time (AnoGAN) need autograd inside the
        # model, which inference_mode forbids; no_grad still keeps every other graph off.
        self.needs_grad = bool(card["scores"].get("needs_grad", False))
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        self.module = module
        self.batch_size = batch_size
        self.patch_size = int(card["patch"]["size"])
        self.stride = int(card["patch"]["stride"])
        self.cover_edges = bool(card["patch"].get("cover_edges", True))
        self.channels = int(card["input"]["channels"])
        self._grids: dict[tuple[int, int], PatchGrid] = {}
        self.ignore_mask = decode_ignore_mask(card)
        self._counted: dict[tuple[int, int], np.ndarray | None] = {}
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

    def warm_up(self, batches: int = 2) -> float:
        """Run a few batches so the first real frame does not pay for allocation and kernel selection."""
        x = torch.rand(min(self.batch_size, 64), self.channels, self.patch_size, self.patch_size)
        t0 = time.perf_counter()
        for _ in range(batches):
            self.score_patches(x)
        return time.perf_counter() - t0

    def _grad_mode(self):
        return torch.no_grad() if self.needs_grad else torch.inference_mode()

    def score_patches(self, patches: torch.Tensor, name: str | None = None) -> np.ndarray:
        """(N, C, P, P) float32 in [0, 1] -> (N,) float32, in batches of batch_size."""
        name = name or self.score_name
        out = []
        with self._grad_mode():
            for start in range(0, patches.shape[0], self.batch_size):
                x = patches[start : start + self.batch_size].to(self.device, self.dtype, non_blocking=True)
                out.append(self.module.score(x, name).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def score_patches_all(self, patches: torch.Tensor) -> dict[str, np.ndarray]:
        """Every score of the model at once: name -> (N,) float32."""
        parts: dict[str, list[torch.Tensor]] = {}
        with self._grad_mode():
            for start in range(0, patches.shape[0], self.batch_size):
                x = patches[start : start + self.batch_size].to(self.device, self.dtype, non_blocking=True)
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
        return FrameScores(grid, self.score_patches(patches, name))

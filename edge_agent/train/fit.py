"""Training on good parts only: random P x P crops, Adam as in the seed, export to one artifact.

The daemon never imports this package; it needs only the exported file.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import edge_agent
from edge_agent import artifact
from edge_agent.errors import DataError
from edge_agent.images import file_hashes, fingerprint, list_images, read_image
from edge_agent.patches import MIN_PATCH_SIZE, to_tensor
from edge_agent.progress import Progress
from edge_agent.scoring import cpu_has_bf16, pick_device
from edge_agent.train.nets import AE, VAE, fold_decoder_batchnorm

logger = logging.getLogger(__name__)

FAMILIES = ("vae", "ae")


@dataclass
class TrainOptions:
    model: str = "vae"
    patch_size: int = 32
    stride: int = 8
    channels: int = 1
    nc: int = 32
    nz: int = 20
    batch_size: int = 64
    epochs: int = 10
    max_minutes: float | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-5
    sigma_min: float = 0.01
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where the hardware has it
    name: str | None = None
    progress: bool = True
    extra_card: dict[str, Any] = field(default_factory=dict)


def load_good_images(data_dir: Path, channels: int, patch_size: int) -> tuple[list[Path], list[torch.Tensor]]:
    files = list_images(data_dir, what="training data")
    tensors = []
    for f in files:
        t = to_tensor(read_image(f), channels)
        if min(t.shape[1:]) < patch_size:
            raise DataError(f"image {f} is {t.shape[2]}x{t.shape[1]}, smaller than the {patch_size}px patch; "
                            "use a smaller --patch-size")
        tensors.append(t)
    return files, tensors


class CropSampler:
    """Uniform random P x P crops from a set of images, reproducible for a seed."""

    def __init__(self, images: list[torch.Tensor], patch_size: int, seed: int):
        self.p = patch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.same_size = len({tuple(t.shape) for t in images}) == 1
        self.images = torch.stack(images) if self.same_size else images

    def sample(self, n: int) -> torch.Tensor:
        p, g = self.p, self.gen
        if self.same_size:
            _, c, h, w = self.images.shape
            idx = torch.randint(len(self.images), (n,), generator=g)
            ys = torch.randint(h - p + 1, (n,), generator=g)
            xs = torch.randint(w - p + 1, (n,), generator=g)
            ar = torch.arange(p)
            rows = (ys[:, None] + ar)[:, :, None]  # (n, P, 1)
            cols = (xs[:, None] + ar)[:, None, :]  # (n, 1, P)
            return self.images[idx[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()
        out = []
        for _ in range(n):
            img = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
            y = int(torch.randint(img.shape[1] - p + 1, (1,), generator=g))
            x = int(torch.randint(img.shape[2] - p + 1, (1,), generator=g))
            out.append(img[:, y : y + p, x : x + p])
        return torch.stack(out)


def build_model(opts: TrainOptions) -> nn.Module:
    if opts.model == "vae":
        return VAE(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.sigma_min)
    if opts.model == "ae":
        return AE(opts.channels, opts.patch_size, opts.nc, opts.nz)
    raise DataError(f"unknown model family {opts.model!r}; choose one of: {', '.join(FAMILIES)}")


def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-batch training loss: the negative ELBO (VAE, one reparameterized sample) or the MSE (AE)."""
    if isinstance(model, VAE):
        mu_z, logvar_z = model.encode(x)
        z = mu_z + torch.randn_like(mu_z) * torch.exp(0.5 * logvar_z)
        t = model.terms(x, z, mu_z, logvar_z)
        return (t["d"] + t["a"] + t["m"]).mean()
    return (model.reconstruct(x) - x).pow(2).mean()


def fit(data_dir: Path, out: Path, opts: TrainOptions) -> dict[str, Any]:
    """Train, export, set the seed's max-over-training-images threshold; returns the model card."""
    if opts.patch_size < MIN_PATCH_SIZE:
        raise DataError(f"--patch-size {opts.patch_size} is below {MIN_PATCH_SIZE}; use 16 or more")
    torch.manual_seed(opts.seed)
    files, images = load_good_images(data_dir, opts.channels, opts.patch_size)
    device = pick_device(opts.device)
    use_bf16 = opts.precision == "bf16" or (
        opts.precision == "auto" and (device.type == "cuda" or cpu_has_bf16())
    )
    model = build_model(opts).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay)
    sampler = CropSampler(images, opts.patch_size, opts.seed)

    h, w = images[0].shape[1:]
    per_image = (math.floor((h - opts.patch_size) / opts.stride) + 1) * (math.floor((w - opts.patch_size) / opts.stride) + 1)
    steps_per_epoch = max(1, math.ceil(len(images) * per_image / opts.batch_size))
    total_steps = steps_per_epoch * opts.epochs
    budget_s = opts.max_minutes * 60 if opts.max_minutes else math.inf

    model.train()
    t0 = time.monotonic()
    step, ema, stopped_by = 0, None, "epochs"
    with Progress(total_steps, "train", enabled=opts.progress) as bar:
        while step < total_steps:
            elapsed = time.monotonic() - t0
            if elapsed >= budget_s:
                stopped_by = "time budget"
                break
            x = sampler.sample(opts.batch_size).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, x)
            if not torch.isfinite(loss):
                raise DataError(f"training diverged at step {step} (loss {loss.item()}); lower --lr or check the images")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
            value = float(loss.detach())
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            eta = min((total_steps - step) * elapsed / max(step - 1, 1), budget_s - elapsed) if step > 1 else None
            bar.update(1, eta_s=eta, epoch=f"{step // steps_per_epoch + 1}/{opts.epochs}", loss=ema)
    seconds = time.monotonic() - t0

    training = {
        "data_dir": str(data_dir), "images": len(files), "data_fingerprint": fingerprint(files),
        "image_hashes": file_hashes(files),
        "steps": step, "steps_per_epoch": steps_per_epoch, "epochs": round(step / steps_per_epoch, 3),
        "stopped_by": stopped_by, "final_loss": ema, "seconds": round(seconds, 1),
        "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay,
        "optimizer": "Adam(betas=(0.9, 0.999))", "seed": opts.seed, "device": str(device),
        "autocast": "bf16" if use_bf16 else "fp32",
    }
    export(model, opts, out, int(h), int(w), training)
    return set_training_thresholds(out, files, progress=opts.progress)


def export(model: nn.Module, opts: TrainOptions, out: Path, frame_h: int, frame_w: int,
           training: dict[str, Any], thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Script the model (eval, CPU, decoder BatchNorms folded) and write it with its card: the one way
    an artifact is made."""
    model.eval().cpu()
    scripted = torch.jit.script(fold_decoder_batchnorm(model))
    card = {
        "model_id": opts.name or out.stem,
        "family": opts.model,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"channels": opts.channels, "color": "gray" if opts.channels == 1 else "bgr",
                  "scale": "x / 255", "frame_height": frame_h, "frame_width": frame_w},
        "patch": {"size": opts.patch_size, "stride": opts.stride, "cover_edges": True},
        "scores": {"names": list(model.score_names), "default": model.default_score, "pixel_map": True,
                   "higher_is_anomalous": True},
        "architecture": {"nc": opts.nc, "nz": opts.nz, "depth": len(model.encoder.conv) // 3,
                         **({"sigma_min": opts.sigma_min} if opts.model == "vae" else {})},
        "thresholds": thresholds or {},
        "training": training,
        "versions": {"edge_agent": edge_agent.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        **opts.extra_card,
    }
    return artifact.save(scripted, card, out)


def set_training_thresholds(path: Path, files: list[Path], progress: bool = True) -> dict[str, Any]:
    """The seed's rule until calibration: threshold = the highest image score over the training images."""
    from edge_agent.evaluation import score_files  # scoring side; imported late to keep train light
    from edge_agent.scoring import Scorer

    scorer = Scorer(path, device="cpu", threshold=math.inf, warmup=False)
    results = score_files(scorer, files, progress=progress, label="threshold")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def change(card: dict[str, Any]) -> dict[str, Any]:
        for name in card["scores"]["names"]:
            image_scores = np.array([r.image_score(name) for r in results], dtype=np.float64)
            card["thresholds"][name] = {
                "value": float(image_scores.max()),
                "method": "max-train",
                "description": "highest image score over the training images (seeds/003); calibrate to replace",
                "images": len(files),
                "data_fingerprint": card["training"]["data_fingerprint"],
                "chosen_at": now,
                "good_image_scores": quantiles(image_scores),
            }
        return card

    return artifact.update_card(path, change)


def quantiles(values: np.ndarray) -> dict[str, float]:
    """Summary of a good-image score distribution, kept in the card to watch for drift."""
    q = np.quantile(values, [0.5, 0.9, 0.99]) if len(values) else [math.nan] * 3
    return {"n": int(len(values)), "mean": float(np.mean(values)), "std": float(np.std(values)),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(np.max(values))}


def options_dict(opts: TrainOptions) -> dict[str, Any]:
    return asdict(opts)

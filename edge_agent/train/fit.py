"""Training on good parts only: random P x P crops, Adam as in the seed, export to one artifact.

The daemon never imports this package; it needs only the exported file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
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
from edge_agent.scoring import cpu_bf16_pays, pick_device
from edge_agent.train import distributed
from edge_agent.train.nets import (LATENTS, MIN_CONV_LATENT_PATCH, AE, VAE, ConvDecoder, fold_decoder_batchnorm, latent_cells,
                                   subpixel_decoder)

logger = logging.getLogger(__name__)

FAMILIES = ("vae", "ae", "gmm", "anogan")
LATENT_SEARCHES = {"encoder": "encoder", "encoder+refine": "encoder_refine", "random": "search"}  # -> default score


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
    beta_nll: float = 0.0  # VAE: weight each pixel's NLL by sigma_x^(2 beta) (loss_fn); 0 = the seed's ELBO
    latent: str = "fc"  # VAE/AE code: "fc" (the seed's Nz vector) or "conv" (Nz channels per cell, nets.ConvEncoder)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where it measurably pays (scoring.cpu_bf16_pays; GPUs)
    name: str | None = None
    progress: bool = True
    # gmm (SPEC 2.3): PCA dims Nh, mixture components Nz, covariance regularizer, crops per image (seed: 100).
    # nh None: every pixel of the patch up to GMM_DEFAULT_NH (the dropped rest is scored by m_full's residual)
    nh: int | None = None
    components: int = 8
    reg_covar: float = 1e-4
    crops_per_image: int = 100
    # anogan (SPEC 2.4): search steps Gamma, weight lambda, refine steps k, search Adam lr, default latent search
    gamma_steps: int = 100
    lam: float = 0.1
    refine_steps: int = 10
    search_lr: float = 0.05
    latent_search: str = "encoder+refine"
    threshold_images: int | None = None  # score at most this many held-out images for the initial threshold
    # Budget: steps = max(epochs x steps_per_epoch, min_steps) unless `steps` is given; max_minutes caps it.
    steps: int | None = None
    min_steps: int = 2000
    lr_schedule: str = "cosine"  # cosine decay to lr_floor x lr over the budget, or "constant" (the seed's)
    lr_floor: float = 0.05
    early_stop: bool = True  # stop when the held-out loss has not improved for `patience` checks
    patience: int = 8
    # Good images held out of training: the initial threshold (FRR method) and the anomaly map's statistics.
    holdout: float = 0.2
    anomaly_map: bool = True  # add the anomaly-map score (anomaly_map.py) and make it the default
    min_position_images: int = 50  # fewer give a noisy per-place spread that costs more than it buys
    blur_sigma: float = 0.0  # px; measured on three sets (docs/RESULTS.md): any blur buries 1-px scratches and fibres
    position_stats: bool = True  # normalize the map by what good parts show at each place (fixtured parts)
    texture_loss: bool = True  # the map score also flags patches far below every good one (anomaly_map.LowSide)
    # The place score (anomaly_map.PlaceStats, vae/ae): a Gaussian of the patch code per grid cell, fitted on up
    # to place_images training images; kept when held-out codes gain >= PLACE_MIN_GAIN_NATS from it.
    place_score: bool = True
    place_images: int = 200
    min_place_images: int = 50
    place_shrink: float = 0.01
    place_min_gain: float | None = None  # nats; None: anomaly_map.PLACE_MIN_GAIN_NATS
    # vae/ae: also score the shape of the signed residual (anomaly_map.Whitening), fitted on the held-out images.
    whiten: bool = True
    whiten_window: int = 5  # px (anomaly_map.WHITEN_WINDOW)
    whiten_place: bool = True  # check per-place whitening, kept where places differ (anomaly_map.WHITE_PLACE_MIN_GAIN)
    # Whitened matched filters for lines and stains on a uniform surface (anomaly_map.SurfaceFilters), kept
    # where the held-out frames' places do not differ (a texture), any family with the map score.
    surface_filters: bool = True
    target_frr: float = 0.01
    confidence: float = 0.95
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

    def to(self, device: torch.device, max_share: float = 0.25) -> "CropSampler":
        """Keep the images on the training device and cut the crops there, so a GPU step moves no image data
        and waits for no host-side gather (measured on an H200: the loop was host-bound). Only where they take
        at most max_share of the device's free memory; the crops are the CPU's, for the generator stays on the
        CPU and draws the same indices."""
        if device.type == "cuda" and self.same_size:
            need = self.images.numel() * self.images.element_size()
            free, _ = torch.cuda.mem_get_info(device)
            if need <= max_share * free:
                self.images = self.images.to(device)
            else:
                logger.info("training images (%.0f MB) stay in host memory: over %.0f %% of the GPU's free %.0f MB",
                            need / 2**20, 100 * max_share, free / 2**20)
        return self

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
            dev = self.images.device
            return self.images[idx[:, None, None].to(dev), :, rows.to(dev), cols.to(dev)].permute(0, 3, 1, 2).contiguous()
        out = []
        for _ in range(n):
            img = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
            y = int(torch.randint(img.shape[1] - p + 1, (1,), generator=g))
            x = int(torch.randint(img.shape[2] - p + 1, (1,), generator=g))
            out.append(img[:, y : y + p, x : x + p])
        return torch.stack(out)


def build_model(opts: TrainOptions) -> nn.Module:
    if opts.model == "vae":
        return VAE(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.sigma_min, opts.latent)
    if opts.model == "ae":
        return AE(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.latent)
    if opts.model == "anogan":
        from edge_agent.train.anogan import AnoGAN

        if opts.latent_search not in LATENT_SEARCHES:
            raise DataError(f"--latent-search {opts.latent_search!r} is not one of: {', '.join(LATENT_SEARCHES)}")
        return AnoGAN(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.gamma_steps, opts.refine_steps,
                      opts.lam, opts.search_lr, opts.seed, LATENT_SEARCHES[opts.latent_search])
    raise DataError(f"unknown model family {opts.model!r}; choose one of: {', '.join(FAMILIES)}")


def loss_fn(model: nn.Module, x: torch.Tensor, beta_nll: float = 0.0) -> torch.Tensor:
    """Per-batch training loss: the negative ELBO (VAE, one reparameterized sample) or the MSE (AE).

    beta_nll > 0 (VAE): each pixel's Gaussian NLL weighted by sigma_x^(2 beta), detached and normalised to mean 1
    over the batch (beta-NLL, Seitzer et al. 2022). The plain NLL's gradient on mu_x is (mu_x - x) / sigma_x^2:
    where the decoder is still poor (a thread, any fine periodic structure) sigma_x grows first and then starves
    the mean of gradient, so the model settles on "noise" there and a defect on it scores nothing. The weight
    gives those pixels their gradient back; the normalisation keeps the NLL's scale against the KL term.
    """
    if isinstance(model, VAE):
        mu_z, logvar_z = model.encode(x)
        z = mu_z + torch.randn_like(mu_z) * torch.exp(0.5 * logvar_z)
        if beta_nll <= 0:
            t = model.terms(x, z, mu_z, logvar_z)
            return (t["d"] + t["a"] + t["m"]).mean()
        mu_x, sigma_x = model.decode(z)
        a, m = model.pixel_terms(x, mu_x, sigma_x)
        w = sigma_x.detach().pow(2 * beta_nll)
        return (model.kl(mu_z, logvar_z) + (w / w.mean() * (a + m)).flatten(1).sum(1)).mean()
    return (model.reconstruct(x) - x).pow(2).mean()


def split_holdout(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: every k-th image evenly spaced across the set (acquisition order varies
    lighting and batches; an even spread samples all of it). None held out below MIN_HOLDOUT images."""
    count = int(round(n * fraction)) if fraction > 0 else 0
    if count < MIN_HOLDOUT or n - count < MIN_TRAIN:
        return list(range(n)), []
    held = sorted({min(n - 1, int((i + 0.5) * n / count)) for i in range(count)})
    keep = sorted(set(range(n)) - set(held))
    return keep, held


GMM_DEFAULT_NH = 256  # PCA dims when --nh is not given: EM with 8 full covariances stays ~20 s on 2 cores
MIN_HOLDOUT = 8  # fewer held-out images than this say too little about unseen parts; use the training maximum
MIN_TRAIN = 4
LOSS_READ_EVERY = 25  # GPU training reads its loss (a host-device wait) every this many steps


def planned_steps(opts: TrainOptions, steps_per_epoch: int) -> tuple[int, str]:
    """(total optimizer steps, why that many). One epoch is as many crops as the images have patches, which
    on a few small images is a few dozen steps: min_steps keeps such a model from stopping untrained."""
    if opts.steps is not None:
        return opts.steps, "steps"
    by_epochs = steps_per_epoch * opts.epochs
    if by_epochs < opts.min_steps:
        return opts.min_steps, "min steps"
    return by_epochs, "epochs"


def fit(data_dir: Path, out: Path, opts: TrainOptions) -> dict[str, Any]:
    """Train on good images minus a held-out share, export, then set the initial threshold on the held-out
    images by the good-only FRR method (and fit the anomaly map's statistics); returns the model card."""
    if opts.patch_size < MIN_PATCH_SIZE:
        raise DataError(f"--patch-size {opts.patch_size} is below {MIN_PATCH_SIZE}; use 16 or more")
    if opts.model not in FAMILIES:
        raise DataError(f"unknown model family {opts.model!r}; choose one of: {', '.join(FAMILIES)}")
    if not 0 <= opts.holdout < 1:
        raise DataError(f"--holdout {opts.holdout} must be a share in [0, 1) (e.g. 0.2)")
    if opts.latent not in LATENTS:
        raise DataError(f"--latent {opts.latent!r} must be fc (the seed's vector) or conv (a code per place in the patch)")
    if opts.latent != "fc" and (opts.model not in ("vae", "ae") or opts.patch_size < MIN_CONV_LATENT_PATCH):
        raise DataError(f"--latent {opts.latent} needs --model vae or ae and --patch-size >= {MIN_CONV_LATENT_PATCH} "
                        "(smaller cells copy the patch); use --latent fc")
    world = distributed.init(opts.device)  # torchrun: one process per device; otherwise a single process
    distributed.check(world, opts.model, opts.batch_size)
    torch.manual_seed(opts.seed)
    all_files, all_images = load_good_images(data_dir, opts.channels, opts.patch_size)
    keep, held = split_holdout(len(all_files), opts.holdout)
    files, images = [all_files[i] for i in keep], [all_images[i] for i in keep]
    held_files = [all_files[i] for i in held]
    if opts.model == "gmm" and opts.nh is None:
        opts = dataclasses.replace(opts, nh=min(GMM_DEFAULT_NH, opts.channels * opts.patch_size**2,
                                                len(images) * opts.crops_per_image))
    if opts.holdout > 0 and not held:
        logger.warning("%d good images are too few to hold out %d (>= %d needed); the initial threshold is the "
                       "highest score over the training images (seeds/003): calibrate on more good parts",
                       len(all_files), int(round(len(all_files) * opts.holdout)), MIN_HOLDOUT)
    device = distributed.place(world, pick_device(opts.device))
    use_bf16 = opts.model in ("vae", "ae") and (opts.precision == "bf16" or (
        opts.precision == "auto" and (device.type == "cuda" or cpu_bf16_pays())))
    sampler = CropSampler(images, opts.patch_size, distributed.rank_seed(opts.seed, world))
    if opts.model in ("vae", "ae"):  # gmm fits on the CPU; anogan keeps its own loop
        sampler.to(device)
    if world.size > 1:
        sampler = distributed.ShardedSampler(sampler, world)
    val_sampler = CropSampler([all_images[i] for i in held], opts.patch_size, opts.seed + 1) if held else None

    h, w = images[0].shape[1:]
    per_image = (math.floor((h - opts.patch_size) / opts.stride) + 1) * (math.floor((w - opts.patch_size) / opts.stride) + 1)
    steps_per_epoch = max(1, math.ceil(len(images) * per_image / opts.batch_size))
    total_steps, planned_by = planned_steps(opts, steps_per_epoch)
    budget_s = opts.max_minutes * 60 if opts.max_minutes else math.inf

    t0 = time.monotonic()
    if opts.model == "gmm":
        model, training = _fit_gmm(sampler, len(images), opts)
    elif opts.model == "anogan":
        model, training = _fit_anogan(sampler, device, total_steps, steps_per_epoch, budget_s, opts)
    else:
        model = build_model(opts).to(device)
        training = _fit_gradient(model, sampler, val_sampler, device, use_bf16, total_steps, steps_per_epoch,
                                 budget_s, opts, planned_by, world)
    seconds = time.monotonic() - t0

    training = {
        "data_dir": str(Path(data_dir).resolve()), "images": len(files), "data_fingerprint": fingerprint(files),
        "image_hashes": file_hashes(files),
        "holdout": {"fraction": opts.holdout, "images": len(held_files), "image_hashes": file_hashes(held_files),
                    "rule": "every k-th image of the sorted folder, evenly spaced; never trained on"},
        **training,
        "seconds": round(seconds, 1), "seed": opts.seed, "device": str(device),
        "autocast": "bf16" if use_bf16 else "fp32", "processes": world.size,
    }
    head = None
    if opts.anomaly_map:
        sigma = opts.blur_sigma
        head = {"name": f"{model.default_score}_map", "blur_sigma_px": float(sigma), "position": None}
    if not world.main:  # rank 0 exports and sets the threshold; the others return its card
        distributed.barrier(world)
        distributed.finish(world)
        return artifact.verify(out)
    export(model, opts, out, int(h), int(w), training, head=head)
    if opts.position_stats and len({tuple(t.shape) for t in all_images}) > 1:
        logger.warning("the good images differ in size: no position statistics (they need every frame to show the "
                       "same place at the same pixel); the anomaly map is compared with good parts globally")
        opts = dataclasses.replace(opts, position_stats=False)
    place_files = files if opts.place_score and opts.model in ("vae", "ae") and head is not None else []
    if place_files and len({tuple(t.shape) for t in all_images}) > 1:
        logger.warning("the good images differ in size: no place score (it needs every frame to show the same place "
                       "at the same pixel)")
        place_files = []
    card = set_initial_thresholds(out, held_files or files, opts, seconds, trained_on=not held_files,
                                  place_files=place_files)
    distributed.barrier(world)
    distributed.finish(world)
    return card


def export(model: nn.Module, opts: TrainOptions, out: Path, frame_h: int, frame_w: int,
           training: dict[str, Any], thresholds: dict[str, Any] | None = None,
           head: dict[str, Any] | None = None) -> dict[str, Any]:
    """Script the model (eval, CPU; VAE/AE decoder BatchNorms folded) and write it with its card: the one
    way an artifact is made."""
    model.eval().cpu()
    if isinstance(getattr(model, "decoder", None), ConvDecoder):
        model = subpixel_decoder(fold_decoder_batchnorm(model))  # the output deconv as a conv (PERFORMANCE.md)
    scripted = torch.jit.script(model)
    scores: dict[str, Any] = {"names": list(model.score_names), "default": model.default_score, "pixel_map": True,
                              "higher_is_anomalous": True}
    if head is not None:  # the anomaly-map score (anomaly_map.py) becomes the default
        scores["names"].append(head["name"])
        scores["default"] = head["name"]
    if opts.model in ("gmm", "anogan"):
        # GMM: its Mahalanobis distances (precisions up to 1/reg_covar) need float32, not bf16. AnoGAN: the latent
        # search runs autograd, so the scorer must use no_grad (not inference_mode) and fp32 for the Adam steps on z.
        scores["precision"] = "fp32"
        scores["needs_grad"] = opts.model == "anogan"
    card = {
        "model_id": opts.name or out.stem,
        "family": opts.model,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"channels": opts.channels, "color": "gray" if opts.channels == 1 else "bgr",
                  "scale": "x / 255", "frame_height": frame_h, "frame_width": frame_w},
        "patch": {"size": opts.patch_size, "stride": opts.stride, "cover_edges": True},
        "scores": scores,
        "architecture": architecture(model, opts),
        "thresholds": thresholds or {},
        "training": training,
        **({"anomaly_map": head} if head is not None else {}),
        "versions": {"edge_agent": edge_agent.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        **opts.extra_card,
    }
    return artifact.save(scripted, card, out)


def architecture(model: nn.Module, opts: TrainOptions) -> dict[str, Any]:
    """The family's parameters for the card."""
    if opts.model == "gmm":
        return {"nh": opts.nh, "components": opts.components, "covariance_type": "full", "reg_covar": opts.reg_covar,
                "reg_covar_description": "added to the diagonal of every covariance (scikit-learn reg_covar)"}
    arch: dict[str, Any] = {"nc": opts.nc, "nz": opts.nz, "depth": len(model.encoder.conv) // 3}
    if opts.model in ("vae", "ae"):
        cells = latent_cells(opts.patch_size, opts.latent)
        arch["latent"] = ({"kind": "fc", "size": opts.nz} if opts.latent == "fc" else
                          {"kind": "conv", "channels": opts.nz, "cells": f"{math.isqrt(cells)}x{math.isqrt(cells)}",
                           "size": opts.nz * cells, "head": "3x3 conv (encoder and decoder)"})
    if opts.model == "vae":
        arch["sigma_min"] = opts.sigma_min
    if opts.model == "anogan":
        arch.update({"gamma_steps": opts.gamma_steps, "lambda": opts.lam, "refine_steps": opts.refine_steps,
                     "search_optimizer": f"Adam(lr={opts.search_lr}, betas=(0.9, 0.999)) on z, G and D frozen",
                     "search_start": f"fixed N(0, 1) bank of {model.z_bank.shape[0]} latents, seed {opts.seed}",
                     "latent_search": opts.latent_search, "discriminator_features": "last conv layer",
                     "generator": "mirror of the encoder (linear + ConvTranspose 4x4/2 + BatchNorm + ReLU), sigmoid"})
    return arch


def lr_factor(progress: float, schedule: str, floor: float) -> float:
    """The learning rate's multiplier at `progress` in [0, 1] of the budget: cosine from 1 down to floor."""
    if schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model: nn.Module, crops: torch.Tensor, batch_size: int = 128) -> float:
    """Mean training objective on fixed held-out crops, deterministic (the VAE at z = mu_z)."""
    model.eval()
    total = 0.0
    for start in range(0, crops.shape[0], batch_size):
        x = crops[start : start + batch_size]
        if isinstance(model, VAE):
            mu_z, logvar_z = model.encode(x)
            t = model.terms(x, mu_z, mu_z, logvar_z)
            total += float((t["d"] + t["a"] + t["m"]).sum())
        else:
            total += float((model.reconstruct(x) - x).pow(2).flatten(1).mean(1).sum())
    model.train()
    return total / crops.shape[0]


def loss_read_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else LOSS_READ_EVERY


def _fit_gradient(model: nn.Module, sampler: CropSampler, val_sampler: CropSampler | None, device: torch.device,
                  use_bf16: bool, total_steps: int, steps_per_epoch: int, budget_s: float, opts: TrainOptions,
                  planned_by: str = "epochs", world: distributed.World = distributed.SINGLE) -> dict[str, Any]:
    """The VAE/AE Adam loop with a cosine learning rate over the budget (steps or time, whichever ends first)
    and an early stop when the held-out loss stops improving; returns the card's training summary."""
    # fused: one kernel for the whole update on CUDA instead of several per parameter
    optim = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay,
                             fused=device.type == "cuda")
    train_loss = distributed.loss_step(model, functools.partial(loss_fn, beta_nll=opts.beta_nll), world, opts.seed)
    model.train()
    val = val_sampler.sample(512).to(device) if val_sampler is not None else None
    check_every = max(50, total_steps // 40)
    best, best_step, checks_since_best, history = math.inf, 0, 0, []
    t0 = time.monotonic()
    step, ema, stopped_by = 0, None, planned_by
    # Reading the loss waits for the device; on a GPU read it every few steps so the host queues ahead.
    # read_losses is also where a diverged (non-finite) loss stops training, with its step.
    read_every = loss_read_every(device)
    pending: list[torch.Tensor] = []

    def read_losses() -> None:
        nonlocal ema
        if not pending:
            return
        values = torch.stack(pending).float().tolist()
        first = step - len(pending)
        pending.clear()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise DataError(f"training diverged at step {first + k} (loss {value}); lower --lr or check the images")
            ema = value if ema is None else 0.98 * ema + 0.02 * value
    with Progress(total_steps, "train", enabled=opts.progress and world.main) as bar:
        while step < total_steps:
            # every process uses the slowest one's clock: the same learning rate and the same stop step
            elapsed = distributed.agreed_max(world, time.monotonic() - t0)
            if elapsed >= budget_s:
                stopped_by = "time budget"
                break
            progress = max(step / total_steps, elapsed / budget_s)
            for group in optim.param_groups:
                group["lr"] = opts.lr * lr_factor(progress, opts.lr_schedule, opts.lr_floor)
            x = sampler.sample(opts.batch_size).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = train_loss(x)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            pending.append(loss.detach())
            step += 1
            checking = val is not None and (step % check_every == 0 or step == total_steps)
            if step % read_every == 0 or checking or step == total_steps:
                read_losses()
            if checking:
                v = heldout_loss(model, val)
                history.append([step, round(v, 4)])
                # An improvement must beat noise: 0.1 % of the loss's scale.
                if not math.isfinite(best) or v < best - 1e-3 * max(abs(best), 1.0):
                    best, best_step, checks_since_best = v, step, 0
                else:
                    checks_since_best += 1
                if distributed.any_rank(world, opts.early_stop and checks_since_best >= opts.patience
                                        and step >= min(opts.min_steps, total_steps)):
                    stopped_by = f"converged (held-out loss flat for {opts.patience} checks)"
                    bar.update(0, loss=ema, heldout=v)
                    break
            eta = min((total_steps - step) * elapsed / max(step - 1, 1), budget_s - elapsed) if step > 1 else None
            bar.update(1, eta_s=eta, epoch=f"{step // steps_per_epoch + 1}/{max(1, total_steps // steps_per_epoch)}",
                       **({"loss": ema} if ema is not None else {}),
                       **({"heldout": history[-1][1]} if history else {}))
        read_losses()
        bar.fields["stopped"] = stopped_by
    return {"steps": step, "planned_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "epochs": round(step / steps_per_epoch, 3), "stopped_by": stopped_by, "final_loss": ema,
            "heldout_loss": {"best": best if math.isfinite(best) else None, "best_step": best_step,
                             "history": history, "crops": 0 if val is None else int(val.shape[0])},
            "batch_size": opts.batch_size, "lr": opts.lr,
            "lr_schedule": f"cosine to {opts.lr_floor} x lr over the budget" if opts.lr_schedule == "cosine"
            else "constant", "weight_decay": opts.weight_decay, "optimizer": "Adam(betas=(0.9, 0.999))"}


def _fit_gmm(sampler: CropSampler, n_images: int, opts: TrainOptions) -> tuple[nn.Module, dict[str, Any]]:
    """No gradient loop: crops_per_image random crops per image (seed 000: 100), then PCA + EM (scikit-learn)."""
    from edge_agent.train.gmm import fit_pca_gmm

    n_crops = n_images * opts.crops_per_image
    if opts.nh > min(n_crops, opts.channels * opts.patch_size**2):
        raise DataError(f"--nh {opts.nh} is more than the {n_crops} crops or the {opts.channels * opts.patch_size**2} "
                        "pixels of a patch allow; lower --nh or raise --crops-per-image")
    if opts.components > n_crops:
        raise DataError(f"--components {opts.components} is more than the {n_crops} crops; lower it")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError("--model gmm needs scikit-learn at training time: pip install 'edge-agent[train]'") from None
    with Progress(1, "fit pca+gmm", enabled=opts.progress) as bar:
        module, _, _, info = fit_pca_gmm(sampler.sample(n_crops), opts.nh, opts.components, opts.reg_covar, opts.seed)
        bar.update(1)
    if not info["converged"]:
        logger.warning("GMM EM did not converge in %d iterations; the model is usable but may be improved",
                       info["em_iterations"])
    return module, {"steps": info["em_iterations"], "stopped_by": "converged" if info["converged"] else "max_iter",
                    "final_loss": info["mean_nll"], "crops": n_crops, "crops_per_image": opts.crops_per_image,
                    "pca_explained_variance": info["explained_variance"],
                    "pca_residual_variance": info["residual_variance"],
                    "optimizer": "scikit-learn PCA + GaussianMixture EM (k-means init)"}


def _fit_anogan(sampler: CropSampler, device: torch.device, total_steps: int, steps_per_epoch: int, budget_s: float,
                opts: TrainOptions) -> tuple[nn.Module, dict[str, Any]]:
    """DCGAN, then the encoder that inverts the generator (see anogan.train_anogan)."""
    from edge_agent.train.anogan import train_anogan

    model = build_model(opts).to(device)
    with Progress(total_steps + max(1, total_steps // 2), "train", enabled=opts.progress) as bar:
        try:
            info = train_anogan(model, lambda: sampler.sample(opts.batch_size).to(device, non_blocking=True), device,
                                total_steps, budget_s, opts.lr,
                                on_step=lambda phase, loss: bar.update(1, phase=phase, loss=loss))
        except FloatingPointError as e:
            raise DataError(f"{e}; lower --lr or check the images") from None
    done = info["gan_steps"] >= total_steps and info["encoder_steps"] >= max(1, total_steps // 2)
    return model, {"steps": info["gan_steps"] + info["encoder_steps"], "steps_per_epoch": steps_per_epoch,
                   "epochs": round(info["gan_steps"] / steps_per_epoch, 3),
                   "stopped_by": "epochs" if done else "time budget", "final_loss": info["final_loss_encoder"],
                   "batch_size": opts.batch_size, "lr": opts.lr, **info}


def fit_place(scorer: Any, files: list[Path], opts: TrainOptions, budget_s: float) -> tuple[np.ndarray, list[Path]]:
    """The codes (images, cells, D) of up to opts.place_images of `files` (evenly spaced), within budget_s."""
    if len(files) > opts.place_images:
        files = [files[i * len(files) // opts.place_images] for i in range(opts.place_images)]
    codes, used = [], []
    t0 = time.monotonic()
    with Progress(len(files), "place", enabled=opts.progress) as bar:
        for f in files:
            if len(used) >= opts.min_place_images and time.monotonic() - t0 > budget_s:
                break
            codes.append(scorer.codes(scorer.patches(read_image(f))[1]).double().numpy())
            used.append(f)
            bar.update(1)
    if len(used) < len(files):
        logger.info("place score: %d of %d training images fitted the %.0f s budget", len(used), len(files), budget_s)
    return np.stack(codes), used


def set_initial_thresholds(path: Path, files: list[Path], opts: TrainOptions, train_seconds: float,
                           trained_on: bool = False, place_files: list[Path] | None = None) -> dict[str, Any]:
    """The threshold a freshly trained model ships with, from good images it never saw (`files`, the
    held-out ones): the anomaly map's position statistics from every other image, then every score's
    threshold by the good-only FRR method (calibrate.py) on the rest, with the bound it achieves.

    trained_on: `files` are the training images (too few to hold out): the seed's max-train rule instead.
    place_files: training images to fit the place score on (anomaly_map.PlaceStats; none: no place score); it
    is kept when the held-out images' codes show that places differ (PlaceStats.gain).
    The phase is kept to a small share of the training time: after the first images it scores only as
    many as fit in max(60 s, 10 % of training) (and as much again for the place score's codes); the card
    says how many it used.
    """
    from edge_agent import calibrate  # scoring side; imported late to keep train light
    from edge_agent.anomaly_map import LowSide, MapHead, PlaceStats, PositionStats, SurfaceFilters, Whitening, fold_mean
    from edge_agent.evaluation import ImageResult, blank_frame_scores
    from edge_agent.images import read_image
    from edge_agent.scoring import Scorer

    scorer = Scorer(path, device="cpu", threshold=math.inf, warmup=False)
    # The floor for each score's low bound (calibrate.low_bound); the map head's score is refitted below, so
    # it gets the spread rule.
    blanks = blank_frame_scores(scorer, [n for n in scorer.card["scores"]["names"] if n != scorer.head_name])
    if opts.threshold_images and opts.threshold_images < len(files):
        files = [files[round(i * len(files) / opts.threshold_images)] for i in range(opts.threshold_images)]
    head = scorer.head
    # From fewer images the per-place spread is noise, and normalizing by it costs more than it buys (measured:
    # 20 images lowered the 640x480 AUROC 0.986 -> 0.982, 50-100 raised the 128x128 one 0.984 -> 0.990-0.994).
    fit_position = (head is not None and opts.position_stats and not trained_on
                    and len(files) >= 2 * opts.min_position_images)
    if head is not None and opts.position_stats and not trained_on and not fit_position:
        logger.info("anomaly map: no position statistics (%d held-out images; they need >= %d, half of them for "
                    "the statistics): hold out more good images (--holdout) for a fixtured part", len(files),
                    2 * opts.min_position_images)
    # Alternate: even images give the position statistics, odd ones the threshold, so a phase cut short by
    # the time budget still has both halves.
    budget_s = max(60.0, 0.1 * train_seconds)
    place_check: dict[str, Any] | None = None
    fit_place_score = bool(place_files) and head is not None and not trained_on
    if place_files and not fit_place_score:
        place_check = {"used": False, "why": "no held-out images to check it on"}
    elif fit_place_score and len(place_files) < opts.min_place_images:
        place_check = {"used": False, "why": f"{len(place_files)} training images; it needs >= {opts.min_place_images}"}
        fit_place_score = False
    train_codes, held_codes = None, []
    fit_white = (head is not None and opts.whiten and not trained_on and opts.model in ("vae", "ae")
                 and hasattr(scorer.module, "pixel_map_residual"))
    signed: list[torch.Tensor] = []  # each threshold image's folded signed residual (Whitening)
    if fit_place_score:
        train_codes, _ = fit_place(scorer, place_files, opts, budget_s)
        place_mean, place_chol = PlaceStats.fit(train_codes, opts.place_shrink)
    t0 = time.monotonic()
    position_maps: list[torch.Tensor] = []
    position_files: list[Path] = []
    raw: list[dict[str, np.ndarray]] = []
    smooth: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []  # each threshold image's raw patch scores as the head sees them (the low side)
    frames: list[torch.Tensor] = []  # each threshold image itself, (H, W) (anomaly_map.SurfaceFilters)
    fit_surface = head is not None and opts.surface_filters and not trained_on
    surface_check: dict[str, Any] | None = None
    grids: list[Any] = []
    used: list[Path] = []
    with Progress(len(files), "threshold", enabled=opts.progress) as bar:
        for i, f in enumerate(files):
            done = len(position_files) + len(used)
            if done >= MIN_HOLDOUT and time.monotonic() - t0 > budget_s:
                break
            grid, patches = scorer.patches(read_image(f))
            if fit_position and i % 2 == 0:
                position_maps.append(head.smoothed(grid, scorer.pixel_maps(patches)))
                position_files.append(f)
            else:
                raw.append(scorer.score_patches_all(patches))
                if head is not None:
                    if fit_white:
                        maps, residuals, _ = scorer.maps_residuals(patches)
                        signed.append(fold_mean(grid, residuals))
                    else:
                        maps = scorer.pixel_maps(patches)
                    smooth.append(head.smoothed(grid, maps))
                    sums.append(maps.flatten(1).float().sum(1).cpu())
                    if fit_surface:
                        frames.append(SurfaceFilters.frame_of(grid, patches))
                    if fit_place_score:
                        held_codes.append(scorer.codes(patches).double().numpy())
                grids.append(grid)
                used.append(f)
            bar.update(1)
        if position_maps:
            head = MapHead(head.sigma_px, PositionStats.fit(position_maps))
        images = [ImageResult(f, grid, dict(raw[k]), scorer.counted(grid))
                  for k, (f, grid) in enumerate(zip(used, grids))]
        if head is not None:
            for k, image in enumerate(images):
                image.scores[scorer.head_name] = head.scores_of_smoothed(image.grid, smooth[k]).numpy()
            if fit_white and signed:
                white = Whitening.weighted(signed, [i.image_score(scorer.head_name) for i in images],
                                           opts.whiten_window, stride=grids[0].stride if opts.whiten_place else 0)
                if white is not None:
                    head = dataclasses.replace(head, white=white)
                    for k, image in enumerate(images):
                        image.scores[scorer.head_name] = head.scores_of_smoothed(image.grid, smooth[k],
                                                                                 signed=signed[k]).numpy()
            if fit_place_score and held_codes:
                place, place_check = _checked_place(train_codes, np.stack(held_codes), place_mean, place_chol,
                                                    [i.image_score(scorer.head_name) for i in images], opts)
                if place is not None:
                    head = dataclasses.replace(head, place=place)
                    for k, image in enumerate(images):
                        image.scores[scorer.head_name] = head.scores_of_smoothed(
                            image.grid, smooth[k], codes=torch.from_numpy(held_codes[k]).float(),
                            signed=signed[k] if head.white is not None else None).numpy()
            if fit_surface and frames:
                surface, surface_check = SurfaceFilters.checked(frames, grids[0].stride,
                                                                [i.image_score(scorer.head_name) for i in images])
                if surface is not None:
                    head = dataclasses.replace(head, surface=surface)
                    for k, image in enumerate(images):
                        image.scores[scorer.head_name] = head.scores_of_smoothed(
                            image.grid, smooth[k],
                            codes=torch.from_numpy(held_codes[k]).float() if head.place is not None else None,
                            signed=signed[k] if head.white is not None else None, frame=frames[k]).numpy()
            if opts.texture_loss and images:  # the low side from the map's scores without it, on the same images
                scores = [i.image_score(scorer.head_name) for i in images]
                head = dataclasses.replace(head, low=LowSide.fit(sums, scores))
            if head.low is not None:
                for k, image in enumerate(images):
                    image.scores[scorer.head_name] = np.maximum(image.scores[scorer.head_name],
                                                                head.low.scores_from_sums(sums[k]).numpy())
        results: dict[str, list[float]] = {}
        for image in images:
            for name in image.scores:
                results.setdefault(name, []).append(image.image_score(name))
    if len(used) < len(files) - len(position_files):
        logger.info("threshold phase: %d of %d held-out images fitted the %.0f s budget", len(used) +
                    len(position_files), len(files), budget_s)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    hashes = file_hashes(used)

    def change(card: dict[str, Any]) -> dict[str, Any]:
        if head is not None:
            card["anomaly_map"] = {**card["anomaly_map"], **head.card(), "name": card["anomaly_map"]["name"]}
            if head.position is not None:
                card["anomaly_map"]["position"]["image_hashes"] = file_hashes(position_files)
            if place_check is not None:
                card["anomaly_map"]["place_check"] = place_check
            if surface_check is not None:
                card["anomaly_map"]["surface_check"] = surface_check
        for name in card["scores"]["names"]:
            good = np.array(results[name], dtype=np.float64)
            method = "max-train" if trained_on else "frr"
            entry = calibrate.choose(good, None, method, opts.target_frr, None, opts.confidence, blanks.get(name))
            entry.update({
                "description": ("highest image score over the training images (seeds/003): too few images to hold "
                                "out; calibrate to replace") if trained_on else
                               f"{entry['description']}, on good images held out of training; calibrate to replace",
                "images": len(used), "image_hashes": [] if trained_on else hashes,
                "data_fingerprint": card["training"]["data_fingerprint"], "chosen_at": now,
                "good_image_scores": quantiles(good), "seconds": round(time.monotonic() - t0, 1),
            })
            card["thresholds"][name] = entry
        return card

    return artifact.update_card(path, change, extras=head.extras() if head is not None else None)


def _checked_place(train_codes: np.ndarray, held_codes: np.ndarray, mean: np.ndarray, chol: np.ndarray,
                   map_image_scores: list[float], opts: TrainOptions) -> tuple[Any, dict[str, Any]]:
    """The place score if the held-out codes say places differ (PlaceStats.gain >= PLACE_MIN_GAIN_NATS), with
    its weight; and the check's record for the card."""
    from edge_agent.anomaly_map import PLACE_MIN_GAIN_NATS, PlaceStats

    gain = PlaceStats.gain(train_codes, held_codes, mean, chol, opts.place_shrink)
    least = PLACE_MIN_GAIN_NATS if opts.place_min_gain is None else opts.place_min_gain
    check: dict[str, Any] = {"gain_nats": round(gain, 3), "min_gain_nats": least,
                             "images": int(train_codes.shape[0]), "checked_on": int(held_codes.shape[0]),
                             "used": gain >= least}
    if not check["used"]:
        check["why"] = (f"held-out good codes gain {gain:.1f} nats from their place's Gaussian over a pooled one "
                        f"(< {least:g}): the places differ too little, as on a texture or a part that moves more "
                        "than a few px (--place-min-gain to change)")
        logger.info("place score left out: %s", check["why"])
        return None, check
    place_max = float(np.median(PlaceStats.distances(held_codes, mean, chol).max(1)))
    map_max = float(np.median(map_image_scores))
    if not (place_max > 0 and map_max > 0 and math.isfinite(place_max) and math.isfinite(map_max)):
        check.update(used=False, why=f"the medians of the map ({map_max:g}) and place ({place_max:g}) image scores "
                                     "cannot put them on one scale")
        return None, check
    logger.info("place score: held-out good codes gain %.1f nats from their place; weight %.4g", gain, map_max / place_max)
    place = PlaceStats(mean.astype(np.float32), chol.astype(np.float32), map_max / place_max,
                       int(train_codes.shape[0]), opts.place_shrink, gain)
    return place, check


def quantiles(values: np.ndarray) -> dict[str, float]:
    """Summary of a good-image score distribution, kept in the card to watch for drift."""
    q = np.quantile(values, [0.5, 0.9, 0.99]) if len(values) else [math.nan] * 3
    return {"n": int(len(values)), "mean": float(np.mean(values)), "std": float(np.std(values)),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(np.max(values))}


def options_dict(opts: TrainOptions) -> dict[str, Any]:
    return asdict(opts)

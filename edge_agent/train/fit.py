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
from edge_agent.train.nets import AE, VAE, ConvDecoder, fold_decoder_batchnorm

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
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast where the hardware has it
    name: str | None = None
    progress: bool = True
    # gmm (SPEC 2.3): PCA dims Nh, mixture components Nz, covariance regularizer, crops per image (seed: 100)
    nh: int = 32
    components: int = 8
    reg_covar: float = 1e-4
    crops_per_image: int = 100
    # anogan (SPEC 2.4): search steps Gamma, weight lambda, refine steps k, search Adam lr, default latent search
    gamma_steps: int = 100
    lam: float = 0.1
    refine_steps: int = 10
    search_lr: float = 0.05
    latent_search: str = "encoder+refine"
    threshold_images: int | None = None  # score only this many training images (evenly spaced) for the threshold
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
    if opts.model == "anogan":
        from edge_agent.train.anogan import AnoGAN

        if opts.latent_search not in LATENT_SEARCHES:
            raise DataError(f"--latent-search {opts.latent_search!r} is not one of: {', '.join(LATENT_SEARCHES)}")
        return AnoGAN(opts.channels, opts.patch_size, opts.nc, opts.nz, opts.gamma_steps, opts.refine_steps,
                      opts.lam, opts.search_lr, opts.seed, LATENT_SEARCHES[opts.latent_search])
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
    if opts.model not in FAMILIES:
        raise DataError(f"unknown model family {opts.model!r}; choose one of: {', '.join(FAMILIES)}")
    torch.manual_seed(opts.seed)
    files, images = load_good_images(data_dir, opts.channels, opts.patch_size)
    device = pick_device(opts.device)
    use_bf16 = opts.model in ("vae", "ae") and (opts.precision == "bf16" or (
        opts.precision == "auto" and (device.type == "cuda" or cpu_has_bf16())))
    sampler = CropSampler(images, opts.patch_size, opts.seed)

    h, w = images[0].shape[1:]
    per_image = (math.floor((h - opts.patch_size) / opts.stride) + 1) * (math.floor((w - opts.patch_size) / opts.stride) + 1)
    steps_per_epoch = max(1, math.ceil(len(images) * per_image / opts.batch_size))
    total_steps = steps_per_epoch * opts.epochs
    budget_s = opts.max_minutes * 60 if opts.max_minutes else math.inf

    t0 = time.monotonic()
    if opts.model == "gmm":
        model, training = _fit_gmm(sampler, len(images), opts)
    elif opts.model == "anogan":
        model, training = _fit_anogan(sampler, device, total_steps, steps_per_epoch, budget_s, opts)
    else:
        model = build_model(opts).to(device)
        training = _fit_gradient(model, sampler, device, use_bf16, total_steps, steps_per_epoch, budget_s, opts)
    seconds = time.monotonic() - t0

    training = {
        "data_dir": str(data_dir), "images": len(files), "data_fingerprint": fingerprint(files),
        "image_hashes": file_hashes(files),
        **training,
        "seconds": round(seconds, 1), "seed": opts.seed, "device": str(device),
        "autocast": "bf16" if use_bf16 else "fp32",
    }
    export(model, opts, out, int(h), int(w), training)
    if opts.threshold_images and opts.threshold_images < len(files):
        # AnoGAN's 100-step search costs minutes per image on a CPU; an evenly spaced subset keeps it affordable.
        files = [files[round(i * len(files) / opts.threshold_images)] for i in range(opts.threshold_images)]
    return set_training_thresholds(out, files, progress=opts.progress)


def export(model: nn.Module, opts: TrainOptions, out: Path, frame_h: int, frame_w: int,
           training: dict[str, Any], thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Script the model (eval, CPU; VAE/AE decoder BatchNorms folded) and write it with its card: the one
    way an artifact is made."""
    model.eval().cpu()
    if isinstance(getattr(model, "decoder", None), ConvDecoder):
        model = fold_decoder_batchnorm(model)
    scripted = torch.jit.script(model)
    scores: dict[str, Any] = {"names": list(model.score_names), "default": model.default_score, "pixel_map": True,
                              "higher_is_anomalous": True}
    if opts.model in ("gmm", "anogan"):
        # GMM: float64 Cholesky factors must not be cast to bf16. AnoGAN: the latent search runs autograd,
        # so the scorer must use no_grad (not inference_mode) and fp32 for the Adam steps on z.
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
    if opts.model == "vae":
        arch["sigma_min"] = opts.sigma_min
    if opts.model == "anogan":
        arch.update({"gamma_steps": opts.gamma_steps, "lambda": opts.lam, "refine_steps": opts.refine_steps,
                     "search_optimizer": f"Adam(lr={opts.search_lr}, betas=(0.9, 0.999)) on z, G and D frozen",
                     "search_start": f"fixed N(0, 1) bank of {model.z_bank.shape[0]} latents, seed {opts.seed}",
                     "latent_search": opts.latent_search, "discriminator_features": "last conv layer",
                     "generator": "mirror of the encoder (linear + ConvTranspose 4x4/2 + BatchNorm + ReLU), sigmoid"})
    return arch


def _fit_gradient(model: nn.Module, sampler: CropSampler, device: torch.device, use_bf16: bool, total_steps: int,
                  steps_per_epoch: int, budget_s: float, opts: TrainOptions) -> dict[str, Any]:
    """The VAE/AE Adam loop; returns the card's training summary."""
    optim = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay)
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
    return {"steps": step, "steps_per_epoch": steps_per_epoch, "epochs": round(step / steps_per_epoch, 3),
            "stopped_by": stopped_by, "final_loss": ema, "batch_size": opts.batch_size, "lr": opts.lr,
            "weight_decay": opts.weight_decay, "optimizer": "Adam(betas=(0.9, 0.999))"}


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


def set_training_thresholds(path: Path, files: list[Path], progress: bool = True) -> dict[str, Any]:
    """The seed's rule until calibration: threshold = the highest image score over the training images."""
    from edge_agent.calibrate import low_bound
    from edge_agent.evaluation import blank_frame_scores, score_files  # scoring side; imported late to keep train light
    from edge_agent.scoring import Scorer

    scorer = Scorer(path, device="cpu", threshold=math.inf, warmup=False)
    results = score_files(scorer, files, progress=progress, label="threshold")
    blanks = blank_frame_scores(scorer, scorer.card["scores"]["names"])
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
                "low": low_bound(image_scores, blanks[name]),
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

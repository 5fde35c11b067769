"""SPEC 2.4: AnoGAN (DCGAN + latent search) with the encoder the seed names as the fix for its speed.

The exported module runs the whole latent search itself, batched over all patches of a frame. The
search needs autograd, so callers must not use torch.inference_mode (the card says scores.needs_grad).
"""

import time
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.train.nets import ConvDecoder, ConvEncoder, encoder_sizes

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
BANK_SIZE = 1024  # fixed random starts for the "search" score: deterministic, no global RNG at score time


class Discriminator(nn.Module):
    """DCGAN discriminator: Conv(4x4, stride 2) + LeakyReLU(0.2), BatchNorm after the first; then a linear logit.

    features(x) is the last conv layer's output, the f of AnoGAN's discrimination loss.
    """

    def __init__(self, channels: int, patch_size: int, ndf: int):
        super().__init__()
        sizes = encoder_sizes(patch_size)
        layers: List[nn.Module] = []
        c_in = channels
        for n in range(len(sizes) - 1):
            c_out = ndf * 2**n
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=n == 0))
            if n > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * sizes[-1] ** 2, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)).squeeze(1)


class AnoGAN(nn.Module):
    """Generator G, discriminator D and encoder E; every score is A(x) = (1 - lam) R + lam D at the final z.

    Scores differ in how z is found: encoder = E(x) (one pass), encoder_refine = refine_steps of Adam
    from E(x) (default), search = gamma_steps of Adam from a fixed random z (the original AnoGAN).
    R = sum |x - G(z)|, D = sum |f(x) - f(G(z))| with f the discriminator's last conv layer.
    """

    score_names: List[str]
    default_score: str

    def __init__(self, channels: int = 1, patch_size: int = 32, nc: int = 32, nz: int = 20, gamma_steps: int = 100,
                 refine_steps: int = 10, lam: float = 0.1, search_lr: float = 0.05, search_seed: int = 0,
                 default_score: str = "encoder_refine"):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.nz = nz
        self.gamma_steps = gamma_steps
        self.refine_steps = refine_steps
        self.lam = lam
        self.search_lr = search_lr
        self.generator = ConvDecoder(channels, patch_size, nc, nz)
        self.discriminator = Discriminator(channels, patch_size, nc)
        self.encoder = ConvEncoder(channels, patch_size, nc, nz)
        bank = torch.randn(BANK_SIZE, nz, generator=torch.Generator().manual_seed(search_seed))
        self.register_buffer("z_bank", bank)
        self.score_names = ["encoder_refine", "encoder", "search"]
        if default_score not in self.score_names:
            raise ValueError(f"default score {default_score!r} is not one of {self.score_names}")
        self.default_score = default_score

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, Nz) -> G(z) (N,C,P,P) in [0, 1]."""
        return torch.sigmoid(self.generator(z))

    def loss_terms(self, x: torch.Tensor, fx: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per patch (R, D), each (N,), for patches x with discriminator features fx at latent z."""
        g = self.generate(z)
        r = (x - g).abs().flatten(1).sum(1)
        d = (fx - self.discriminator.features(g)).abs().sum(1)
        return r, d

    def anomaly(self, x: torch.Tensor, fx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r, d = self.loss_terms(x, fx, z)
        return (1.0 - self.lam) * r + self.lam * d

    def random_start(self, n: int) -> torch.Tensor:
        idx = torch.arange(n, device=self.z_bank.device) % self.z_bank.shape[0]
        return self.z_bank[idx]

    @torch.jit.export
    def search(self, x: torch.Tensor, z0: torch.Tensor, steps: int) -> torch.Tensor:
        """Adam on z for `steps` steps, all patches at once, G and D frozen; (N, Nz) -> (N, Nz).

        Patches are independent: the summed loss gives each z its own gradient, and Adam is elementwise.
        """
        x = x.float()
        z = z0.detach().float()
        if steps <= 0:
            return z
        # A fresh tensor is an inference tensor only under inference_mode (zeros_like: not constant-folded).
        if torch.zeros_like(z).is_inference():
            raise RuntimeError("AnoGAN latent search needs autograd: call it under torch.no_grad(), "
                               "not torch.inference_mode() (the card says scores.needs_grad)")
        was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        fx = self.discriminator.features(x)
        torch.set_grad_enabled(True)
        b1 = 0.9  # ADAM_BETA1; TorchScript cannot read module-level floats
        b2 = 0.999  # ADAM_BETA2
        m = torch.zeros_like(z)
        v = torch.zeros_like(z)
        for t in range(1, steps + 1):
            zr = z.detach().requires_grad_(True)
            loss = self.anomaly(x, fx, zr).sum()
            grads = torch.autograd.grad([loss], [zr])
            g = grads[0]
            assert g is not None
            g = g.detach()
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            m_hat = m / (1.0 - b1**t)
            v_hat = v / (1.0 - b2**t)
            z = z - self.search_lr * m_hat / (torch.sqrt(v_hat) + 1e-8)
        torch.set_grad_enabled(was_enabled)
        return z.detach()

    def latent(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name == "encoder":
            return self.encoder(x).float()
        if name == "encoder_refine":
            return self.search(x, self.encoder(x).float(), self.refine_steps)
        if name == "search":
            return self.search(x, self.random_start(x.shape[0]), self.gamma_steps)
        raise ValueError("unknown score name")

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.float()
        z = self.latent(x, name)
        return self.anomaly(x, self.discriminator.features(x), z).detach()

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = x.float()
        fx = self.discriminator.features(x)
        z_enc = self.encoder(x).float()
        out: Dict[str, torch.Tensor] = {}
        out["encoder"] = self.anomaly(x, fx, z_enc).detach()
        out["encoder_refine"] = self.anomaly(x, fx, self.search(x, z_enc, self.refine_steps)).detach()
        out["search"] = self.anomaly(x, fx, self.search(x, self.random_start(x.shape[0]), self.gamma_steps)).detach()
        return out

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, P): |x - G(z)| averaged over channels, z from the default score's latent search."""
        x = x.float()
        z = self.latent(x, self.default_score)
        return (x - self.generate(z)).abs().mean(1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x, self.default_score)


def train_anogan(model: AnoGAN, sample, device: torch.device, total_steps: int, budget_s: float, encoder_lr: float,
                 gan_lr: float = 2e-4, on_step=None) -> Dict[str, Any]:
    """Two phases: DCGAN (non-saturating loss) for total_steps, then the encoder for total_steps // 2 with G and D
    frozen (izi_f of f-AnoGAN: pixel MSE + discriminator-feature MSE of x vs G(E(x))).

    The time budget is split 70/30 between the phases. sample(n) -> (n,C,P,P) crops on device.
    """
    g, d, e = model.generator, model.discriminator, model.encoder
    opt_g = torch.optim.Adam(g.parameters(), lr=gan_lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=gan_lr, betas=(0.5, 0.999))
    opt_e = torch.optim.Adam(e.parameters(), lr=encoder_lr, betas=(ADAM_BETA1, ADAM_BETA2))
    bce = nn.BCEWithLogitsLoss()
    t0 = time.monotonic()
    gan_steps, ema_d, ema_g = 0, None, None
    g.train(), d.train()
    while gan_steps < total_steps and (gan_steps == 0 or time.monotonic() - t0 < 0.7 * budget_s):
        x = sample()
        z = torch.randn(x.shape[0], model.nz, device=device)
        fake = model.generate(z)
        loss_d = bce(d(x), torch.ones(x.shape[0], device=device)) + bce(d(fake.detach()), torch.zeros(x.shape[0], device=device))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = bce(d(fake), torch.ones(x.shape[0], device=device))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
            raise FloatingPointError(f"GAN training diverged at step {gan_steps}")
        gan_steps += 1
        ema_d = loss_d.item() if ema_d is None else 0.98 * ema_d + 0.02 * loss_d.item()
        ema_g = loss_g.item() if ema_g is None else 0.98 * ema_g + 0.02 * loss_g.item()
        if on_step is not None:
            on_step("gan", ema_g)
    gan_seconds = time.monotonic() - t0

    g.eval(), d.eval(), e.train()
    for p in list(g.parameters()) + list(d.parameters()):
        p.requires_grad_(False)
    enc_steps, ema_e, enc_total = 0, None, max(1, total_steps // 2)
    while enc_steps < enc_total and (enc_steps == 0 or time.monotonic() - t0 < budget_s):
        x = sample()
        recon = model.generate(e(x))
        loss_e = F.mse_loss(recon, x) + F.mse_loss(d.features(recon), d.features(x))
        opt_e.zero_grad(set_to_none=True)
        loss_e.backward()
        opt_e.step()
        enc_steps += 1
        ema_e = loss_e.item() if ema_e is None else 0.98 * ema_e + 0.02 * loss_e.item()
        if on_step is not None:
            on_step("encoder", ema_e)
    e.eval()
    return {"gan_steps": gan_steps, "gan_seconds": round(gan_seconds, 1), "encoder_steps": enc_steps,
            "final_loss_d": ema_d, "final_loss_g": ema_g, "final_loss_encoder": ema_e,
            "gan_optimizer": f"Adam(lr={gan_lr}, betas=(0.5, 0.999)), non-saturating BCE",
            "encoder_optimizer": f"Adam(lr={encoder_lr}, betas=({ADAM_BETA1}, {ADAM_BETA2})), MSE(x, G(E(x))) + MSE(f(x), f(G(E(x))))"}

"""The seed networks as pure, scriptable nn.Modules: the Gaussian-decoder VAE and the autoencoder.

Every model takes patches x (N, C, P, P) float in [0, 1] and scores them (N,) float32, higher =
more anomalous. The exported TorchScript keeps these methods: forward, score, scores, pixel_map.
"""

import math
from typing import Dict, Final, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_DEPTH = 5  # the seed's encoder: 5 conv layers, kernel 4, stride 2
MIN_BOTTLENECK = 3
# A conv latent sits after at most 4 layers (cells of 16 px): after the seed's 5 (3 x 3 cells of 32 px at P 96) it
# fit the 640x480 part's thread no better than the fc latent in 14 CPU minutes (docs/RESULTS.md, round 5).
CONV_LATENT_DEPTH = 4
MIN_CONV_LATENT_PATCH = 28  # 3 layers, cells of >= 7 px: finer cells carry the patch itself through the code


def encoder_sizes(patch_size: int) -> List[int]:
    """Spatial sizes through the encoder: [P, P//2, ...]; as deep as the seed (5) while the map stays >= 3.

    P=96 gives the seed's 5 layers (96..3), P=28 gives 3 (28, 14, 7, 3), P=16 gives 2 (16, 8, 4).
    """
    sizes = [patch_size]
    while len(sizes) <= MAX_DEPTH and sizes[-1] // 2 >= MIN_BOTTLENECK:
        sizes.append(sizes[-1] // 2)
    if len(sizes) < 3:
        raise ValueError(f"patch size {patch_size} is too small; use a patch size >= 16")
    return sizes


class Layers(nn.Sequential):
    """nn.Sequential whose first and last convolutions take their input in their own dtype.

    So a module cast to bf16/fp16 takes float32 patches, and the mixed policy of scoring.py (the
    output layer in float32) works. No casts in between: they would stop freezing from folding a
    conv with its BatchNorm and break oneDNN's chain of layers (casts are no-ops when dtypes agree).
    """

    last: Final[int]

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.last = len(layers) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self):
            if hasattr(layer, "stride") and (i == 0 or i == self.last):  # static per layer: Conv2d, ConvTranspose2d
                x = layer(x.to(layer.weight.dtype))
            else:
                x = layer(x)
        return x


def flatten_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.flatten(x, 1).to(dtype)


LATENTS = ("fc", "conv")


class ConvEncoder(nn.Module):
    """Conv(4x4, stride 2) + BatchNorm + ReLU layers; layer n has nc * 2**(n-1) channels; then the latent head.

    latent "fc" (the seed): one linear layer to out_features. latent "conv": at most CONV_LATENT_DEPTH layers
    (cells of 16 px: 6 x 6 at P 96), then a 3x3 convolution to out_features channels at every cell, flattened
    channel-major, so the code is out_features * s * s values with a place in the patch (VAE: first half
    mu_z, then log var).
    """

    conv_latent: Final[bool]

    def __init__(self, channels: int, patch_size: int, nc: int, out_features: int, latent: str = "fc"):
        super().__init__()
        sizes = latent_sizes(patch_size, latent)
        layers: List[nn.Module] = []
        c_in = channels
        for n in range(len(sizes) - 1):
            c_out = nc * 2**n
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.conv = Layers(*layers)
        self.conv_latent = latent == "conv"
        self.fc = nn.Conv2d(c_in, out_features, 3, 1, 1) if self.conv_latent else nn.Linear(c_in * sizes[-1] ** 2, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_latent:
            return torch.flatten(self.fc(self.conv(x).to(self.fc.weight.dtype)), 1)
        return self.fc(flatten_as(self.conv(x), self.fc.weight.dtype))


def latent_sizes(patch_size: int, latent: str) -> List[int]:
    """Spatial sizes through the encoder for a latent kind: the seed's (fc) or down to 16-px cells (conv)."""
    if latent not in LATENTS:
        raise ValueError(f"latent {latent!r} is not one of: {', '.join(LATENTS)}")
    sizes = encoder_sizes(patch_size)
    return sizes[: CONV_LATENT_DEPTH + 1] if latent == "conv" else sizes


def latent_cells(patch_size: int, latent: str) -> int:
    """How many places the code has: 1 for the seed's fc latent, s * s for the conv latent."""
    return latent_sizes(patch_size, latent)[-1] ** 2 if latent == "conv" else 1


class ConvDecoder(nn.Module):
    """The encoder's mirror: linear (latent "conv": a 3x3 convolution from nz channels per cell), then
    ConvTranspose(4x4, stride 2) layers back to P x P."""

    conv_latent: Final[bool]

    def __init__(self, out_channels: int, patch_size: int, nc: int, nz: int, latent: str = "fc"):
        super().__init__()
        sizes = latent_sizes(patch_size, latent)
        depth = len(sizes) - 1
        self.c0 = nc * 2 ** (depth - 1)
        self.s0 = sizes[-1]
        self.nz = nz
        self.conv_latent = latent == "conv"
        self.fc = nn.Conv2d(nz, self.c0, 3, 1, 1) if self.conv_latent else nn.Linear(nz, self.c0 * self.s0**2)
        layers: List[nn.Module] = [nn.BatchNorm2d(self.c0), nn.ReLU(inplace=True)]
        c_in = self.c0
        for n in range(depth - 1, -1, -1):
            # output_padding restores the pixel that floor-halving dropped, so any P >= 16 round-trips.
            pad = sizes[n] - 2 * sizes[n + 1]
            last = n == 0
            c_out = out_channels if last else nc * 2 ** (n - 1)
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, output_padding=pad, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.deconv = Layers(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.conv_latent:
            return self.deconv(self.fc(z.to(self.fc.weight.dtype).view(-1, self.nz, self.s0, self.s0)))
        return self.deconv(self.fc(z.to(self.fc.weight.dtype)).view(-1, self.c0, self.s0, self.s0))


class VAE(nn.Module):
    """SPEC 2.1: Gaussian encoder and Gaussian decoder with a learned per-pixel sigma_x.

    Scores (MAP latent z = mu_z, no sampling): m = normalized distance (default, "unregularized"),
    d = KL regularizer, a = log normalizer, elbo = d + a + m.

    latent "conv" (ConvEncoder): nz latent channels at each cell of the encoder's last map, so the code
    has nz * cells values (self.nz) and the decoder draws each part of the patch from its own cells.
    """

    score_names: List[str]
    default_score: str

    def __init__(self, channels: int = 1, patch_size: int = 32, nc: int = 32, nz: int = 20, sigma_min: float = 0.01,
                 latent: str = "fc"):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.nz = nz * latent_cells(patch_size, latent)
        self.sigma_min = sigma_min
        self.encoder = ConvEncoder(channels, patch_size, nc, 2 * nz, latent)
        self.decoder = ConvDecoder(2 * channels, patch_size, nc, nz, latent)
        self.score_names = ["m", "elbo", "d", "a"]
        self.default_score = "m"

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N,C,P,P) -> (mu_z, log sigma_z^2), each (N, Nz), float32."""
        h = self.encoder(x).float()
        return h[:, : self.nz], h[:, self.nz :].clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """z (N, Nz) -> (mu_x, sigma_x), each (N,C,P,P) float32; sigma_x >= sigma_min."""
        # contiguous: channel slices of a channels-last map are strided, and the elementwise ops on them slow
        out = self.decoder(z).float().contiguous()
        mu = torch.sigmoid(out[:, : self.channels])
        sigma = self.sigma_min + F.softplus(out[:, self.channels :])
        return mu, sigma

    def terms(self, x: torch.Tensor, z: torch.Tensor, mu_z: torch.Tensor, logvar_z: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The negative ELBO's three terms per patch, for the latent z decoded."""
        a, m = self.pixel_terms(x, *self.decode(z))
        return {"d": self.kl(mu_z, logvar_z), "a": a.flatten(1).sum(1), "m": m.flatten(1).sum(1)}

    def kl(self, mu_z: torch.Tensor, logvar_z: torch.Tensor) -> torch.Tensor:
        """d per patch: KL(q(z|x) || N(0, I))."""
        return 0.5 * (-logvar_z - 1.0 + logvar_z.exp() + mu_z.pow(2)).sum(1)

    def pixel_terms(self, x: torch.Tensor, mu_x: torch.Tensor, sigma_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per pixel (N, C, P, P): the log normalizer a and the normalized distance m of the Gaussian decoder."""
        a = torch.log(sigma_x) + 0.5 * math.log(2.0 * math.pi)
        m = 0.5 * ((mu_x - x.float()) / sigma_x).pow(2)
        return a, m

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        mu_z, logvar_z = self.encode(x)
        t = self.terms(x, mu_z, mu_z, logvar_z)
        t["elbo"] = t["d"] + t["a"] + t["m"]
        return t

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name == "m":
            mu_z, _ = self.encode(x)
            mu_x, sigma_x = self.decode(mu_z)
            return (0.5 * ((mu_x - x.float()) / sigma_x).pow(2)).flatten(1).sum(1)
        if name not in self.score_names:
            raise ValueError("unknown score name")
        return self.scores(x)[name]

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, P): each pixel's share of m, summed over channels."""
        mu_z, _ = self.encode(x)
        mu_x, sigma_x = self.decode(mu_z)
        return (0.5 * ((mu_x - x.float()) / sigma_x).pow(2)).sum(1)

    @torch.jit.export
    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Nz) float32: mu_z, the patch's code (what the place score, anomaly_map.PlaceStats, compares)."""
        return self.encode(x)[0]

    @torch.jit.export
    def pixel_map_code(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """pixel_map and code from one forward pass."""
        mu_z, _ = self.encode(x)
        mu_x, sigma_x = self.decode(mu_z)
        return (0.5 * ((mu_x - x.float()) / sigma_x).pow(2)).sum(1), mu_z

    @torch.jit.export
    def pixel_map_residual(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixel_map, the signed normalized residual (x - mu_x) / sigma_x averaged over channels (N, P, P; what
        anomaly_map.Whitening scores), and the code, from one forward pass."""
        mu_z, _ = self.encode(x)
        mu_x, sigma_x = self.decode(mu_z)
        r = (x.float() - mu_x) / sigma_x
        return (0.5 * r.pow(2)).sum(1), r.mean(1), mu_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x, self.default_score)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float32) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


class AE(nn.Module):
    """SPEC 2.2: the same conv architecture, deterministic, trained with MSE.

    Scores: l2 = mean squared error (default), l1 = sum of absolute differences, ssim = 1 - mean SSIM.
    """

    score_names: List[str]
    default_score: str

    def __init__(self, channels: int = 1, patch_size: int = 32, nc: int = 32, nz: int = 20, latent: str = "fc"):
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.encoder = ConvEncoder(channels, patch_size, nc, nz, latent)
        self.decoder = ConvDecoder(channels, patch_size, nc, nz, latent)
        self.register_buffer("window", _gaussian_window().repeat(channels, 1, 1, 1))
        self.score_names = ["l2", "l1", "ssim"]
        self.default_score = "l2"

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)).float())

    def ssim_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-pixel SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5), (N, C, P, P)."""
        c1, c2 = 0.01**2, 0.03**2
        pad = self.window.shape[-1] // 2
        w = self.window.to(x.dtype)
        g = self.channels
        mx = F.conv2d(x, w, padding=pad, groups=g)
        my = F.conv2d(y, w, padding=pad, groups=g)
        sxx = F.conv2d(x * x, w, padding=pad, groups=g) - mx * mx
        syy = F.conv2d(y * y, w, padding=pad, groups=g) - my * my
        sxy = F.conv2d(x * y, w, padding=pad, groups=g) - mx * my
        return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))

    def _all(self, x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, torch.Tensor]:
        diff = x_hat - x
        return {
            "l2": diff.pow(2).flatten(1).mean(1),
            "l1": diff.abs().flatten(1).sum(1),
            "ssim": 1.0 - self.ssim_map(x, x_hat).flatten(1).mean(1),
        }

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = x.float()
        return self._all(x, self.reconstruct(x))

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.score_names:
            raise ValueError("unknown score name")
        return self.scores(x)[name]

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, P): |x - x_hat| averaged over channels."""
        x = x.float()
        return (x - self.reconstruct(x)).abs().mean(1)

    @torch.jit.export
    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Nz) float32: the encoder's output, the patch's code."""
        return self.encoder(x.float()).float()

    @torch.jit.export
    def pixel_map_code(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """pixel_map and code from one forward pass."""
        x = x.float()
        z = self.encoder(x)
        return (x - torch.sigmoid(self.decoder(z).float())).abs().mean(1), z.float()

    @torch.jit.export
    def pixel_map_residual(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixel_map, the signed residual x - x_hat averaged over channels (N, P, P), and the code, from one pass."""
        x = x.float()
        z = self.encoder(x)
        r = x - torch.sigmoid(self.decoder(z).float())
        return r.abs().mean(1), r.mean(1), z.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x, self.default_score)


@torch.no_grad()
def fold_decoder_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose decoder BatchNorms are folded into the layer before them.

    torch.jit.freeze folds Conv2d + BatchNorm (the encoder) but not ConvTranspose2d + BatchNorm
    nor Linear + BatchNorm2d (the decoder); folding them at export removes five BatchNorm passes
    over the decoder's largest maps. Scores change only by float rounding.
    """
    import copy

    model = copy.deepcopy(model).eval()
    decoder = model.decoder
    layers = list(decoder.deconv)
    for i, (layer, bn) in enumerate(zip(layers, layers[1:])):
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(layer, nn.ConvTranspose2d):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                   layer.padding, output_padding=layer.output_padding, bias=True)
        fused.weight.copy_(layer.weight * scale.view(1, -1, 1, 1))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        layers[i], layers[i + 1] = fused, nn.Identity()
    if isinstance(layers[0], nn.BatchNorm2d):  # right after the latent layer: fold into its output channels
        bn, fc = layers[0], decoder.fc
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if isinstance(fc, nn.Linear):  # its rows are channel-major (c0, s0, s0)
            scale, shift = scale.repeat_interleave(decoder.s0**2), shift.repeat_interleave(decoder.s0**2)
        fc.weight.mul_(scale.view(-1, *[1] * (fc.weight.dim() - 1)))
        fc.bias.mul_(scale).add_(shift)
        layers[0] = nn.Identity()
    decoder.deconv = Layers(*layers)
    return model



class SubpixelConvTranspose2d(nn.Conv2d):
    """A ConvTranspose2d(k=4, s=2, p=1, output_padding 0/1) computed as one Conv2d + a pixel shuffle (exact).

    With u = o + 1, outputs o = 2t - 1 and o = 2t (t = 0..H) both read inputs t - 1 and t: a 2x2 conv
    over the input zero-padded by 1 gives, for every t, the four sub-pixel phases (by, bx) as 4 x c_out
    channels ordered (by, bx, c); the shuffle interleaves them to 2H + 2 and the crop [1 : 1 + out]
    drops the border phases outside the transposed conv's output. It is a plain convolution, so oneDNN
    runs it like the encoder's (the transposed conv is its slow path). Cost: (H+1)^2/H^2 of the
    deconv's multiply-adds (x1.78 at H=3, x1.04 at H=48).

    relu: the ReLU that followed the layer, applied before the shuffle (they commute), so it can fuse
    with the conv. pad_out: instead of cropping, zero the 1-pixel border and hand the next layer its
    input already zero-padded (pad_in there: conv padding 0), which saves a copy per layer.
    In channels-last memory the (by, bx, c) order makes the shuffle move runs of c values.
    """

    out_pad: Final[int]
    relu: Final[bool]
    pad_out: Final[bool]

    def __init__(self, in_channels: int, out_channels: int, output_padding: int = 0, bias: bool = True,
                 relu: bool = False, pad_in: bool = False, pad_out: bool = False):
        super().__init__(in_channels, 4 * out_channels, 2, 1, 0 if pad_in else 1, bias=bias)
        if pad_out and output_padding:
            raise ValueError("pad_out needs output_padding 0: the zero border is the next layer's padding")
        self.out_pad = output_padding
        self.relu = relu
        self.pad_out = pad_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        if self.relu:
            y = torch.relu(y)
        n, c4, h, w = y.shape
        c = c4 // 4
        y = y.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        if self.pad_out:
            y[:, :, 0] = 0.0
            y[:, :, -1] = 0.0
            y[:, :, :, 0] = 0.0
            y[:, :, :, -1] = 0.0
            return y
        return y[:, :, 1 : 2 * h - 1 + self.out_pad, 1 : 2 * w - 1 + self.out_pad]

    @staticmethod
    @torch.no_grad()
    def from_transposed(layer: nn.ConvTranspose2d, relu: bool = False, pad_in: bool = False,
                        pad_out: bool = False) -> "SubpixelConvTranspose2d":
        """The same map as `layer` (kernel 4, stride 2, padding 1, square output_padding 0 or 1)."""
        if (layer.kernel_size, layer.stride, layer.padding, layer.groups, layer.dilation) != ((4, 4), (2, 2), (1, 1), 1,
                                                                                             (1, 1)):
            raise ValueError(f"only ConvTranspose2d(k=4, s=2, p=1) has this rewrite, not {layer}")
        op = layer.output_padding
        if op[0] != op[1]:
            raise ValueError(f"output_padding must be square, not {op}")
        c_in, c_out = layer.in_channels, layer.out_channels
        conv = SubpixelConvTranspose2d(c_in, c_out, op[0], layer.bias is not None, relu, pad_in, pad_out)
        conv = conv.to(layer.weight.dtype)
        # Output u = 2t + b (before the crop) takes input t - 1 at conv tap 0 and t at tap 1, through kernel
        # index k = u - 2i (o = 2i - 1 + k): tap 0 -> k = b + 2, tap 1 -> k = b.
        taps = torch.tensor([[2, 0], [3, 1]])  # taps[b, tap] = k
        w = layer.weight[:, :, taps[:, None, :, None], taps[None, :, None, :]]  # (c_in, c_out, by, bx, ty, tx)
        conv.weight.copy_(w.permute(2, 3, 1, 0, 4, 5).reshape(4 * c_out, c_in, 2, 2))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.repeat(4))
        return conv


@torch.no_grad()
def subpixel_decoder(model: nn.Module, which: str = "output") -> nn.Module:
    """A copy whose decoder ConvTranspose2d layers (which: "output" = the last one, "all") are
    SubpixelConvTranspose2d: same scores up to rounding.

    Run after fold_decoder_batchnorm: a ReLU that directly follows a deconv (Identity between) moves into it,
    and consecutive deconvs with output_padding 0 hand each other zero-bordered maps instead of cropping.
    Export rewrites only the output layer: measured per layer (bf16, channels-last, one core), oneDNN runs the
    inner deconvs at about the bf16 matmul rate and the rewrite's extra taps and shuffle cost more than they
    save, while the output layer (32 -> 2 channels, float32) runs ~3x faster as a conv (PERFORMANCE.md).
    """
    import copy

    if which not in ("output", "all"):
        raise ValueError(f"which must be 'output' or 'all', not {which!r}")
    model = copy.deepcopy(model).eval()
    layers = list(model.decoder.deconv)
    deconvs = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)]
    if which == "output":
        deconvs = deconvs[-1:]
    between = [j for j, m in enumerate(layers) if not isinstance(m, (nn.ConvTranspose2d, nn.Identity, nn.ReLU))]
    pad_in = False
    for i, nxt in zip(deconvs, deconvs[1:] + [None]):
        layer = layers[i]
        rest = range(i + 1, nxt if nxt is not None else len(layers))
        relus = [j for j in rest if isinstance(layers[j], nn.ReLU)]
        relu = len(relus) == 1 and not any(j in between for j in rest)
        # pad_out only when nothing but a ReLU (absorbed) or Identity sits before the next deconv
        pad_out = relu and nxt is not None and layer.output_padding == (0, 0)
        layers[i] = SubpixelConvTranspose2d.from_transposed(layer, relu, pad_in, pad_out)
        if relu:
            layers[relus[0]] = nn.Identity()
        pad_in = pad_out
    model.decoder.deconv = Layers(*layers)
    return model

"""Patch scores from an anomaly map: the model's per-pixel map, averaged where patches overlap, smoothed,
compared with what good parts show at that place, then each patch scored by the map's maximum inside it.

So a frame is still NG when any patch scores over the threshold, and every consumer (decide, heatmaps,
calibrate, evaluate) still sees (N,) patch scores; the head's parameters live in the model card under
`anomaly_map`. Pure torch: runs on the scorer's device. Tensors (N, P, P) for pixel maps, (H, W) for maps.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent.errors import ModelError
from edge_agent.patches import PatchGrid

# Position statistics are kept at 1/POSITION_SCALE of the frame's resolution: they vary on the scale of the
# blur and the part's features, not pixel by pixel, and the card stays small (640x480 -> 160x120).
POSITION_SCALE = 4

logger = logging.getLogger(__name__)


def _regular(starts: tuple[int, ...], stride: int) -> int:
    """How many of the grid's starts lie on the regular stride (the edge-flush last one may not)."""
    n = len(starts)
    return n - 1 if n > 1 and starts[-1] - starts[-2] != stride else n


def fold_mean(grid: PatchGrid, pixel_maps: torch.Tensor) -> torch.Tensor:
    """(N, P, P) per-patch pixel maps -> (H, W): each pixel the mean over the patches covering it."""
    p, s = grid.size, grid.stride
    nh, nw = grid.shape
    maps = pixel_maps.reshape(nh, nw, p, p)
    rh, rw = _regular(grid.ys, s), _regular(grid.xs, s)
    total = torch.zeros(grid.frame_h, grid.frame_w, dtype=torch.float32, device=pixel_maps.device)
    count = torch.zeros_like(total)
    out_h, out_w = grid.ys[rh - 1] + p, grid.xs[rw - 1] + p
    if p % s == 0:
        total[:out_h, :out_w], count[:out_h, :out_w] = _fold_cells(maps[:rh, :rw].float(), p // s, s)
    else:
        ones = torch.ones(1, p * p, rh * rw, dtype=torch.float32, device=pixel_maps.device)
        blocks = maps[:rh, :rw].reshape(rh * rw, p * p).t().unsqueeze(0).float()
        total[:out_h, :out_w] = F.fold(blocks, (out_h, out_w), p, stride=s)[0, 0]
        count[:out_h, :out_w] = F.fold(ones, (out_h, out_w), p, stride=s)[0, 0]
    # The edge-flush last row and column (at most nh + nw - 1 patches) are added one by one.
    for i in range(nh):
        for j in range(nw):
            if i < rh and j < rw:
                continue
            y, x = grid.ys[i], grid.xs[j]
            total[y : y + p, x : x + p] += maps[i, j].float()
            count[y : y + p, x : x + p] += 1
    return total / count


def _fold_cells(maps: torch.Tensor, k: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F.fold for a stride that divides the patch (P = k S): each patch is k x k cells of S x S, so the sum
    is k^2 shifted adds of whole (rows, cols, S, S) tensors: ~10x faster than col2im at P = 96, S = 16."""
    nh, nw = maps.shape[:2]
    blocks = maps.reshape(nh, nw, k, s, k, s)
    cells = torch.zeros(nh + k - 1, nw + k - 1, s, s, dtype=maps.dtype, device=maps.device)
    hits = torch.zeros(nh + k - 1, nw + k - 1, dtype=maps.dtype, device=maps.device)
    for a in range(k):
        for b in range(k):
            cells[a : a + nh, b : b + nw] += blocks[:, :, a, :, b, :]
            hits[a : a + nh, b : b + nw] += 1
    image = cells.permute(0, 2, 1, 3).reshape((nh + k - 1) * s, (nw + k - 1) * s)
    count = hits.repeat_interleave(s, 0).repeat_interleave(s, 1)
    return image, count


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(H, W) -> (H, W), separable Gaussian (truncated at 3 sigma, edges replicated); sigma <= 0: unchanged."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(image.dtype)
    x = image[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x[0, 0]


def window_max(grid: PatchGrid, image: torch.Tensor) -> torch.Tensor:
    """(H, W) -> (N,): the maximum inside each patch of the grid, row-major like PatchGrid.extract."""
    p, s = grid.size, grid.stride
    rh, rw = _regular(grid.ys, s), _regular(grid.xs, s)
    x = image[None, None]
    rows = F.max_pool2d(x, (p, 1), stride=(s, 1))[0, 0, :rh]  # (rh, W)
    if rh < len(grid.ys):
        rows = torch.cat([rows, image[grid.ys[-1] :].amax(0, keepdim=True)])
    cells = F.max_pool2d(rows[None, None], (1, p), stride=(1, s))[0, 0, :, :rw]  # (nh, rw)
    if rw < len(grid.xs):
        cells = torch.cat([cells, rows[:, grid.xs[-1] :].amax(1, keepdim=True)], 1)
    return cells.reshape(-1)


def _cached(cache: dict | None, key: tuple, make):
    """cache[key], made by make() on first use (the scorer keeps one cache per model: tensors on its device)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _encode(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ModelError(f"the model card's anomaly_map statistics are unreadable ({e}); retrain the model") from None


def _pack_gaussians(mean: np.ndarray, chol: np.ndarray) -> bytes:
    """Gaussians' means (..., D) and Cholesky factors (..., D, D) as an .npz archive entry, the factors as their
    lower triangles (half the bytes)."""
    rows, cols = np.tril_indices(chol.shape[-1])
    buf = io.BytesIO()
    np.savez(buf, mean=mean.astype(np.float32), chol=chol[..., rows, cols].astype(np.float32))
    return buf.getvalue()


def _unpack_gaussians(data: bytes, lead: tuple[int, ...], dims: int) -> tuple[np.ndarray, np.ndarray]:
    """_pack_gaussians' entry -> mean (*lead, dims), chol (*lead, dims, dims); ValueError/KeyError/OSError if the
    entry does not hold that many."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        mean, tri = z["mean"], z["chol"]
    chol = np.zeros((*lead, dims, dims), np.float32)
    rows, cols = np.tril_indices(dims)
    chol[..., rows, cols] = tri.reshape(*lead, -1)
    return mean.reshape(*lead, dims), chol


@dataclass(frozen=True)
class PositionStats:
    """What good parts' smoothed maps show at each place: mean and spread, (h, w) at reduced resolution."""

    mean: np.ndarray
    spread: np.ndarray
    images: int

    @staticmethod
    def fit(maps: list[torch.Tensor] | torch.Tensor, floor_quantile: float = 0.05) -> PositionStats:
        """From smoothed good maps (each (H, W)): per-place median and a robust spread (1.4826 x MAD).

        The spread is floored at a low quantile of itself so a place where good parts never vary (a dark
        hole bottom) cannot turn a tiny wobble into a huge normalized score.
        """
        stack = torch.stack(list(maps)).float()
        small = F.avg_pool2d(stack[:, None], POSITION_SCALE, ceil_mode=True)[:, 0]
        median = small.median(0).values
        spread = 1.4826 * (small - median).abs().median(0).values
        floor = torch.quantile(spread.flatten(), floor_quantile).clamp(min=1e-6)
        return PositionStats(median.numpy(), torch.maximum(spread, floor).numpy(), int(stack.shape[0]))

    def card(self) -> dict[str, Any]:
        return {"scale": POSITION_SCALE, "images": self.images, "shape": list(self.mean.shape),
                "mean_npy_base64": _encode(self.mean), "spread_npy_base64": _encode(self.spread)}

    @staticmethod
    def from_card(record: dict[str, Any]) -> PositionStats:
        mean, spread = _decode(record["mean_npy_base64"]), _decode(record["spread_npy_base64"])
        if mean.shape != spread.shape or mean.ndim != 2 or not (np.isfinite(mean).all() and (spread > 0).all()):
            raise ModelError("the model card's anomaly_map position statistics are malformed; retrain the model")
        return PositionStats(mean, spread, int(record.get("images", 0)))

    def at(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and spread resized to a (height, width) frame, on device."""
        def up(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a)[None, None]
            return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].to(device)

        return up(self.mean), up(self.spread)


@dataclass(frozen=True)
class LowSide:
    """Texture loss: a patch the model explains far better than any good patch (a smear, a polished or wet
    spot, a blurred area) is as anomalous as one it explains far worse.

    A model of good texture gives every good patch a raw score (its pixel map summed over the patch, `m` for
    the VAE) around the typical value for its dimension: a Gaussian's good patches lie on a shell, not at the
    centre. A patch whose texture is gone lies near the centre and scores far below every good patch, which a
    maximum never sees. The head adds, for a patch below `reference` (the lowest raw patch score on the
    held-out good images), weight * reference / raw, `weight` being their median image score: a patch just
    under the lowest good one scores like a typical good image, one half as low like twice that. Patches
    at or above the reference keep the map's score, so the low side changes nothing on normal texture.
    """

    reference: float
    weight: float
    images: int

    @staticmethod
    def fit(raw_sums: list[torch.Tensor], image_scores: list[float]) -> LowSide | None:
        """From held-out good images: each one's (N,) raw patch sums and its image score without the low side.
        None when the raw scores are not positive (no shell to fall inside)."""
        low = LowSide(min(float(r.min()) for r in raw_sums), float(np.median(image_scores)), len(raw_sums))
        return low if low.usable else None

    @property
    def usable(self) -> bool:
        return self.reference > 0 and self.weight > 0 and math.isfinite(self.reference) and math.isfinite(self.weight)

    def card(self) -> dict[str, Any]:
        return {"reference": self.reference, "weight": self.weight, "images": self.images,
                "rule": "patch score = max(map score, weight * reference / r) where r, the pixel map summed over "
                        "the patch, is below reference: the lowest r on held-out good images; weight: their "
                        "median image score"}

    @staticmethod
    def from_card(record: dict[str, Any]) -> LowSide:
        try:
            low = LowSide(float(record["reference"]), float(record["weight"]), int(record.get("images", 0)))
        except (KeyError, TypeError, ValueError):
            raise ModelError("the model card's anomaly_map low side is malformed; retrain the model") from None
        if not low.usable:
            raise ModelError("the model card's anomaly_map low side is malformed; retrain the model")
        return low

    def scores(self, pixel_maps: torch.Tensor) -> torch.Tensor:
        """(N, P, P) pixel maps -> (N,) low-side patch scores, float32."""
        return self.scores_from_sums(pixel_maps.flatten(1).float().sum(1))

    def scores_from_sums(self, raw: torch.Tensor) -> torch.Tensor:
        """(N,) raw patch scores (pixel maps summed over each patch) -> (N,) low-side patch scores: -inf where the
        patch is not below the reference, so a normal patch never changes the map's score."""
        raw = raw.float()
        low = self.weight * self.reference / raw.clamp(min=self.reference * 1e-3)
        return torch.where(raw < self.reference, low, torch.full_like(low, -math.inf))


PLACE_ENTRY = "place.npz"  # the archive entry (artifact extras) that holds PlaceStats' arrays
# Below this the places differ too little and the place score is left out. Measured (docs/RESULTS.md, round 12):
# a texture -0.7; parts moving +-16 px in 128 gave 8.2 and 11.8 nats, and the place score cost recall at 1 % FRR
# there (bracket 56 -> 33 %); +-8 px 20.4 (cost 0.002 AUROC); fixtured parts where it paid: 22.3-61.
PLACE_MIN_GAIN_NATS = 15.0


@dataclass(frozen=True)
class PlaceStats:
    """What the model's code (VAE mu_z, AE encoder output) of a good patch looks like at each place of the grid.

    A patch model judges each patch alone, so a plain patch where a hole or a marking should be scores like any
    plain patch. On a fixtured part each grid cell always shows the same piece of the part: one Gaussian of the
    code per cell (PaDiM, Defard et al. 2021, with the model's own encoder instead of pretrained features),
    fitted on the training images, scores a patch by its Mahalanobis distance at its place. The head takes
    weight x that distance where it exceeds the map's patch score; `weight` puts it on the map's scale (the
    median image maximum of the map over the median of the distance's, on held-out good images).

    mean (cells, D); chol (cells, D, D) lower-triangular with precision = chol @ chol.T, so the squared distance
    is |(z - mean) @ chol|^2. The covariance is shrunk towards its average variance (shrink x trace / D on the
    diagonal) so that fewer images than dimensions still give a usable precision.
    """

    mean: np.ndarray
    chol: np.ndarray
    weight: float
    images: int
    shrink: float
    gain_nats: float

    @staticmethod
    def fit(codes: np.ndarray, shrink: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """codes (images, cells, D) -> per-cell mean (cells, D) and Cholesky factor of the precision (cells, D, D)."""
        codes = np.asarray(codes, dtype=np.float64)
        n, _, dims = codes.shape
        mean = codes.mean(0)
        d = codes - mean
        cov = np.einsum("ncd,nce->cde", d, d) / max(n - 1, 1)
        ridge = shrink * np.trace(cov, axis1=1, axis2=2) / dims
        cov = cov + (np.maximum(ridge, 1e-12)[:, None, None] * np.eye(dims))
        return mean, np.linalg.cholesky(np.linalg.inv(cov))

    @staticmethod
    def distances(codes: np.ndarray, mean: np.ndarray, chol: np.ndarray) -> np.ndarray:
        """codes (..., cells, D) -> (..., cells) Mahalanobis distances at each place (numpy, float64)."""
        return np.sqrt((np.einsum("...cd,cde->...ce", np.asarray(codes, np.float64) - mean, chol) ** 2).sum(-1))

    @staticmethod
    def gain(train: np.ndarray, held: np.ndarray, mean: np.ndarray, chol: np.ndarray, shrink: float) -> float:
        """How many nats of log-likelihood a held-out good code gains, on average, from its place's Gaussian over
        one Gaussian of every place's codes pooled. Tens of nats on a fixtured part; about 0 (or below: each
        place's Gaussian has fewer codes behind it) where places do not differ, as on a texture."""
        pooled_mean, pooled_chol = PlaceStats.fit(train.reshape(-1, 1, train.shape[-1]), shrink)
        log_place = np.log(np.abs(np.diagonal(chol, axis1=1, axis2=2))).sum(1) - 0.5 * PlaceStats.distances(held, mean, chol) ** 2
        log_pooled = (np.log(np.abs(np.diagonal(pooled_chol[0]))).sum()
                      - 0.5 * PlaceStats.distances(held[..., None, :], pooled_mean, pooled_chol)[..., 0] ** 2)
        return float(np.mean(log_place - log_pooled))

    @property
    def cells(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dims(self) -> int:
        return int(self.mean.shape[1])

    def card(self) -> dict[str, Any]:
        return {"entry": PLACE_ENTRY, "cells": self.cells, "dims": self.dims, "images": self.images,
                "shrink": self.shrink, "weight": self.weight, "gain_nats": round(self.gain_nats, 3),
                "rule": "patch score = max(map score, weight x Mahalanobis distance of the patch's code from the "
                        "Gaussian of good codes at its place); the Gaussians (one per patch of the grid) are fitted "
                        "on the training images and kept in the archive entry"}

    def blob(self) -> bytes:
        """The arrays as an .npz (the Cholesky factors as their lower triangles: half the bytes)."""
        return _pack_gaussians(self.mean, self.chol)

    @staticmethod
    def from_card(record: dict[str, Any], extras: dict[str, bytes]) -> PlaceStats:
        data = extras.get(str(record.get("entry")))
        if data is None:
            raise ModelError(f"the model card's place score needs the archive entry {record.get('entry')!r}, which the "
                             "file lacks; retrain the model")
        try:
            mean, chol = _unpack_gaussians(data, (int(record["cells"]),), int(record["dims"]))
            place = PlaceStats(mean, chol, float(record["weight"]), int(record.get("images", 0)),
                               float(record.get("shrink", 0.0)), float(record.get("gain_nats", math.nan)))
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ModelError(f"the model card's place statistics are unreadable ({e}); retrain the model") from None
        if not (np.isfinite(place.mean).all() and np.isfinite(place.chol).all() and math.isfinite(place.weight)
                and place.weight > 0):
            raise ModelError("the model card's place statistics are malformed; retrain the model")
        return place

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.mean).float().to(device), torch.from_numpy(self.chol).float().to(device))

    def scores(self, codes: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(N, D) codes of one frame's patches (grid order) -> (N,) weight x distance at each place, float32."""
        if codes.shape != (self.cells, self.dims):
            raise ModelError(f"the frame gives {codes.shape[0]} patch codes of {codes.shape[-1]} values but the place "
                             f"statistics hold {self.cells} places of {self.dims}: score frames of the size the model "
                             "was trained on")
        mean, chol = _cached(cache, ("place", codes.device), lambda: self.tensors(codes.device))
        white = torch.bmm((codes.float() - mean).unsqueeze(1), chol).squeeze(1)
        return self.weight * white.pow(2).sum(1).sqrt()


WHITEN_WINDOW = 5  # px; measured 3-15 (docs/RESULTS.md round 13): 5 best with the map on the 640x480 part, 5-9 alike on textures
WHITE_PLACE_ENTRY = "white_place.npz"  # the archive entry that holds per-place whitening's arrays
# Per-place whitening: one window Gaussian per cell of the frame (cell = the patch stride), fitted on the cell and
# its 3 x 3 neighbours. Kept when held-out windows gain at least this many nats each over the one Gaussian.
# Measured (docs/RESULTS.md round 14, cells of the stride, 3 x 3): fixtured parts 2.1 (640x480, P 96 S 16) and
# 3.1 (128x128), where it paid (AUROC 0.993 -> 0.996, 0.987 -> 0.993); the bracket with +-4 px, +-3 degree
# placement 1.3, where it cost recall at 1 % FRR; textures and photographed surfaces 0.00-0.04.
WHITE_PLACE_MIN_GAIN = 1.5
WHITE_PLACE_POOL = 3
WHITE_PLACE_MAX_CELLS = 16384  # cells are doubled in size until the frame has at most this many (card size)
# With cells, each cell's whitened map is also scaled so that every place raises false alarms alike (constant false
# alarm rate): by (median over cells of Q) / Q_cell, Q_cell the WHITE_SCALE_QUANTILE of the good images' maxima in
# the cells of its WHITE_SCALE_POOL x WHITE_SCALE_POOL neighbourhood. Without it the image maximum of a good part
# comes from the few places whose edges move from part to part (a bore's rim), and the threshold with it.
# Measured (docs/RESULTS.md round 15): pools 5-9 and quantiles 0.8-0.95 all gave goal 1's pair 0.97-0.985 recall
# at the calibrated threshold (0.95 without); 5 and 0.9 were fixed before the single fc model was measured.
WHITE_SCALE_POOL = 5
WHITE_SCALE_QUANTILE = 0.9


@dataclass(frozen=True)
class Whitening:
    """The residual's shape, not only its size: the model's signed per-pixel residual (VAE: (x - mu_x) / sigma_x,
    AE: x - x_hat), averaged over the patches that cover each pixel (fold_mean), and every k x k window of it
    scored by its Mahalanobis distance from the windows of good images.

    The pixel map treats pixels as independent, but a good part's residual is not: brushing, grain and a loosely
    drawn thread leave residuals correlated along lines and rings, while a 1-px scratch or fibre is a few tenths
    of a sigma per pixel in a shape no good residual has. One Gaussian of the k x k windows (mean (k^2,), chol
    (k^2, k^2) lower-triangular with precision = chol @ chol.T, fitted on held-out good images: millions of
    windows for k^2 (k^2 + 1) / 2 numbers) whitens that correlation; the map 0.5 d^2 x weight (weight: the
    plain map's median image maximum over this one's, on the same images) is taken where it exceeds the plain
    map. A k^2-filter convolution per frame: about 1 % of a 640x480 VAE frame's scoring at k = 5.
    """

    window: int
    mean: np.ndarray
    chol: np.ndarray
    weight: float
    images: int
    # Per place (None: one Gaussian for the whole frame): cells of `cell` px over a frame of `frame` (H, W),
    # place_mean (ch, cw, k^2) and place_chol (ch, cw, k^2, k^2), in the archive entry WHITE_PLACE_ENTRY.
    cell: int = 0
    frame: tuple[int, int] | None = None
    place_mean: np.ndarray | None = None
    place_chol: np.ndarray | None = None
    place_check: dict[str, Any] | None = None  # what the per-place check measured (kept in the card either way)
    place_scale: np.ndarray | None = None  # (ch, cw): each cell's factor on its whitened map (place_scales)

    @property
    def per_place(self) -> bool:
        return self.place_mean is not None

    @staticmethod
    def windows(signed: torch.Tensor, k: int) -> torch.Tensor:
        """(H, W) -> (H * W, k * k): the window around every pixel (edges reflected)."""
        x = F.pad(signed.float()[None, None], (k // 2,) * 4, mode="reflect")
        return F.unfold(x, k)[0].t()

    @staticmethod
    def fit(signed: list[torch.Tensor], k: int, shrink: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """Good images' folded signed residuals (each (H, W)) -> mean (k^2,) and Cholesky factor of the precision."""
        n, total, outer = 0, torch.zeros(k * k, dtype=torch.float64), torch.zeros(k * k, k * k, dtype=torch.float64)
        for image in signed:
            w = Whitening.windows(image.cpu(), k).double()
            n += w.shape[0]
            total += w.sum(0)
            outer += w.t() @ w
        mean = total / n
        cov = outer / n - torch.outer(mean, mean)
        cov += shrink * torch.trace(cov) / (k * k) * torch.eye(k * k, dtype=torch.float64) + 1e-12 * torch.eye(k * k, dtype=torch.float64)
        chol = torch.linalg.cholesky(torch.linalg.inv(cov))
        return mean.numpy(), chol.numpy()

    @staticmethod
    def cell_windows(signed: torch.Tensor, k: int, cell: int) -> torch.Tensor:
        """(H, W) -> (ch, cw, cell^2, k^2): each pixel's window, grouped by the cell of cell x cell px it lies in
        (the frame's last cells filled by repeating its edge)."""
        h, w = signed.shape
        ch, cw, d = -(-h // cell), -(-w // cell), k * k
        x = F.pad(signed.float()[None, None], (k // 2,) * 4, mode="reflect")
        win = F.unfold(x, k).reshape(1, d, h, w)
        win = F.pad(win, (0, cw * cell - w, 0, ch * cell - h), mode="replicate")[0]
        return win.reshape(d, ch, cell, cw, cell).permute(1, 3, 2, 4, 0).reshape(ch, cw, cell * cell, d)

    @staticmethod
    def fit_places(signed: list[torch.Tensor], k: int, cell: int, pool: int = WHITE_PLACE_POOL,
                   shrink: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """Good images' folded signed residuals -> per cell mean (ch, cw, k^2) and precision's Cholesky factor
        (ch, cw, k^2, k^2), each cell's Gaussian fitted on the windows of its pool x pool neighbourhood."""
        total = outer = None
        n = 0
        for image in signed:
            win = Whitening.cell_windows(image.cpu(), k, cell).double()
            total = win.sum(2) if total is None else total + win.sum(2)
            part = win.transpose(2, 3) @ win
            outer = part if outer is None else outer + part
            n += win.shape[2]
        ch, cw, d = total.shape

        def box(t: torch.Tensor) -> torch.Tensor:  # the sum over each cell's pool x pool neighbours (edges repeated)
            flat = t.reshape(ch, cw, -1).permute(2, 0, 1)[None]
            return (F.avg_pool2d(F.pad(flat, (pool // 2,) * 4, mode="replicate"), pool, 1)[0]
                    .permute(1, 2, 0).reshape(t.shape))

        mean = box(total) / n
        cov = box(outer) / n - mean[..., :, None] * mean[..., None, :]
        eye = torch.eye(d, dtype=torch.float64)
        cov = cov + (shrink * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)[..., None, None] + 1e-12) * eye
        chol = torch.linalg.cholesky(torch.linalg.inv(cov))
        return mean.numpy(), chol.numpy()

    @staticmethod
    def place_gain(signed: list[torch.Tensor], k: int, cell: int, pool: int = WHITE_PLACE_POOL) -> float:
        """Nats per window that good windows gain, on average, from their cell's Gaussian over the one Gaussian of
        the frame, both fitted on the even images and measured on the odd ones. About 0 on a texture (the
        cells' Gaussians are the frame's), a few nats on a fixtured part."""
        fit, held = signed[0::2], signed[1::2]
        g_mean, g_chol = (torch.from_numpy(v) for v in Whitening.fit(fit, k))
        p_mean, p_chol = (torch.from_numpy(v) for v in Whitening.fit_places(fit, k, cell, pool))
        p_logdet = torch.log(torch.diagonal(p_chol, dim1=-2, dim2=-1)).sum(-1)  # (ch, cw)
        g_logdet = float(torch.log(torch.diagonal(g_chol)).sum())
        gains = []
        for image in held:
            win = Whitening.cell_windows(image.cpu(), k, cell).double()
            ll_place = p_logdet[..., None] - 0.5 * ((win - p_mean[:, :, None]) @ p_chol).pow(2).sum(-1)
            ll_global = g_logdet - 0.5 * ((win - g_mean) @ g_chol).pow(2).sum(-1)
            gains.append(float((ll_place - ll_global).mean()))
        return float(np.mean(gains))

    def cell_maxima(self, signed: torch.Tensor) -> torch.Tensor:
        """(H, W) folded signed residual -> (ch, cw): each cell's maximum of 0.5 d^2, times its scale if any
        (per place only)."""
        return self._cell_distances(signed).amax(-1)

    def place_scales(self, signed: list[torch.Tensor], pool: int = WHITE_SCALE_POOL,
                     quantile: float = WHITE_SCALE_QUANTILE) -> np.ndarray:
        """Good images' folded signed residuals -> (ch, cw) factors that give every place the same tail: per cell,
        (median over cells of Q) / Q_cell, Q_cell the quantile of the images' cell maxima over the cell and its
        pool x pool neighbours (edges repeated). Fitted without a scale (the cells' Gaussians as they are)."""
        plain = dataclasses.replace(self, place_scale=None)
        maxima = torch.stack([plain.cell_maxima(s.cpu().float()) for s in signed]).double()  # (n, ch, cw)
        ch, cw = maxima.shape[1:]
        padded = F.pad(maxima[:, None], (pool // 2,) * 4, mode="replicate")[:, 0]
        sample = torch.cat([padded[:, i:i + ch, j:j + cw] for i in range(pool) for j in range(pool)])
        q = torch.quantile(sample, quantile, dim=0).clamp_min(1e-12)
        return (q.median() / q).numpy().astype(np.float32)

    @staticmethod
    def cell_size(height: int, width: int, stride: int) -> int:
        cell = max(1, stride)
        while -(-height // cell) * -(-width // cell) > WHITE_PLACE_MAX_CELLS:
            cell *= 2
        return cell

    @staticmethod
    def weighted(signed: list[torch.Tensor], map_image_scores: list[float], k: int, stride: int = 0,
                 min_gain: float = WHITE_PLACE_MIN_GAIN) -> Whitening | None:
        """Fitted on good images' folded signed residuals and put on the map's scale: weight = the median of the
        map's image maxima (map_image_scores, the same images) over the whitened map's; None where no scale can
        be set (train and combine then leave it out).

        stride > 0: also check per-place whitening (cells of the stride, Whitening.place_gain on the images'
        halves) and use it when the gain is at least min_gain nats per window."""
        mean, chol = Whitening.fit(signed, k)
        white = Whitening(k, mean.astype(np.float32), chol.astype(np.float32), 1.0, len(signed))
        if stride > 0:
            h, w = (int(v) for v in signed[0].shape)
            cell = Whitening.cell_size(h, w, stride)
            check: dict[str, Any] = {"used": False, "cell_px": cell, "pool": WHITE_PLACE_POOL, "min_gain_nats": min_gain}
            if len(signed) < 4:
                check["why"] = f"{len(signed)} held-out images; the check needs >= 4"
            elif any(tuple(s.shape) != (h, w) for s in signed):
                check["why"] = "the held-out images differ in size"
            else:
                gain = Whitening.place_gain(signed, k, cell)
                check["gain_nats_per_window"] = round(gain, 4)
                if gain >= min_gain:
                    p_mean, p_chol = Whitening.fit_places(signed, k, cell)
                    white = dataclasses.replace(white, cell=cell, frame=(h, w), place_mean=p_mean.astype(np.float32),
                                                place_chol=p_chol.astype(np.float32))
                    white = dataclasses.replace(white, place_scale=white.place_scales(signed))
                    check["used"] = True
                    check["scale_range"] = [round(float(white.place_scale.min()), 4),
                                            round(float(white.place_scale.max()), 4)]
                else:
                    check["why"] = (f"held-out windows gain {gain:.2f} nats each from their place's Gaussian, "
                                    f"under {min_gain}: places do not differ enough")
            logger.info("residual whitening per place (cells of %d px): %s", cell,
                        "used" if check["used"] else f"not used: {check['why']}")
            white = dataclasses.replace(white, place_check=check)
        white_max = float(np.median([float(white.unweighted(s).max()) for s in signed]))
        map_max = float(np.median(map_image_scores))
        if not (white_max > 0 and map_max > 0 and math.isfinite(white_max) and math.isfinite(map_max)):
            logger.warning("residual whitening left out: the medians of the map (%g) and the whitened map (%g) "
                           "cannot put them on one scale", map_max, white_max)
            return None
        logger.info("residual whitening: %dx%d windows of %d good images; weight %.4g", k, k, len(signed),
                    map_max / white_max)
        return dataclasses.replace(white, weight=map_max / white_max)

    def extras(self) -> dict[str, bytes]:
        """The archive entry of the per-place arrays (the Cholesky factors as their lower triangles)."""
        return {WHITE_PLACE_ENTRY: _pack_gaussians(self.place_mean, self.place_chol)} if self.per_place else {}

    def card(self) -> dict[str, Any]:
        record = {"window_px": self.window, "mean": _encode(self.mean), "chol": _encode(self.chol),
                  "weight": self.weight, "images": self.images,
                  "rule": "map = max(map, weight x 0.5 d^2), d the Mahalanobis distance of the k x k window of the "
                          "signed residual (folded over overlapping patches) around each pixel from good windows"
                          + (" of the same place (the Gaussian of its cell)" if self.per_place else "")
                          + (", times its cell's scale" if self.place_scale is not None else "")}
        if self.per_place:
            record["place"] = {"entry": WHITE_PLACE_ENTRY, "cell_px": self.cell, "frame": list(self.frame),
                               "cells": list(self.place_mean.shape[:2]), "pool": WHITE_PLACE_POOL}
            if self.place_scale is not None:
                record["place"]["scale"] = {
                    "values": _encode(self.place_scale), "pool": WHITE_SCALE_POOL, "quantile": WHITE_SCALE_QUANTILE,
                    "rule": "each cell's map x (median over cells of Q) / Q_cell, Q_cell the quantile of good images' "
                            "maxima in the cell's pool x pool neighbourhood: every place raises false alarms alike"}
        if self.place_check is not None:
            record["place_check"] = self.place_check
        return record

    @staticmethod
    def from_card(record: dict[str, Any], extras: dict[str, bytes] | None = None) -> Whitening:
        white = Whitening._global_from_card(record)
        if record.get("place_check") is not None:
            white = dataclasses.replace(white, place_check=dict(record["place_check"]))
        place = record.get("place")
        if not place:
            return white
        data = (extras or {}).get(str(place.get("entry")))
        if data is None:
            raise ModelError(f"the model card's per-place whitening needs the archive entry {place.get('entry')!r}, "
                             "which the file lacks; retrain the model")
        try:
            ch, cw = (int(v) for v in place["cells"])
            h, w = (int(v) for v in place["frame"])
            cell = int(place["cell_px"])
            mean, chol = _unpack_gaussians(data, (ch, cw), white.window * white.window)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ModelError(f"the model card's per-place whitening is unreadable ({e}); retrain the model") from None
        scale = None
        if place.get("scale") is not None:
            try:
                scale = _decode(place["scale"]["values"])
            except (KeyError, TypeError) as e:
                raise ModelError(f"the model card's per-place whitening scale is unreadable ({e}); retrain the model") from None
        if (cell < 1 or -(-h // cell) != ch or -(-w // cell) != cw or not np.isfinite(mean).all()
                or not np.isfinite(chol).all()
                or (scale is not None and (scale.shape != (ch, cw) or not np.isfinite(scale).all() or (scale <= 0).any()))):
            raise ModelError("the model card's per-place whitening is malformed; retrain the model")
        return dataclasses.replace(white, cell=cell, frame=(h, w), place_mean=mean, place_chol=chol, place_scale=scale)

    @staticmethod
    def _global_from_card(record: dict[str, Any]) -> Whitening:
        try:
            k = int(record["window_px"])
            white = Whitening(k, _decode(record["mean"]).reshape(k * k), _decode(record["chol"]).reshape(k * k, k * k),
                              float(record["weight"]), int(record.get("images", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"the model card's residual whitening is unreadable ({e}); retrain the model") from None
        if k < 1 or k % 2 == 0 or not (np.isfinite(white.mean).all() and np.isfinite(white.chol).all()
                                       and math.isfinite(white.weight) and white.weight > 0):
            raise ModelError("the model card's residual whitening is malformed; retrain the model")
        return white

    def filters(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whitening as a convolution: k^2 filters of k x k (chol's columns) and their bias (-mean @ chol)."""
        k = self.window
        chol = torch.from_numpy(np.asarray(self.chol, np.float32))
        weight = chol.t().reshape(k * k, 1, k, k).contiguous()
        bias = -(torch.from_numpy(np.asarray(self.mean, np.float32)) @ chol)
        return weight.to(device), bias.to(device)

    def place_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cells' means and Cholesky factors on the device, each factor times sqrt(its cell's scale): 0.5 d^2
        comes out scaled at no cost per frame."""
        chol = torch.from_numpy(np.asarray(self.place_chol, np.float32))
        if self.place_scale is not None:
            chol = chol * torch.from_numpy(np.sqrt(np.asarray(self.place_scale, np.float32)))[:, :, None, None]
        return torch.from_numpy(np.asarray(self.place_mean, np.float32)).to(device), chol.to(device)

    def _cell_distances(self, signed: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(H, W) folded signed residual -> (ch, cw, cell^2) 0.5 d^2 of each pixel's window from its cell's Gaussian
        (per place only; the frame's last cells padded by repeating its edge)."""
        h, w = signed.shape
        if (h, w) != tuple(self.frame):
            raise ModelError(f"the frame is {w}x{h} but the per-place whitening holds places of a "
                             f"{self.frame[1]}x{self.frame[0]} frame: score frames of the size the model was "
                             "trained on")
        mean, chol = _cached(cache, ("white_place", signed.device), lambda: self.place_tensors(signed.device))
        win = Whitening.cell_windows(signed, self.window, self.cell)
        return 0.5 * ((win - mean[:, :, None]) @ chol).pow(2).sum(-1)

    def unweighted(self, signed: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(H, W) folded signed residual -> (H, W) 0.5 d^2 of the window around each pixel, float32."""
        if self.per_place:
            h, w = signed.shape
            z = self._cell_distances(signed, cache)  # scaled by the cells' factors (place_tensors)
            ch, cw = z.shape[:2]
            return z.reshape(ch, cw, self.cell, self.cell).permute(0, 2, 1, 3).reshape(ch * self.cell, cw * self.cell)[:h, :w]
        weight, bias = _cached(cache, ("white", signed.device), lambda: self.filters(signed.device))
        x = F.pad(signed.float()[None, None], (self.window // 2,) * 4, mode="reflect")
        return 0.5 * F.conv2d(x, weight, bias)[0].pow(2).sum(0)

    def map(self, signed: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return self.weight * self.unweighted(signed, cache)


SURFACE_TILE = 64  # px: the tiles the surface's power spectrum is measured on, and the filters' support
# The defect shapes the surface filters look for, (kind, size px, angle degrees): a thin 9-px line at 12
# angles (scratches, cracks, fibres) and a soft disc (stains, discolouration). Chosen on a texture set drawn
# with its own seed (docs/RESULTS.md round 16): more disc sizes lowered it (each adds false alarms), 15-px
# lines as well bought nothing there and doubled the filters' cost.
SURFACE_SHAPES: tuple[tuple[str, float, float], ...] = (("disc", 8.0, 0.0),) + tuple(
    ("line", 9.0, float(angle)) for angle in range(0, 180, 15))
SURFACE_LINE_SIGMA = 0.6  # px: a line's blur (its width)
SURFACE_DISC_SIGMA = 2.0  # px: a disc's soft edge
SURFACE_MAX_GAIN = 1.5  # nats per window: frames whose places differ more than this are not a stationary surface


def surface_template(kind: str, size: float, angle: float, tile: int) -> np.ndarray:
    """(tile, tile) float64 shape centred at tile // 2: a line `size` px long at `angle` degrees, or a disc of
    radius `size` px, both with soft edges."""
    yy, xx = (np.mgrid[0:tile, 0:tile] - tile // 2).astype(np.float64)
    if kind == "line":
        a = math.radians(angle)
        along, across = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
        beyond = np.clip(np.abs(along) - size / 2, 0, None)
        return np.exp(-(across ** 2 + beyond ** 2) / (2 * SURFACE_LINE_SIGMA ** 2))
    if kind == "disc":
        r = np.hypot(xx, yy)
        return 0.5 * np.vectorize(math.erfc)((r - size) / (SURFACE_DISC_SIGMA * math.sqrt(2)))
    raise ValueError(f"unknown surface filter shape {kind!r}")


@dataclass(frozen=True)
class SurfaceFilters:
    """Whitened matched filters for a stationary surface (a texture with no fixed geometry): the frame itself,
    not the model's residual, correlated with each defect shape of SURFACE_SHAPES after whitening by the good
    surface's power spectrum S (kernel = IFFT(conj(T_hat) / S), the best linear detector of a known shape in
    Gaussian grain), each response divided by its spread on good frames at the same distance from the frame's
    edge (the frame is reflected there, which leaves a crease the filters see), |z| taken.

    A model of patches pays for every direction of the patch space; a faint stain or a long thin fibre is one
    direction, which these filters look along. Per pixel: max over groups (lines, discs) of weight x max |z| in
    the group, the weight putting each group's median image maximum on the map's (as Whitening does); the
    head takes it where it is larger. Only for frames whose places do not differ (a good-only check on the raw
    frames, Whitening.place_gain < SURFACE_MAX_GAIN): on a fixtured part the part's own edges would fire.
    Per frame: one FFT of the frame and one inverse per shape, kernels transformed once per frame size.
    """

    tile: int
    spectrum: np.ndarray  # (tile, tile) power per pixel of the good surface (mean-free, Hann-windowed tiles)
    shapes: tuple[tuple[str, float, float], ...]
    spread: np.ndarray  # (K, tile // 2 + 1) each filter's response spread on good frames by distance to the edge
    weights: dict[str, float]  # group (shape kind) -> weight
    images: int

    @staticmethod
    def frame_of(grid: PatchGrid, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) patches of one frame -> (H, W) float32 frame (channels averaged)."""
        return fold_mean(grid, patches.float().mean(1))

    @staticmethod
    def tile_for(height: int, width: int) -> int:
        return min(SURFACE_TILE, (min(height, width) // 2) * 2)

    @staticmethod
    def measure_spectrum(frames: list[torch.Tensor], tile: int) -> np.ndarray:
        hann = np.outer(np.hanning(tile), np.hanning(tile))
        total, n = np.zeros((tile, tile)), 0
        for frame in frames:
            x = frame.detach().cpu().double().numpy()
            h, w = x.shape
            for y0 in range(0, h - tile + 1, tile // 2):
                for x0 in range(0, w - tile + 1, tile // 2):
                    t = x[y0:y0 + tile, x0:x0 + tile]
                    total += np.abs(np.fft.fft2((t - t.mean()) * hann)) ** 2
                    n += 1
        s = total / (n * (hann ** 2).sum())
        return (s + 1e-6 * s.mean() + 1e-12).astype(np.float32)

    def kernels(self) -> np.ndarray:
        """(K, tile, tile) float32 spatial filters, centred at tile // 2."""
        s = np.asarray(self.spectrum, np.float64)
        out = []
        for kind, size, angle in self.shapes:
            t = np.fft.fft2(np.fft.ifftshift(surface_template(kind, size, angle, self.tile)))
            h = np.conj(t) / s
            h[0, 0] = 0.0  # the frame's mean level is lighting and gain, not a defect
            out.append(np.fft.fftshift(np.real(np.fft.ifft2(h))))
        return np.stack(out).astype(np.float32)

    def _kernel_hats(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        t = self.tile
        k = torch.zeros(len(self.shapes), height + t, width + t, dtype=torch.float32)
        k[:, :t, :t] = torch.from_numpy(self.kernels())
        k = torch.roll(k, (-(t // 2), -(t // 2)), dims=(1, 2))
        return torch.fft.rfft2(k).to(device)

    @staticmethod
    def edge_distance(height: int, width: int, tile: int) -> torch.Tensor:
        """(H, W) long: each pixel's distance in px to the nearest edge of the frame, at most tile // 2."""
        y = torch.arange(height)
        x = torch.arange(width)
        dy = torch.minimum(y, height - 1 - y)[:, None]
        dx = torch.minimum(x, width - 1 - x)[None, :]
        return torch.minimum(dy, dx).clamp_max(tile // 2)

    def responses(self, frame: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(H, W) frame -> (K, H, W) each filter's response (the frame reflected at its edges)."""
        h, w = frame.shape
        t = self.tile
        hats = _cached(cache, ("surface", h, w, frame.device), lambda: self._kernel_hats(h, w, frame.device))
        x = F.pad(frame.float()[None, None], (t // 2, t - t // 2, t // 2, t - t // 2), mode="reflect")[0, 0]
        r = torch.fft.irfft2(torch.fft.rfft2(x)[None] * hats, s=x.shape)
        return r[:, t // 2:t // 2 + h, t // 2:t // 2 + w]

    def z(self, frame: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """(H, W) frame -> (K, H, W) |response| / its spread at the pixel's distance from the edge."""
        h, w = frame.shape

        def spread_map() -> torch.Tensor:
            spread = torch.from_numpy(np.asarray(self.spread, np.float32))
            return spread[:, SurfaceFilters.edge_distance(h, w, self.tile)].to(frame.device)

        spread = _cached(cache, ("surface_spread", h, w, frame.device), spread_map)
        return self.responses(frame, cache).abs() / spread

    @property
    def groups(self) -> dict[str, list[int]]:
        """Shape kind -> the indices of its filters, in the order of `shapes`."""
        out: dict[str, list[int]] = {}
        for i, (kind, _, _) in enumerate(self.shapes):
            out.setdefault(kind, []).append(i)
        return out

    def group_maps(self, frame: torch.Tensor, cache: dict | None = None) -> dict[str, torch.Tensor]:
        """(H, W) frame -> group -> (H, W) max |z| over the group's filters (unweighted)."""
        z = self.z(frame, cache)
        groups = _cached(cache, ("surface_groups",), lambda: self.groups)
        return {g: z[idx].amax(0) for g, idx in groups.items()}

    def map(self, frame: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        maps = self.group_maps(frame, cache)
        return torch.stack([self.weights[g] * m for g, m in maps.items()]).amax(0)

    @staticmethod
    def check(frames: list[torch.Tensor], stride: int) -> dict[str, Any]:
        """Whether the frames are a stationary surface: Whitening.place_gain on the raw frames."""
        h, w = (int(v) for v in frames[0].shape)
        check: dict[str, Any] = {"used": False, "max_gain_nats": SURFACE_MAX_GAIN}
        if len(frames) < 4:
            check["why"] = f"{len(frames)} held-out images; the check needs >= 4"
        elif any(tuple(f.shape) != (h, w) for f in frames):
            check["why"] = "the held-out images differ in size"
        elif SurfaceFilters.tile_for(h, w) < 16:
            check["why"] = f"frames of {w}x{h} px are too small for the filters (>= 16 px)"
        else:
            cell = Whitening.cell_size(h, w, max(1, stride))
            gain = Whitening.place_gain([f.cpu() for f in frames], WHITEN_WINDOW, cell)
            check["gain_nats_per_window"] = round(gain, 4)
            if gain < SURFACE_MAX_GAIN:
                check["used"] = True
            else:
                check["why"] = (f"held-out frames gain {gain:.2f} nats per window from their place's Gaussian, "
                                f"at least {SURFACE_MAX_GAIN}: a part with places, not a uniform surface")
        return check

    @staticmethod
    def checked(frames: list[torch.Tensor], stride: int,
                map_image_scores: list[float]) -> tuple[SurfaceFilters | None, dict[str, Any]]:
        """The check, and the filters fitted where it keeps them: what train and combine write into the card."""
        check = SurfaceFilters.check(frames, stride)
        filters = SurfaceFilters.fit(frames, map_image_scores) if check["used"] else None
        if check["used"] and filters is None:
            check.update(used=False, why="the map's scores could not set the filters' scale")
        logger.info("surface filters: %s", "used" if check["used"] else f"not used: {check['why']}")
        return filters, check

    @staticmethod
    def fit(frames: list[torch.Tensor], map_image_scores: list[float]) -> SurfaceFilters | None:
        """Good frames (held out of training) -> the filters put on the map's scale (map_image_scores: the head's
        image scores of the same frames); None where no scale can be set."""
        h, w = (int(v) for v in frames[0].shape)
        tile = SurfaceFilters.tile_for(h, w)
        spectrum = SurfaceFilters.measure_spectrum(frames, tile)
        filters = SurfaceFilters(tile, spectrum, SURFACE_SHAPES, np.ones((len(SURFACE_SHAPES), tile // 2 + 1),
                                                                         np.float32), {}, len(frames))
        cache: dict = {}
        power = torch.zeros(len(SURFACE_SHAPES), tile // 2 + 1, dtype=torch.float64)
        counts = torch.zeros(tile // 2 + 1, dtype=torch.float64)
        distance = SurfaceFilters.edge_distance(h, w, tile).reshape(-1)
        for f in frames:
            r = filters.responses(f.cpu(), cache).double().reshape(len(SURFACE_SHAPES), -1)
            power.index_add_(1, distance, r ** 2)
            counts += torch.bincount(distance, minlength=tile // 2 + 1).double()
        for d in range(1, tile // 2 + 1):  # distances a small frame does not have: those of its middle
            if counts[d] == 0:
                power[:, d], counts[d] = power[:, d - 1], counts[d - 1]
        spread = (power / counts).sqrt().numpy()
        if not (np.isfinite(spread).all() and (spread > 0).all()):
            logger.warning("surface filters left out: a filter's response has no spread on the good frames")
            return None
        filters = dataclasses.replace(filters, spread=spread.astype(np.float32))
        cache = {}
        maxima: dict[str, list[float]] = {}
        for f in frames:
            for g, m in filters.group_maps(f.cpu(), cache).items():
                maxima.setdefault(g, []).append(float(m.max()))
        map_max = float(np.median(map_image_scores))
        weights = {g: map_max / float(np.median(v)) for g, v in maxima.items()}
        if not (map_max > 0 and all(math.isfinite(v) and v > 0 for v in weights.values())):
            logger.warning("surface filters left out: the map's median image score (%g) cannot set their scale", map_max)
            return None
        logger.info("surface filters: %d shapes, spectrum of %d good frames; weights %s", len(SURFACE_SHAPES),
                    len(frames), ", ".join(f"{g} {v:.4g}" for g, v in weights.items()))
        return dataclasses.replace(filters, weights=weights)

    def card(self) -> dict[str, Any]:
        return {"tile_px": self.tile, "spectrum": _encode(self.spectrum),
                "shapes": [[kind, size, angle] for kind, size, angle in self.shapes],
                "spread": _encode(self.spread), "weights": dict(self.weights), "images": self.images,
                "rule": "map = max(map, max over shape groups of weight x max |z|), z the frame's correlation with "
                        "each shape whitened by the good surface's power spectrum, over its spread on good frames "
                        "at the same distance from the frame's edge"}

    @staticmethod
    def from_card(record: dict[str, Any]) -> SurfaceFilters:
        try:
            tile = int(record["tile_px"])
            shapes = tuple((str(k), float(s), float(a)) for k, s, a in record["shapes"])
            filters = SurfaceFilters(tile, _decode(record["spectrum"]), shapes, _decode(record["spread"]),
                                     {str(k): float(v) for k, v in record["weights"].items()}, int(record.get("images", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"the model card's surface filters are unreadable ({e}); retrain the model") from None
        kinds = {k for k, _, _ in shapes}
        if (tile < 16 or filters.spectrum.shape != (tile, tile) or not np.isfinite(filters.spectrum).all()
                or (filters.spectrum <= 0).any() or filters.spread.shape != (len(shapes), tile // 2 + 1)
                or not np.isfinite(filters.spread).all() or (filters.spread <= 0).any()
                or not kinds <= {"line", "disc"} or set(filters.weights) != kinds
                or not all(math.isfinite(v) and v > 0 for v in filters.weights.values())):
            raise ModelError("the model card's surface filters are malformed; retrain the model")
        return filters


@dataclass(frozen=True)
class MapHead:
    """The card's `anomaly_map`: pixel maps -> fold mean -> blur -> (minus place mean) / place spread -> window max,
    and with a low side (texture loss) the larger of that and LowSide's score."""

    sigma_px: float
    position: PositionStats | None = None
    low: LowSide | None = None
    place: PlaceStats | None = None
    white: Whitening | None = None
    surface: SurfaceFilters | None = None

    @staticmethod
    def from_card(card: dict[str, Any], extras: dict[str, bytes] | None = None) -> MapHead | None:
        """The card's head; extras: the archive's extra entries (artifact.load_extras), needed by a place score."""
        record = card.get("anomaly_map")
        if not record:
            return None
        position, low, place = record.get("position"), record.get("low"), record.get("place")
        white, surface = record.get("white"), record.get("surface")
        return MapHead(float(record.get("blur_sigma_px", 0.0)), PositionStats.from_card(position) if position else None,
                       LowSide.from_card(low) if low else None,
                       PlaceStats.from_card(place, extras or {}) if place else None,
                       Whitening.from_card(white, extras) if white else None,
                       SurfaceFilters.from_card(surface) if surface else None)

    def card(self) -> dict[str, Any]:
        return {"source": "pixel_map", "fold": "mean over overlapping patches", "blur_sigma_px": self.sigma_px,
                "position": self.position.card() if self.position else None,
                "low": self.low.card() if self.low else None,
                "place": self.place.card() if self.place else None,
                "white": self.white.card() if self.white else None,
                "surface": self.surface.card() if self.surface else None,
                "patch_score": "max of the map inside the patch" + (
                    ", the map normalized by the good parts' median and spread at each place" if self.position else "")
                + (", the map raised to the whitened residual's where larger" if self.white else "")
                + (", or the surface filters' where larger (lines and stains in a uniform surface)" if self.surface else "")
                + (", or the place score where larger (the patch's code against good codes at its place)"
                   if self.place else "")
                + (", or the low side's score where larger (texture loss)" if self.low else "")}

    def extras(self) -> dict[str, bytes]:
        """The archive entries this head needs next to the card."""
        return {**({PLACE_ENTRY: self.place.blob()} if self.place else {}), **(self.white.extras() if self.white else {})}

    def smoothed(self, grid: PatchGrid, pixel_maps: torch.Tensor) -> torch.Tensor:
        """(N, P, P) -> (H, W): the fold mean, blurred; what PositionStats.fit takes."""
        return gaussian_blur(fold_mean(grid, pixel_maps), self.sigma_px)

    def normalized(self, smooth: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.position is None:
            return smooth
        h, w = smooth.shape
        mean, spread = _cached(cache, (h, w, smooth.device), lambda: self.position.at(h, w, smooth.device))
        return (smooth - mean) / spread

    def patch_scores(self, grid: PatchGrid, pixel_maps: torch.Tensor, cache: dict | None = None,
                     codes: torch.Tensor | None = None, residuals: torch.Tensor | None = None,
                     patches: torch.Tensor | None = None) -> torch.Tensor:
        """(N, P, P) pixel maps of one frame (with a place score its (N, D) codes, with whitening its (N, P, P)
        signed residuals, with surface filters its (N, C, P, P) patches) -> (N,) patch scores."""
        signed = fold_mean(grid, residuals) if self.white is not None and residuals is not None else None
        frame = (SurfaceFilters.frame_of(grid, patches).to(pixel_maps.device)  # folded where the patches are
                 if self.surface is not None and patches is not None else None)
        scores = self.scores_of_smoothed(grid, self.smoothed(grid, pixel_maps), cache, codes, signed, frame)
        return scores if self.low is None else torch.maximum(scores, self.low.scores(pixel_maps).to(scores.device))

    def scores_of_smoothed(self, grid: PatchGrid, smooth: torch.Tensor, cache: dict | None = None,
                           codes: torch.Tensor | None = None, signed: torch.Tensor | None = None,
                           frame: torch.Tensor | None = None) -> torch.Tensor:
        """(H, W) smoothed map (from `smoothed`; with whitening the (H, W) folded signed residual, with surface
        filters the (H, W) frame) -> (N,) patch scores without the low side: what train uses once the statistics
        exist."""
        image = self.normalized(smooth, cache)
        if self.white is not None:
            if signed is None:
                raise ValueError("this head whitens the residual: give the frame's signed residuals")
            image = torch.maximum(image, self.white.map(signed.to(image.device), cache))
        if self.surface is not None:
            if frame is None:
                raise ValueError("this head has surface filters: give the frame's patches")
            image = torch.maximum(image, self.surface.map(frame.to(image.device), cache))
        scores = window_max(grid, image)
        if self.place is None:
            return scores
        if codes is None:
            raise ValueError("this head has a place score: give the frame's patch codes")
        return torch.maximum(scores, self.place.scores(codes.to(scores.device), cache))

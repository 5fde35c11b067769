"""`edge-agent combine`: several trained models as one artifact whose pixel map is the largest of theirs.

Round 5 (docs/RESULTS.md) found that models with different latents fail on different defects: the seed's
fc-latent VAE draws a fine periodic structure (a thread) as noise, so defects on it score nothing; a
`--latent conv` VAE reconstructs the thread but partly copies large debris. Each member's per-pixel map is put
on a common scale (divided by the median of its image maximum over good images, so "1" means "as high as a
typical good part gets" for every member) and the combination keeps, pixel by pixel, the highest:

    pixel_map(x) = max_k  scale_k * pixel_map_k(x)        scale_k = 1 / median_i max(fold_mean(map_k(image_i)))

The result is an ordinary artifact: one TorchScript module (the members inside it), the scales as a buffer,
the members' cards, the scales and their images in its card; its raw score is the sum of that map over the
patch (as m is for one VAE) and its default score the anomaly-map head over it. So the daemon, calibrate,
evaluate and bench cannot tell it from a single model. It costs every member's scoring time.
"""

# No `from __future__ import annotations`: TorchScript reads Ensemble's class annotations as types.
import dataclasses
import datetime as dt
import math
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

import edge_agent
from edge_agent import artifact, calibrate
from edge_agent.anomaly_map import (WHITE_PLACE_ENTRY, LowSide, MapHead, PlaceStats, SurfaceFilters, Whitening, fold_mean,
                                    window_max)
from edge_agent.errors import ConfigError, DataError, ModelError
from edge_agent.evaluation import ImageResult, blank_frame_scores
from edge_agent.images import file_hashes, fingerprint, fitted_files, list_images, read_image
from edge_agent.patches import PatchGrid, to_tensor
from edge_agent.progress import Progress

SCALE_IMAGES = 50  # default number of good images whose median sets each member's scale


class Ensemble(nn.Module):
    """Members' pixel maps, each times its scale, combined by the pixelwise maximum."""

    score_names: List[str]
    default_score: str

    def __init__(self, members: list[torch.jit.ScriptModule], scales: list[float], raw_name: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        self.score_names = [raw_name]
        self.default_score = raw_name

    @torch.jit.export
    def pixel_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) -> (N, P, P): max over members of scale_k * pixel_map_k(x), float32."""
        out = torch.empty(0)
        for k, member in enumerate(self.members):
            scaled = member.pixel_map(x).float() * self.scales[k]
            out = scaled if k == 0 else torch.maximum(out, scaled)
        return out

    @torch.jit.export
    def scores(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self.default_score: self.pixel_map(x).flatten(1).sum(1)}

    @torch.jit.export
    def score(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if name != self.default_score:
            raise ValueError("unknown score name")
        return self.pixel_map(x).flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x, self.default_score)


class EnsembleWithCode(Ensemble):
    """An Ensemble whose first member has a place score (anomaly_map.PlaceStats): the combination keeps it, so it
    also gives that member's patch code, from the same forward pass as the maps."""

    @torch.jit.export
    def latent_code(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].latent_code(x)

    @torch.jit.export
    def pixel_map_code(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(max over members of scale_k * pixel_map_k(x), the first member's code)."""
        first, code = self.members[0].pixel_map_code(x)
        out = first.float() * self.scales[0]
        for k, member in enumerate(self.members):
            if k > 0:
                out = torch.maximum(out, member.pixel_map(x).float() * self.scales[k])
        return out, code


class EnsembleWithResidual(EnsembleWithCode):
    """An Ensemble whose first member whitens its residual (anomaly_map.Whitening): the combination keeps that
    member's signed residual (and code), from the same forward pass as the maps."""

    @torch.jit.export
    def pixel_map_residual(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(max over members of scale_k * pixel_map_k(x), the first member's signed residual and code)."""
        first, residual, code = self.members[0].pixel_map_residual(x)
        out = first.float() * self.scales[0]
        for k, member in enumerate(self.members):
            if k > 0:
                out = torch.maximum(out, member.pixel_map(x).float() * self.scales[k])
        return out, residual, code


def _geometry(card: dict[str, Any]) -> tuple:
    p, i = card["patch"], card["input"]
    return (int(p["size"]), int(p["stride"]), bool(p.get("cover_edges", True)), int(i["channels"]),
            i.get("frame_height"), i.get("frame_width"))


def load_members(paths: list[Path]) -> list[tuple[torch.jit.ScriptModule, dict[str, Any]]]:
    """Load and check that the models can be combined; ModelError naming the one that cannot."""
    if len(paths) < 2:
        raise ConfigError(f"combine needs two or more models, got {len(paths)}; name every model to combine")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ConfigError("the same model is named twice; combine different models")
    members = [artifact.load(p) for p in paths]
    first = _geometry(members[0][1])
    for path, (_, card) in zip(paths, members):
        if not card.get("anomaly_map") or not card["scores"].get("pixel_map"):
            raise ModelError(f"{path} has no anomaly map (family {card.get('family')}, trained with --no-anomaly-map?); "
                             "only models whose default score is the map can be combined: retrain it with the defaults")
        if _geometry(card) != first:
            size, stride, _, channels, h, w = _geometry(card)
            raise ModelError(f"{path} scores P={size} S={stride}, {channels} channel(s), {w}x{h} frames, but "
                             f"{paths[0]} scores P={first[0]} S={first[1]}, {first[3]} channel(s), {first[5]}x{first[4]}; "
                             "combine models trained with the same --patch-size, --stride and images")
    return members


def heldout_files(cards: list[dict[str, Any]], paths: list[Path]) -> list[Path]:
    """The good images every member held out of training, found again in its training folder (by content)."""
    common: set[str] | None = None
    for card in cards:
        hashes = set((card.get("training", {}).get("holdout") or {}).get("image_hashes") or [])
        common = hashes if common is None else common & hashes
    folder = Path(cards[0].get("training", {}).get("data_dir", ""))
    if not common or not folder.is_dir():
        raise DataError(f"{paths[0]} and the others share no held-out good images that can still be read "
                        f"(training folder {folder}); give good images none of them was trained on with --good DIR")
    files = list_images(folder, what="training folder")
    return [f for f, h in zip(files, file_hashes(files)) if h in common]


def _image_max(grid: PatchGrid, pixel: torch.Tensor) -> float:
    return float(window_max(grid, fold_mean(grid, pixel)).max())


def _pixel_maps(module, patches: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([module.pixel_map(patches[s : s + batch_size]).float()
                          for s in range(0, patches.shape[0], batch_size)])


def fit_scales(members: list, files: list[Path], progress: bool = True) -> tuple[list[float], list[list[float]]]:
    """Each member's scale: 1 / the median over `files` of its image maximum (fold mean of the pixel map, no
    blur, no position statistics). Returns (scales, the maxima per member)."""
    size, stride, cover, channels, _, _ = _geometry(members[0][1])
    maxima: list[list[float]] = [[] for _ in members]
    with Progress(len(files), "scales", enabled=progress) as bar:
        for f in files:
            image = read_image(f)
            grid = PatchGrid.for_frame(image.shape[0], image.shape[1], size, stride, cover)
            patches = grid.extract(to_tensor(image, channels))
            for k, (module, _) in enumerate(members):
                maxima[k].append(_image_max(grid, _pixel_maps(module, patches)))
            bar.update(1)
    scales = []
    for k, values in enumerate(maxima):
        median = float(np.median(values))
        if not math.isfinite(median) or median <= 0:
            raise ModelError(f"member {k + 1} gives good images a median map maximum of {median:g}; it cannot be put on a "
                             "common scale (an untrained or broken model): retrain it")
        scales.append(1.0 / median)
    return scales, maxima


def _member_record(path: Path, card: dict[str, Any], scale: float, maxima: list[float]) -> dict[str, Any]:
    t = card.get("training", {})
    return {"file": path.name, "model_id": card.get("model_id"), "family": card.get("family"),
            "checksum": card.get("checksum"), "architecture": card.get("architecture"),
            "training": {k: t.get(k) for k in ("images", "data_fingerprint", "steps", "seconds", "stopped_by")},
            "map_score": card["anomaly_map"]["name"], "scale": scale,
            "good_image_max": {"median": float(np.median(maxima)), "min": float(np.min(maxima)),
                               "max": float(np.max(maxima))}}


def combine(paths: list[Path], out: Path, good: Path | None = None, scale_images: int = SCALE_IMAGES,
            target_frr: float = 0.01, confidence: float = 0.95, progress: bool = True,
            name: str | None = None, texture_loss: bool = True, whiten_place: bool = True) -> dict[str, Any]:
    """Write the combined artifact and set its threshold; returns its card. whiten_place: where the first member
    whitens its residual, check per-place whitening too (kept by Whitening.weighted's rule).

    The good images (--good, default: the ones every member held out of training) are split alternately:
    even ones (at most scale_images) fit the scales, the rest set the threshold by the good-only FRR
    method, as `calibrate` would.
    """
    calibrate.check_rate("--target-frr", target_frr)
    calibrate.check_rate("--confidence", confidence)
    if scale_images < 1:
        raise ConfigError(f"--scale-images {scale_images} must be >= 1 (the default {SCALE_IMAGES} is a stable median)")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ConfigError(f"--out {out} is one of the models being combined; write the combination to a new file")
    members = load_members(paths)
    cards = [card for _, card in members]
    files = list_images(good, what="--good") if good is not None else heldout_files(cards, paths)
    if len(files) < 2:
        raise DataError(f"{len(files)} good image(s) are too few: combine needs some to fit the scales and some to set "
                        "the threshold; give more good images with --good DIR")
    hashes = file_hashes(files)
    for path, card in zip(paths, cards):
        overlap = fitted_files(card, files, hashes)
        if overlap:
            raise DataError(f"--good image {overlap[0]} was used to train {path}; the scales and the threshold need good "
                            "images none of the models was fitted on (e.g. calibration images)")
    evens, odds = files[0::2], files[1::2]
    scale_files = evens[:scale_images]
    threshold_files = odds + evens[scale_images:]

    t0 = time.monotonic()
    scales, maxima = fit_scales(members, scale_files, progress)
    raw_names = {c["anomaly_map"]["name"].removesuffix("_map") for c in cards}  # m_map -> m
    raw = raw_names.pop() if len(raw_names) == 1 else "map_sum"
    head_name = f"{raw}_map"
    # The first member's place score (its code's Gaussians at each place) is kept; its weight is refitted on the
    # combined map's scale with the threshold images (set_threshold).
    place = MapHead.from_card(cards[0], artifact.load_with_extras(paths[0])[2]).place
    if place is not None and not hasattr(members[0][0], "pixel_map_code"):
        place = None
    # The first member's residual whitening is refitted on the threshold images (set_threshold) with its window.
    white = (cards[0].get("anomaly_map") or {}).get("white")
    window = int(white["window_px"]) if white and hasattr(members[0][0], "pixel_map_residual") else None
    white_place = bool(window) and whiten_place
    # Surface filters (a texture's lines and stains) are refitted on the threshold images when a member has them.
    surface = any((c.get("anomaly_map") or {}).get("surface") for c in cards)
    ensemble = EnsembleWithResidual if window else EnsembleWithCode if place is not None else Ensemble
    module = torch.jit.script(ensemble([m for m, _ in members], scales, raw))

    scores: dict[str, Any] = {"names": [raw, head_name], "default": head_name, "pixel_map": True,
                              "higher_is_anomalous": True}
    if any(c["scores"].get("precision") == "fp32" for c in cards):
        scores["precision"] = "fp32"
    if any(c["scores"].get("needs_grad") for c in cards):
        scores["needs_grad"] = True
    first = cards[0]
    card = {
        "model_id": name or out.stem,
        "family": "ensemble",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": dict(first["input"]),
        "patch": dict(first["patch"]),
        "scores": scores,
        "architecture": {
            "combine": "pixelwise max over members of scale_k * pixel_map_k",
            "scale_rule": "1 / median over the scale images of the member's image maximum (fold mean of its pixel "
                          "map, no blur, no position statistics)",
            "members": [_member_record(p, c, s, m) for p, c, s, m in zip(paths, cards, scales, maxima)],
        },
        "thresholds": {},
        "training": {
            "data_dir": str(good if good is not None else cards[0]["training"].get("data_dir")),
            "images": len(scale_files), "data_fingerprint": fingerprint(scale_files),
            # what any member was fitted on, and the scale images: none of it is a fair test image
            "image_hashes": sorted(set(file_hashes(scale_files)).union(
                *(c.get("training", {}).get("image_hashes", []) for c in cards))),
            "seconds": round(sum(float(c.get("training", {}).get("seconds") or 0) for c in cards), 1),
            "steps": sum(int(c.get("training", {}).get("steps") or 0) for c in cards),
            "stopped_by": "combined", "scale_seconds": round(time.monotonic() - t0, 1),
            "holdout": {"images": len(threshold_files), "image_hashes": file_hashes(threshold_files),
                        "rule": "the good images not used for the scales (every other one)"},
        },
        "anomaly_map": {**MapHead(0.0, place=place).card(), "name": head_name},
        "versions": {"edge_agent": edge_agent.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    artifact.save(module, card, out, MapHead(0.0, place=place).extras())
    return set_threshold(out, threshold_files, target_frr, confidence, progress, texture_loss, window, white_place,
                         surface)


def set_threshold(path: Path, files: list[Path], target_frr: float, confidence: float,
                  progress: bool = True, texture_loss: bool = True, whiten_window: int | None = None,
                  whiten_place: bool = False, surface: bool = False) -> dict[str, Any]:
    """Every score's threshold by the good-only FRR method on `files`, written into the card; with a place score
    (the first member's) its weight is refitted here first: median image maximum of the combined map over that
    of the place distance, as train sets it. whiten_place: check per-place whitening (Whitening.weighted).
    surface: check and fit surface filters on the images (SurfaceFilters), as train does."""
    from edge_agent.scoring import Scorer
    from edge_agent.train.fit import quantiles

    if not files:
        raise DataError("no good images are left for the threshold after the scales; give more with --good DIR")
    scorer = Scorer(path, device="cpu", threshold=math.inf, warmup=False)
    blanks = blank_frame_scores(scorer, scorer.card["scores"]["names"])
    raw = scorer.card["scores"]["names"][0]
    images: list[ImageResult] = []
    distances: list[np.ndarray] = []  # the place score's distances (weight 1) of each image's patches
    signed: list[torch.Tensor] = []  # the first member's folded signed residual of each image (whitening)
    smooth: list[torch.Tensor] = []
    frames: list[torch.Tensor] = []  # each image itself (surface filters)
    plain = MapHead(0.0)
    place = scorer.head.place
    t0 = time.monotonic()
    with Progress(len(files), "threshold", enabled=progress) as bar:
        for f in files:
            grid, patches = scorer.patches(read_image(f))
            if whiten_window:
                maps, residuals, codes = scorer.maps_residuals(patches)
                signed.append(fold_mean(grid, residuals))
            else:
                maps, codes, _ = scorer.pixel_maps_codes(patches)
            if surface:
                frames.append(SurfaceFilters.frame_of(grid, patches))
            with torch.inference_mode():
                smooth.append(plain.smoothed(grid, maps))
                values = {raw: maps.flatten(1).sum(1).cpu().numpy(),
                          scorer.head_name: plain.scores_of_smoothed(grid, smooth[-1]).cpu().numpy()}
                if place is not None:
                    distances.append((place.scores(codes) / place.weight).cpu().numpy())
            images.append(ImageResult(f, grid, values, scorer.counted(grid)))
            bar.update(1)
    white = None
    if signed:
        white = Whitening.weighted(signed, [i.image_score(scorer.head_name) for i in images], whiten_window,
                                   stride=images[0].grid.stride if whiten_place else 0)
        if white is not None:
            with_white = MapHead(0.0, white=white)
            for k, image in enumerate(images):
                image.scores[scorer.head_name] = with_white.scores_of_smoothed(image.grid, smooth[k], signed=signed[k]).numpy()
    if place is not None:
        weight = float(np.median([i.image_score(scorer.head_name) for i in images]) /
                       np.median([d.max() for d in distances]))
        if not (math.isfinite(weight) and weight > 0):
            raise ModelError(f"the place score of {scorer.card['architecture']['members'][0]['file']} cannot be put on "
                             f"the combined map's scale (weight {weight:g}); retrain that member")
        place = dataclasses.replace(place, weight=weight)
        for image, d in zip(images, distances):
            image.scores[scorer.head_name] = np.maximum(image.scores[scorer.head_name], weight * d)
    filters, surface_check = None, None
    if frames:
        filters, surface_check = SurfaceFilters.checked(frames, images[0].grid.stride,
                                                        [i.image_score(scorer.head_name) for i in images])
        if filters is not None:
            with torch.inference_mode():
                for image, frame in zip(images, frames):
                    image.scores[scorer.head_name] = np.maximum(image.scores[scorer.head_name],
                                                                window_max(image.grid, filters.map(frame)).numpy())
    # The low side (texture loss, anomaly_map.LowSide) from the same images, as train fits a single model's.
    low = LowSide.fit([torch.from_numpy(i.scores[raw]) for i in images],
                      [i.image_score(scorer.head_name) for i in images]) if texture_loss else None
    results: dict[str, list[float]] = {}
    for image in images:
        if low is not None:
            image.scores[scorer.head_name] = np.maximum(image.scores[scorer.head_name],
                                                        low.scores_from_sums(torch.from_numpy(image.scores[raw])).numpy())
        for k in image.scores:
            results.setdefault(k, []).append(image.image_score(k))
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    hashes = file_hashes(files)

    def change(card: dict[str, Any]) -> dict[str, Any]:
        card["anomaly_map"] = {**card["anomaly_map"], **MapHead(0.0, None, low, place, white, filters).card()}
        if surface_check is not None:
            card["anomaly_map"]["surface_check"] = surface_check
        for k, values in results.items():
            good = np.array(values, dtype=np.float64)
            entry = calibrate.choose(good, None, "frr", target_frr, None, confidence, blanks.get(k))
            entry.update({
                "description": f"{entry['description']}, on good images not used for the scales; calibrate to replace",
                "images": len(files), "image_hashes": hashes, "data_fingerprint": fingerprint(files), "chosen_at": now,
                "good_image_scores": quantiles(good),
                "seconds": round(time.monotonic() - t0, 1), "scored_with": scorer.scored_with(),
            })
            card["thresholds"][k] = entry
        return card

    return artifact.update_card(path, change, extras={WHITE_PLACE_ENTRY: None,
                                                      **MapHead(0.0, place=place, white=white).extras()})

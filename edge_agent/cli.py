"""The `edge-agent` command line: parse, call one function, map errors to exit codes.

A user mistake prints one line `edge-agent: error: ...` on stderr and exits non-zero (2 for usage,
configuration and model problems, 1 for data); never a traceback. EDGE_AGENT_DEBUG=1 shows them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edge_agent.errors import ConfigError, DataError, EdgeAgentError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Streaming edge inspection agent: train on good parts, calibrate, score, evaluate, run the station daemon.",
)

# readable=False: our own check names the problem ("permission denied ... chmod g+r"), click's only says "not readable".
Model = Annotated[Path, typer.Argument(help="Model file (.pt) exported by `edge-agent train`.", readable=False)]
Station = Annotated[Optional[Path], typer.Option(
    "--config", help="Station config (TOML): judge as that station does, with its model, score, threshold, ignore "
    "mask and precision (score: its quality gate too); reproduces a disputed verdict offline.")]


def _station_model(config: Path, device: str):
    """The station's Model (scorer + ignore mask) and config, as the daemon loads them; device 'auto' keeps the config's."""
    from edge_agent.config import load_config
    from edge_agent.daemon import load_model

    station = load_config(config)
    cfg = station.model if device == "auto" else station.model.model_copy(update={"device": device})
    return load_model(cfg), station


def _json_safe(value):
    """NaN and infinities become null: JSON has no NaN, and `score --json` output must parse anywhere."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) or hasattr(value, "item"):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _json_line(obj: dict) -> None:
    sys.stdout.write(json.dumps(_json_safe(obj), allow_nan=False) + "\n")
    sys.stdout.flush()


def _box(box) -> dict | None:
    return None if box is None else dict(zip(("x", "y", "w", "h"), (int(v) for v in box)))


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Folder of good images (png/jpg/bmp/tif).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (.pt).")],
    model: Annotated[str, typer.Option(help="Model family: vae, ae, gmm (PCA + Gaussian mixture) or anogan.")] = "vae",
    patch_size: Annotated[int, typer.Option(help="Patch size P (>= 16; the seed used 96).")] = 32,
    stride: Annotated[int, typer.Option(help="Patch stride S when scoring (the seed used 16).")] = 8,
    channels: Annotated[int, typer.Option(help="1 = grayscale, 3 = BGR colour.")] = 1,
    nc: Annotated[int, typer.Option(help="Channels of the first conv layer (Nc; seed: 16, 32 or 64).")] = 32,
    nz: Annotated[int, typer.Option(help="Latent size (Nz; seed: 2..100).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Crops per training step.")] = 64,
    epochs: Annotated[int, typer.Option(help="Epochs (one epoch = as many crops as the images have patches).")] = 10,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes, whatever the epochs.")] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate (seed: 1e-3).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed and data give the same model when --max-minutes does not stop it (the clock sets the step count and the learning-rate schedule, so two timed runs differ).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast where the hardware has it), fp32 or bf16.")] = "auto",
    name: Annotated[Optional[str], typer.Option(help="Model id in the card; default: the file name.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    nh: Annotated[Optional[int], typer.Option(help="gmm: PCA dimensions Nh (seed: 2..500); default: every pixel of "
                                                   "the patch up to 256 (m_full scores the rest).")] = None,
    components: Annotated[int, typer.Option(help="gmm: mixture components Nz (seed: 2..100).")] = 8,
    reg_covar: Annotated[float, typer.Option(help="gmm: added to every covariance diagonal (recorded in the card).")] = 1e-4,
    crops_per_image: Annotated[int, typer.Option(help="gmm: random crops per training image (seed: 100).")] = 100,
    gamma_steps: Annotated[int, typer.Option(help="anogan: latent search steps from a random z (Gamma).")] = 100,
    lam: Annotated[float, typer.Option("--lambda", help="anogan: weight of the discrimination loss (lambda).")] = 0.1,
    refine_steps: Annotated[int, typer.Option(help="anogan: search steps from the encoder's z (k).")] = 10,
    search_lr: Annotated[float, typer.Option(help="anogan: Adam learning rate of the latent search.")] = 0.05,
    latent_search: Annotated[str, typer.Option(help="anogan default score: encoder, encoder+refine or random.")] = "encoder+refine",
    threshold_images: Annotated[Optional[int], typer.Option(help="Score at most this many held-out images for the "
                                                                  "initial threshold (evenly spaced); default: all.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; default: max(epochs x steps per epoch, "
                                                      "--min-steps).")] = None,
    min_steps: Annotated[int, typer.Option(help="At least this many steps, however few the images.")] = 2000,
    holdout: Annotated[float, typer.Option(help="Share of the good images held out of training for the initial "
                                                "threshold (FRR method) and the anomaly map's statistics.")] = 0.2,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay over the budget) or constant (the seed's).")] = "cosine",
    early_stop: Annotated[bool, typer.Option(help="Stop when the held-out loss stops improving.")] = True,
    anomaly_map: Annotated[bool, typer.Option(help="Add the anomaly-map score (smoothed pixel map, the default "
                                                   "score) next to the patch scores.")] = True,
    blur_sigma: Annotated[Optional[float], typer.Option(help="Anomaly map Gaussian blur in px (0 = none, the default: blur buries 1-px scratches and fibres).")] = 0.0,
    position_stats: Annotated[bool, typer.Option(help="Compare the anomaly map with good parts at the same place "
                                                      "(fixtured parts); --no-position-stats for free-lying parts.")] = True,
    texture_loss: Annotated[bool, typer.Option(help="The anomaly-map score also flags a patch the model explains "
                                                    "far better than any held-out good patch (a smear, a polished "
                                                    "or blurred spot).")] = True,
    place_score: Annotated[bool, typer.Option(help="vae/ae: also score each patch's code against good codes at its "
                                                   "place (a Gaussian per grid cell, fitted on the training images); "
                                                   "kept only when held-out images show that places differ "
                                                   "(fixtured parts, not textures).")] = True,
    place_min_gain: Annotated[Optional[float], typer.Option(
        help="Keep the place score when held-out good codes gain at least this many nats from their place's "
             "Gaussian over one pooled Gaussian; default 15 (parts moving +-16 px at 128 px gave 8-12, and the "
             "place score cost them recall).", show_default=False)] = None,
    whiten: Annotated[bool, typer.Option(help="vae/ae: also score the shape of the signed residual: each k x k "
                                              "window's Mahalanobis distance from good windows, fitted on the "
                                              "held-out images (catches 1-px scratches and fibres the pixel map "
                                              "misses).")] = True,
    whiten_window: Annotated[int, typer.Option(help="The whitened windows' side k in px (odd).")] = 5,
    whiten_place: Annotated[bool, typer.Option(help="With --whiten: one window Gaussian per place (cells of the "
                                                    "stride), kept only when held-out windows show that places "
                                                    "differ (fixtured parts, not textures).")] = True,
    surface_filters: Annotated[bool, typer.Option(help="Also look for thin lines and soft stains in the frame "
                                                       "itself with filters whitened by the good surface's "
                                                       "spectrum; kept only when held-out frames show no places "
                                                       "(textures, not fixtured parts).")] = True,
    target_frr: Annotated[float, typer.Option(help="False-reject rate the initial threshold aims at.")] = 0.01,
    beta_nll: Annotated[float, typer.Option(help="VAE: weight each pixel's NLL by sigma_x^(2 beta) in training "
                                                 "(beta-NLL; 0 = the plain ELBO).")] = 0.0,
    latent: Annotated[str, typer.Option(help="vae/ae: the code's shape. fc = the seed's vector of Nz; conv = Nz "
                                             "channels per 16-px cell of the patch (6x6 at P 96; needs P >= 28).")] = "fc",
) -> None:
    """Train a model on good images and export one self-describing TorchScript file.

    anogan trains the DCGAN with Adam(2e-4, betas (0.5, 0.999)) and then the encoder with --lr.
    """
    from edge_agent.train.fit import FAMILIES, TrainOptions, fit

    if model not in FAMILIES:
        raise DataError(f"--model {model!r} is not a model family; choose one of: {', '.join(FAMILIES)}")
    if channels not in (1, 3):
        raise DataError(f"--channels {channels} must be 1 (gray) or 3 (BGR)")
    if precision not in ("auto", "fp32", "bf16"):
        raise DataError(f"--precision {precision!r} must be auto, fp32 or bf16")
    if latent_search not in ("encoder", "encoder+refine", "random"):
        raise DataError(f"--latent-search {latent_search!r} must be encoder, encoder+refine or random")
    if min(1 if nh is None else nh, components, crops_per_image) < 1 or min(gamma_steps, refine_steps) < 0 or not 0 <= lam <= 1:
        raise DataError("--nh, --components, --crops-per-image must be >= 1, --gamma-steps and --refine-steps >= 0, "
                        "--lambda in [0, 1]")
    if threshold_images is not None and threshold_images < 1:
        raise DataError(f"--threshold-images {threshold_images} must be >= 1 (leave it out to use every held-out image)")
    if steps is not None and steps < 1 or min_steps < 1:
        raise DataError(f"--steps {steps} / --min-steps {min_steps} must be >= 1")
    if not 0 <= holdout < 1:
        raise DataError(f"--holdout {holdout} must be a share in [0, 1), e.g. 0.2 (0 trains on every image)")
    if lr_schedule not in ("cosine", "constant"):
        raise DataError(f"--lr-schedule {lr_schedule!r} must be cosine or constant")
    if blur_sigma is not None and blur_sigma < 0:
        raise DataError(f"--blur-sigma {blur_sigma} must be >= 0 (0 = no blur)")
    if not 0 <= beta_nll <= 1:
        raise DataError(f"--beta-nll {beta_nll} must be in [0, 1] (0.5 is the usual choice, 0 the plain ELBO)")
    if not 0 < target_frr < 1:
        raise DataError(f"--target-frr {target_frr} must be a rate between 0 and 1 (e.g. 0.01)")
    if whiten_window < 1 or whiten_window % 2 == 0 or whiten_window > 15:
        raise DataError(f"--whiten-window {whiten_window} must be an odd number of px from 1 to 15 (default 5)")
    opts = TrainOptions(model=model, patch_size=patch_size, stride=stride, channels=channels, nc=nc, nz=nz,
                        batch_size=batch_size, epochs=epochs, max_minutes=max_minutes, lr=lr,
                        weight_decay=weight_decay, seed=seed, device=device, precision=precision, name=name,
                        progress=not quiet, nh=nh, components=components, reg_covar=reg_covar,
                        crops_per_image=crops_per_image, gamma_steps=gamma_steps, lam=lam, refine_steps=refine_steps,
                        search_lr=search_lr, latent_search=latent_search, threshold_images=threshold_images,
                        steps=steps, min_steps=min_steps, holdout=holdout, lr_schedule=lr_schedule,
                        early_stop=early_stop, anomaly_map=anomaly_map, blur_sigma=blur_sigma,
                        position_stats=position_stats, texture_loss=texture_loss, place_score=place_score,
                        place_min_gain=place_min_gain, whiten=whiten, whiten_window=whiten_window,
                        whiten_place=whiten_place, surface_filters=surface_filters,
                        target_frr=target_frr,
                        beta_nll=beta_nll, latent=latent)
    card = fit(data_dir, out, opts)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 wrote the file and reports it
        return
    t = card["training"]
    th = card["thresholds"][card["scores"]["default"]]
    if th["method"] == "frr":
        how = (f"FRR method on {th['n_good']} held-out good images: true FRR <= {th['frr_upper_bound']:.3g} at "
               f"{th['confidence']:g} confidence" + ("" if th["enough_good_images"] else
                                                      f"; {th['n_min_for_target']} needed for {opts.target_frr:g}, "
                                                      "calibrate on more good parts"))
    else:
        how = f"max over {th['images']} training images: too few to hold out; calibrate on more good parts"
    typer.echo(f"wrote {out}: {card['family']} P={opts.patch_size} S={opts.stride}, {t['steps']} steps in "
               f"{t['seconds']} s (stopped: {t['stopped_by']}), final loss {t['final_loss']:.4g}; threshold "
               f"{card['scores']['default']} = {th['value']:.6g} ({how})", err=True)


@app.command()
def score(
    model: Annotated[Optional[Path], typer.Argument(
        help="Model file (.pt) exported by `edge-agent train`; left out with --config (model.path).")] = None,
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Images or folders of images.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    score_name: Annotated[Optional[str], typer.Option("--score", help="Score name; default: the card's.")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Write an overlay PNG per image into this folder.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Override the card's threshold.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    config: Station = None,
) -> None:
    """Score images: image score = the highest patch score; anomalous when it is over the threshold."""
    import cv2

    from edge_agent import quality
    from edge_agent.config import QualityConfig
    from edge_agent.images import list_images, read_image
    from edge_agent.scoring import Scorer
    from edge_agent.verdict import decide, failed, overlay

    targets = list(paths or [])
    mask = None
    gate = QualityConfig()
    if config is not None:
        if model is not None and model.suffix == ".pt":
            raise ConfigError(f"with --config the model is the station's model.path; leave {model} out")
        targets = ([model] if model is not None else []) + targets
        station_model, station = _station_model(config, device)
        scorer, mask, gate = station_model.scorer, station_model.ignore_mask, station.quality
        if score_name is not None or threshold is not None:
            scorer = Scorer(scorer.path, device=str(scorer.device), precision=station.model.precision,
                            score_name=score_name or station.model.score,
                            threshold=threshold if threshold is not None else station.model.threshold)
    else:
        if model is None:
            raise ConfigError("Missing argument 'MODEL': give the model file and images (edge-agent score MODEL "
                              "IMAGES...) or --config station.toml")
        scorer = Scorer(model, device=device, score_name=score_name, threshold=threshold)
    if not targets:
        raise ConfigError("Missing argument 'PATHS...': name image files or folders to score")
    files = list_images(targets)
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    failed_images = 0
    for f in files:
        try:
            image = read_image(f)
            fs = scorer.score_image(image)
        except EdgeAgentError as e:
            failed_images += 1
            typer.echo(f"edge-agent: error: {e}", err=True)
            if json_out:
                _json_line({"image": str(f), "error": str(e), "anomalous": None})
            continue
        counted = fs.grid.counted(mask) if mask is not None else scorer.counted(fs.grid)
        problem = quality.check(image, gate) if gate.enabled else None
        if problem is not None:
            d = failed(problem.message(), problem.reason, fs.grid.count)
        else:
            d = decide(fs.grid, fs.scores, scorer.threshold, counted, scorer.low)
        row = {"image": str(f), "score": d.score, "threshold": scorer.threshold, "anomalous": d.anomalous,
               "result": d.result, "score_name": scorer.score_name, "worst_patch": _box(d.worst_box),
               "patches_over_threshold": d.patches_over, "patches_total": d.patches_total}
        if d.error:
            row["error"] = d.error
            row["error_reason"] = d.reason
            failed_images += 1
        if heatmaps is not None:
            out = heatmaps / f"{f.stem}_heatmap.png"
            cv2.imwrite(str(out), overlay(image, fs.grid, fs.scores, scorer.threshold, d,
                                          good_image_scores=scorer.good_image_scores))
            row["heatmap"] = str(out)
        if json_out:
            _json_line(row)
        else:
            typer.echo(f"{d.result:5s} {d.score:12.6g}  (threshold {scorer.threshold:.6g}, "
                       f"{d.patches_over}/{d.patches_total} patches over)  {f}"
                       + (f"  {d.error}" if d.error else ""))
    if failed_images:
        raise typer.Exit(1)


@app.command()
def evaluate(
    good: Annotated[Path, typer.Option(help="Folder of good test images (never used for training).")],
    defect: Annotated[Path, typer.Option(help="Folder of defective test images.")],
    masks: Annotated[Optional[Path], typer.Option(help="Folder of ground-truth masks (same names) for pixel AUROC.")] = None,
    score_names: Annotated[Optional[list[str]], typer.Option("--score", help="Scores to compare (repeat); default: all.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write report.json, roc.png and histograms.png here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    allow_overlap: Annotated[bool, typer.Option(help="Evaluate even if test images were used for training.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    kinds: Annotated[Optional[Path], typer.Option(help="CSV of image,kind lines for per-kind numbers; default: "
                                                       "kinds.csv in the --defect folder when there is one.")] = None,
    config: Station = None,
    models: Annotated[Optional[list[Path]], typer.Argument(help="One or more model files to compare; left out with --config.")] = None,
) -> None:
    """Image ROC-AUC (the seed's metric), pixel ROC-AUC, best F1, recall at 1 % false rejects, per defect kind;
    several scores and models in one report."""
    from edge_agent.evaluate_cmd import run_evaluation

    station = None
    if config is not None:
        if models:
            raise ConfigError(f"with --config the model is the station's model.path; leave {models[0]} out")
        station = _station_model(config, device)[0]
    elif not models:
        raise ConfigError("Missing argument 'MODELS...': give one or more model files, or --config station.toml")
    summary = run_evaluation(models or [], good, defect, masks, score_names, report, device, allow_overlap, not quiet, kinds,
                             station=station)
    typer.echo(summary)


@app.command()
def calibrate(
    model: Model,
    good: Annotated[Path, typer.Option(help="Folder of good images held out from training (one score per image).")],
    defect: Annotated[Optional[Path], typer.Option(help="Folder of defective images (for f1, youden, target-recall).")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Ground-truth masks of the defects (same names) for pixel AUROC.")] = None,
    score_name: Annotated[Optional[str], typer.Option("--score", help="Score to calibrate; default: the card's.")] = None,
    target_frr: Annotated[Optional[float], typer.Option(help="Highest false-reject rate to guarantee (method frr; default 0.01).")] = None,
    method: Annotated[Optional[str], typer.Option(help="frr (default), f1, youden, target-recall or max-train.")] = None,
    target_recall: Annotated[Optional[float], typer.Option(help="Share of defects to catch (method target-recall).")] = None,
    confidence: Annotated[float, typer.Option(help="Confidence of the false-reject bound.")] = 0.95,
    ignore_mask: Annotated[Optional[Path], typer.Option(help="Image whose black pixels mark where patches do not count; stored in the model.")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse (exit 2) instead of warning when there are too few good images.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print what would change; write nothing.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write calibration.json, histograms.png (and roc.png) here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto: score as the station will (model.precision); recorded with the threshold.")] = "fp32",
) -> None:
    """Set the threshold from good images (false-reject bound) or with defects (F1, Youden, recall); writes the card."""
    from edge_agent.calibrate_cmd import run_calibration

    summary = run_calibration(model, good, defect, masks, score_name, method, target_frr, target_recall, confidence,
                              ignore_mask, strict, dry_run, report, device, not quiet,
                              warn=lambda msg: typer.echo(f"edge-agent: warning: {msg}", err=True), precision=precision)
    typer.echo(summary)


@app.command()
def combine(
    models: Annotated[list[Path], typer.Argument(help="Two or more model files trained on the same images with the same "
                                                      "--patch-size and --stride (e.g. --latent fc and --latent conv).",
                                                 readable=False)],
    out: Annotated[Path, typer.Option(help="The combined model file to write.")],
    good: Annotated[Optional[Path], typer.Option(help="Good images none of the models was trained on: every other one "
                                                      "fits the scales, the rest set the threshold (default: the good "
                                                      "images every model held out of training).")] = None,
    scale_images: Annotated[int, typer.Option(help="At most this many good images fit each model's scale.")] = 50,
    target_frr: Annotated[float, typer.Option(help="False-reject rate the initial threshold guarantees (FRR method).")] = 0.01,
    confidence: Annotated[float, typer.Option(help="Confidence of the false-reject bound.")] = 0.95,
    name: Annotated[Optional[str], typer.Option(help="Model id in the card (default: the file name).")] = None,
    texture_loss: Annotated[bool, typer.Option(help="The combined map score also flags a patch far below every "
                                                    "good patch (as train does).")] = True,
    whiten_place: Annotated[bool, typer.Option(help="Where the first model whitens its residual: check one window "
                                                    "Gaussian per place too, kept only where places differ (as "
                                                    "train does).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Combine models into one: each one's anomaly map on a common scale, the pixelwise maximum (docs/RESULTS.md)."""
    from edge_agent.combine import combine as run_combine

    card = run_combine(models, out, good, scale_images, target_frr, confidence, not quiet, name, texture_loss,
                       whiten_place)
    th = card["thresholds"][card["scores"]["default"]]
    members = ", ".join(f"{m['file']} x {m['scale']:.4g}" for m in card["architecture"]["members"])
    typer.echo(f"wrote {out}: {len(models)} models combined ({members}); threshold {card['scores']['default']} = "
               f"{th['value']:.6g} (FRR method on {th['n_good']} good images: true FRR <= {th['frr_upper_bound']:.3g} "
               f"at {th['confidence']:g} confidence)", err=True)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic station data set into.")],
    train_images: Annotated[int, typer.Option("--train", help="Good training images.")] = 200,
    calib_images: Annotated[int, typer.Option("--calib", help="Good calibration images.")] = 100,
    test_good: Annotated[int, typer.Option(help="Good test images.")] = 100,
    test_defect: Annotated[int, typer.Option(help="Defective test images (with masks).")] = 100,
    seed: Annotated[int, typer.Option(help="Data set seed.")] = 0,
    video: Annotated[Optional[Path], typer.Option(help="Also write a station video (.avi) here.")] = None,
    frames: Annotated[int, typer.Option(help="Frames in the video.")] = 100,
    defect_every: Annotated[int, typer.Option(help="Every Nth part in the video is defective (0 = none).")] = 5,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 128,
    width: Annotated[Optional[int], typer.Option(help="Image width in pixels (default: the height).")] = None,
    kind: Annotated[str, typer.Option(help="part: a machined part with a threaded hole (fixtured); "
                                           "texture: a surface with no fixed geometry.")] = "part",
) -> None:
    """Write a synthetic station: good parts (train/calib/test), defects with masks, a video."""
    from edge_agent.synth import KINDS, write_dataset, write_video

    if kind not in KINDS:
        raise typer.BadParameter(f"{kind!r} is not a kind; choose one of: {', '.join(KINDS)}", param_hint="--kind")
    if height < 32 or (width is not None and width < 32):
        raise typer.BadParameter(f"{width or height} px is too small; use at least 32", param_hint="--height/--width")
    counts = write_dataset(out, train_images, calib_images, test_good, test_defect, seed, height, width, kind)
    typer.echo(f"wrote {sum(counts.values())} images to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), err=True)
    if video is not None:
        bad = write_video(video, frames, seed, defect_every, size=height, width=width, kind=kind)
        typer.echo(f"wrote {video}: {len(bad)} frames, {sum(bad)} defective", err=True)


@app.command()
def info(model: Model) -> None:
    """Verify a model file's seal and checksum and print its model card (JSON)."""
    from edge_agent import artifact

    data = artifact.read_bytes(model)
    card = artifact.verify_bytes(model, data)
    if not artifact.check_seal(model, data):
        typer.echo(f"{model}: no file seal (exported before it existed); its checksum holds. "
                   "Rewriting the card (edge-agent calibrate) seals it.", err=True)
    typer.echo(json.dumps(card, indent=2))


Overrides = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key for this run: section.key=value (repeat).")]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Station config (TOML); see deploy/config.example.toml.")],
    overrides: Overrides = None,
    frames: Annotated[Optional[int], typer.Option("--frames", min=1, help="Stop after this many frames (tests, demos).")] = None,
    print_verdicts: Annotated[bool, typer.Option("--print-verdicts", help="Echo one line per verdict on stdout.")] = False,
) -> None:
    """Run the station daemon: camera -> patch scoring -> verdicts over MQTT, metrics over HTTP. Stops on SIGTERM."""
    import faulthandler

    from edge_agent.daemon import run as run_daemon

    # systemd's watchdog (and TimeoutStopFailureMode=abort) stops a wedged agent with SIGABRT: every thread's
    # stack then goes to stderr, the journal, and says where it hung. A stderr without a file descriptor (an
    # embedding caller's) has nowhere to take them.
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError):  # no fileno (io.UnsupportedOperation is a ValueError)
        pass

    run_daemon(config, overrides or [], frames, _print_verdict if print_verdicts else None)


def _print_verdict(v: dict) -> None:
    if "cameras" in v:  # version 2 ([[cameras]]): the part's result and each camera's
        part = f" part_id={v['part_id']}" if v["part_id"] is not None else ""
        cams = ",".join(f"{c['camera']}:{c['result']}" for c in v["cameras"])
        error = f" error={v['error']!r}" if v["error"] else ""
        sys.stdout.write(f"seq={v['seq']} {v['result']} cameras={cams}{part} "
                         f"heatmap={'yes' if v['heatmap'] else 'no'}{error}\n")
        sys.stdout.flush()
        return
    score = "-" if v["score"] is None else f"{v['score']:.6g}"
    part = f" part_id={v['part_id']}" if v["part_id"] is not None else ""
    error = f" error={v['error']!r}" if v["error"] else ""
    sys.stdout.write(f"seq={v['seq']} {v['result']} score={score} threshold={v['threshold']:.6g} "
                     f"over={v['patches_over_threshold']}/{v['patches_total']}{part} "
                     f"heatmap={'yes' if v['heatmap'] else 'no'}{error}\n")
    sys.stdout.flush()


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Argument(help="Model file; default: the seed VAE (Nc=32, Nz=100, P=96) with random weights.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result as JSON on stdout.")] = False,
    frames: Annotated[int, typer.Option("--frames", min=2, help="Frames through the daemon pipeline.")] = 8,
    latency_frames: Annotated[int, typer.Option(min=2, help="Single frames at low load for p50/p99 latency.")] = 5,
    test_frames: Annotated[int, typer.Option(min=2, help="Synthetic test frames (half defective) for fp32 vs bf16.")] = 6,
    repeats: Annotated[int, typer.Option(min=1, help="Best-of repeats for matmul and scorer timings.")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per forward pass.")] = 64,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads; default: torch's (physical cores).")] = None,
    precision: Annotated[str, typer.Option(help="Precision of the pipeline and latency runs: fp32, bf16 or fp16.")] = "fp32",
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny model and 128x128 frames: a smoke run, not a measurement.")] = False,
    train_steps: Annotated[int, typer.Option(min=0, help="Timed VAE train steps per precision (0 = skip training throughput).")] = 3,
    cameras: Annotated[Optional[str], typer.Option(help="Only the shared scorer: frames/s for these camera counts "
                                                  "(e.g. 1,2,4) against the scorer's own rate; --frames per camera.")] = None,
) -> None:
    """Measure matmul, scorer (fp32, bf16), the daemon pipeline, latency and memory on this machine."""
    from edge_agent.bench import BenchOptions, run_bench, summary, to_json

    if device not in ("cpu", "cuda"):
        raise DataError(f"--device {device!r} must be cpu or cuda")
    if precision not in ("fp32", "bf16", "fp16"):
        raise DataError(f"--precision {precision!r} must be fp32, bf16 or fp16")
    if cameras is not None:
        from edge_agent import bench_cameras

        try:
            counts = sorted({int(c) for c in cameras.split(",")})
        except ValueError:
            counts = []
        if not counts or counts[0] < 1:
            raise DataError(f"--cameras {cameras!r} must be camera counts >= 1, e.g. 1,2,4")
        result = bench_cameras.run_cameras_bench(BenchOptions(model=model, device=device, frames=frames, repeats=repeats,
                                                              batch_size=batch_size, threads=threads,
                                                              precision=precision, tiny=tiny), counts)
        typer.echo(to_json(result) if json_out else bench_cameras.summary(result))
        return
    result = run_bench(BenchOptions(model=model, device=device, frames=frames, latency_frames=latency_frames,
                                    test_frames=test_frames, repeats=repeats, batch_size=batch_size,
                                    threads=threads, precision=precision, tiny=tiny, train_steps=train_steps))
    typer.echo(to_json(result) if json_out else summary(result))


@app.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="Station config (TOML) to validate, with the model it names.")],
    overrides: Overrides = None,
) -> None:
    """Validate a station config and its model file: exit 0, or 2 with every problem, one per line."""
    from edge_agent.daemon import check

    problems = check(config, overrides or [])
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{config}: OK", err=True)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("EDGE_AGENT_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    try:
        rc = app(args=argv, standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except EdgeAgentError as e:
        if os.environ.get("EDGE_AGENT_DEBUG"):
            raise
        sys.stderr.write(f"edge-agent: error: {e}\n")
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.stderr.write("edge-agent: aborted\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        # Usage errors from typer's bundled click (missing argument, bad option value): show them as click would.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("EDGE_AGENT_DEBUG"):
            raise
        sys.stderr.write(f"edge-agent: internal error: {type(e).__name__}: {e} (EDGE_AGENT_DEBUG=1 shows the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()

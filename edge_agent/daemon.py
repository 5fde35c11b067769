"""`edge-agent run`: assemble the station daemon from its config and run it until SIGTERM.

Start order: model (verified, warmed up) -> metrics -> outbox -> broker -> publisher -> pipeline
-> READY=1. Shutdown runs in reverse: capture stops, queued frames are inspected and their
verdicts published, the outbox is flushed (bounded), then the broker link closes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import systemd
from edge_agent.config import Config, ModelConfig, load_config
from edge_agent.errors import ConfigError, EdgeAgentError, ModelError

if TYPE_CHECKING:
    import numpy as np

    from edge_agent.metrics import Metrics
    from edge_agent.pipeline import Model, Pipeline
    from edge_agent.state import StationState

# The stage modules (torch, OpenCV) are imported where they are used, so that check-config of a
# config with a typo answers at once.

logger = logging.getLogger(__name__)


def load_model(cfg: ModelConfig, warmup: bool = True) -> Model:
    """Load, verify and warm up the model; ModelError/ConfigError name the file and the fix."""
    from edge_agent.pipeline import Model
    from edge_agent.scoring import Scorer

    try:
        found = Path(cfg.path).is_file()
    except PermissionError:
        raise ModelError(f"model.path {cfg.path}: permission denied on a folder of its path; let the service "
                         "user enter it (chmod o+x / g+x) or move the model") from None
    if not found:
        raise ModelError(f"model.path {cfg.path} not found; train one with `edge-agent train` or fix the path")
    scorer = Scorer(cfg.path, device=cfg.device, precision=cfg.precision, score_name=cfg.score,
                    batch_size=cfg.batch_size, threshold=cfg.threshold, warmup=warmup)
    # The config's mask, when set, overrides the one `edge-agent calibrate` stored in the card.
    mask = load_ignore_mask(cfg.ignore_mask, scorer)
    return Model(scorer, scorer.ignore_mask if mask is None else mask)


def load_ignore_mask(path: Path | None, scorer: Any) -> np.ndarray | None:
    import cv2

    from edge_agent.pipeline import expected_frame

    if path is None:
        return None
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ConfigError(f"model.ignore_mask {path} cannot be read as an image; give a PNG (black = ignore)")
    h, w, _ = expected_frame(scorer)
    if h and w:
        counted = scorer.grid(h, w).counted(mask)
        if counted is not None and not counted.any():
            raise ConfigError(f"model.ignore_mask {path} ignores every patch; paint the inspected area white")
    return mask


def load_recipes(config: Config, warmup: bool = True,
                 load: Callable[[ModelConfig], Model] | None = None) -> dict[str, Model]:
    """Every recipe's model, loaded, verified, warmed up and checked against the camera's frame size.

    load: how a model is loaded (shared_scorer.ModelCache.get shares one file between cameras)."""
    from edge_agent.pipeline import expected_frame

    models: dict[str, Model] = {}
    for name, cfg in config.recipe_models().items():
        try:
            model = load(cfg) if load is not None else load_model(cfg, warmup=warmup)
            check_fit(config, model)
        except EdgeAgentError as e:
            if not config.recipes:
                raise
            raise type(e)(f"recipe {name!r}: {e}") from None
        models[name] = model
    sizes = {name: expected_frame(m.scorer) for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n} {w}x{h}x{c}" for n, (h, w, c) in sizes.items())
        raise ModelError(f"the recipes' models take different frame sizes ({listed}); one camera gives one size: "
                         "use models trained on the same frame size")
    return models


def check_fit(config: Config, model: Model) -> None:
    """The frame size the config asks the camera for must be the size the model takes."""
    from edge_agent.pipeline import expected_frame

    h, w, _ = expected_frame(model.scorer)
    src = config.source
    for key, want, got in (("width", w, src.width), ("height", h, src.height)):
        if want and got and want != got:
            raise ConfigError(f"source.{key} = {got} but model {model.scorer.path.name} takes frames {w}x{h}; "
                              f"set source.{key} = {want} or use a model trained on {key} {got}")


def check(config_path: Path, overrides: list[str]) -> list[str]:
    """Every problem of a config and the model it names, one line each (empty: fine)."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as e:
        return str(e).splitlines()
    try:
        if config.cameras:
            load_cameras(config, warmup=False)
        else:
            load_recipes(config, warmup=False)
    except EdgeAgentError as e:
        return str(e).splitlines()
    return []


def load_cameras(config: Config, warmup: bool = True) -> dict[str, tuple[Config, dict[str, Model]]]:
    """Camera id -> (its view of the config, its recipes' models); a model file used twice is loaded once."""
    from edge_agent.shared_scorer import ModelCache

    cache = ModelCache(lambda cfg: load_model(cfg, warmup=warmup))
    cameras = {}
    for cam in config.cameras:
        view = config.for_camera(cam)
        try:
            cameras[cam.id] = (view, load_recipes(view, load=cache.get))
        except EdgeAgentError as e:
            raise type(e)(f"camera {cam.id!r}: {e}") from None
    logger.info("%d cameras, %d models loaded", len(cameras), cache.loaded)
    return cameras


def _serve_metrics(config: Config, metrics: Metrics, stack: contextlib.ExitStack) -> None:
    if not config.metrics.enabled:
        return
    try:
        server, _port = metrics.serve(config.metrics.bind, config.metrics.port)
    except OSError as e:
        raise EdgeAgentError(f"metrics endpoint {config.metrics.bind}:{config.metrics.port}: {e.strerror}; "
                             "set metrics.port to a free port or metrics.enabled = false") from None
    stack.callback(server.server_close)
    stack.callback(server.shutdown)


def _serve_page(config: Config, metrics: Metrics, model: Model, stack: contextlib.ExitStack) -> StationState | None:
    """The station page's state, fed by the metrics' health hooks, and its server; None when web.enabled is off."""
    from edge_agent.state import StationState
    from edge_agent.web import StationPage

    web = config.web
    if not web.enabled:
        return None
    state = StationState(config.station.id, config.station.name, web.recent, jpeg_quality=config.mqtt.heatmap_quality)
    state.model(model.scorer, threshold_from_config=config.model.threshold is not None)
    metrics.watch_health(state)
    retention_dir = config.retention.dir if config.retention.enabled else None
    page = StationPage(state, web.host, web.port, web.token(), retention_dir)
    try:
        page.start()
    except OSError as e:
        raise EdgeAgentError(f"station page {web.host}:{web.port}: {e.strerror}; "
                             "set web.port to a free port or web.enabled = false") from None
    stack.callback(page.stop)
    return state


def run(config_path: Path, overrides: list[str] | None = None, max_frames: int | None = None,
        on_verdict: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT, the end of a non-looping file, or max_frames; returns 0."""
    from edge_agent.broker import start_embedded_if_needed
    from edge_agent.capture import make_source
    from edge_agent.metrics import Metrics
    from edge_agent.mqtt import MqttPublisher
    from edge_agent.outbox import Outbox
    from edge_agent.pipeline import Pipeline
    from edge_agent.reload import Reloader
    from edge_agent.retention import Retention

    overrides = overrides or []
    config = load_config(config_path, overrides)
    logging.getLogger().setLevel(config.logging.level)
    if config.cameras:
        return run_station(config, max_frames, on_verdict, config_path, overrides)
    stop = threading.Event()
    recipes = load_recipes(config)
    model = recipes[config.default_recipe_name()]
    scorer = model.scorer
    metrics = Metrics(threshold=scorer.threshold, good_image_scores=scorer.good_image_scores)
    _model_info(metrics, model)
    watchdog = systemd.Watchdog()
    boot_id = uuid.uuid4().hex[:12]

    with contextlib.ExitStack() as stack:
        _serve_metrics(config, metrics, stack)
        state = _serve_page(config, metrics, model, stack)
        outbox = Outbox(config.outbox.dir, int(config.outbox.max_mb * 1024 * 1024))
        stack.callback(outbox.close)
        broker = start_embedded_if_needed(config.mqtt)
        if broker is not None:
            stack.callback(broker.stop)
        retention = Retention(config.retention) if config.retention.enabled else None
        pipeline = Pipeline(config, model, make_source(config.source), None, metrics, stop, watchdog=watchdog,
                            retention=retention, boot_id=boot_id, max_frames=max_frames, on_verdict=on_verdict,
                            recipes=recipes)
        publisher = MqttPublisher(config.mqtt, config.station.id, outbox, on_trigger=pipeline.trigger,
                                  on_delivered=pipeline.delivered, metrics=metrics,
                                  info=lambda: status_info(config, pipeline))
        pipeline.publisher = publisher
        publisher.start()
        stack.callback(publisher.stop, config.outbox.flush_timeout_s)
        reloader = Reloader(config_path, overrides, config, pipeline, metrics)
        _install_signals(stop, reloader)
        pipeline.state = state
        pipeline.start()
        watchdog.start()
        stack.callback(watchdog.stop)
        fallback = " ON CPU: GPU expected but unavailable (see log)" if getattr(scorer, "device_fallback", None) else ""
        systemd.ready(f"inspecting {pipeline.source.describe()} with {scorer.model_id}{fallback}")
        logger.info("ready: station %s, %s mode, model %s (%s, threshold %.6g), boot %s", config.station.id,
                    config.inspection.mode, scorer.model_id, scorer.score_name, scorer.threshold, boot_id)
        _wait_for_stop(stop)
        systemd.stopping("draining in-flight frames")
        logger.info("stopping: draining in-flight frames, then flushing the outbox (up to %.0f s)",
                    config.outbox.flush_timeout_s)
        pipeline.drain()
        if not publisher.flush(config.outbox.flush_timeout_s):
            logger.warning("%d messages not yet acknowledged stay in the outbox %s for the next start",
                           outbox.depth(), outbox.path)
    if pipeline.fatal is not None:
        raise EdgeAgentError(pipeline.fatal)  # exit 1: systemd restarts the agent
    return 0


def run_station(config: Config, max_frames: int | None = None,
                on_verdict: Callable[[dict[str, Any]], None] | None = None, config_path: Path | None = None,
                overrides: list[str] | None = None) -> int:
    """The daemon for a station with [[cameras]]: one pipeline per camera, one shared scoring service."""
    from edge_agent.broker import start_embedded_if_needed
    from edge_agent.capture import make_source
    from edge_agent.metrics import Metrics
    from edge_agent.mqtt import MqttPublisher
    from edge_agent.outbox import Outbox
    from edge_agent.pipeline import Pipeline
    from edge_agent.reload import StationReloader
    from edge_agent.retention import Retention
    from edge_agent.shared_scorer import ScoringService
    from edge_agent.station import Station

    stop = threading.Event()
    cameras = load_cameras(config)
    first_view, first_recipes = next(iter(cameras.values()))
    model = first_recipes[first_view.default_recipe_name()]
    metrics = Metrics(threshold=model.scorer.threshold, good_image_scores=model.scorer.good_image_scores)
    _model_info(metrics, model)
    watchdog = systemd.Watchdog(lanes=list(cameras))  # one lane a camera: a stuck one cannot hide behind another
    boot_id = uuid.uuid4().hex[:12]
    station = Station(config, boot_id, metrics, on_verdict=on_verdict)

    with contextlib.ExitStack() as stack:
        _serve_metrics(config, metrics, stack)
        state = _serve_page(config, metrics, model, stack)
        if state is not None:
            state.cameras(list(cameras))
        outbox = Outbox(config.outbox.dir, int(config.outbox.max_mb * 1024 * 1024))
        stack.callback(outbox.close)
        broker = start_embedded_if_needed(config.mqtt)
        if broker is not None:
            stack.callback(broker.stop)
        scoring = ScoringService().start()
        stack.callback(scoring.close)
        for cid, (view, recipes) in cameras.items():
            retention = Retention(view.retention) if view.retention.enabled else None
            pipe = Pipeline(view, recipes[view.default_recipe_name()], make_source(view.source), None,
                            metrics.for_camera(cid), stop, watchdog=watchdog.lane(cid), retention=retention, boot_id=boot_id,
                            max_frames=max_frames, recipes=recipes, camera=cid, scoring=scoring,
                            next_seq=station.next_seq)
            pipe.state = state
            station.add(cid, pipe)
        pipelines = list(station.pipelines.values())
        publisher = MqttPublisher(config.mqtt, config.station.id, outbox, on_trigger=station.trigger,
                                  on_delivered=pipelines[0].delivered, metrics=metrics,
                                  info=lambda: station_info(config, station))
        station.publisher = publisher
        publisher.start()
        stack.callback(publisher.stop, config.outbox.flush_timeout_s)
        if config_path is not None:
            _install_signals(stop, StationReloader(config_path, overrides or [], config, station, metrics, state))
        else:
            _install_signals(stop, None)
        for pipe in pipelines:
            pipe.start()
        watchdog.start()
        stack.callback(watchdog.stop)
        systemd.ready(f"inspecting {len(pipelines)} cameras")
        logger.info("ready: station %s, %s mode, cameras %s, boot %s", config.station.id, config.inspection.mode,
                    ", ".join(f"{cid} ({p.source.describe()}, {p.model.scorer.model_id})"
                              for cid, p in station.pipelines.items()), boot_id)
        _wait_for_stop(stop)
        systemd.stopping("draining in-flight frames")
        logger.info("stopping: draining in-flight frames of %d cameras, then flushing the outbox (up to %.0f s)",
                    len(pipelines), config.outbox.flush_timeout_s)
        for pipe in pipelines:
            pipe.drain()
        logger.info("shared scorer: %d frames in %d forward-pass groups", scoring.frames, scoring.passes)
        if not publisher.flush(config.outbox.flush_timeout_s):
            logger.warning("%d messages not yet acknowledged stay in the outbox %s for the next start",
                           outbox.depth(), outbox.path)
    fatal = [p.fatal for p in pipelines if p.fatal is not None]
    if fatal:
        raise EdgeAgentError(fatal[0])
    return 0


def station_info(config: Config, station: Any) -> dict[str, Any]:
    """status/info of a station with [[cameras]]: every camera, its source, up/down and its recipes."""
    cams = {}
    for cid, pipe in station.pipelines.items():
        cams[cid] = {"source": pipe.source.describe(), "camera": "up" if pipe.capture.up else "down",
                     "recipes": {name or "": {"model_id": m.scorer.model_id, "checksum": m.scorer.checksum,
                                              "score_name": m.scorer.score_name, "threshold": m.scorer.threshold}
                                 for name, m in pipe.recipes.items()}}
    return {
        "station": config.station.id,
        "boot_id": station.boot_id,
        "mode": config.inspection.mode,
        "verdict_version": 2,
        "camera": "up" if all(c["camera"] == "up" for c in cams.values()) else "down",
        "cameras": cams,
        "trigger_cameras": config.trigger_cameras(),
        "default_recipe": config.default_recipe_name() or None,
        "trigger_deadline_s": config.trigger.deadline_s,
    }


def status_info(config: Config, pipeline: Pipeline) -> dict[str, Any]:
    """The retained status/info document: what this agent runs, for integrators."""
    return {
        "station": config.station.id,
        "boot_id": pipeline.boot_id,
        "mode": config.inspection.mode,
        "source": pipeline.source.describe(),
        "camera": "up" if pipeline.capture.up else "down",
        "default_recipe": pipeline.default_recipe or None,
        "recipes": {name or "": {"model_id": m.scorer.model_id, "checksum": m.scorer.checksum,
                                 "score_name": m.scorer.score_name, "threshold": m.scorer.threshold}
                    for name, m in pipeline.recipes.items()},
        "trigger_deadline_s": config.trigger.deadline_s,
    }


def _model_info(metrics: Metrics, model: Model) -> None:
    s = model.scorer
    metrics.model_info(s.model_id, s.checksum, s.score_name, s.threshold, str(s.device),
                       str(s.dtype).removeprefix("torch."))
    metrics.calibration(s.threshold, s.card.get("thresholds", {}).get(s.score_name, {}).get("good_image_scores"))
    metrics.device_fallback(getattr(s, "device_fallback", None) is not None)


def _wait_for_stop(stop: threading.Event, poll_s: float = 0.5) -> None:
    """Park the main thread until stop is set, waking every poll_s.

    The kernel hands SIGTERM/SIGHUP to any thread of the process that does not block it (capture, infer,
    paho, a torch worker); Python then runs the handler in the main thread the next time that thread runs
    bytecode. A main thread parked in an untimed Event.wait() never does, so such a signal was ignored until
    systemd's SIGKILL. Waking twice a second bounds the delay and costs nothing.
    """
    while not stop.wait(poll_s):
        pass


def _install_signals(stop: threading.Event, reloader: Any) -> None:
    def on_stop(signum: int, _frame: object) -> None:
        if stop.is_set():
            return
        logger.info("%s received; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if reloader is not None:
        signal.signal(signal.SIGHUP, lambda *_: reloader.request())

"""SIGHUP: load the models and thresholds again on a `reload` thread, then swap them in between frames.

The broker connection, capture and queues stay up; a config or model that fails keeps the running
models and says why. Reloader serves the one-camera agent, StationReloader a station with [[cameras]].
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from edge_agent import systemd
from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError, EdgeAgentError

logger = logging.getLogger(__name__)

_RESTART_SECTIONS = ("station", "source", "inspection", "trigger", "mqtt", "outbox", "metrics", "retention", "web")


def _warn_restart_only(old: Config, new: Config) -> None:
    for section in _RESTART_SECTIONS:
        if getattr(new, section) != getattr(old, section):
            logger.warning("reload: changes in [%s] take effect only after a restart", section)
    if set(new.recipes) != set(old.recipes):
        raise ConfigError(f"the recipe names changed ({sorted(old.recipes)} -> {sorted(new.recipes)}); "
                          "restart the agent to add or remove recipes")


class _Reload:
    """What every SIGHUP reload does: one at a time on a `reload` thread, systemd told RELOADING then READY,
    the config read again, and any failure keeps what runs. Subclasses swap and announce."""

    def __init__(self, config_path: Path, overrides: list[str], config: Config, metrics: Any) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.config = config
        self.metrics = metrics
        self._lock = threading.Lock()

    def request(self) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def reload(self) -> bool:
        with self._lock:
            systemd.reloading()
            try:
                config = load_config(self.config_path, self.overrides)
                _warn_restart_only(self.config, config)
                self._swap(config)
            except EdgeAgentError as e:
                logger.error("reload failed, %s: %s", self._keeping(), e)
                return False
            except Exception as e:
                logger.error("reload failed, %s: %s: %s", self._keeping(plain=True), type(e).__name__, e)
                return False
            finally:
                systemd.ready()
            self._announce(config)
            return True

    def _swap(self, config: Config) -> None:
        raise NotImplementedError

    def _keeping(self, plain: bool = False) -> str:
        raise NotImplementedError

    def _announce(self, config: Config) -> None:
        raise NotImplementedError


class Reloader(_Reload):
    """SIGHUP for the one-camera agent: its pipeline's models."""

    def __init__(self, config_path: Path, overrides: list[str], config: Config, pipeline: Any, metrics: Any) -> None:
        super().__init__(config_path, overrides, config, metrics)
        self.pipeline = pipeline

    def _swap(self, config: Config) -> None:
        from edge_agent.daemon import load_recipes

        recipes = load_recipes(config.model_copy(update={"source": self.config.source,
                                                         "inspection": self.config.inspection}))
        self.pipeline.swap_model(recipes[self.config.default_recipe_name()], recipes)

    def _keeping(self, plain: bool = False) -> str:
        if plain:
            return "keeping the running model"
        s = self.pipeline.model.scorer
        return f"keeping model {s.model_id} (threshold {s.threshold:.6g})"

    def _announce(self, config: Config) -> None:
        from edge_agent.daemon import _model_info

        model = self.pipeline.model
        if self.pipeline.state is not None:
            self.pipeline.state.model(model.scorer, threshold_from_config=config.model.threshold is not None)
        s = model.scorer
        _model_info(self.metrics, model)
        publish_info = getattr(self.pipeline.publisher, "publish_info", None)
        if publish_info is not None:
            publish_info()
        logger.info("reloaded model %s (checksum %s, %s, threshold %.6g)", s.model_id, s.checksum[:12],
                    s.score_name, s.threshold)


class StationReloader(_Reload):
    """SIGHUP for a station with [[cameras]]: every camera's models, all or none.

    Camera ids are fixed at start (each has its threads, metrics and topics); a camera's source,
    like [source], takes effect only after a restart."""

    def __init__(self, config_path: Path, overrides: list[str], config: Config, station: Any, metrics: Any,
                 state: Any = None) -> None:
        super().__init__(config_path, overrides, config, metrics)
        self.station = station
        self.state = state

    def _swap(self, config: Config) -> None:
        from edge_agent.daemon import load_cameras

        pipelines = self.station.pipelines
        ids = [c.id for c in config.cameras]
        if ids != list(pipelines):
            raise ConfigError(f"the cameras changed ({list(pipelines)} -> {ids}); restart the agent to add, "
                              "remove or reorder cameras")
        old_sources = {c.id: c.source for c in self.config.cameras}
        for cam in config.cameras:
            if cam.source != old_sources[cam.id]:
                logger.warning("reload: changes in camera %s's source take effect only after a restart", cam.id)
        # Each camera keeps its running source, so the models are checked against the frames it gives.
        kept = config.model_copy(update={
            "cameras": [c.model_copy(update={"source": old_sources[c.id]}) for c in config.cameras],
            "inspection": self.config.inspection})
        cameras = load_cameras(kept)  # off the hot path: the cameras judge on with the old models
        for cid, (view, recipes) in cameras.items():
            pipelines[cid].check_models(recipes.values())
        for cid, (view, recipes) in cameras.items():  # every camera fits: swap them all
            pipelines[cid].swap_model(recipes[view.default_recipe_name()], recipes)

    def _keeping(self, plain: bool = False) -> str:
        return "keeping every camera's running models" + ("" if plain else f" ({self._running()})")

    def _announce(self, config: Config) -> None:
        from edge_agent.daemon import _model_info

        pipelines = self.station.pipelines
        first = next(iter(pipelines.values())).model
        _model_info(self.metrics, first)
        if self.state is not None:
            self.state.model(first.scorer, threshold_from_config=config.model.threshold is not None)
        self.station.publish_info()
        logger.info("reloaded the models of %d cameras: %s", len(pipelines), self._running())

    def _running(self) -> str:
        return ", ".join(f"{cid} {p.model.scorer.model_id} threshold {p.model.scorer.threshold:.6g}"
                         for cid, p in self.station.pipelines.items())

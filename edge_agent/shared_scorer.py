"""One scoring service per device, shared by every camera of a station: the `scorer` thread owns the
device; camera infer threads hand it a frame's patches and wait. Frames that use the same model and
arrive while a forward pass runs are scored together in the next one (scoring.Scorer.score_frames).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.patches import PatchGrid

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    scorer: Any  # scoring.Scorer (or a threshold copy of one: same module)
    grid: PatchGrid
    patches: Any  # (N, C, P, P) float32 tensor
    done: threading.Event = field(default_factory=threading.Event)
    scores: np.ndarray | None = None
    error: BaseException | None = None


def batch_key(scorer: Any) -> tuple[int, str]:
    """Requests with the same key go through the same forward passes: one loaded module, one score."""
    return id(scorer.module), scorer.score_name


class ScoringServiceDied(RuntimeError):
    """The shared `scorer` thread is gone: no camera can be judged again, so the agent must restart."""


class ScoringService:
    """start(), score_frame() from any thread, close(). Counts the frames and forward passes it ran."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="scorer", daemon=True)
        self.frames = 0
        self.passes = 0  # score_frames calls: frames / passes is how much cameras shared
        self.death: str | None = None  # why the thread ended on a bug

    def start(self) -> ScoringService:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def score_frame(self, scorer: Any, grid: PatchGrid, patches: Any) -> np.ndarray:
        """(N,) float32 patch scores of one frame, as scorer.score_frame gives them; raises what scoring raised."""
        request = _Request(scorer, grid, patches)
        self._queue.put(request)
        while not request.done.wait(1.0):
            if not self._thread.is_alive():
                raise ScoringServiceDied(self.death or "the scoring service has stopped")
        if request.error is not None:
            raise request.error
        assert request.scores is not None
        return request.scores

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug outside one pass: every waiting camera sees ScoringServiceDied
            self.death = f"the scoring service died ({type(e).__name__}: {e})"
            logger.exception("%s; every camera's next frame is ERROR and the agent exits", self.death)

    def _serve(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            while True:  # everything that queued while the last pass ran goes into the next
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = None in batch
            groups: dict[tuple[int, str], list[_Request]] = {}
            for request in batch:
                if request is not None:
                    groups.setdefault(batch_key(request.scorer), []).append(request)
            for requests in groups.values():
                self._score(requests)

    def _score(self, requests: list[_Request]) -> None:
        try:
            results = requests[0].scorer.score_frames([(r.grid, r.patches) for r in requests])
        except Exception as e:  # the camera's infer thread turns it into an ERROR verdict (reason scoring)
            for r in requests:
                r.error = e
        else:
            for r, scores in zip(requests, results):
                r.scores = scores
        self.frames += len(requests)
        self.passes += 1
        for r in requests:
            r.done.set()


class ModelCache:
    """Models loaded once per file and score: a second camera (or recipe) with the same model file shares the
    loaded module; a different threshold gets a shallow copy that shares it."""

    def __init__(self, load: Any) -> None:
        self._load = load  # (ModelConfig) -> pipeline.Model
        self._models: dict[tuple, Any] = {}

    @property
    def loaded(self) -> int:
        return len(self._models)

    def get(self, cfg: Any) -> Any:
        import dataclasses

        key = (str(cfg.path.resolve()), cfg.score, cfg.device, cfg.precision, cfg.batch_size)
        base = self._models.get(key)
        if base is None:
            base = self._models[key] = self._load(cfg.model_copy(update={"ignore_mask": None}))
        scorer = base.scorer
        threshold = cfg.threshold
        if threshold is None:
            threshold = float(scorer.card.get("thresholds", {}).get(scorer.score_name, {}).get("value", scorer.threshold))
        if threshold != scorer.threshold:
            scorer = copy.copy(scorer)
            scorer.threshold = float(threshold)
        if scorer is base.scorer and cfg.ignore_mask is None:
            return base
        mask = None
        if cfg.ignore_mask is not None:
            from edge_agent.daemon import load_ignore_mask

            mask = load_ignore_mask(cfg.ignore_mask, scorer)
        return dataclasses.replace(base, scorer=scorer, ignore_mask=scorer.ignore_mask if mask is None else mask,
                                   counted={})

"""Audit copies: NG (and ERROR) frames, and a sample of OK frames, saved as PNG + verdict JSON.

Called by the pipeline after a verdict is published; the folder is bounded by size, oldest first.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.config import RetentionConfig

logger = logging.getLogger(__name__)


class Retention:
    """Files are named <captured_at ms>_<seq>_<result>.{png,json}, so name order is age order."""

    def __init__(self, cfg: RetentionConfig, rng: random.Random | None = None) -> None:
        self.dir = Path(cfg.dir)
        self.max_bytes = int(cfg.max_mb * 1024 * 1024)
        self.ok_sample_rate = cfg.ok_sample_rate
        self._rng = rng or random.Random()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._entries: deque[tuple[str, int]] = deque()  # (stem, bytes), oldest first
        self._bytes = 0
        sizes: dict[str, int] = {}
        for p in self.dir.iterdir():
            if p.suffix in (".png", ".json") and p.is_file():
                sizes[p.stem] = sizes.get(p.stem, 0) + p.stat().st_size
        for stem in sorted(sizes):
            self._entries.append((stem, sizes[stem]))
            self._bytes += sizes[stem]
        self._prune()

    @property
    def bytes(self) -> int:
        return self._bytes

    def wants(self, result: str) -> bool:
        return result != "OK" or (self.ok_sample_rate > 0 and self._rng.random() < self.ok_sample_rate)

    def save(self, image: np.ndarray, verdict: dict[str, Any]) -> Path:
        """Write the frame and its verdict; returns the PNG path. OSError when the disk refuses."""
        stem = f"{int(verdict['captured_at'] * 1000):013d}_{verdict['seq']:08d}_{verdict['result']}"
        png = self.dir / f"{stem}.png"
        if not cv2.imwrite(str(png), image):
            raise OSError(f"OpenCV could not write {png}")
        meta = self.dir / f"{stem}.json"
        # The verdict goes last and whole (rename), so a reader that sees the JSON (the station page's gallery,
        # a person's script) never reads half of it and always finds the PNG complete.
        partial = meta.with_suffix(".json.tmp")
        partial.write_text(json.dumps(verdict, indent=1))
        os.replace(partial, meta)
        size = png.stat().st_size + meta.stat().st_size
        self._entries.append((stem, size))
        self._bytes += size
        self._prune()
        return png

    def _prune(self) -> None:
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            stem, size = self._entries.popleft()
            for suffix in (".png", ".json"):
                (self.dir / f"{stem}{suffix}").unlink(missing_ok=True)
            self._bytes -= size
            logger.debug("retention: removed %s to stay under %d bytes", stem, self.max_bytes)


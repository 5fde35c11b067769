"""Messages that flow between the daemon's stages: capture -> infer -> publish.

Images are HWC uint8 numpy arrays as OpenCV delivers them (BGR, or HW for grayscale)
everywhere outside patches.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Trigger:
    """A PLC request to inspect the next frame; ids are echoed in the verdict."""

    trigger_id: str
    part_id: str
    recipe: str | None = None
    job_id: str | None = None
    received_at: float = 0.0  # epoch s
    arrived_mono: float = 0.0  # time.monotonic() at arrival: compared with Frame.read_started_mono


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image and where it came from."""

    seq: int  # per-process capture sequence number, starts at 1
    image: np.ndarray  # HWC uint8 (BGR) or HW uint8
    captured_at: float  # epoch s
    source: str = ""
    trigger: Trigger | None = None
    stage_s: dict[str, float] = field(default_factory=dict)  # per-stage latency so far
    error: str | None = None  # why this frame cannot be judged (unreadable, wrong size): an ERROR verdict
    error_reason: str | None = None  # with error: verdict.ERROR_REASONS (None = unreadable, as capture says)
    read_started_mono: float = 0.0  # time.monotonic() when the read that returned this frame began
    frame_age_s: float | None = None  # seconds from capture to pairing with its trigger

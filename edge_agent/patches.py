"""Frame -> patch tensor, and the exact geometry of the patch grid.

The only module that turns OpenCV images (HWC/HW uint8) into tensors (C, H, W float32 in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
import torch

from edge_agent.errors import DataError

MIN_PATCH_SIZE = 16


def _starts(length: int, size: int, stride: int, cover_edges: bool) -> tuple[int, ...]:
    starts = list(range(0, length - size + 1, stride))
    # A last patch flush with the edge, so a defect in the strip the stride leaves out is still seen.
    if cover_edges and starts[-1] != length - size:
        starts.append(length - size)
    return tuple(starts)


@dataclass(frozen=True)
class PatchGrid:
    """Where each patch of a frame lies: patch i is rows ys[i // nw], columns xs[i % nw] (row-major)."""

    frame_h: int
    frame_w: int
    size: int
    stride: int
    cover_edges: bool = True

    @staticmethod
    def for_frame(h: int, w: int, size: int, stride: int, cover_edges: bool = True) -> PatchGrid:
        if size < MIN_PATCH_SIZE:
            raise DataError(f"patch size {size} is below the minimum {MIN_PATCH_SIZE}; use a patch size >= 16")
        if stride < 1:
            raise DataError(f"patch stride {stride} must be >= 1")
        if h < size or w < size:
            raise DataError(
                f"frame {w}x{h} is smaller than the {size}x{size} patch; use larger frames or a smaller patch size"
            )
        return PatchGrid(h, w, size, stride, cover_edges)

    @cached_property
    def ys(self) -> tuple[int, ...]:
        return _starts(self.frame_h, self.size, self.stride, self.cover_edges)

    @cached_property
    def xs(self) -> tuple[int, ...]:
        return _starts(self.frame_w, self.size, self.stride, self.cover_edges)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return len(self.ys), len(self.xs)

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of patch `index` in frame pixels."""
        nw = len(self.xs)
        return self.xs[index % nw], self.ys[index // nw], self.size, self.size

    def boxes(self) -> np.ndarray:
        """(N, 4) int array of (x, y, w, h), row-major like extract()."""
        yy, xx = np.meshgrid(np.array(self.ys), np.array(self.xs), indexing="ij")
        n = self.count
        return np.stack([xx.ravel(), yy.ravel(), np.full(n, self.size), np.full(n, self.size)], axis=1)

    def extract(self, frame: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (N, C, P, P) with Tensor.unfold; a copy, contiguous."""
        c, h, w = frame.shape
        if (h, w) != (self.frame_h, self.frame_w):
            raise DataError(f"frame is {w}x{h} but the patch grid was made for {self.frame_w}x{self.frame_h}")
        p, s = self.size, self.stride
        rows = frame.unfold(1, p, s)  # (C, nh, W, P)
        if len(self.ys) > rows.shape[1]:
            rows = torch.cat([rows, frame[:, h - p :, :].unfold(1, p, p)], dim=1)
        tiles = rows.unfold(2, p, s)  # (C, nh, nw, P, P)
        if len(self.xs) > tiles.shape[2]:
            tiles = torch.cat([tiles, rows[:, :, w - p :, :].unfold(2, p, p)], dim=2)
        return tiles.permute(1, 2, 0, 3, 4).reshape(-1, c, p, p).contiguous()

    def heatmap(self, scores: np.ndarray) -> np.ndarray:
        """(N,) patch scores -> (H, W) float32: each pixel gets the highest score of the patches covering it."""
        grid = np.asarray(scores, dtype=np.float32).reshape(self.shape)
        p = self.size
        lowest = np.float32(grid.min()) if grid.size else np.float32(0)
        by_row = np.full((self.frame_h, grid.shape[1]), lowest, dtype=np.float32)
        for i, y in enumerate(self.ys):
            np.maximum(by_row[y : y + p], grid[i], out=by_row[y : y + p])
        heat = np.full((self.frame_h, self.frame_w), lowest, dtype=np.float32)
        for j, x in enumerate(self.xs):
            np.maximum(heat[:, x : x + p], by_row[:, j : j + 1], out=heat[:, x : x + p])
        return heat

    def counted(self, ignore_mask: np.ndarray | None) -> np.ndarray | None:
        """(N,) bool: patches whose centre pixel is not black in the ignore mask; None when there is no mask."""
        if ignore_mask is None:
            return None
        if ignore_mask.shape[:2] != (self.frame_h, self.frame_w):
            ignore_mask = cv2.resize(ignore_mask, (self.frame_w, self.frame_h), interpolation=cv2.INTER_NEAREST)
        if ignore_mask.ndim == 3:
            ignore_mask = ignore_mask.max(axis=2)
        half = self.size // 2
        cy = np.array(self.ys) + half
        cx = np.array(self.xs) + half
        return (ignore_mask[np.ix_(cy, cx)] > 0).ravel()


def to_tensor(image: np.ndarray, channels: int) -> torch.Tensor:
    """HWC BGR / HW gray uint8 -> (channels, H, W) float32 in [0, 1]."""
    if image.dtype != np.uint8:
        raise DataError(f"image dtype is {image.dtype}; expected 8-bit (uint8) images")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 3 and image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif channels not in (1, 3):
        raise DataError(f"model expects {channels} channels; only 1 (gray) and 3 (BGR) are supported")
    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div_(255.0)


def frame_patches(image: np.ndarray, channels: int, size: int, stride: int, cover_edges: bool = True):
    """One image -> (grid, (N, C, P, P) patches)."""
    h, w = image.shape[:2]
    grid = PatchGrid.for_frame(h, w, size, stride, cover_edges)
    return grid, grid.extract(to_tensor(image, channels))

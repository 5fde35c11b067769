import numpy as np
import pytest
import torch

from edge_agent.errors import DataError
from edge_agent.patches import PatchGrid, frame_patches, to_tensor


@pytest.mark.parametrize(
    "h, w, p, s, cover, ys, xs",
    [
        (480, 640, 96, 16, True, list(range(0, 385, 16)), list(range(0, 545, 16))),  # the seed: 25 x 35 = 875
        (100, 100, 32, 16, True, [0, 16, 32, 48, 64, 68], [0, 16, 32, 48, 64, 68]),  # edge strip covered
        (100, 100, 32, 16, False, [0, 16, 32, 48, 64], [0, 16, 32, 48, 64]),
        (28, 28, 28, 4, True, [0], [0]),  # whole-image patch
        (40, 64, 16, 24, True, [0, 24], [0, 24, 48]),
    ],
)
def test_grid_positions_exact(h, w, p, s, cover, ys, xs):
    g = PatchGrid.for_frame(h, w, p, s, cover)
    assert list(g.ys) == ys and list(g.xs) == xs
    assert g.count == len(ys) * len(xs)
    assert g.box(0) == (0, 0, p, p)
    assert g.box(g.count - 1) == (xs[-1], ys[-1], p, p)
    assert g.box(len(xs) - 1) == (xs[-1], 0, p, p)


def test_seed_protocol_has_875_patches():
    assert PatchGrid.for_frame(480, 640, 96, 16).count == 875


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cover", [True, False])
def test_extract_matches_slicing(channels, cover):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    grid, patches = frame_patches(image, channels, 16, 12, cover)
    frame = to_tensor(image, channels)
    assert patches.shape == (grid.count, channels, 16, 16)
    for i, (x, y, w, h) in enumerate(grid.boxes()):
        assert torch.equal(patches[i], frame[:, y : y + h, x : x + w])


def test_to_tensor_scale_and_layout():
    image = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    t = to_tensor(image, 1)
    assert t.shape == (1, 2, 2) and t.dtype == torch.float32
    assert t[0, 0, 1] == 1.0 and t[0, 1, 0] == pytest.approx(0.2)
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 2] = 255  # red
    assert to_tensor(bgr, 3)[2].min() == 1.0 and to_tensor(bgr, 3)[0].max() == 0.0


@pytest.mark.parametrize("h, w, p, s, msg", [(20, 40, 32, 8, "smaller than"), (64, 64, 8, 4, "below the minimum"),
                                             (64, 64, 16, 0, "stride")])
def test_bad_geometry_is_a_clear_error(h, w, p, s, msg):
    with pytest.raises(DataError, match=msg):
        PatchGrid.for_frame(h, w, p, s)


def test_heatmap_is_max_of_covering_patches():
    grid = PatchGrid.for_frame(40, 48, 16, 8)
    scores = np.random.default_rng(3).random(grid.count).astype(np.float32)
    heat = grid.heatmap(scores)
    expected = np.full((40, 48), -np.inf, np.float32)
    for i, (x, y, w, h) in enumerate(grid.boxes()):
        expected[y : y + h, x : x + w] = np.maximum(expected[y : y + h, x : x + w], scores[i])
    np.testing.assert_array_equal(heat, expected)


def test_ignore_mask_by_patch_centre():
    grid = PatchGrid.for_frame(32, 48, 16, 16)  # 2 x 3 patches, centres at x 8/24/40, y 8/24
    mask = np.full((32, 48), 255, np.uint8)
    mask[:, 32:] = 0  # right column ignored
    assert grid.counted(mask).tolist() == [True, True, False, True, True, False]
    assert grid.counted(None) is None

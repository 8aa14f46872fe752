"""The plasma colormap, the sample grid and PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.train.pictures import SEPARATOR, make_grid, plasma, save_png

# matplotlib 3.11.2, 255 * colormaps["plasma"](v)[:3] (taken once in a throwaway venv; matplotlib
# is not a dependency of this project).
MATPLOTLIB_PLASMA = {
    0.0: (12.8, 7.6, 134.6),
    0.25: (126.2, 3.1, 167.8),
    0.5: (203.5, 71.5, 119.7),
    0.7: (242.1, 132.0, 75.4),
    1.0: (239.7, 248.7, 33.5),
}


def test_plasma_matches_matplotlib_at_the_ends_and_inside():
    values = np.array(list(MATPLOTLIB_PLASMA))
    colours = plasma(values)
    assert colours.shape == (len(values), 3) and colours.dtype == np.uint8
    expected = np.array(list(MATPLOTLIB_PLASMA.values()))
    assert np.abs(colours.astype(float) - expected).max() <= 3.5


def test_plasma_keeps_the_shape_and_clips_out_of_range_values():
    values = np.linspace(-0.5, 1.5, 24).reshape(2, 3, 4)
    colours = plasma(values)
    assert colours.shape == (2, 3, 4, 3)
    assert (colours[0, 0, 0] == plasma(np.array(0.0))).all()
    assert (colours[-1, -1, -1] == plasma(np.array(1.0))).all()


def batch(n: int, channels: int, as_torch: bool):
    g = np.random.default_rng(0)
    arrays = [
        g.random((n, channels, 160, 160)),
        g.random((n, channels, 160, 160)),
        (g.random((n, 1, 160, 160)) > 0.5).astype(np.float32),
        g.random((n, 1, 160, 160)),
        g.random((n, 1, 80, 80)),
        g.random((n, 1, 80, 80)),
    ]
    return [torch.from_numpy(a).float() for a in arrays] if as_torch else arrays


@pytest.mark.parametrize("channels, as_torch", [(1, True), (3, False), (3, True)])
def test_grid_shape_and_dtype(channels, as_torch):
    grid = make_grid(*batch(3, channels, as_torch))
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * 160 + 2 * SEPARATOR, 6 * 160 + 5 * SEPARATOR, 3)


def test_grid_places_each_column_and_caps_the_rows():
    images = batch(10, 1, as_torch=True)
    grid = make_grid(*images, max_rows=2)
    assert grid.shape[0] == 2 * 160 + SEPARATOR
    # Row 1, column 3 (the true mask) is that sample's mask in gray.
    top, left = 160 + SEPARATOR, 2 * (160 + SEPARATOR)
    tile = grid[top : top + 160, left : left + 160]
    assert (tile[..., 0] == images[2][1, 0].numpy() * 255).all()
    # Row 0, column 5 (the true depth): plasma, upscaled 2x by nearest neighbour.
    left = 4 * (160 + SEPARATOR)
    tile = grid[:160, left : left + 160]
    assert (tile[::2, ::2] == plasma(images[4][0, 0].numpy())).all()
    assert (tile[1::2, 1::2] == tile[::2, ::2]).all()
    assert (grid[160:top] == 255).all()  # the separator


def test_grid_rejects_wrong_shapes():
    images = batch(2, 1, as_torch=False)
    images[4] = images[4][:, 0]
    with pytest.raises(ValueError, match="depth_true"):
        make_grid(*images)


def test_save_png_round_trips_and_creates_folders(tmp_path):
    grid = make_grid(*batch(2, 3, as_torch=False))
    path = save_png(grid, tmp_path / "a" / "b" / "grid.png")
    assert path.exists()
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert (np.asarray(image) == grid).all()
    with pytest.raises(ValueError, match="uint8"):
        save_png(grid.astype(np.float32), tmp_path / "bad.png")

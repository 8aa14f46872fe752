"""Pictures: the plasma colormap, the sample grid for TensorBoard and `--grid`, PNG output.

numpy and Pillow only (torch tensors are accepted through their .detach().cpu().numpy()).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is not imported at run time: predict/evaluate may not need it
    import torch

    Images = np.ndarray | torch.Tensor

log = logging.getLogger(__name__)

# matplotlib's "plasma" at 33 evenly spaced points of [0, 1], RGB 0-255, taken once from
# matplotlib 3.11.2 (round(255 * colormaps["plasma"](linspace(0, 1, 33))[:, :3])) so that
# matplotlib need not be a dependency; linear interpolation between them stays within 3.1 units
# of matplotlib's own 256-entry table.
_PLASMA_ANCHORS = np.array(
    [
        [13, 8, 135], [34, 6, 144], [49, 5, 151], [63, 4, 156], [76, 2, 161], [89, 1, 165],
        [102, 0, 167], [114, 1, 168], [126, 3, 168], [138, 9, 165], [149, 17, 161],
        [160, 26, 156], [170, 35, 149], [179, 44, 142], [188, 53, 135], [196, 62, 127],
        [204, 71, 120], [211, 81, 113], [218, 90, 106], [224, 99, 99], [230, 108, 92],
        [235, 118, 85], [240, 128, 78], [245, 139, 71], [248, 149, 64], [251, 161, 57],
        [253, 172, 51], [254, 184, 44], [253, 197, 39], [252, 210, 37], [248, 223, 37],
        [244, 237, 39], [240, 249, 33],
    ],
    dtype=np.float64,
)  # fmt: skip
_ANCHOR_POSITIONS = np.linspace(0.0, 1.0, len(_PLASMA_ANCHORS))

SEPARATOR = 2  # pixels of white between the grid's tiles
COLUMNS = ("bg", "fg_bg", "mask_true", "mask_pred", "depth_true", "depth_pred")


def plasma(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] of any shape -> uint8 RGB (..., 3) in matplotlib's plasma colormap."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    x = np.clip(x, 0.0, 1.0)
    channels = [np.interp(x, _ANCHOR_POSITIONS, _PLASMA_ANCHORS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def make_grid(
    bg: Images,
    fg_bg: Images,
    mask_true: Images,
    mask_pred: Images,
    depth_true: Images,
    depth_pred: Images,
    max_rows: int = 8,
) -> np.ndarray:
    """One uint8 RGB (H, W, 3) image: a row per sample; bg, fg_bg, masks, depths in plasma."""
    arrays = [_as_numpy(a) for a in (bg, fg_bg, mask_true, mask_pred, depth_true, depth_pred)]
    for name, array in zip(COLUMNS, arrays, strict=True):
        if array.ndim != 4:
            raise ValueError(f"make_grid: {name} must be (B, C, H, W), got shape {array.shape}")
    rows = min(max_rows, *(len(a) for a in arrays))
    if rows < 1:
        raise ValueError("make_grid: no samples to draw (empty batch or max_rows < 1)")
    size = arrays[0].shape[2:]  # every tile is shown at the size of bg
    tiles = [
        [_gray_tile(a[i], size) for a in arrays[:4]]
        + [_plasma_tile(a[i], size) for a in arrays[4:]]
        for i in range(rows)
    ]
    return _assemble(tiles)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) image as PNG, creating parent folders; return the path."""
    path = Path(path)
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: expected a uint8 image, got {image.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    log.debug("wrote %s (%dx%d)", path, image.shape[1], image.shape[0])
    return path


def _as_numpy(images: Images) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or an array -> float32 numpy."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def _gray_tile(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) in [0, 1], C = 1 or 3 -> uint8 (H, W, 3)."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    tile = np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)
    return _resize_nearest(tile, size)


def _plasma_tile(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(1, h, w) depth in [0, 1] -> plasma uint8 (H, W, 3), upscaled by nearest neighbour."""
    return _resize_nearest(plasma(depth[0]), size)


def _resize_nearest(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) -> (H, W, 3) by nearest neighbour (80 -> 160 repeats each pixel twice)."""
    height, width = size
    rows = np.arange(height) * tile.shape[0] // height
    cols = np.arange(width) * tile.shape[1] // width
    return tile[rows[:, None], cols[None, :]]


def _assemble(tiles: list[list[np.ndarray]]) -> np.ndarray:
    """Lay equal (H, W, 3) tiles out in rows and columns with white separators."""
    height, width = tiles[0][0].shape[:2]
    n_rows, n_cols = len(tiles), len(tiles[0])
    step_y, step_x = height + SEPARATOR, width + SEPARATOR
    grid = np.full(
        (n_rows * step_y - SEPARATOR, n_cols * step_x - SEPARATOR, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid[r * step_y : r * step_y + height, c * step_x : c * step_x + width] = tile
    return grid

"""Pictures of a fitted model (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import os

import numpy as np

from sae_core.io import atomic_path


def tile_filters(W: np.ndarray, patch_shape: tuple[int, int], pad: int = 1) -> np.ndarray:
    """Arrange the rows of W (k, h*w) as a grid of h x w tiles, each scaled to its own
    range [min, max] -> [0, 1] (so each filter's structure shows, whatever its norm).
    Returns one image (rows*(h+pad)+pad, cols*(w+pad)+pad) with a 0.5 grey border."""
    k = W.shape[0]
    h, w = patch_shape
    if W.shape[1] != h * w:
        raise ValueError(
            f"filters have {W.shape[1]} values, patch_shape {patch_shape} needs {h * w}"
        )
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for i in range(k):
        f = W[i].reshape(h, w)
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.full_like(f, 0.5)
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = f
    return grid


def save_filter_grid(
    path: str | os.PathLike, W: np.ndarray, patch_shape: tuple[int, int], title: str = ""
) -> None:
    """Write the filter grid of W (k, h*w) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tile_filters(W, patch_shape)
    fig, ax = plt.subplots(figsize=(4, 4 * grid.shape[0] / grid.shape[1] + 0.3), dpi=120)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # metadata=None-like settings keep the bytes identical across runs
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)

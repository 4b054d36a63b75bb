"""Pictures and plot tables of sparse-autoencoder runs (matplotlib Agg; no display needed).

Every picture is one pure function of arrays returning a matplotlib Figure (``*_figure``);
:func:`save_figure` writes any of them as PNG, atomically, and :func:`figure_png` gives
the same bytes in memory (for reports).
The same input gives the same bytes, in any process, for a given matplotlib version:
figures are drawn under matplotlib's default style (a user's matplotlibrc changes nothing),
without pyplot (no global figure state), and saved with "saeflow" as the PNG "Software"
text (not the matplotlib version; it also marks the file as saeflow's own, to be replaced).

Pictures:

- :func:`filter_grid_figure`: the learned filters, rows of W1 (k, h*w[*c]), as a grid of tiles,
  each on its own range;
- :func:`rho_hat_histogram_figure`: the units' mean activations rho_hat_j against the target
  rho, with the band [rho/2, 2 rho] shaded;
- :func:`loss_decomposition_figure`: J = reconstruction + weight decay + sparsity over the
  iterations, and optionally the mean rho_hat over the iterations: the picture that shows
  the optimiser lowering the *sum*, hence pushing the activations down to rho;
- :func:`reconstructions_figure`: inputs beside their reconstructions.

Pictures across the runs of a sweep are in :mod:`sae_core.sweep_plots`.

The tables behind two of them (CSV, for ``dvc plots``) are written by :mod:`sae_core.tables`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sae_core.io import atomic_path
from sae_core.outputs import PNG, PNG_SOFTWARE
from sae_core.tables import (
    LOSS_TERMS,
    checked_rho,
    finite_array,
    history_columns,
    rho_hat_array,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
"""Resolution of every picture (dots per inch)."""

_TERM_STYLE = {
    "loss": ("total J", "black", 2.2),
    "reconstruction": ("reconstruction", "tab:blue", 1.4),
    "weight_decay": ("weight decay", "tab:orange", 1.4),
    "sparsity": ("sparsity", "tab:red", 1.4),
    "auxiliary": ("auxiliary (AuxK)", "tab:purple", 1.4),
}


# ----------------------------------------------------------------------------- helpers
def _figure(figsize: tuple[float, float], draw: Callable[[Any], None]) -> Figure:
    """A fresh figure (no pyplot: no global state) drawn by ``draw`` under the default
    style."""
    import matplotlib.style
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=figsize, dpi=DPI)
        draw(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure's PNG bytes: rendered by Agg under matplotlib's default style, with the
    "Software" text "saeflow" (matplotlib's would name its version), so equal figures give
    equal bytes and the file is recognised as saeflow's (:data:`sae_core.outputs.PNG`)."""
    import matplotlib.style

    buf = io.BytesIO()
    with matplotlib.style.context("default"):
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": PNG_SOFTWARE})
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write :func:`figure_png` of ``fig`` to ``path``, atomically; an existing path is
    replaced only if it is a PNG saeflow drew (:data:`sae_core.outputs.PNG`)."""
    png = figure_png(fig)
    with atomic_path(path, PNG) as tmp:
        tmp.write_bytes(png)


def _patch_shape(patch_shape: Sequence[int], n_values: int, name: str) -> tuple[int, int, int]:
    """(h, w) or (h, w, c) with c in {1, 3} -> (h, w, c), checked against n_values."""
    shape = tuple(int(v) for v in patch_shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"patch_shape must be (h, w) or (h, w, 3); got {tuple(patch_shape)}")
    h, w, c = shape
    if h * w * c != n_values:
        raise ValueError(
            f"{name} have {n_values} values each, patch_shape {tuple(patch_shape)} needs "
            f"{h * w * c}"
        )
    return h, w, c


def _scaled(tile: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Affine map [lo, hi] -> [0, 1]; a flat tile (hi == lo) becomes 0.5 grey."""
    if hi > lo:
        return (tile - lo) / (hi - lo)
    return np.full_like(tile, 0.5)


def _canvas(rows: int, cols: int, tile_h: int, tile_w: int, pad: int, c: int) -> np.ndarray:
    shape = (rows * (tile_h + pad) + pad, cols * (tile_w + pad) + pad)
    return np.full((*shape, c) if c == 3 else shape, 0.5)


def _log_ok(values: np.ndarray, log_x: bool | str, name: str) -> bool:
    """log_x "auto": log when all values are > 0 and span at least a factor 10."""
    if log_x == "auto":
        return bool((values > 0).all() and values.max() >= 10 * values.min())
    if log_x is True:
        if (values <= 0).any():
            raise ValueError(f"log_x=True needs {name} > 0; got min {values.min():g}")
        return True
    if log_x is False:
        return False
    raise ValueError(f"log_x must be True, False or 'auto'; got {log_x!r}")


# ----------------------------------------------------------------------------- filters
def tile_filters(W: np.ndarray, patch_shape: Sequence[int], pad: int = 1) -> np.ndarray:
    """Arrange the rows of W (k, h*w) or (k, h*w*3) as a grid of h x w tiles.

    Each filter is scaled to its own range, [min_f, max_f] -> [0, 1] (over all three
    channels together for colour, so its colour balance is kept), so each filter's
    structure shows whatever its norm. Colour rows are flattened row-major, channels last,
    as the patches are. The grid has ceil(sqrt(k)) columns and a 0.5 grey border of ``pad``
    pixels. Returns (rows*(h+pad)+pad, cols*(w+pad)+pad), with a last axis of 3 for colour.
    """
    W = finite_array(W, "W", 2)
    k = W.shape[0]
    h, w, c = _patch_shape(patch_shape, W.shape[1], "filters")
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = _canvas(rows, cols, h, w, pad, c)
    for i in range(k):
        f = W[i].reshape(h, w, c) if c == 3 else W[i].reshape(h, w)
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = _scaled(f, f.min(), f.max())
    return grid


def _show_grid(fig: Any, grid: np.ndarray, title: str) -> None:
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88 if title else 0.96))
    if grid.ndim == 3:
        ax.imshow(grid, vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, y=0.97)


def _grid_figsize(grid: np.ndarray, width: float = 4.8, title: str = "") -> tuple[float, float]:
    aspect = grid.shape[0] / grid.shape[1]
    return (width, width * aspect / 0.96 * (0.96 / 0.88 if title else 1.0))


def filter_grid_figure(W: np.ndarray, patch_shape: Sequence[int], title: str = "") -> Figure:
    """Figure of :func:`tile_filters` (W (k, h*w) grey or (k, h*w*3) colour)."""
    grid = tile_filters(W, patch_shape)
    return _figure(_grid_figsize(grid, title=title), lambda fig: _show_grid(fig, grid, title))


# ----------------------------------------------------------------------------- reconstructions
def tile_pairs(
    X: np.ndarray, X_hat: np.ndarray, patch_shape: Sequence[int], pad: int = 1
) -> np.ndarray:
    """Inputs beside their reconstructions: rows of X (m, h*w[*3]) and X_hat (m, h*w[*3]).

    Pair i is the tile of x_i, ``pad`` pixels, then the tile of x_hat_i, both mapped with the
    same affine map [min(x_i, x_hat_i), max(x_i, x_hat_i)] -> [0, 1], so brightness is
    comparable within a pair (a faded reconstruction looks faded). Pairs are laid out in
    ceil(sqrt(m / 2)) columns (a roughly square picture), 3 * pad pixels apart; the
    background is 0.5 grey. Returns a 2-d image, or 3-d (..., 3) for colour.
    """
    X = finite_array(X, "X", 2)
    X_hat = finite_array(X_hat, "X_hat", 2)
    if X_hat.shape != X.shape:
        raise ValueError(f"X_hat must have the shape of X {X.shape}; got {X_hat.shape}")
    m = X.shape[0]
    h, w, c = _patch_shape(patch_shape, X.shape[1], "inputs")
    cols = math.ceil(math.sqrt(m / 2))
    rows = math.ceil(m / cols)
    pair_w = 2 * w + pad
    gap = 3 * pad
    shape = (rows * (h + pad) + pad, cols * (pair_w + gap) - gap + 2 * pad)
    grid = np.full((*shape, c) if c == 3 else shape, 0.5)
    tile_shape = (h, w, c) if c == 3 else (h, w)
    for i in range(m):
        x, x_hat = X[i].reshape(tile_shape), X_hat[i].reshape(tile_shape)
        lo, hi = min(x.min(), x_hat.min()), max(x.max(), x_hat.max())
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (pair_w + gap)
        grid[top : top + h, left : left + w] = _scaled(x, lo, hi)
        grid[top : top + h, left + w + pad : left + pair_w] = _scaled(x_hat, lo, hi)
    return grid


def reconstructions_figure(
    X: np.ndarray,
    X_hat: np.ndarray,
    patch_shape: Sequence[int],
    *,
    n_pairs: int = 16,
    title: str = "",
) -> Figure:
    """Figure of :func:`tile_pairs` for the first ``n_pairs`` rows of X and X_hat (m, h*w[*3]).

    The default title says which tile is which: "input | reconstruction (each pair on its
    own scale)".
    """
    if int(n_pairs) < 1:
        raise ValueError(f"n_pairs must be >= 1; got {n_pairs!r}")
    X = finite_array(X, "X", 2)
    X_hat = finite_array(X_hat, "X_hat", 2)
    n = min(int(n_pairs), X.shape[0])
    grid = tile_pairs(X[:n], X_hat[:n], patch_shape)
    title = title or "input | reconstruction (each pair on its own scale)"
    return _figure(
        _grid_figsize(grid, width=5.6, title=title), lambda fig: _show_grid(fig, grid, title)
    )


# ----------------------------------------------------------------------------- rho_hat
class HistogramBins(NamedTuple):
    """Bins of a rho_hat histogram: ``edges`` (n_bins + 1,), ``log`` (log-x axis or not),
    ``view`` (x-limits: the data and, with a target, the band [rho/2, 2 rho])."""

    edges: np.ndarray
    log: bool
    view: tuple[float, float]


def rho_hat_bins(
    rho_hat: np.ndarray,
    rho: float | None = None,
    bins: int | None = None,
    log_x: bool | str = "auto",
) -> HistogramBins:
    """Bins for the histogram of rho_hat (s,), values >= 0.

    The bins span the data alone (so values clustered near a small rho are resolved: 30
    units in [0.0095, 0.0105] fall into many bins, not one), and the view also takes in
    [rho/2, 2 rho]. The number of bins is ``bins`` or clip(2 ceil(sqrt(s)), 10, 60).
    ``log_x="auto"`` chooses a log axis when the view's positive part spans more than a
    factor 20 (a few units far from the rest); bins are then geometric over the positive
    values, and units at exactly 0 cannot be drawn (the picture says how many).
    """
    v = rho_hat_array(rho_hat)
    rho = checked_rho(rho)
    default = int(np.clip(2 * math.ceil(math.sqrt(v.size)), 10, 60))
    n_bins = int(bins) if bins is not None else default
    if n_bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins!r}")
    pos = v[v > 0]
    lows = [*([pos.min()] if pos.size else []), *([rho / 2] if rho else [])]
    highs = [*([pos.max()] if pos.size else []), *([2 * rho] if rho else [])]
    if log_x == "auto":
        log = bool(lows) and max(highs) > 20 * min(lows)
    elif log_x is True:
        if not lows:
            raise ValueError("log_x=True needs some rho_hat > 0 or a target rho")
        log = True
    elif log_x is False:
        log = False
    else:
        raise ValueError(f"log_x must be True, False or 'auto'; got {log_x!r}")

    if log:
        data = pos if pos.size else np.array([rho])
        lo, hi = data.min(), data.max()
        if hi == lo:
            lo, hi = lo / 1.1, hi * 1.1
        if bins is None:  # at least 8 bins per decade, so a cluster is not one bar
            n_bins = min(80, max(n_bins, math.ceil(8 * math.log10(hi / lo))))
        edges = np.geomspace(lo, hi, n_bins + 1)
        view = (min(lows) / 1.3, max(highs) * 1.3)
    else:
        lo, hi = v.min(), v.max()
        if hi == lo:
            half = 0.05 * (abs(lo) or (rho or 1.0))
            lo, hi = max(0.0, lo - half), lo + half + (half if lo == 0 else 0.0)
        edges = np.linspace(lo, hi, n_bins + 1)
        v_lo = min(edges[0], rho / 2) if rho else edges[0]
        v_hi = max(edges[-1], 2 * rho) if rho else edges[-1]
        margin = 0.04 * (v_hi - v_lo)
        view = (max(0.0, v_lo - margin), v_hi + margin)
    return HistogramBins(edges, log, (float(view[0]), float(view[1])))


def _draw_rho_hat_histogram(
    fig: Any, v: np.ndarray, rho: float | None, hb: HistogramBins, title: str
) -> None:
    ax = fig.add_subplot()
    shown = v[v > 0] if hb.log else v
    counts, _ = np.histogram(np.clip(shown, hb.edges[0], hb.edges[-1]), bins=hb.edges)
    ax.stairs(counts, hb.edges, fill=True, color="tab:blue", alpha=0.8,
              label=f"{v.size} unit" + ("" if v.size == 1 else "s"))
    if rho is not None:
        near = float(np.mean((v >= rho / 2) & (v <= 2 * rho)))
        ax.axvspan(rho / 2, 2 * rho, color="tab:green", alpha=0.15,
                   label=f"[rho/2, 2 rho]: {100 * near:.0f}% of units")
        ax.axvline(rho, color="tab:green", lw=2, label=f"target rho = {rho:g}")
    ax.axvline(float(v.mean()), color="black", lw=1, ls=":",
               label=f"mean rho_hat = {v.mean():.4g}")
    if hb.log:
        ax.set_xscale("log")
        zeros = int((v <= 0).sum())
        if zeros:
            units = "unit" if zeros == 1 else "units"
            ax.plot([], [], " ", label=f"{zeros} {units} at rho_hat = 0 (off the log axis)")
    ax.set_xlim(*hb.view)
    ax.set_xlabel("rho_hat_j = mean activation of unit j")
    ax.set_ylabel("units")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "Mean activation per hidden unit", fontsize=9)
    fig.tight_layout()


def rho_hat_histogram_figure(
    rho_hat: np.ndarray,
    rho: float | None = None,
    *,
    bins: int | None = None,
    log_x: bool | str = "auto",
    title: str = "",
) -> Figure:
    """Histogram of rho_hat (s,), the units' mean activations, >= 0.

    With a target ``rho`` in (0, 1): a vertical line at rho, the band [rho/2, 2 rho]
    shaded and the fraction of units inside it in the legend (the ``frac_units_near_target``
    of :mod:`sae_core.stats`). The mean of rho_hat is a dotted line. Bins and axis: see
    :func:`rho_hat_bins`.
    """
    v = rho_hat_array(rho_hat)
    rho = checked_rho(rho)
    hb = rho_hat_bins(v, rho, bins, log_x)
    return _figure((5.0, 3.4), lambda fig: _draw_rho_hat_histogram(fig, v, rho, hb, title))


# ----------------------------------------------------------------------------- loss
def _draw_loss(
    fig: Any,
    cols: dict[str, np.ndarray],
    rho_hat_mean: np.ndarray | None,
    rho: float | None,
    log_y: bool,
    x_label: str,
    title: str,
) -> None:
    x = cols["iteration"]
    if rho_hat_mean is None:
        ax = fig.add_subplot()
        ax_rho = None
    else:
        ax, ax_rho = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    names = [n for n in ("loss", *LOSS_TERMS, "auxiliary") if n in cols]
    if "auxiliary" in names and not (cols["auxiliary"] != 0).any():
        names.remove("auxiliary")
    for name in names:
        label, color, lw = _TERM_STYLE[name]
        y = cols[name]
        if log_y and not (y > 0).any():
            ax.plot([], [], color=color, lw=lw, ls="--", label=f"{label} = 0 (not shown)")
            continue
        ax.plot(x, y, color=color, lw=lw, label=f"{label}: {y[-1]:.4g}")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("loss term")
    ax.legend(fontsize=7, loc="best", title="J = sum of the terms (last value)",
              title_fontsize=7)
    ax.set_title(title or "Loss decomposition over training", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    if ax_rho is not None:
        assert rho_hat_mean is not None
        if rho_hat_mean.ndim == 2:
            ax_rho.fill_between(x, rho_hat_mean.min(axis=1), rho_hat_mean.max(axis=1),
                                color="tab:blue", alpha=0.2, lw=0, label="min..max over units")
            mean = rho_hat_mean.mean(axis=1)
        else:
            mean = rho_hat_mean
        ax_rho.plot(x, mean, color="tab:blue", lw=1.6, label=f"mean rho_hat: {mean[-1]:.4g}")
        if rho is not None:
            ax_rho.axhline(rho, color="tab:green", lw=1.4, ls="--", label=f"target rho = {rho:g}")
        if log_y and (rho_hat_mean > 0).all():
            ax_rho.set_yscale("log")
        ax_rho.set_ylabel("rho_hat")
        ax_rho.legend(fontsize=7, loc="best")
        ax_rho.grid(True, which="major", alpha=0.3)
        ax_rho.set_xlabel(x_label)
    else:
        ax.set_xlabel(x_label)
    fig.tight_layout()


def loss_decomposition_figure(
    history: Sequence[Mapping[str, Any]],
    rho_hat_mean: np.ndarray | None = None,
    *,
    rho: float | None = None,
    log_y: bool = True,
    x_label: str = "iteration",
    title: str = "",
) -> Figure:
    """Figure of the terms of J over the iterations of ``history`` (list of T dicts).

    J = reconstruction + weight decay + sparsity (+ auxiliary for AuxK, drawn when not
    all 0): the total in black, each term in colour, the last values in the legend, log-y
    by default (the terms differ by orders of magnitude). A term that is 0 throughout
    (beta = 0, weight_decay = 0) cannot be drawn on a log axis and is listed as such.

    ``rho_hat_mean`` (T,) adds a second panel with the mean activation over the units per
    iteration (or (T, s): rho_hat per unit per iteration, drawn as the mean and its
    min..max band), with the target ``rho`` as a dashed line: the sparsity term falling
    while rho_hat approaches rho is why adding the penalty ends with lower activations.
    """
    cols = history_columns(history)
    rho = checked_rho(rho)
    rh = None
    if rho_hat_mean is not None:
        raw = np.asarray(rho_hat_mean)
        rh = finite_array(raw, "rho_hat_mean", 2 if raw.ndim == 2 else 1)
        if rh.shape[0] != cols["loss"].size:
            raise ValueError(
                f"rho_hat_mean has {rh.shape[0]} rows, history has {cols['loss'].size} "
                "iterations"
            )
    height = 5.2 if rh is not None else 3.4
    return _figure(
        (5.6, height), lambda fig: _draw_loss(fig, cols, rh, rho, bool(log_y), x_label, title)
    )

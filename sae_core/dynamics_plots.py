"""Pictures of the mechanism: how the sparsity term drives the hidden units down over
training (from :class:`sae_core.dynamics.Dynamics`), and how the end state depends on beta.

The conventions of :mod:`sae_core.plots` hold: pure functions of their inputs returning a
matplotlib Figure, drawn without pyplot under the default style, written by
:func:`sae_core.plots.save_figure` (the same input gives the same bytes).

- :func:`dynamics_figure`: one run, three panels over the iterations (a symmetric-log
  axis, linear up to 1: the first iterations and the long tail both show): rho_hat_j per unit
  with the target rho (units start near 0.5 and are driven down to rho), the hidden
  biases b1_j (falling below 0), and the sparsity delta_j (positive while rho_hat_j > rho:
  the push on dJ/db1_j); each unit has one colour in all three panels;
- :func:`dynamics_comparison_figure`: the same panels for several runs side by side
  (e.g. ``beta: 3`` against ``beta: 0``), each row on one y-axis;
- :func:`rho_hat_histograms_figure`: the final rho_hat histograms of several runs (a beta
  sweep) side by side on one log axis, with the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_core.dynamics import Dynamics
from sae_core.plots import _figure
from sae_core.tables import checked_rho, rho_hat_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROWS = ("rho_hat", "b1", "delta")
"""The panels of a dynamics picture, top to bottom."""
MAX_RUNS = 6
"""At most this many runs side by side (more would make unreadable columns)."""
_LINTHRESH = 1e-2
"""delta's symmetric-log axis is linear within +/- this (delta passes through 0 at rho)."""


def _check(dyn: Any, name: str = "dyn") -> Dynamics:
    if not isinstance(dyn, Dynamics):
        raise ValueError(f"{name} must be a sae_core.dynamics.Dynamics; got {type(dyn).__name__}")
    return dyn


def _unit_colours(s: int) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, s))


def _lines(ax: Any, x: np.ndarray, Y: np.ndarray, colours: np.ndarray) -> None:
    """Y (T, s): one thin line per unit, and the mean over units in black."""
    for j in range(Y.shape[1]):
        ax.plot(x, Y[:, j], color=colours[j], lw=0.8, alpha=0.7)
    ax.plot(x, Y.mean(axis=1), color="black", lw=1.6, label="mean over units")
    ax.grid(True, which="major", alpha=0.3)


def _draw_rho_hat(ax: Any, dyn: Dynamics, colours: np.ndarray) -> None:
    x, v = dyn.iteration, dyn.rho_hat
    _lines(ax, x, v, colours)
    kl = dyn.penalty == "kl"
    if kl:
        ax.axhline(dyn.rho, color="tab:green", lw=1.6, ls="--", label=f"target rho = {dyn.rho:g}")
    if (v > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel("rho_hat_j" if kl else "firing rate (a > 1e-3)", fontsize=8)
    ax.legend(fontsize=7, loc="best")


def _draw_b1(ax: Any, dyn: Dynamics, colours: np.ndarray) -> None:
    _lines(ax, dyn.iteration, dyn.b1, colours)
    ax.axhline(0.0, color="grey", lw=1.0)
    neg = int((dyn.b1[-1] < 0).sum())
    ax.plot([], [], " ", label=f"{neg} of {dyn.n_units} end below 0")
    ax.set_ylabel("hidden bias b1_j", fontsize=8)
    ax.legend(fontsize=7, loc="best")


def _draw_delta(ax: Any, dyn: Dynamics, colours: np.ndarray) -> None:
    ax.axhline(0.0, color="grey", lw=1.0)
    ax.set_ylabel("sparsity delta_j", fontsize=8)
    if dyn.penalty != "kl":
        ax.text(0.5, 0.5, f"penalty {dyn.penalty}: no KL term, no sparsity delta",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_yticks([])
        return
    d = dyn.delta
    _lines(ax, dyn.iteration, np.where(np.isfinite(d), d, np.nan), colours)
    ax.set_yscale("symlog", linthresh=_LINTHRESH)
    above = dyn.rho_hat > dyn.rho
    # the sign rule the picture shows: delta_j > 0 exactly while rho_hat_j > rho
    pos = int((d > 0)[above].sum()) if above.any() else 0
    if dyn.beta == 0:
        note = "beta = 0: delta_j = 0 (no push)"
    else:
        note = f"delta > 0 at {pos} of {int(above.sum())} (sample, unit)\nwith rho_hat > rho"
    ax.plot([], [], " ", label=note)
    ax.legend(fontsize=7, loc="best")


_DRAW = {"rho_hat": _draw_rho_hat, "b1": _draw_b1, "delta": _draw_delta}


def _draw_columns(fig: Any, dyns: Sequence[Dynamics], labels: Sequence[str], title: str) -> None:
    k = len(dyns)
    axes = fig.subplots(len(ROWS), k, sharex="col", sharey="row", squeeze=False)
    for c, (dyn, label) in enumerate(zip(dyns, labels, strict=True)):
        colours = _unit_colours(dyn.n_units)
        for r, row in enumerate(ROWS):
            ax = axes[r][c]
            _DRAW[row](ax, dyn, colours)
            ax.tick_params(labelsize=7)
            if c > 0:
                ax.set_ylabel("")
        axes[0][c].set_title(label, fontsize=8)
        # symlog: the first iterations (where rho_hat falls) and the long tail both show
        axes[-1][c].set_xscale("symlog", linthresh=1.0)
        axes[-1][c].set_xlabel("iteration" if dyn.extra.get("solver") != "adam" else "epoch",
                               fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()


def _label(dyn: Dynamics) -> str:
    if dyn.penalty == "kl":
        return f"KL, rho {dyn.rho:g}, beta {dyn.beta:g}"
    return f"penalty {dyn.penalty}"


def dynamics_figure(dyn: Dynamics, *, title: str = "") -> Figure:
    """The three panels of the module docstring for one run, over its T samples:
    rho_hat (T, s) per unit on a log axis with the target rho, b1 (T, s) with 0 marked,
    delta (T, s) on a symmetric-log axis with 0 marked; the mean over units in black."""
    dyn = _check(dyn)
    title = title or f"How the sparsity term drives the units ({_label(dyn)})"
    return _figure((5.6, 7.0), lambda fig: _draw_columns(fig, [dyn], [""], title))


def dynamics_comparison_figure(dyns: Sequence[Dynamics], labels: Sequence[str], *,
                               title: str = "") -> Figure:
    """:func:`dynamics_figure`'s panels for up to :data:`MAX_RUNS` runs side by side, one
    column per run (titled by ``labels``), each row sharing its y-axis across the runs."""
    dyns = [_check(d, f"dyns[{i}]") for i, d in enumerate(dyns)]
    labels = [str(x) for x in labels]
    if not 1 <= len(dyns) <= MAX_RUNS:
        raise ValueError(f"dyns must hold 1 to {MAX_RUNS} runs; got {len(dyns)}")
    if len(labels) != len(dyns):
        raise ValueError(f"labels must name each of the {len(dyns)} runs; got {len(labels)}")
    title = title or "The units over training, side by side"
    return _figure((3.2 * len(dyns) + 0.8, 7.0),
                   lambda fig: _draw_columns(fig, dyns, labels, title))


def _draw_histograms(fig: Any, values: list[np.ndarray], labels: list[str],
                     rho: float | None, edges: np.ndarray, title: str) -> None:
    axes = fig.subplots(1, len(values), sharex=True, sharey=True, squeeze=False)[0]
    for ax, v, label in zip(axes, values, labels, strict=True):
        counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
        if rho is not None:
            ax.axvline(rho, color="tab:green", lw=1.6, ls="--", label=f"target rho = {rho:g}")
        ax.axvline(float(v.mean()), color="black", lw=1, ls=":",
                   label=f"mean {v.mean():.3g}")
        ax.set_xscale("log")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("rho_hat_j", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    axes[0].set_ylabel("units", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()


def rho_hat_histograms_figure(rho_hats: Sequence[np.ndarray], labels: Sequence[str],
                              rho: float | None = None, *, title: str = "") -> Figure:
    """Histograms of the final rho_hat (s_i,) of up to :data:`MAX_RUNS` runs side by side,
    all on one geometric binning of a log axis spanning every run's positive values and
    the target ``rho`` (a unit at exactly 0 is drawn in the first bin)."""
    values = [rho_hat_array(v, f"rho_hats[{i}]") for i, v in enumerate(rho_hats)]
    labels = [str(x) for x in labels]
    rho = checked_rho(rho)
    if not 1 <= len(values) <= MAX_RUNS:
        raise ValueError(f"rho_hats must hold 1 to {MAX_RUNS} runs; got {len(values)}")
    if len(labels) != len(values):
        raise ValueError(f"labels must name each of the {len(values)} runs; got {len(labels)}")
    pos = np.concatenate([v[v > 0] for v in values] + [np.array([rho] if rho else [])])
    if pos.size == 0:
        raise ValueError("rho_hats are all 0 and there is no target: nothing to draw")
    lo = pos.min() / 1.2
    hi = max(pos.max() * 1.2, lo * 10)
    edges = np.geomspace(lo, hi, max(12, math.ceil(8 * math.log10(hi / lo))) + 1)
    title = title or "Final rho_hat per unit, side by side"
    return _figure((2.6 * len(values) + 0.8, 3.0),
                   lambda fig: _draw_histograms(fig, values, labels, rho, edges, title))

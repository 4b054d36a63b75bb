"""Pictures across the runs of a sweep (one run's pictures: :mod:`sae_core.plots`, whose
conventions hold here: pure functions of arrays returning a matplotlib Figure, the same
bytes for the same input).

- :func:`sweep_figure`: rho_hat spread and downstream accuracy against one swept setting;
- :func:`sweep_grid_figure`: sparsity statistics and accuracy against each of several
  swept settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_core.plots import _figure, _log_ok
from sae_core.tables import checked_rho, finite_array, rho_hat_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def sweep_summary(rho_hat: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The spread of rho_hat at each point of a sweep: ``rho_hat`` is a sequence of p
    arrays (s_i,) (or a (p, s) array); returns min, q1, median, q3, max, each (p,)
    (quartiles by numpy's linear interpolation)."""
    if isinstance(rho_hat, np.ndarray) and rho_hat.ndim == 2:
        rows = list(rho_hat)
    elif isinstance(rho_hat, Sequence) and not isinstance(rho_hat, (str, bytes)):
        rows = list(rho_hat)
    else:
        raise ValueError("rho_hat must be a sequence of 1-d arrays, one per swept value")
    if not rows:
        raise ValueError("rho_hat is empty")
    vs = [rho_hat_array(r, f"rho_hat[{i}]") for i, r in enumerate(rows)]
    q = np.array([np.quantile(v, [0.0, 0.25, 0.5, 0.75, 1.0]) for v in vs])
    return dict(zip(("min", "q1", "median", "q3", "max"), q.T, strict=True))


def _draw_sweep(
    fig: Any,
    x: np.ndarray,
    spread: dict[str, np.ndarray],
    accuracy: np.ndarray | None,
    raw: np.ndarray | float | None,
    rho: float | None,
    name: str,
    log_x: bool,
    title: str,
) -> None:
    order = np.argsort(x, kind="stable")
    x = x[order]
    spread = {k: v[order] for k, v in spread.items()}
    if accuracy is None:
        ax = fig.add_subplot()
        ax_acc = None
    else:
        ax, ax_acc = fig.subplots(2, 1, sharex=True)
        accuracy = accuracy[order]
        if isinstance(raw, np.ndarray):
            raw = raw[order]
    values = np.concatenate(list(spread.values()))
    positive = values[values > 0]
    floor = float(positive.min()) / 10 if positive.size else 1e-6
    if rho is not None:
        floor = min(floor, rho / 10)
    clipped = {k: np.maximum(v, floor) for k, v in spread.items()}
    ax.fill_between(x, clipped["q1"], clipped["q3"], color="tab:blue", alpha=0.25, lw=0,
                    label="quartiles over units")
    ax.plot(x, clipped["min"], color="tab:blue", lw=0.8, ls="--", label="min / max")
    ax.plot(x, clipped["max"], color="tab:blue", lw=0.8, ls="--")
    ax.plot(x, clipped["median"], color="tab:blue", lw=1.8, marker="o", ms=4,
            label="median rho_hat")
    if rho is not None:
        ax.axhline(rho, color="tab:green", lw=1.4, label=f"target rho = {rho:g}")
    ax.set_yscale("log")
    if (values <= 0).any():
        ax.plot([], [], " ", label=f"rho_hat = 0 drawn at {floor:.1e}")
    ax.set_ylabel("rho_hat per unit")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or f"Sweep over {name}", fontsize=9)
    last = ax
    if ax_acc is not None:
        assert accuracy is not None
        ax_acc.plot(x, accuracy, color="tab:red", lw=1.6, marker="o", ms=4,
                    label="learned features")
        if isinstance(raw, np.ndarray):
            ax_acc.plot(x, raw, color="gray", lw=1.2, ls="--", marker="s", ms=3,
                        label="raw pixels")
        elif raw is not None:
            ax_acc.axhline(raw, color="gray", lw=1.2, ls="--", label=f"raw pixels: {raw:.3g}")
        ax_acc.set_ylabel("test accuracy")
        ax_acc.legend(fontsize=7, loc="best")
        ax_acc.grid(True, which="major", alpha=0.3)
        last = ax_acc
    if log_x:
        last.set_xscale("log")
    last.set_xlabel(name)
    fig.tight_layout()


def sweep_figure(
    values: Sequence[float],
    rho_hat: Sequence[np.ndarray],
    *,
    name: str = "beta",
    accuracy: Sequence[float] | None = None,
    raw_accuracy: float | Sequence[float] | None = None,
    rho: float | None = None,
    log_x: bool | str = "auto",
    title: str = "",
) -> Figure:
    """Figure of a sweep over one setting ``name`` (beta, k, l1_coefficient, ...).

    ``values`` (p,) are the swept settings; ``rho_hat`` holds p arrays (s_i,) of the units'
    mean activations (see :func:`sweep_summary`). Top panel, log-y: the median over units
    with the quartile band and min/max lines (units at 0 are drawn at a floor one decade
    below the smallest positive value, as the legend says), the target ``rho`` if given.
    Bottom panel, when ``accuracy`` (p,) is given: downstream accuracy on the learned
    features, against ``raw_accuracy`` (a number: a horizontal line; or (p,)). Points are
    sorted by value. ``log_x="auto"``: log x when all values are > 0 and span a factor 10.
    """
    x = finite_array(values, "values", 1)
    spread = sweep_summary(rho_hat)
    if spread["median"].size != x.size:
        raise ValueError(f"rho_hat has {spread['median'].size} entries, values has {x.size}")
    rho = checked_rho(rho)
    acc = raw = None
    if accuracy is not None:
        acc = finite_array(accuracy, "accuracy", 1)
        if acc.size != x.size:
            raise ValueError(f"accuracy has {acc.size} entries, values has {x.size}")
    if raw_accuracy is not None:
        if accuracy is None:
            raise ValueError("raw_accuracy needs accuracy (the baseline is drawn beside it)")
        if np.ndim(raw_accuracy) == 0:
            raw = float(finite_array([raw_accuracy], "raw_accuracy", 1)[0])
        else:
            raw = finite_array(raw_accuracy, "raw_accuracy", 1)
            if raw.size != x.size:
                raise ValueError(f"raw_accuracy has {raw.size} entries, values has {x.size}")
    log = _log_ok(x, log_x, "values")
    height = 5.4 if acc is not None else 3.4
    return _figure(
        (5.4, height),
        lambda fig: _draw_sweep(fig, x, spread, acc, raw, rho, str(name), log, title),
    )


def sweep_grid_figure(settings: dict[str, Sequence[float]],
                      metrics: dict[str, Sequence[float]], title: str = "") -> Figure:
    """Figure of a sweep over several settings: one panel per (metric, setting), the
    metric against the setting, one line per combination of the other settings.

    ``settings``: name -> (p,) values of each point; ``metrics``: name -> (p,) values (NaN
    where a point lacks the metric). A setting whose values are all > 0 and span a factor
    10 is drawn on a log axis."""
    names = list(settings)
    if not names or not metrics:
        raise ValueError("sweep_grid_figure needs at least one setting and one metric")
    xs = {n: finite_array(v, n, 1) for n, v in settings.items()}
    p = next(iter(xs.values())).size
    ys = {}
    for m, v in metrics.items():
        y = np.asarray(v, dtype=float)
        if y.shape != (p,):
            raise ValueError(f"{m} has {y.size} entries, the settings have {p}")
        ys[m] = y

    def draw(fig) -> None:
        axes = fig.subplots(len(ys), len(names), squeeze=False)
        for col, name in enumerate(names):
            others = [n for n in names if n != name]
            groups: dict[tuple, list[int]] = {}
            for i in range(p):
                groups.setdefault(tuple(xs[o][i] for o in others), []).append(i)
            for row, (metric, y) in enumerate(ys.items()):
                ax = axes[row][col]
                for combo, idx in sorted(groups.items()):
                    idx = sorted(idx, key=lambda i: xs[name][i])
                    label = ", ".join(f"{o}={v:g}" for o, v in zip(others, combo, strict=True))
                    ax.plot(xs[name][idx], y[idx], marker="o", label=label or None)
                if _log_ok(xs[name], "auto", name):
                    ax.set_xscale("log")
                ax.set_xlabel(name)
                ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
                if row == 0 and others:
                    ax.legend(fontsize="x-small")
        if title:
            fig.suptitle(title)
        fig.tight_layout()

    return _figure((3.2 * len(names) + 0.6, 2.4 * len(ys) + 0.4), draw)

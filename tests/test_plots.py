"""Pictures and plot tables: tiling by hand, figure content, byte-identical output, CSV."""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest

from sae_core import plots, sweep_plots, tables

PNG = b"\x89PNG\r\n\x1a\n"

# One fixed set of inputs for every picture; run here and in a fresh process (the
# determinism that `dvc repro` relies on is across processes).
PICTURES_CODE = """
import numpy as np
from sae_core import plots, sweep_plots
rng = np.random.default_rng(0)
history = [
    {"iteration": t, "loss": 3.0 / (t + 1) + 0.31, "reconstruction": 0.3 + 0.01 / (t + 1),
     "weight_decay": 0.002 * (1 + t / 10), "sparsity": 3.0 / (t + 1) ** 2, "auxiliary": 0.0}
    for t in range(12)
]
rh = 0.01 + 0.0005 * rng.standard_normal(25)
W = rng.normal(size=(25, 64))
PICTURES = {
    "filters": lambda: plots.filter_grid_figure(W, (8, 8), "f"),
    "colour": lambda: plots.filter_grid_figure(np.arange(4 * 12.0).reshape(4, 12), (2, 2, 3)),
    "hist": lambda: plots.rho_hat_histogram_figure(rh, 0.01),
    "hist_log": lambda: plots.rho_hat_histogram_figure(np.r_[rh, 0.0, 1e-5, 0.3], 0.01),
    "loss": lambda: plots.loss_decomposition_figure(history, np.geomspace(0.5, 0.01, 12),
                                                    rho=0.01),
    "pairs": lambda: plots.reconstructions_figure(
        np.linspace(0, 1, 6 * 16).reshape(6, 16), np.linspace(0.2, 0.8, 6 * 16).reshape(6, 16),
        (4, 4)),
    "sweep": lambda: sweep_plots.sweep_figure(
        [0.0, 1.0, 3.0], [rh, rh / 2, np.r_[rh[:-1] / 4, 0.0]], rho=0.01,
        accuracy=[0.9, 0.95, 0.93], raw_accuracy=0.78),
}
"""


def _pictures() -> dict:
    namespace: dict = {}
    exec(PICTURES_CODE, namespace)
    return namespace["PICTURES"]


def _render_all() -> dict[str, bytes]:
    return {name: plots.figure_png(make()) for name, make in _pictures().items()}


@pytest.fixture(scope="module")
def rendered() -> dict[str, bytes]:
    """Every picture of PICTURES_CODE, drawn once in this process."""
    return _render_all()


# ----------------------------------------------------------------------------- tiling
def test_tile_filters_scales_each_filter_to_its_own_range():
    W = np.array([[0.0, 1.0, 2.0, 4.0], [-10.0, -10.0, 10.0, 30.0], [5.0, 5.0, 5.0, 5.0]])
    grid = plots.tile_filters(W, (2, 2), pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)  # 2 columns, 2 rows of 2x2 tiles
    np.testing.assert_allclose(grid[1:3, 1:3], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(grid[1:3, 4:6], [[0.0, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(grid[4:6, 1:3], 0.5)  # a flat filter: mid grey
    assert (grid[0] == 0.5).all() and (grid[:, 3] == 0.5).all()  # border
    assert (grid[4:6, 4:6] == 0.5).all()  # empty slot


def test_tile_filters_colour_keeps_the_colour_balance():
    f = np.array([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]])
    grid = plots.tile_filters(f.reshape(1, -1), (2, 2, 3), pad=0)
    assert grid.shape == (2, 2, 3)
    np.testing.assert_allclose(grid, f / 11.0)  # one range over all three channels


def test_tile_filters_rejects_a_wrong_patch_shape():
    with pytest.raises(ValueError, match="filters have 16 values each, patch_shape"):
        plots.tile_filters(np.zeros((3, 16)), (3, 3))
    with pytest.raises(ValueError, match=r"patch_shape must be \(h, w\) or \(h, w, 3\)"):
        plots.tile_filters(np.zeros((3, 8)), (2, 2, 2))
    with pytest.raises(ValueError, match="W contains NaN"):
        plots.tile_filters(np.full((1, 4), np.nan), (2, 2))


def test_tile_pairs_puts_each_pair_on_one_scale():
    x = np.array([[0.0, 1.0, 2.0, 4.0], [10.0, 10.0, 10.0, 11.0]])
    x_hat = np.array([[1.0, 1.0, 1.0, 1.0], [9.0, 10.0, 10.0, 10.0]])
    grid = plots.tile_pairs(x, x_hat, (2, 2), pad=1)
    # 2 pairs in ceil(sqrt(1)) = 1 column: each row is input | recon
    assert grid.shape == (2 * 3 + 1, 2 * 2 + 1 + 2)
    np.testing.assert_allclose(grid[1:3, 1:3], [[0.0, 0.25], [0.5, 1.0]])  # range [0, 4]
    np.testing.assert_allclose(grid[1:3, 4:6], 0.25)  # recon 1.0 on the same [0, 4]
    np.testing.assert_allclose(grid[4:6, 1:3], [[0.5, 0.5], [0.5, 1.0]])  # range [9, 11]
    np.testing.assert_allclose(grid[4:6, 4:6], [[0.0, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="X_hat must have the shape of X"):
        plots.tile_pairs(x, x_hat[:1], (2, 2))


# ----------------------------------------------------------------------------- bytes
def test_every_picture_is_a_png_and_byte_identical_when_redrawn(rendered):
    assert all(png.startswith(PNG) for png in rendered.values())
    assert len(set(rendered.values())) == len(rendered)  # the pictures differ from each other
    assert _render_all() == rendered


def test_pictures_are_byte_identical_in_a_fresh_process(rendered, python, subprocess_env):
    code = PICTURES_CODE + (
        "\nimport hashlib, json\n"
        "print(json.dumps({k: hashlib.sha256(plots.figure_png(f())).hexdigest()\n"
        "                  for k, f in PICTURES.items()}))"
    )
    out = subprocess.run(
        [python, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True
    )
    expected = {name: hashlib.sha256(png).hexdigest() for name, png in rendered.items()}
    assert json.loads(out.stdout) == expected


def test_save_writes_the_png_bytes_atomically(tmp_path):
    W = np.random.default_rng(1).normal(size=(9, 16))
    target = tmp_path / "sub" / "filters.png"
    plots.save_figure(plots.filter_grid_figure(W, (4, 4), title="nine"), target)
    assert target.read_bytes() == plots.figure_png(plots.filter_grid_figure(W, (4, 4), "nine"))
    rh = np.array([0.01, 0.02, 0.005])
    plots.save_figure(plots.rho_hat_histogram_figure(rh, 0.01), tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes() == plots.figure_png(
        plots.rho_hat_histogram_figure(rh, 0.01))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["filters.png", "h.png", "sub"]
    (tmp_path / "x.png").write_bytes(b"GIF89a")  # not a picture saeflow drew: kept
    with pytest.raises(ValueError, match=r"x\.png: exists and is not a PNG picture drawn by"):
        plots.save_figure(plots.rho_hat_histogram_figure(rh, 0.01), tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes() == b"GIF89a"


# ----------------------------------------------------------------------------- rho_hat
def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_rho_hat_bins_resolve_a_cluster_near_a_small_rho():
    rho = 0.01
    rh = rho + 0.0004 * np.random.default_rng(2).standard_normal(100)
    hb = plots.rho_hat_bins(rh, rho)
    assert not hb.log
    assert hb.edges[0] == rh.min() and hb.edges[-1] == rh.max()  # bins span the data only
    counts, _ = np.histogram(rh, hb.edges)
    assert (counts > 0).sum() >= 10  # not one bar
    assert hb.view[0] <= rho / 2 and hb.view[1] >= 2 * rho  # the band is in view


def test_rho_hat_bins_go_log_when_values_span_decades():
    rh = np.array([0.0, 1e-5, 0.009, 0.01, 0.011, 0.3])
    hb = plots.rho_hat_bins(rh, 0.01)
    assert hb.log
    assert hb.edges[0] == pytest.approx(1e-5) and hb.edges[-1] == pytest.approx(0.3)
    ratios = hb.edges[1:] / hb.edges[:-1]
    np.testing.assert_allclose(ratios, ratios[0])  # geometric
    assert ratios[0] <= 10 ** (1 / 8) + 1e-12  # at least 8 bins per decade
    assert not plots.rho_hat_bins(rh, 0.01, log_x=False).log
    with pytest.raises(ValueError, match="log_x=True needs some rho_hat > 0"):
        plots.rho_hat_bins(np.zeros(4), log_x=True)


def test_rho_hat_histogram_marks_the_target_and_the_band():
    rho = 0.01
    rh = np.array([0.004, 0.009, 0.01, 0.012, 0.03])
    fig = plots.rho_hat_histogram_figure(rh, rho)
    (ax,) = fig.axes
    labels = _legend(ax)
    assert "target rho = 0.01" in labels
    assert "[rho/2, 2 rho]: 60% of units" in labels
    vlines = [line.get_xdata() for line in ax.get_lines()]
    assert any(list(x) == [rho, rho] for x in vlines)
    spans = [p for p in ax.patches if p.get_label().startswith("[rho/2")]
    (span,) = spans
    assert span.get_x() == pytest.approx(rho / 2)
    assert span.get_x() + span.get_width() == pytest.approx(2 * rho)
    log_fig = plots.rho_hat_histogram_figure(np.r_[rh, 0.0, 1e-6], rho)
    assert log_fig.axes[0].get_xscale() == "log"
    assert "1 unit at rho_hat = 0 (off the log axis)" in _legend(log_fig.axes[0])


def test_rho_hat_inputs_are_checked():
    with pytest.raises(ValueError, match="rho_hat has negative values"):
        plots.rho_hat_histogram_figure(np.array([0.1, -0.1]))
    with pytest.raises(ValueError, match="rho_hat must be 1-d"):
        plots.rho_hat_histogram_figure(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="rho must be a number in"):
        plots.rho_hat_histogram_figure(np.array([0.1]), rho=1.5)
    with pytest.raises(ValueError, match="rho_hat is empty"):
        tables.write_rho_hat_csv("never.csv", np.array([]))


# ----------------------------------------------------------------------------- loss
HISTORY = [
    {"iteration": 0, "loss": 4.0, "reconstruction": 1.0, "weight_decay": 0.0, "sparsity": 3.0},
    {"iteration": 1, "loss": 1.5, "reconstruction": 0.5, "weight_decay": 0.0, "sparsity": 1.0},
    {"iteration": 2, "loss": 0.6, "reconstruction": 0.4, "weight_decay": 0.0, "sparsity": 0.2},
]


def test_loss_decomposition_draws_each_term_and_the_rho_hat_panel():
    fig = plots.loss_decomposition_figure(HISTORY, np.array([0.5, 0.1, 0.02]), rho=0.01)
    ax, ax_rho = fig.axes
    assert ax.get_yscale() == "log" and ax_rho.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["total J: 0.6"].get_ydata(), [4.0, 1.5, 0.6])
    np.testing.assert_array_equal(lines["reconstruction: 0.4"].get_ydata(), [1.0, 0.5, 0.4])
    np.testing.assert_array_equal(lines["sparsity: 0.2"].get_ydata(), [3.0, 1.0, 0.2])
    np.testing.assert_array_equal(lines["sparsity: 0.2"].get_xdata(), [0, 1, 2])
    assert "weight decay = 0 (not shown)" in lines  # 0 throughout: no line on a log axis
    assert "target rho = 0.01" in _legend(ax_rho)
    # without the rho_hat series: one panel; on a linear axis the zero term is drawn
    (single,) = plots.loss_decomposition_figure(HISTORY, log_y=False).axes
    assert single.get_yscale() == "linear"
    assert "weight decay: 0" in [line.get_label() for line in single.get_lines()]


def test_loss_decomposition_band_of_units_and_bad_input():
    per_unit = np.array([[0.4, 0.6], [0.05, 0.15], [0.01, 0.03]])
    fig = plots.loss_decomposition_figure(HISTORY, per_unit, rho=0.02)
    mean = [line for line in fig.axes[1].get_lines() if "mean rho_hat" in line.get_label()]
    np.testing.assert_allclose(mean[0].get_ydata(), [0.5, 0.1, 0.02])
    with pytest.raises(ValueError, match="rho_hat_mean has 2 rows, history has 3 iterations"):
        plots.loss_decomposition_figure(HISTORY, np.array([0.5, 0.1]))
    with pytest.raises(ValueError, match="history\\[1\\] has no 'sparsity'"):
        plots.loss_decomposition_figure([HISTORY[0], {"loss": 1.0, "reconstruction": 1.0,
                                                   "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="history is empty"):
        plots.loss_decomposition_figure([])


# ----------------------------------------------------------------------------- sweeps
def test_sweep_summary_by_hand():
    s = sweep_plots.sweep_summary([np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([0.5])])
    np.testing.assert_array_equal(s["min"], [0.0, 0.5])
    np.testing.assert_array_equal(s["q1"], [1.0, 0.5])
    np.testing.assert_array_equal(s["median"], [2.0, 0.5])
    np.testing.assert_array_equal(s["q3"], [3.0, 0.5])
    np.testing.assert_array_equal(s["max"], [4.0, 0.5])


def test_sweep_figure_shows_spread_and_accuracy_against_the_baseline():
    values = [10.0, 1.0, 100.0]  # unsorted on purpose
    rh = [np.full(4, 0.02), np.full(4, 0.05), np.array([0.0, 0.001, 0.002, 0.003])]
    fig = sweep_plots.sweep_figure(values, rh, name="beta", accuracy=[0.9, 0.8, 0.95],
                             raw_accuracy=0.78, rho=0.01)
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_xscale() == "log"  # 1..100: log-x
    median = next(line for line in top.get_lines() if line.get_label() == "median rho_hat")
    np.testing.assert_array_equal(median.get_xdata(), [1.0, 10.0, 100.0])
    np.testing.assert_allclose(median.get_ydata(), [0.05, 0.02, 0.0015])
    assert any(label.startswith("rho_hat = 0 drawn at") for label in _legend(top))
    acc = next(line for line in bottom.get_lines() if line.get_label() == "learned features")
    np.testing.assert_array_equal(acc.get_ydata(), [0.8, 0.9, 0.95])
    raw = next(line for line in bottom.get_lines() if line.get_label().startswith("raw"))
    assert list(raw.get_ydata()) == [0.78, 0.78]
    assert bottom.get_xlabel() == "beta"
    # a sweep including 0 stays on a linear x axis; without accuracy there is one panel
    (only,) = sweep_plots.sweep_figure([0, 1, 3], rh, name="l1_coefficient").axes
    assert only.get_xscale() == "linear" and only.get_xlabel() == "l1_coefficient"


def test_sweep_inputs_are_checked():
    rh = [np.full(3, 0.1), np.full(3, 0.2)]
    with pytest.raises(ValueError, match="rho_hat has 2 entries, values has 3"):
        sweep_plots.sweep_figure([1, 2, 3], rh)
    with pytest.raises(ValueError, match="accuracy has 1 entries, values has 2"):
        sweep_plots.sweep_figure([1, 2], rh, accuracy=[0.5])
    with pytest.raises(ValueError, match="log_x=True needs values > 0"):
        sweep_plots.sweep_figure([0, 2], rh, log_x=True)
    with pytest.raises(ValueError, match="raw_accuracy needs accuracy"):
        sweep_plots.sweep_figure([1, 2], rh, raw_accuracy=0.7)


# ----------------------------------------------------------------------------- CSV
def test_loss_csv_exact_bytes(tmp_path):
    history = [
        {"iteration": 0, "loss": 0.1 + 0.2, "reconstruction": 0.25, "weight_decay": 1e-4,
         "sparsity": 0.04999999999999999, "auxiliary": 0.0},
        {"iteration": 1, "loss": 2.0, "reconstruction": 1.5, "weight_decay": 0.0,
         "sparsity": 0.5, "auxiliary": 0.0},
    ]
    path = tmp_path / "plots" / "loss.csv"
    tables.write_loss_csv(path, history)
    assert path.read_bytes() == (
        b"iteration,loss,reconstruction,weight_decay,sparsity,auxiliary\n"
        b"0,0.30000000000000004,0.25,0.0001,0.04999999999999999,0.0\n"
        b"1,2.0,1.5,0.0,0.5,0.0\n"
    )
    first = path.read_bytes()
    tables.write_loss_csv(path, history)
    assert path.read_bytes() == first
    # records without auxiliary / iteration: the five columns, iterations counted from 0
    tables.write_loss_csv(path, [{k: v for k, v in r.items() if k != "auxiliary"}
                                for r in HISTORY])
    lines = path.read_text().splitlines()
    assert lines[0] == "iteration,loss,reconstruction,weight_decay,sparsity"
    assert lines[1] == "0,4.0,1.0,0.0,3.0"
    assert [p.name for p in path.parent.iterdir()] == ["loss.csv"]


def test_rho_hat_csv_exact_bytes(tmp_path):
    path = tmp_path / "rho_hat.csv"
    tables.write_rho_hat_csv(path, np.array([0.01, 1 / 3, 0.0]), 0.01)
    assert path.read_bytes() == (
        b"unit,rho_hat,target\n0,0.01,0.01\n1,0.3333333333333333,0.01\n2,0.0,0.01\n"
    )
    tables.write_rho_hat_csv(path, np.array([0.5]))
    assert path.read_text() == "unit,rho_hat,target\n0,0.5,\n"


def test_sweep_grid_figure_has_a_panel_per_metric_and_setting():
    from sae_core.sweep_plots import sweep_grid_figure

    settings = {"train.beta": [1, 1, 3, 3], "train.rho": [0.01, 0.05, 0.01, 0.05]}
    fig = sweep_grid_figure(settings, {"rho_hat_mean": [0.01, 0.05, 0.011, 0.049],
                                       "accuracy": [0.9, 0.92, float("nan"), 0.95]})
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [a.get_xlabel() for a in axes[:2]] == ["train.beta", "train.rho"]
    # one line per value of the other setting
    assert len(axes[0].get_lines()) == 2 and len(axes[1].get_lines()) == 2
    with pytest.raises(ValueError, match="accuracy has 3 entries"):
        sweep_grid_figure(settings, {"accuracy": [0.9, 0.9, 0.9]})

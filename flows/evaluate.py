"""Stage 4, evaluate: the model + the held-out patches -> the sparsity statistics
(``metrics/sparsity.json``, per unit as Parquet) and the pictures and plot data that show
what the sparsity term did to the hidden units; + the train stage's dynamics table -> the
picture of how it did it over training. Adds them to the pipeline's MLflow run."""

from __future__ import annotations

from prefect import flow

from flows import tracking
from flows.lineage import input_hashes
from flows.stage_support import (
    compute_timer,
    model_sha256,
    prefect_tags,
    read_section,
    tracking_enabled,
    tracking_settings,
)

KEYS = {"split", "n_reconstructions"}


def evaluate(model: str, patches: str, dynamics: str, sparsity_metrics: str, units: str,
             filters_png: str, rho_hat_png: str, rho_hat_csv: str, loss_png: str,
             reconstructions_png: str, dynamics_png: str,
             params_file: str = "params.yaml") -> dict:
    """Statistics on ``evaluate.split`` ('heldout', the default, or 'train') of the store."""
    import numpy as np

    from sae_core import SparseAutoencoder, tables
    from sae_core.dynamics import read_dynamics
    from sae_core.outputs import PNG, check_paths
    from sae_core.patch_store import read_patch_store
    from sae_core.stats import SPARSITY_METRICS
    from sae_core.units_table import UNITS

    c = tracking.client() if tracking_enabled() else None
    params, cfg = read_section(params_file, "evaluate", KEYS)
    split, n_pairs = evaluate_settings(cfg, params_file)
    check_paths(inputs={"params": params_file, "model": model, "patches": patches,
                        "dynamics": dynamics},
                outputs={"sparsity_metrics": (sparsity_metrics, SPARSITY_METRICS),
                         "units": (units, UNITS), "filters_png": (filters_png, PNG),
                         "rho_hat_png": (rho_hat_png, PNG),
                         "rho_hat_csv": (rho_hat_csv, tables.RHO_HAT_CSV),
                         "loss_png": (loss_png, PNG),
                         "reconstructions_png": (reconstructions_png, PNG),
                         "dynamics_png": (dynamics_png, PNG)})
    sae = SparseAutoencoder.load(model)
    dyn = read_dynamics(dynamics)
    # the last sample is the fitted model: its biases must be the model's, bit for bit
    if dyn.b1.shape[1] != sae.n_components or not np.array_equal(
            dyn.b1[-1], np.asarray(sae.intercept_hidden_, dtype=np.float64)):
        raise ValueError(f"{dynamics}: recorded for another model than {model} (re-run the "
                         "train stage)")
    store = read_patch_store(patches)
    X = evaluation_patches(store, split, patches)
    run_id = None
    if c is not None:  # the record is opened before any output is written
        run_id = tracking.attach_run(
            c, tracking_settings(params)[0], model_sha256=model_sha256(model), params=params,
            section="evaluate", tags={**input_hashes([model, patches]),
                                      **prefect_tags("evaluate")})
    with tracking.failed_on_error(c, run_id):
        with compute_timer("evaluate") as timer:
            metrics = write_evaluation(sae, X, tuple(store.patch_shape), split, n_pairs, {
                "sparsity_metrics": sparsity_metrics, "units": units,
                "filters_png": filters_png, "rho_hat_png": rho_hat_png,
                "rho_hat_csv": rho_hat_csv, "loss_png": loss_png,
                "reconstructions_png": reconstructions_png, "dynamics_png": dynamics_png},
                dynamics=dyn)
        near = metrics.get("frac_units_near_target")
        print(f"evaluate: {X.shape[0]} {split} patches; rho_hat in "
              f"[{metrics['rho_hat_min']:.4f}, {metrics['rho_hat_max']:.4f}]"
              + (f", {100 * near:.0f}% of units within [rho/2, 2 rho]" if near is not None
                 else "")
              + f"; {metrics['dead_units']} dead; FVU {metrics['fvu']:.3f} -> {sparsity_metrics}")
        if c is not None:
            tracking.log_stage(c, run_id, "sparsity", metrics=metrics, artifacts={
                "sparsity": sparsity_metrics, "units": units, "filters": filters_png,
                "rho_hat": rho_hat_png, "rho_hat_csv": rho_hat_csv, "loss": loss_png,
                "reconstructions": reconstructions_png, "dynamics": dynamics_png})
            tracking.complete_stage(c, run_id, "evaluate")
            print(f"evaluate: added to MLflow run {run_id}")
    return {**metrics, "seconds": timer["seconds"]}


def evaluate_settings(cfg: dict, where: str) -> tuple[str, int]:
    """(split, n_reconstructions) of an ``evaluate`` section; a bad one is a ValueError
    naming ``where`` (the params file, or a sweep point)."""
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) in evaluate: {', '.join(unknown)}")
    split = cfg.get("split", "heldout")
    if split not in ("heldout", "train"):
        raise ValueError(f"{where}: evaluate.split must be 'heldout' or 'train'; got {split!r}")
    n_pairs = cfg.get("n_reconstructions", 10)
    if not isinstance(n_pairs, int) or isinstance(n_pairs, bool) or n_pairs < 1:
        # >= 1: the picture is a declared output, so there is always something to draw
        raise ValueError(f"{where}: evaluate.n_reconstructions must be an integer "
                         f">= 1; got {n_pairs!r}")
    return split, n_pairs


def evaluation_patches(store, split: str, patches: str):
    """The store's ``split`` (m, n); an empty one is a ValueError naming the store."""
    X = store.split(split)
    if X.shape[0] == 0:
        raise ValueError(f"{patches}: the {split!r} split is empty (set "
                         "patches.heldout_fraction > 0, or evaluate.split: train)")
    return X


def write_evaluation(sae, X, patch_shape: tuple[int, ...], split: str, n_pairs: int,
                     out: dict[str, str], dynamics=None) -> dict:
    """The sparsity statistics of ``sae`` on X (m, n) and the pictures of its hidden units,
    written to ``out`` (keys: the evaluate stage's output names); with ``dynamics`` (the
    fit's :class:`sae_core.dynamics.Dynamics`), also the picture of its units over
    training (``dynamics_png``). Returns the metrics."""
    import numpy as np

    from sae_core import dynamics_plots, plots, tables
    from sae_core.io import write_json
    from sae_core.stats import SPARSITY_METRICS, sparsity_stats
    from sae_core.units_table import write_per_unit

    stats = sparsity_stats(sae, X)
    metrics = {**stats.metrics(), "split": split}
    write_json(out["sparsity_metrics"], metrics, SPARSITY_METRICS)
    write_per_unit(out["units"], stats)
    rho = stats.rho
    title = f"{sae.n_components} filters ({_setting(sae)})"
    plots.save_figure(plots.filter_grid_figure(sae.components_, patch_shape, title=title),
                      out["filters_png"])
    plots.save_figure(plots.rho_hat_histogram_figure(stats.rho_hat, rho), out["rho_hat_png"])
    tables.write_rho_hat_csv(out["rho_hat_csv"], stats.rho_hat, rho)
    plots.save_figure(plots.loss_decomposition_figure(sae.history_), out["loss_png"])
    pick = np.asarray(X[: min(n_pairs, X.shape[0])])
    plots.save_figure(plots.reconstructions_figure(pick, sae.reconstruct(pick), patch_shape),
                      out["reconstructions_png"])
    if dynamics is not None:
        plots.save_figure(dynamics_plots.dynamics_figure(dynamics), out["dynamics_png"])
    return metrics


def _setting(sae) -> str:
    if sae.penalty == "kl":
        return f"KL, rho {sae.rho:g}, beta {sae.beta:g}"
    if sae.penalty == "l1":
        return f"L1 {sae.l1_coefficient:g}"
    return f"TopK k={sae.k}"


evaluate_flow = flow(name="evaluate", log_prints=False, persist_result=False)(evaluate)

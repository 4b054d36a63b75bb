"""``saeflow report``: an HTML report of one pipeline run, or a comparison of several
(settings against metrics, the pictures side by side, and for a sweep over one setting the
rho_hat spread and downstream accuracy against it). Runs that recorded their units'
dynamics get the answer, from their own numbers, to how the sparsity term switches the
units off (:mod:`sae_core.answer`), and several of them the dynamics and the final rho_hat
histograms side by side (:mod:`sae_core.dynamics_plots`). The runs and their pictures come from
MLflow; the page is written by :mod:`sae_core.report`, logged to MLflow and published as a
Prefect artifact."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from prefect import flow

from flows import tracking
from flows.audit import matches, parse_filter

PICTURES = {"filters": "sparsity/filters.png", "rho_hat histogram": "sparsity/rho_hat.png",
            "loss decomposition": "sparsity/loss.png",
            "inputs and reconstructions": "sparsity/reconstructions.png",
            "the units over training": "sparsity/dynamics.png"}
UNITS = "sparsity/units.parquet"
DYNAMICS = "train/dynamics.parquet"
KEY_METRICS = ("train/loss", "train/reconstruction", "train/sparsity", "train/iterations",
               "sparsity/rho_hat_mean", "sparsity/rho_hat_min", "sparsity/rho_hat_max",
               "sparsity/frac_units_near_target", "sparsity/dead_units", "sparsity/kl_total",
               "sparsity/l0_mean", "sparsity/hoyer_mean", "sparsity/kurtosis_mean",
               "sparsity/lifetime_sparseness_mean", "sparsity/population_sparseness_mean",
               "sparsity/active_fraction_mean", "sparsity/fvu", "score/accuracy",
               "score/raw_accuracy", "score/macro_f1", "score/raw_macro_f1")
"""The metrics the report tables show, in this order (all are in MLflow)."""
SWEEPABLE = ("train.beta", "train.k", "train.l1_coefficient", "train.rho",
             "train.weight_decay", "train.n_components")


def select_runs(c, experiment: str, run_ids=(), where=(), last: int = 1) -> list:
    """The runs to report, oldest first: the given ids; else the newest ``last`` runs that
    have sparsity statistics and match every ``where`` filter (on params such as
    ``train.beta`` and metrics such as ``score/accuracy``)."""
    from mlflow.exceptions import MlflowException

    if int(last) < 1:
        raise ValueError(f"--last must be >= 1; got {last}")
    if run_ids:
        try:
            return [c.get_run(r) for r in run_ids]
        except MlflowException as exc:
            raise ValueError(f"--run: {' '.join(str(exc).split())}") from None
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {c.tracking_uri}: run the "
                         "pipeline first")
    filters = [parse_filter(w, columns=None) for w in where]
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=5000,
                                     order_by=["attributes.start_time DESC"])
            if any(k.startswith(("sparsity/", "score/")) for k in r.data.metrics)
            and all(matches({**r.data.params, **r.data.metrics}, f) for f in filters)]
    if not runs:
        raise ValueError("no pipeline run with sparsity or score metrics matches")
    return list(reversed(runs[: max(1, last)]))


def _labels(runs, differing: list[str]) -> list[str]:
    """Run names with the settings that differ between the runs (training ones first, at
    most three); the short run id is added where two labels would still be equal."""
    keys = sorted(differing, key=lambda k: (not k.startswith("train."), k))[:3]
    labels = []
    for run in runs:
        name = run.info.run_name or run.info.run_id[:8]
        parts = [f"{k}={run.data.params.get(k)}" for k in keys]
        labels.append(f"{name} ({', '.join(parts)})" if parts else name)
    return [f"{label} [{run.info.run_id[:8]}]" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs, strict=True)]


GRID_METRICS = ("sparsity/rho_hat_mean", "sparsity/dead_units", "sparsity/fvu",
                "score/accuracy")
"""What a sweep over several settings plots against each of them."""


def _swept_settings(runs) -> list[str]:
    """The numeric params that differ between the runs (the settings a sweep varied)."""
    out = []
    for k in sorted({k for r in runs for k in r.data.params}):
        values = {r.data.params.get(k) for r in runs}
        if len(values) > 1 and k.split(".")[0] in ("patches", "train", "evaluate", "score"):
            try:
                [float(v) for v in values]
            except (TypeError, ValueError):
                continue
            out.append(k)
    return out


def sweep_setting(runs) -> str | None:
    """The one sweepable setting whose value differs between the runs, if exactly one."""
    differs = [k for k in SWEEPABLE if len({r.data.params.get(k) for r in runs}) > 1]
    return differs[0] if len(differs) == 1 else None


def _side_by_side(runs, labels, setting, dyns, finals) -> dict[str, bytes]:
    """Overview pictures of several runs: their units over training, and their final
    rho_hat histograms (e.g. a beta sweep), side by side, in the order of the swept
    setting when there is one (at most :data:`sae_core.dynamics_plots.MAX_RUNS`)."""
    from sae_core.dynamics_plots import (
        MAX_RUNS,
        dynamics_comparison_figure,
        rho_hat_histograms_figure,
    )
    from sae_core.plots import figure_png

    if len(runs) < 2:
        return {}
    order = list(range(len(runs)))
    names = list(labels)
    if setting:
        order.sort(key=lambda i: float(runs[i].data.params[setting]))
        names = [f"{setting.split('.')[-1]} = {r.data.params[setting]}" for r in runs]
    out = {}
    have = [i for i in order if dyns[i] is not None][:MAX_RUNS]
    if len(have) > 1:
        out["the units over training, side by side"] = figure_png(dynamics_comparison_figure(
            [dyns[i] for i in have], [names[i] for i in have]))
    have = [i for i in order if finals[i] is not None][:MAX_RUNS]
    rhos = {runs[i].data.params.get("train.rho") for i in have}
    kl = {runs[i].data.params.get("train.penalty") for i in have} == {"kl"}
    if len(have) > 1:
        out["final rho_hat per unit, side by side"] = figure_png(rho_hat_histograms_figure(
            [finals[i] for i in have], [names[i] for i in have],
            rho=float(next(iter(rhos))) if kl and len(rhos) == 1 else None))
    return out


def _log_report(c, runs, out: str, experiment: str) -> str | None:
    """Log the page to the run it reports (or to a new run, for several): the run id; None,
    with a notice, where the store is read-only (the report is then only the file)."""
    import sys

    problem = tracking.store_writable(c.tracking_uri)
    if problem:
        print(f"report: not logged to MLflow ({problem})", file=sys.stderr)
        return None
    try:
        if len(runs) == 1:
            target = runs[0].info.run_id
        else:
            target = c.create_run(tracking.experiment_id(c, experiment),
                                  run_name=f"report of {len(runs)} runs",
                                  tags={"saeflow.report_of": ",".join(
                                      r.info.run_id for r in runs)}).info.run_id
        c.log_artifact(target, out, "report")
        if len(runs) > 1:
            c.set_terminated(target, "FINISHED")
    except Exception as exc:  # the page is written; the store refusing it is a notice
        line = tracking.store_error(exc) or " ".join(str(exc).split())
        print(f"report: not logged to MLflow ({line})", file=sys.stderr)
        return None
    return target


@flow(name="report", log_prints=False, persist_result=False)
def report_flow(out: str, run_ids: list[str] | None = None, where: list[str] | None = None,
                last: int = 1, experiment: str = "saeflow") -> dict:
    import numpy as np
    from prefect.artifacts import create_markdown_artifact

    from sae_core.answer import answers
    from sae_core.dynamics import read_dynamics
    from sae_core.outputs import HTML, check_target
    from sae_core.plots import figure_png
    from sae_core.report import RunSummary, write_report
    from sae_core.sweep_plots import sweep_figure, sweep_grid_figure
    from sae_core.units_table import read_per_unit

    check_target(out, HTML)  # before the work; write_report checks again as it writes
    c = tracking.client(create=False)
    runs = select_runs(c, experiment, run_ids or (), where or (), last)
    differing = [k for k in sorted({k for r in runs for k in r.data.params})
                 if len({r.data.params.get(k) for r in runs}) > 1]
    labels = _labels(runs, differing)
    summaries, rho_hats, finals, dyns = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="saeflow-report-") as tmp, tracking.quiet():
        for run, label in zip(runs, labels, strict=True):
            local = Path(tmp) / run.info.run_id
            have = {a.path for a in c.list_artifacts(run.info.run_id, "sparsity")}
            pictures = {}
            for caption, artifact in PICTURES.items():
                if artifact in have:
                    pictures[caption] = Path(c.download_artifacts(run.info.run_id, artifact,
                                                                  str(local))).read_bytes()
            if UNITS in have:
                columns, _ = read_per_unit(c.download_artifacts(run.info.run_id, UNITS,
                                                                str(local)))
                rho_hats.append(columns["rho_hat"])
            finals.append(columns["rho_hat"] if UNITS in have else None)
            trained = {a.path for a in c.list_artifacts(run.info.run_id, "train")}
            dyns.append(read_dynamics(c.download_artifacts(run.info.run_id, DYNAMICS,
                                                           str(local)))
                        if DYNAMICS in trained else None)
            summaries.append(RunSummary(
                name=label,
                params=dict(sorted(run.data.params.items())),
                metrics={k: run.data.metrics[k] for k in KEY_METRICS if k in run.data.metrics},
                pictures=pictures,
                run_id=run.info.run_id))
    summaries = [replace(s, answer=[a.text for a in sentences])
                 for s, sentences in zip(summaries, answers(dyns), strict=True)]
    overview = {}
    setting = sweep_setting(runs) if len(runs) > 1 else None
    overview.update(_side_by_side(runs, labels, setting, dyns, finals))
    if setting and len(rho_hats) == len(runs):
        order = np.argsort([float(r.data.params[setting]) for r in runs])
        acc = [runs[i].data.metrics.get("score/accuracy") for i in order]
        raw = [runs[i].data.metrics.get("score/raw_accuracy") for i in order]
        rhos = {r.data.params.get("train.rho") for r in runs}
        kl = {r.data.params.get("train.penalty") for r in runs} == {"kl"}
        overview[f"sweep over {setting}"] = figure_png(sweep_figure(
            [float(runs[i].data.params[setting]) for i in order],
            [rho_hats[i] for i in order], name=setting.split(".")[-1],
            accuracy=acc if None not in acc else None,
            raw_accuracy=raw if None not in raw and None not in acc else None,
            rho=float(next(iter(rhos))) if kl and len(rhos) == 1 else None))
    swept = _swept_settings(runs)
    if len(swept) > 1:
        overview[f"sweep over {', '.join(swept)}"] = figure_png(sweep_grid_figure(
            {k: [float(r.data.params[k]) for r in runs] for k in swept},
            {k.split("/")[-1]: [r.data.metrics.get(k, float("nan")) for r in runs]
             for k in GRID_METRICS}))
    title = ("saeflow report: " + summaries[0].name if len(runs) == 1
             else f"saeflow report: {len(runs)} runs" + (f", sweep over {setting}"
                                                          if setting else ""))
    write_report(out, summaries, title=title, overview=overview)
    target = _log_report(c, runs, out, experiment)
    rows = ["| run | " + " | ".join(differing[:6]) + " | rho_hat_mean | dead | FVU | accuracy "
            "| raw |", "|" + "---|" * (len(differing[:6]) + 6)]
    for s, r in zip(summaries, runs, strict=True):
        m = r.data.metrics
        cells = [r.data.params.get(k, "") for k in differing[:6]]
        cells += [f"{m.get(k, float('nan')):.4g}" for k in
                  ("sparsity/rho_hat_mean", "sparsity/dead_units", "sparsity/fvu",
                   "score/accuracy", "score/raw_accuracy")]
        rows.append(f"| {s.name} | " + " | ".join(map(str, cells)) + " |")
    create_markdown_artifact(
        key="saeflow-report",
        markdown=f"# {title}\n\nHTML report: `{Path(out).resolve()}`"
                 + (f" (also MLflow run `{target}`, artifact `report/{Path(out).name}`)"
                    if target else "") + "\n\n" + "\n".join(rows),
        description=title)
    print(f"report: {len(runs)} run(s) -> {out}"
          + (f"; logged to MLflow run {target}" if target else ""))
    return {"out": out, "runs": [r.info.run_id for r in runs], "mlflow_run": target,
            "sweep": setting}

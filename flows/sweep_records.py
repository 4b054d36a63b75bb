"""A sweep in MLflow: one parent run, a child run per point (``mlflow.parentRunId``), made
before any point starts, so that each point is recorded exactly once, whatever happens
to the worker that runs it; and the listing of a sweep's points (``saeflow audit --sweep``).
"""

from __future__ import annotations

import json
from typing import Any

from flows import tracking
from flows.sweep_grid import describe
from flows.sweep_point import ERROR_TAG, POINT_KEY_TAG, POINT_TAG, SETTINGS_TAG, SWEEP_TAG

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "saeflow.kind"
POINT_METRICS = {"loss": "train/loss", "rho_hat_mean": "sparsity/rho_hat_mean",
                 "near_target": "sparsity/frac_units_near_target",
                 "dead_units": "sparsity/dead_units", "l0_mean": "sparsity/l0_mean",
                 "fvu": "sparsity/fvu", "accuracy": "score/accuracy",
                 "raw_accuracy": "score/raw_accuracy", "seconds": "sweep/compute_seconds"}
"""The columns of a sweep's table, and the run metrics they show."""


def find_parent(c, exp_id: str, sweep_id: str):
    """The sweep's parent run, or None."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and "
                         f"tags.`{KIND_TAG}` = 'sweep'", max_results=1)
    return runs[0] if runs else None


def children(c, exp_id: str, sweep_id: str) -> list:
    """The sweep's point runs (every page), by point index."""
    out, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and "
                             f"tags.`{KIND_TAG}` = 'point'", max_results=1000,
                             page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda r: int(r.data.tags.get(POINT_TAG, -1)))


def unfinished(c, experiment: str, sweep_id: str, keys: list[str]) -> bool:
    """Whether any point (by key) has no FINISHED run in this sweep (read only)."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None or find_parent(c, exp.experiment_id, sweep_id) is None:
        return True
    done = {r.data.tags.get(POINT_KEY_TAG) for r in children(c, exp.experiment_id, sweep_id)
            if r.info.status == "FINISHED"}
    return not set(keys) <= done


def open_sweep(c, experiment: str, sweep_id: str, *, params: dict, grid: list[str],
               tags: dict[str, str]) -> str:
    """The parent run: found (a re-run of the same sweep) and set RUNNING, or created."""
    exp_id = tracking.experiment_id(c, experiment)
    parent = find_parent(c, exp_id, sweep_id)
    if parent is not None:
        c.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id
    run_id = tracking.open_run(c, experiment, params=params, tags={
        **tags, SWEEP_TAG: sweep_id, KIND_TAG: "sweep", "saeflow.sweep_grid": json.dumps(grid)},
        run_name=f"sweep-{sweep_id}")
    return run_id


def open_points(c, experiment: str, sweep_id: str, parent: str, points: list[dict],
                keys: list[str], full: list[dict], tags: dict[str, str]) -> dict[int, Any]:
    """Index -> the point's run: the existing one where this sweep has it (its status
    tells whether it finished), else a new child run, SCHEDULED, with all its params."""
    exp_id = tracking.experiment_id(c, experiment)
    have = {r.data.tags.get(POINT_KEY_TAG): r for r in children(c, exp_id, sweep_id)}
    runs: dict[int, Any] = {}
    for i, (point, key, params) in enumerate(zip(points, keys, full, strict=True)):
        run = have.get(key)
        if run is None:
            run_id = tracking.open_run(c, experiment, params=params, tags={
                **tags, PARENT_TAG: parent, SWEEP_TAG: sweep_id, KIND_TAG: "point",
                POINT_TAG: str(i), POINT_KEY_TAG: key, SETTINGS_TAG: json.dumps(point)},
                run_name=f"sweep-{sweep_id}-{i} {describe(point)}")
            c.update_run(run_id, status="SCHEDULED")
            run = c.get_run(run_id)
        elif run.info.status != "FINISHED":
            c.update_run(run.info.run_id, status="SCHEDULED")
        runs[i] = run
    return runs


def point_rows(runs: list) -> list[dict]:
    """One row per point run: index, its swept settings, status, key metrics, run id,
    version (if registered) and the error of a failed point."""
    rows = []
    for r in runs:
        settings = json.loads(r.data.tags.get(SETTINGS_TAG, "{}"))
        row: dict[str, Any] = {"point": int(r.data.tags.get(POINT_TAG, -1)),
                               "settings": describe(settings),
                               "status": r.info.status}
        row.update({k: settings[k] for k in settings})
        for col, key in POINT_METRICS.items():
            row[col] = r.data.metrics.get(key)
        row["run_id"] = r.info.run_id
        row["error"] = r.data.tags.get(ERROR_TAG)
        rows.append(row)
    return rows


def sweep_columns(rows: list[dict]) -> tuple[str, ...]:
    """The table's columns: point, the swept settings, status, the metrics, run id."""
    swept = [k for k in (rows[0] if rows else {}) if "." in k]
    return ("point", *swept, "status", *POINT_METRICS, "run_id", "error")


def sweep_rows(sweep_id: str, params_file: str = "params.yaml", uri: str | None = None,
               ) -> list[dict]:
    """``saeflow audit --sweep ID``: the sweep's points, as :func:`point_rows`."""
    from flows.stage_support import tracking_settings_of

    if not sweep_id.replace("-", "").isalnum():
        raise ValueError(f"--sweep {sweep_id!r}: not a sweep id")
    experiment, _ = tracking_settings_of(params_file)
    c = tracking.client(uri, create=False)
    exp = c.get_experiment_by_name(experiment)
    runs = children(c, exp.experiment_id, sweep_id) if exp else []
    if not runs:
        raise ValueError(f"--sweep {sweep_id}: no such sweep in MLflow experiment "
                         f"{experiment!r} ({tracking.redact(c.tracking_uri)})")
    return point_rows(runs)


def best_run(runs: list, metric: str, direction: str):
    """The finished point run with the best value of ``metric`` (e.g. ``score/accuracy``,
    params.yaml's ``retrain.metric``), or None."""
    done = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda r: r.data.metrics[metric])


def find_point(c, experiment: str, ref: str):
    """A point's run from ``SWEEP_ID/INDEX`` or its MLflow run id; else a ValueError."""
    from mlflow.exceptions import MlflowException

    sweep_id, sep, index = ref.partition("/")
    if sep:
        exp = c.get_experiment_by_name(experiment)
        runs = [r for r in (children(c, exp.experiment_id, sweep_id) if exp else [])
                if r.data.tags.get(POINT_TAG) == index]
        if not runs:
            raise ValueError(f"--promote {ref}: no point {index} in sweep {sweep_id}")
        return runs[0]
    try:
        run = c.get_run(ref)
    except MlflowException:
        raise ValueError(f"--promote {ref}: no such MLflow run (give SWEEP_ID/POINT or a "
                         "point's run id)") from None
    if run.data.tags.get(KIND_TAG) != "point":
        raise ValueError(f"--promote {ref}: run {ref} is not a sweep point")
    return run


def promote(ref: str, params_file: str = "params.yaml") -> dict[str, Any]:
    """Write a finished point's settings into params.yaml (comments and layout kept), so
    that ``dvc repro`` makes its model. Refused, with nothing written, when another
    setting of patches/train/evaluate/score differs from what the point ran with (the
    pipeline would then not reproduce the point). Returns the settings written."""
    import os
    import tempfile
    from pathlib import Path

    from ruamel.yaml import YAML

    from flows.params import load_params
    from flows.stage_support import tracking_settings
    from flows.sweep_grid import SWEPT_SECTIONS

    params = load_params(params_file)
    experiment, _ = tracking_settings(params)
    run = find_point(tracking.client(create=False), experiment, ref)
    if run.info.status != "FINISHED":
        raise ValueError(f"--promote {ref}: the point is {run.info.status}, not FINISHED")
    settings = json.loads(run.data.tags.get(SETTINGS_TAG, "{}"))
    current = tracking.flatten({s: params.get(s, {}) for s in SWEPT_SECTIONS})
    for key, value in current.items():
        recorded = run.data.params.get(key)
        if key not in settings and recorded is not None and recorded != value:
            raise ValueError(f"{params_file}: {key} is {value} now but the point ran with "
                             f"{recorded}; set it back (or sweep again) before promoting")
    path = Path(params_file)
    yaml = YAML()  # round-trip: the file's comments and order stay
    doc = yaml.load(path.read_text())
    for key, value in settings.items():
        section, _, name = key.partition(".")
        doc[section][name] = value
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.dump(doc, fh)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return settings

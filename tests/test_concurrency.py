"""Eight pipeline runs started at once on a fresh default (SQLite) store: all recorded, no
errors, distinct version numbers, each run in its own experiment. (The same on the team's
MLflow server is in test_team_mode.py.)"""

from __future__ import annotations

from support import check_concurrent_runs, clean_env, start_concurrent_pipelines


def test_eight_pipelines_at_once_on_a_fresh_sqlite_store(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared"
    store.mkdir()
    # the projects share one project root, so each resolves the default store to the same
    # <root>/mlflow.db (as DVC's queued experiments of one project do through DVC_ROOT)
    env = clean_env(**prefect_server, SAEFLOW_PROJECT_ROOT=str(store))
    results = start_concurrent_pipelines(tmp_path, env)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    check_concurrent_runs(MlflowClient(tracking_uri=uri, registry_uri=uri), results,
                          registered="saeflow-sae")

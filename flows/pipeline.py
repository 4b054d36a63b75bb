"""The parent flow: the five stage flows in order, in one process (``saeflow pipeline``).
Paths come from dvc.yaml; afterwards ``dvc commit`` records the new outputs in dvc.lock, so
DVC and Prefect runs agree on what is up to date, and ``push`` sends them to the default DVC
remote, where a teammate's ``dvc pull`` finds them. It runs every stage; the retraining
flow (:mod:`flows.retrain`) runs only the stale ones and gates the new model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.project import pipeline_paths
from flows.stage_support import PARENT_ENV
from flows.stages import STAGES


@contextmanager
def parent_of_stages() -> Iterator[None]:
    """Within, the stage flows tag their MLflow runs with this flow run's id
    (``prefect.flow_run_id.pipeline``), so a parent flow can find the runs it made."""
    previous = os.environ.get(PARENT_ENV)
    if flow_run.id:
        os.environ[PARENT_ENV] = str(flow_run.id)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


def run_stage(stage, paths: dict[str, str], params_file: str) -> dict:
    """One stage's flow as a subflow, on dvc.yaml's paths; its result."""
    return stage.flow()(**{name: paths[name] for name in stage.path_args},
                        params_file=params_file)


@flow(name="saeflow-pipeline", log_prints=False, persist_result=False)
def pipeline_flow(params_file: str = "params.yaml", dvc_yaml: str = "dvc.yaml",
                  record_in_dvc: bool = True, push: bool = False) -> dict:
    """ingest -> patches -> train -> evaluate -> score, each as a subflow; returns each
    stage's result. ``record_in_dvc``: run ``dvc commit`` at the end (if DVC is set up);
    ``push``: then ``dvc push`` to the default remote."""
    if record_in_dvc and (Path(params_file).resolve() != Path("params.yaml").resolve()
                          or Path(dvc_yaml).resolve() != Path("dvc.yaml").resolve()):
        # dvc.lock would record params.yaml's values for outputs made from other settings
        raise ValueError(f"{params_file}: only the project's params.yaml and dvc.yaml can be "
                         "recorded in dvc.lock; use --no-dvc-commit with other files")
    paths = pipeline_paths(dvc_yaml)
    with parent_of_stages():
        results = {stage.name: run_stage(stage, paths, params_file) for stage in STAGES}
    if record_in_dvc and os.path.isdir(".dvc"):
        subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], check=True)
        print("pipeline: outputs recorded in dvc.lock (dvc commit)")
        if push:
            subprocess.run([sys.executable, "-m", "dvc", "push", "--quiet"], check=True)
            print("pipeline: outputs pushed to the default DVC remote (dvc push)")
    return results

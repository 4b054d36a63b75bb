"""The parent flow: the five stage flows in order, in one process, for Prefect-driven runs
(schedules, deployments). Paths come from dvc.yaml; afterwards ``dvc commit`` records the
new outputs in dvc.lock, so DVC and Prefect runs agree on what is up to date, and ``push``
sends them to the default DVC remote, where a teammate's ``dvc pull`` finds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.project import pipeline_paths
from flows.stages import STAGES


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
    previous = os.environ.get("SAEFLOW_PIPELINE_RUN_ID")
    if flow_run.id:
        os.environ["SAEFLOW_PIPELINE_RUN_ID"] = str(flow_run.id)
    results = {}
    try:
        for stage in STAGES:
            args = {name: paths[name] for name in stage.path_args}
            results[stage.name] = stage.flow()(**args, params_file=params_file)
    finally:
        if previous is None:
            os.environ.pop("SAEFLOW_PIPELINE_RUN_ID", None)
        else:
            os.environ["SAEFLOW_PIPELINE_RUN_ID"] = previous
    if record_in_dvc and os.path.isdir(".dvc"):
        subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], check=True)
        print("pipeline: outputs recorded in dvc.lock (dvc commit)")
        if push:
            subprocess.run([sys.executable, "-m", "dvc", "push", "--quiet"], check=True)
            print("pipeline: outputs pushed to the default DVC remote (dvc push)")
    return results

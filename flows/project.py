"""Where the project is, and the pipeline's paths as dvc.yaml declares them.

dvc.yaml is the only place stage paths are written (its ``vars: - paths: ...`` block, used
by every stage's cmd, deps and outs); the Prefect parent flow reads them from there too.
Standard library + PyYAML only: this module is imported by light commands.
"""

from __future__ import annotations

import os
from pathlib import Path

EXPERIMENT_TMP = (".dvc", "tmp", "exps")
"""DVC runs queued experiments in copies under <project>/.dvc/tmp/exps/<...>."""


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The project that owns the current run, so that every run records into the one store
    that outlives it: ``SAEFLOW_PROJECT_ROOT`` if set; else ``DVC_ROOT``, which DVC sets for
    the stages it runs (for a queued experiment, to the original repository, not the
    temporary copy the stage runs in); else, inside such a copy
    (``<root>/.dvc/tmp/exps/...``), ``<root>``; else the nearest folder upwards holding
    dvc.yaml or params.yaml; else the start folder."""
    for var in ("SAEFLOW_PROJECT_ROOT", "DVC_ROOT"):
        override = os.environ.get(var)
        if override:
            return Path(override).resolve()
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    n = len(EXPERIMENT_TMP)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == EXPERIMENT_TMP:
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "params.yaml").is_file():
            return folder
    return here


def pipeline_paths(dvc_yaml: str | os.PathLike = "dvc.yaml") -> dict[str, str]:
    """The ``paths`` variables of dvc.yaml (name -> path relative to the project)."""
    from flows.params import read_yaml

    p = Path(dvc_yaml)
    doc = read_yaml(p, "pipeline definition")
    for entry in (doc or {}).get("vars") or []:
        if isinstance(entry, dict) and isinstance(entry.get("paths"), dict):
            return {str(k): str(v) for k, v in entry["paths"].items()}
    raise ValueError(f"{p}: no 'paths' block under vars")

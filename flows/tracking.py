"""MLflow records of pipeline runs: one run per pipeline execution, across the stages.

The train stage opens the run (all params, provenance tags, training metrics, the model,
registered with its sparsity settings as version tags); evaluate and score find that run by
the sha256 of the model they read and add their metrics and plots to it. Nothing about the
run is written into DVC outputs, so those stay byte-identical from run to run.

Records before outputs: a stage opens (or finds) its run before it writes any file, so a
store that cannot take the record fails the stage before anything is written; a stage that
fails afterwards ends its run FAILED (:func:`failed_on_error`). Errors of MLflow and its
database become one line naming the store (:func:`store_error`).

Store: ``MLFLOW_TRACKING_URI`` if set, else a SQLite file at an absolute path inside the
project (``<project>/mlflow.db``, artifacts in ``<project>/mlartifacts``); experiments run
by DVC in temporary copies resolve to the original project (:func:`flows.project.project_root`).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.project import project_root

MODEL_TAG = "saeflow.model_sha256"
"""Run tag: sha256 of the model weights the run trained (how later stages find the run)."""
MODEL_URI_TAG = "saeflow.model_uri"
"""Run tag: the ``models:/<id>`` URI of the model the run logged."""
TRAINED_IN_TAG = "saeflow.trained_in"
"""Run tag of a run that a later stage opened for a model (:func:`attach_run`): the run
that trained the model."""
SETTINGS = ("penalty", "n_components", "rho", "beta", "weight_decay", "l1_coefficient", "k",
            "solver", "max_iter")
"""The training settings copied onto each registered model version as tags."""


def default_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def redact(uri: str) -> str:
    """A URI without its password (``postgresql://u:***@host/db``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


_STORE_ERROR_MODULES = ("mlflow", "sqlalchemy", "alembic", "requests", "urllib3", "psycopg",
                        "sqlite3")


def store_error(exc: BaseException, uri: str | None = None) -> str | None:
    """One line for an error raised by MLflow or the store under it (SQLAlchemy, the
    database driver, HTTP): "MLflow store URI: cause" -- the SQL statement, the
    SQLAlchemy help link and any password left out. None for other errors."""
    if type(exc).__module__.split(".")[0] not in _STORE_ERROR_MODULES:
        return None
    cause: BaseException = exc
    # the root cause: MLflow wraps SQLAlchemy's error, which wraps the driver's ("attempt
    # to write a readonly database"); requests wraps urllib3's, which wraps the socket's
    while (inner := getattr(cause, "orig", None) or cause.__cause__) is not None:
        cause = inner
    text = getattr(cause, "message", None) or str(cause) or type(cause).__name__
    text = text.split("\n[SQL:", 1)[0].split("(Background on this error", 1)[0]
    return f"MLflow store {redact(uri or default_uri())}: {' '.join(text.split())}"


def database_problem(uri: str) -> str | None:
    """None if the database of a ``postgresql://``/``mysql://``... store answers within
    5 s; else why not, in one line. (MLflow itself retries a store that does not answer
    for about 100 s, ten times, before it gives up.)"""
    import sqlalchemy

    args = {"connect_timeout": 5} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        try:
            with engine.connect() as con:
                con.execute(sqlalchemy.text("select 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        cause = getattr(exc, "orig", None) or exc
        return " ".join(str(cause).split("\n")[0].split()) or type(cause).__name__
    return None


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store: several processes creating a fresh store at
    once crash in MLflow's schema migrations (queued experiments, parallel stages)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_store_problem(db: Path) -> str | None:
    """None if ``db`` is absent, empty or an MLflow store; else what it is instead (MLflow
    would add its tables to any SQLite file, a user's own database included). Read-only."""
    import sqlite3

    if not db.exists() or (db.is_file() and db.stat().st_size == 0):
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in con.execute(
                "select name from sqlite_master where type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"not a SQLite database ({exc})"
    if tables and not {"experiments", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        return f"not an MLflow store (it holds the table(s) {shown})"
    return None


def client(uri: str | None = None, create: bool = True):
    """An MlflowClient on the project's store, created (migrated) once under a file lock.
    ``create=False`` (for the commands that only read: audit, report): a missing SQLite
    store is a ValueError instead of a new empty store, and no lock is taken, so a store
    on a read-only disk or shared read-only can be read."""
    import logging

    from mlflow.tracking import MlflowClient

    # MLflow announces every migration step at INFO, and logs a database error with its
    # traceback before raising it: the raised error is reported in one line (the traceback
    # with --debug), so both would only be noise
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = uri or default_uri()
    if uri.startswith(("http://", "https://")):
        # a tracking server that is down should fail a stage in seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    db = _sqlite_path(uri)
    problem = sqlite_store_problem(db) if db is not None else None
    if problem:
        raise ValueError(f"{db}: {problem}; saeflow adds MLflow's tables only to a new store "
                         "or an MLflow one (set MLFLOW_TRACKING_URI to another file)")
    if db is None and "://" in uri and not uri.startswith(("http://", "https://", "file:")):
        problem = database_problem(uri)
        if problem:
            raise ValueError(f"MLflow store {redact(uri)}: cannot connect ({problem})")
    if not create and db is not None and not db.exists():
        raise ValueError(f"no MLflow store at {db} (run the pipeline first, or set "
                         "MLFLOW_TRACKING_URI)")
    if not create:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    problem = store_writable(uri)
    if problem:
        raise ValueError(f"MLflow store {uri}: {problem}; the stages record their runs there "
                         "(SAEFLOW_TRACKING=0 runs them without)")
    with _store_lock(uri):
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)  # creates/migrates the tables while locked
    return c


def store_writable(uri: str) -> str | None:
    """None if the records can be written as far as can be told without writing; else why
    not (a SQLite store's file or folder is read-only)."""
    db = _sqlite_path(uri)
    for path in (db, db.parent) if db is not None else ():
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} is read-only"
    return None


def _check_artifacts_writable(c, exp_id: str) -> None:
    """A local artifact folder must be writable before a stage starts its work."""
    from urllib.parse import urlparse

    if c.tracking_uri.startswith(("http://", "https://")):
        return  # a tracking server stores (and serves) the artifacts: no local folder
    location = c.get_experiment(exp_id).artifact_location or ""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # a server's or an object store's: the first upload tells
    folder = Path(parsed.path if parsed.scheme else location)
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"MLflow artifact folder {location}: cannot write in {folder}; "
                         "nothing was written")


def experiment_id(c, name: str, root: Path | None = None) -> str:
    """The experiment's id, creating it with artifacts under the project (for SQLite)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _sqlite_path(c.tracking_uri) is not None:
        location = str((root or project_root()) / "mlartifacts")
    from mlflow.exceptions import MlflowException

    # a file lock serialises creators of a SQLite store; a server answers a second creator
    # "already exists", and that creator then takes the experiment the first one made
    with _store_lock(c.tracking_uri):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return c.get_experiment_by_name(name).experiment_id


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """params.yaml as MLflow params: ``section.key`` -> string (lists/mappings as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = str(value)
    return out


def run_name(params: dict[str, Any], suffix: str = "") -> str:
    """A readable run name from the training settings, e.g. ``kl-beta3.0-rho0.01``."""
    t = params.get("train") or {}
    penalty = t.get("penalty", "kl")
    if penalty == "kl":
        name = f"kl-beta{t.get('beta', 3.0)}-rho{t.get('rho', 0.01)}"
    elif penalty == "l1":
        name = f"l1-{t.get('l1_coefficient')}"
    else:
        name = f"topk-k{t.get('k')}"
    return name + suffix


def git_tags() -> dict[str, str]:
    """The commit the code came from, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=os.getcwd(), capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    tags = {"git.commit": commit or "unknown"}
    if commit:
        tags["git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc.experiment"] = exp
    return tags


def _set_params(c, run_id: str, params: dict[str, str]) -> None:
    """The params, each value cut to MLflow's 6,000 characters (``log_batch`` splits them
    into requests of MLflow's own batch size)."""
    from mlflow.entities import Param

    c.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in sorted(params.items())])


def _log_metrics(c, run_id: str, metrics: dict[str, Any], prefix: str) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}{k}", float(v), now, 0) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if items:
        c.log_batch(run_id, metrics=items)


def open_run(c, experiment: str, *, params: dict[str, Any], tags: dict[str, str],
             run_name: str | None = None) -> str:
    """Start a pipeline run (train, before its work): all params, provenance tags and who
    ran it (the tracking server's user name in team mode, else the login name); returns
    its id. The model's sha256 is tagged once the model exists (:func:`tag_model`)."""
    import getpass

    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    exp_id = experiment_id(c, experiment)
    _check_artifacts_writable(c, exp_id)
    run = c.create_run(exp_id, run_name=run_name, tags={"mlflow.user": user, **tags})
    _set_params(c, run.info.run_id, flatten(params))
    return run.info.run_id


def tag_model(c, run_id: str, model_sha256: str) -> None:
    """Mark the run as the one that trained the model with these weights."""
    c.set_tag(run_id, MODEL_TAG, model_sha256)


@contextmanager
def failed_on_error(c, run_id: str | None) -> Iterator[None]:
    """End the run FAILED if the stage's work raises (the error itself goes on)."""
    try:
        yield
    except BaseException:
        if c is not None and run_id is not None:
            try:
                c.set_terminated(run_id, "FAILED")
            except Exception:  # the stage's own error is the one to report
                pass
        raise


def complete_stage(c, run_id: str, stage: str) -> None:
    """Add ``stage`` to the run's ``saeflow.stages`` and end the run FINISHED."""
    done = [s for s in c.get_run(run_id).data.tags.get("saeflow.stages", "").split(",") if s]
    if stage not in done:
        c.set_tag(run_id, "saeflow.stages", ",".join([*done, stage]))
    c.set_terminated(run_id, "FINISHED")


def attach_run(c, experiment: str, *, model_sha256: str, params: dict[str, Any],
               section: str, tags: dict[str, str]) -> str:
    """The run that trained this model, for a later stage to add to: among the runs tagged
    with its sha256 (newest first, those of the same DVC experiment preferred), the first
    whose recorded ``section`` params equal the current ones. If none matches (only this
    stage re-ran, with changed settings), a new run is opened for the model -- all params,
    the git and data tags, ``saeflow.trained_in`` = the training run -- so that no run mixes
    two settings. Called before the stage's work; :func:`complete_stage` after it."""
    exp_id = experiment_id(c, experiment)
    _check_artifacts_writable(c, exp_id)
    runs = c.search_runs([exp_id], filter_string=f"tags.`{MODEL_TAG}` = '{model_sha256}'",
                         order_by=["attributes.start_time DESC"], max_results=50)
    exp = os.environ.get("DVC_EXP_NAME")
    runs.sort(key=lambda r: r.data.tags.get("dvc.experiment") != exp)  # stable: newest first
    mine = flatten({section: params.get(section, {})})
    for run in runs:
        if all(run.data.params.get(k) in (None, v) for k, v in mine.items()):
            missing = {k: v for k, v in mine.items() if k not in run.data.params}
            if missing:
                _set_params(c, run.info.run_id, missing)
            for k, v in tags.items():
                c.set_tag(run.info.run_id, k, v)
            return run.info.run_id
    trained = next((r for r in runs if "train" in r.data.tags.get("saeflow.stages", "")), None)
    extra = {TRAINED_IN_TAG: trained.info.run_id} if trained else {}
    if trained and "saeflow.dataset_sha256" in trained.data.tags:
        extra["saeflow.dataset_sha256"] = trained.data.tags["saeflow.dataset_sha256"]
    run_id = open_run(c, experiment, params=params, tags={**git_tags(), **tags, **extra},
                      run_name=run_name(params, f"-{section}"))
    tag_model(c, run_id, model_sha256)
    return run_id


def log_stage(c, run_id: str, stage: str, *, metrics: dict[str, Any] | None = None,
              artifacts: dict[str, str | os.PathLike] | None = None) -> None:
    """A stage's metrics (as ``<stage>/<key>``) and files (under ``<stage>/``)."""
    _log_metrics(c, run_id, metrics or {}, f"{stage}/")
    for path in (artifacts or {}).values():
        p = Path(path)
        if p.is_dir():
            c.log_artifacts(run_id, str(p), f"{stage}/{p.name}")
        elif p.exists():
            c.log_artifact(run_id, str(p), stage)


def register_model(c, run_id: str, model_dir: str | os.PathLike, name: str,
                   version_tags: dict[str, str]) -> str:
    """:func:`log_model`, then :func:`register_version`; returns the version."""
    return register_version(c, log_model(c, run_id, model_dir), name, version_tags)


def log_model(c, run_id: str, model_dir: str | os.PathLike) -> str:
    """Log the model to the run as an MLflow pyfunc (defined from code: nothing pickled)
    holding the saeflow model folder; returns its ``models:/<model id>`` URI, which is
    also the run's ``saeflow.model_uri`` tag."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import infer_signature

    code = Path(__file__).with_name("mlflow_model.py")
    s, n = json.loads((Path(model_dir) / "config.json").read_text())["shapes"]["W1"]
    # inputs (batch, n) in [0, 1] -> hidden activations (batch, s)
    signature = infer_signature(np.full((1, n), 0.5), np.zeros((1, s)))
    with fluent_api_at(c), quiet():
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(code), artifacts={"sae": str(model_dir)},
                pip_requirements=["saeflow"], signature=signature)
    # a run ended by the fluent API is FINISHED; later stages keep adding to it
    c.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def register_version(c, model_uri: str, name: str, version_tags: dict[str, str]) -> str:
    """Register a logged model (:func:`log_model`'s URI) under ``name`` and tag the
    version; returns the version."""
    import mlflow

    with fluent_api_at(c), quiet():
        # the tags go in with the version: one write, not one request per tag
        return str(mlflow.register_model(model_uri, name, tags=version_tags).version)


URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_api_at(c) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) pointed at the client's own store
    for the duration, then put back as it was. ``mlflow.set_tracking_uri`` and
    ``set_registry_uri`` are process-wide and also export ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI`` to every later subprocess: left set, they would send a later
    client made without a registry URI, or a child process, to this store."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_uri, registry_uri = tracking_utils._tracking_uri, registry_utils._registry_uri
    environ = {k: os.environ.get(k) for k in URI_VARIABLES}
    mlflow.set_tracking_uri(c.tracking_uri)
    mlflow.set_registry_uri(c._registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_uri)  # None: MLflow's default again
        registry_utils._registry_uri = registry_uri
        for k, v in environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def quiet() -> Iterator[None]:
    """Silence MLflow's progress bars and notices on stdout/stderr for the duration."""
    import contextlib
    import io

    sink = io.StringIO()
    prev = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        if prev is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = prev

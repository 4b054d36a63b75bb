"""Recording to MLflow: the experiment-creation race on a tracking server."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_ALREADY_EXISTS

from flows import tracking


class _Experiment:
    experiment_id = "7"


class _RacingClient:
    """A server client on which another process creates the experiment between this
    process's lookup and its create call."""

    tracking_uri = "http://tracking.invalid:5000"

    def __init__(self, error_code: int = RESOURCE_ALREADY_EXISTS) -> None:
        self.lookups, self.error_code, self.creates = 0, error_code, 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        return _Experiment() if self.creates else None  # the other process won

    def create_experiment(self, name, artifact_location=None):
        assert artifact_location is None  # a server chooses (and serves) the location
        self.creates += 1
        raise MlflowException("already exists", error_code=self.error_code)


def test_a_lost_creation_race_takes_the_winners_experiment():
    c = _RacingClient()
    assert tracking.experiment_id(c, "saeflow") == "7"
    assert c.creates == 1 and c.lookups == 3


def test_other_creation_errors_are_not_swallowed():
    with pytest.raises(MlflowException, match="already exists"):
        tracking.experiment_id(_RacingClient(PERMISSION_DENIED), "saeflow")


@pytest.mark.parametrize("content", ["tables", "text"])
def test_a_foreign_sqlite_file_is_refused_and_left_as_it_was(tmp_path, monkeypatch, content):
    """MLflow adds its tables to any SQLite file it is pointed at; saeflow refuses a
    database that is not MLflow's (and a file that is no database) in one line."""
    import sqlite3

    db = tmp_path / "mine.db"
    if content == "tables":
        with sqlite3.connect(db) as con:
            con.execute("create table notes (text)")
            con.execute("insert into notes values ('keep me')")
        con.close()
    else:
        db.write_text("just text\n" * 100)
    before = db.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    expected = (r"not an MLflow store \(it holds the table\(s\) notes\)" if content == "tables"
                else r"not a SQLite database \(file is not a database\)")
    with pytest.raises(ValueError, match=rf"mine.db: {expected}; saeflow adds MLflow's "
                       "tables only to a new store") as info:
        tracking.client()
    assert "\n" not in str(info.value)
    assert db.read_bytes() == before
    assert not (tmp_path / "mine.db.lock").exists()


def test_a_new_or_mlflow_store_is_accepted(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_experiment("x")
    assert tracking.sqlite_store_problem(tmp_path / "mlflow.db") is None
    assert tracking.client(uri).get_experiment_by_name("x") is not None


# --------------------------------------------------------------- store errors, in one line
def test_a_database_error_becomes_one_line_with_its_root_cause(tmp_path):
    """SQLAlchemy's message carries the SQL statement and a help link over several lines:
    the user sees the store and the driver's cause."""
    import sqlite3

    import sqlalchemy

    db = tmp_path / "store.db"
    sqlite3.connect(db).execute("create table t(x)").connection.close()
    engine = sqlalchemy.create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
    with pytest.raises(sqlalchemy.exc.OperationalError) as info, engine.connect() as con:
        con.execute(sqlalchemy.text("insert into t values (1)"))
    engine.dispose()
    assert "[SQL:" in str(info.value)
    line = tracking.store_error(info.value, f"sqlite:///{db}")
    assert line == f"MLflow store sqlite:///{db}: attempt to write a readonly database"
    assert tracking.store_error(ValueError("not a store error")) is None


def test_a_store_that_does_not_answer_fails_fast_without_its_password():
    """MLflow retries a database that does not answer ten times, for about 100 s; saeflow
    asks it once (5 s timeout) and names the store with the password masked."""
    import time

    from support import free_port

    uri = f"postgresql+psycopg://me:secret@127.0.0.1:{free_port()}/mlflow"
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        tracking.client(uri)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert message.startswith("MLflow store postgresql+psycopg://me:***@127.0.0.1:")
    assert "secret" not in message and "cannot connect" in message and "\n" not in message


def test_a_failed_fit_leaves_a_failed_run_and_no_outputs(tmp_path, monkeypatch):
    """The run is opened before the work (so a store that cannot take it stops the stage
    before anything is written); a fit that then diverges ends it FAILED, with no output."""
    import numpy as np
    import yaml
    from mlflow.tracking import MlflowClient

    from flows.train import train
    from sae_core.patch_store import write_patch_store

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SAEFLOW_TRACKING", raising=False)
    rng = np.random.default_rng(0)
    write_patch_store("patches.arrow", rng.uniform(0.1, 0.9, (300, 16)).astype(np.float32),
                      rng.uniform(0.1, 0.9, (50, 16)).astype(np.float32),
                      {"patch_size": 4}, "0" * 64, patch_shape=(4, 4))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {
        "n_components": 8, "solver": "adam", "learning_rate": 1e6, "max_iter": 3}}))
    with pytest.raises(FloatingPointError, match="loss became"):
        train("patches.arrow", "model", "train.json", "loss.csv", "dynamics.parquet")
    assert not any((tmp_path / p).exists() for p in ("model", "train.json", "loss.csv",
                                                     "dynamics.parquet"))
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("saeflow").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "saeflow.model_sha256" not in runs[0].data.tags


def test_registering_leaves_no_store_behind_in_the_process(tmp_path, monkeypatch, small_X):
    """log_model and register_version point MLflow's process-wide fluent API at their
    client's store only while they run: afterwards a client made without a registry URI,
    and any child process, still reach the store they did before."""
    import os

    import mlflow
    from mlflow import MlflowClient

    from sae_core import SparseAutoencoder

    for k in tracking.URI_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    SparseAutoencoder(n_components=3, max_iter=2, random_state=0).fit(small_X).save("model")
    a, b = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    ca = tracking.client(a)
    run = ca.create_run(ca.create_experiment("e", artifact_location=str(tmp_path / "art")))
    version = tracking.register_model(ca, run.info.run_id, "model", "m", {"beta": "3"})
    assert version == "1" and ca.get_model_version("m", "1").tags["beta"] == "3"
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert not {k for k in tracking.URI_VARIABLES if k in os.environ}
    tracking.client(b)  # an empty store: a client of it without a registry URI finds none
    assert MlflowClient(tracking_uri=b).search_model_versions("name = 'm'") == []

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

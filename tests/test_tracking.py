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

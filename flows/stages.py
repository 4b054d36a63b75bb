"""The five stages: which flow runs each and which dvc.yaml paths it takes.

This table is what ``saeflow stage NAME`` parses its options from, without importing the
flow modules (so ``saeflow --help`` stays instant); a test checks it against the flows'
signatures and against dvc.yaml.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    """The module defining ``<name>_flow`` (a Prefect flow) and ``<name>`` (its body)."""
    inputs: tuple[str, ...]
    """Names of the ``paths`` in dvc.yaml that the stage reads."""
    outputs: tuple[str, ...]
    """Names of the ``paths`` in dvc.yaml that the stage writes."""
    help: str
    optional: tuple[str, ...] = ()
    """Paths the stage can do without (their outputs are then not written)."""

    @property
    def path_args(self) -> tuple[str, ...]:
        return self.inputs + self.outputs

    def flow(self):
        """The Prefect flow object (imports the stage module, hence prefect)."""
        return getattr(importlib.import_module(self.module), f"{self.name}_flow")

    def body(self):
        """The function the flow wraps: the stage's work, callable without Prefect."""
        return getattr(importlib.import_module(self.module), self.name)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "flows.ingest", (), ("images", "images_manifest", "labeled",
                                         "labeled_manifest"),
          "read params.yaml's sources into the image and labeled datasets",
          optional=("labeled", "labeled_manifest")),
    Stage("patches", "flows.patches", ("images",), ("patches", "transform"),
          "cut, whiten and normalise patches into the patch store"),
    Stage("train", "flows.train", ("patches",),
          ("model", "train_metrics", "loss_csv", "dynamics"),
          "fit the sparse autoencoder (recording its units' dynamics); open the MLflow run "
          "and register the model"),
    Stage("evaluate", "flows.evaluate", ("model", "patches", "dynamics"),
          ("sparsity_metrics", "units", "filters_png", "rho_hat_png", "rho_hat_csv",
           "loss_png", "reconstructions_png", "dynamics_png"),
          "sparsity statistics on held-out patches, filter grid, rho_hat histogram and the "
          "units' dynamics"),
    Stage("score", "flows.score", ("model", "labeled", "transform", "patches"),
          ("score_metrics",),
          "SAE features against raw pixels with a linear classifier"),
)
BY_NAME = {s.name: s for s in STAGES}


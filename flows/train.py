"""Stage 3, train: the patch store + params.yaml ``train`` -> the fitted sparse autoencoder
(safetensors + config.json), ``metrics/train.json``, the per-iteration loss terms (CSV) and
the hidden units' dynamics over training (Parquet, :mod:`sae_core.dynamics`, sampled every
``train.dynamics_every`` iterations).

It opens the pipeline's MLflow run: all params, provenance tags, the training metrics, and
the model, registered with its sparsity settings as version tags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import flow

from flows import tracking
from flows.lineage import lineage_tags
from flows.project import pipeline_paths, project_root
from flows.stage_support import (
    compute_timer,
    model_sha256,
    prefect_tags,
    read_section,
    tracking_enabled,
    tracking_settings,
)
from sae_core.outputs import json_with_keys

TRAIN_METRICS = ("loss", "reconstruction", "weight_decay", "sparsity")
METRICS = json_with_keys("saeflow training metrics (JSON)", "loss", "iterations")
"""The kind of file the training metrics are written to."""
EVERY_KEY = "dynamics_every"
"""The one setting of the ``train`` section that is the stage's, not the model's."""


def _allowed() -> set[str]:
    from sae_core.config import SAEConfig

    return set(SAEConfig.__dataclass_fields__) | {EVERY_KEY}


def train_settings(section: dict, where: str) -> tuple[dict, int]:
    """A ``train`` section as (the model's settings, the dynamics sampling interval);
    a bad interval is a one-line ValueError naming ``where`` (a params file, a point)."""
    from sae_core.dynamics import DEFAULT_EVERY, check_every

    cfg = dict(section)
    try:
        every = check_every(cfg.pop(EVERY_KEY, DEFAULT_EVERY), f"train.{EVERY_KEY}")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return cfg, every


class _Progress:
    """A one-line progress report on stderr every ``every`` iterations (a Trainer callback)."""

    def __init__(self, total: int, every: int = 50) -> None:
        self.total, self.every = total, every

    def on_fit_start(self, trainer) -> None:
        pass

    def on_iteration_end(self, trainer) -> None:
        if trainer.iteration % self.every == 0:
            h = trainer.history[-1]
            print(f"train: iteration {trainer.iteration}/{self.total} loss {h['loss']:.5f}",
                  file=sys.stderr, flush=True)

    def on_fit_end(self, trainer) -> None:
        pass


def train(patches: str, model: str, train_metrics: str, loss_csv: str, dynamics: str,
          params_file: str = "params.yaml") -> dict:
    """Fit ``SparseAutoencoder(**params['train'])`` on the store's training patches.

    Order: settings, paths and the patch store are checked, then the MLflow run is opened
    (a store that cannot take it fails the stage here), then the fit and the outputs; a
    failure after the run was opened ends it FAILED."""
    from sae_core import SparseAutoencoder
    from sae_core.config import SAEConfig
    from sae_core.dynamics import DYNAMICS, DynamicsRecorder, write_dynamics
    from sae_core.io import MODEL, write_json
    from sae_core.outputs import check_paths
    from sae_core.patch_store import read_patch_store
    from sae_core.tables import LOSS_CSV, write_loss_csv

    c = tracking.client() if tracking_enabled() else None
    params, cfg = read_section(params_file, "train", _allowed())
    cfg, every = train_settings(cfg, params_file)
    try:
        config = SAEConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{params_file}: train: {exc}") from None
    check_paths(inputs={"params": params_file, "patches": patches},
                outputs={"model": (model, MODEL), "train_metrics": (train_metrics, METRICS),
                         "loss_csv": (loss_csv, LOSS_CSV), "dynamics": (dynamics, DYNAMICS)})
    store = read_patch_store(patches)
    # the git state is read before any output exists (outputs make the tree look modified)
    run_id, tags = _open_run(c, params, store, patches, params_file) if c is not None \
        else (None, {})
    with tracking.failed_on_error(c, run_id), compute_timer("train") as timer:
        rows = store.rows("train")
        recorder = DynamicsRecorder(rows, every=every, seed=config.random_state or 0)
        sae = SparseAutoencoder(**cfg, callbacks=[_Progress(config.max_iter), recorder])
        # a RowSource: Adam streams it when it exceeds train.memory_budget (train.loader)
        sae.fit(rows)
        sae.callbacks = None
        sae.save(model)
    with tracking.failed_on_error(c, run_id):
        last = sae.history_[-1]
        result = {k: float(last[k]) for k in TRAIN_METRICS}
        result["iterations"] = int(sae.n_iter_)
        # the fit's wall time is a metric of the run, not of the data: it is the one key
        # here that differs between two identical runs (metrics files are not DVC-cached)
        result["seconds"] = round(timer["seconds"], 3)
        write_json(train_metrics, result, METRICS)
        write_loss_csv(loss_csv, sae.history_)
        write_dynamics(dynamics, recorder.result())
        n = sae.n_features_in_
        print(f"train: {n}-{sae.n_components}-{n} {sae.penalty} model, {sae.n_iter_} iterations "
              f"({sae.stop_reason_ or 'max_iter'}) in {timer['seconds']:.2f} s; "
              f"loss {result['loss']:.5f} -> {model}")
        if c is not None:
            _record(c, run_id, tags, params, store, sae, model, train_metrics, loss_csv,
                    dynamics, patches, result)
    return result


def _open_run(c, params, store, patches, params_file) -> tuple[str, dict[str, str]]:
    """Open the training run (before any output is written): (run id, its tags)."""
    experiment, _ = tracking_settings(params)
    data = lineage_tags(project_root(), _data_inputs(patches, store, params_file))
    tags = {**tracking.git_tags(), **data, **prefect_tags("train"),
            "saeflow.dataset_sha256": store.source_sha256}
    return tracking.open_run(c, experiment, params=params, tags=tags,
                             run_name=tracking.run_name(params)), tags


def _data_inputs(patches: str, store, params_file: str) -> list[str]:
    """The files the model is made from: the patch store, and the dataset it was cut from
    when dvc.yaml's dataset is that one (the store records the dataset's sha256)."""
    from sae_core.io import sha256_file

    dvc_yaml = Path(params_file).resolve().parent / "dvc.yaml"
    inputs = [patches]
    try:
        images = pipeline_paths(dvc_yaml)["images"]
    except (ValueError, KeyError):
        return inputs
    path = os.path.relpath(dvc_yaml.parent / images)
    if os.path.isfile(path) and sha256_file(path) == store.source_sha256:
        inputs.append(path)
    return inputs


def _record(c, run_id, tags, params, store, sae, model, metrics, loss_csv, dynamics, patches,
            result) -> None:
    _, registered = tracking_settings(params)
    data = {k: v for k, v in tags.items() if k.startswith("dvc.")}
    sha = model_sha256(model)
    tracking.tag_model(c, run_id, sha)
    tracking.log_stage(c, run_id, "train", metrics=result,
                       artifacts={"metrics": metrics, "loss": loss_csv, "dynamics": dynamics})
    settings = {k: str(getattr(sae, k)) for k in tracking.SETTINGS}
    version = tracking.register_model(c, run_id, model, registered, {
        **settings, **data, "data.md5": data[f"dvc.md5:{Path(patches).as_posix()}"],
        "dataset_sha256": store.source_sha256, "git.commit": tags["git.commit"],
        "model_sha256": sha, "run_id": run_id})
    tracking.complete_stage(c, run_id, "train")
    print(f"train: MLflow run {run_id}; registered {registered} version {version}")


train_flow = flow(name="train", log_prints=False, persist_result=False)(train)

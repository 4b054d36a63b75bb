"""Stage 3, train: the patch store + params.yaml ``train`` -> the fitted sparse autoencoder
(safetensors + config.json), ``metrics/train.json`` and the per-iteration loss terms (CSV).

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

TRAIN_METRICS = ("loss", "reconstruction", "weight_decay", "sparsity")


def _allowed() -> set[str]:
    from sae_core.config import SAEConfig

    return set(SAEConfig.__dataclass_fields__)


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


def train(patches: str, model: str, train_metrics: str, loss_csv: str,
          params_file: str = "params.yaml") -> dict:
    """Fit ``SparseAutoencoder(**params['train'])`` on the store's training patches."""
    from sae_core import SparseAutoencoder
    from sae_core.config import SAEConfig
    from sae_core.io import check_model_target, write_json
    from sae_core.patch_store import read_patch_store
    from sae_core.plots import write_loss_csv

    # the store is opened (and checked) and the code's git state read before any output
    # is written (the outputs themselves would make the tree look modified)
    c = tracking.client() if tracking_enabled() else None
    git = tracking.git_tags() if c is not None else {}
    with compute_timer("train") as timer:
        params, cfg = read_section(params_file, "train", _allowed())
        try:
            config = SAEConfig(**cfg)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{params_file}: train: {exc}") from None
        store = read_patch_store(patches)
        check_model_target(model)  # before the fit: a user's folder there is never replaced
        sae = SparseAutoencoder(**cfg, callbacks=[_Progress(config.max_iter)])
        sae.fit(store.train)
        sae.callbacks = None
        sae.save(model)
        last = sae.history_[-1]
        result = {k: float(last[k]) for k in TRAIN_METRICS}
        result["iterations"] = int(sae.n_iter_)
    # the fit's wall time is a metric of the run, not of the data: it is the one key here
    # that differs between two identical runs (metrics files are not DVC-cached)
    result["seconds"] = round(timer["seconds"], 3)
    write_json(train_metrics, result)
    write_loss_csv(loss_csv, sae.history_)
    n = sae.n_features_in_
    print(f"train: {n}-{sae.n_components}-{n} {sae.penalty} model, {sae.n_iter_} iterations "
          f"({sae.stop_reason_ or 'max_iter'}) in {timer['seconds']:.2f} s; "
          f"loss {result['loss']:.5f} -> {model}")
    if c is not None:
        _record(c, git, params, store, sae, model, train_metrics, loss_csv, patches, result,
                params_file)
    return result


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


def _record(c, git, params, store, sae, model, metrics, loss_csv, patches, result,
            params_file) -> None:
    experiment, registered = tracking_settings(params)
    data = lineage_tags(project_root(), _data_inputs(patches, store, params_file))
    tags = {**git, **data, **prefect_tags("train"),
            "saeflow.dataset_sha256": store.source_sha256}
    sha = model_sha256(model)
    run_id = tracking.open_run(c, experiment, model_sha256=sha, params=params, tags=tags,
                               run_name=tracking.run_name(params))
    tracking.log_stage(c, run_id, "train", metrics=result,
                       artifacts={"metrics": metrics, "loss": loss_csv})
    settings = {k: str(getattr(sae, k)) for k in tracking.SETTINGS}
    version = tracking.register_model(c, run_id, model, registered, {
        **settings, **data, "data.md5": data[f"dvc.md5:{Path(patches).as_posix()}"],
        "dataset_sha256": store.source_sha256, "git.commit": tags["git.commit"],
        "model_sha256": sha, "run_id": run_id})
    print(f"train: MLflow run {run_id}; registered {registered} version {version}")


train_flow = flow(name="train", log_prints=False, persist_result=False)(train)

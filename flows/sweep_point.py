"""One sweep point on a Dask worker: train, evaluate and score, then record it all in the
point's MLflow run (created by the sweep beforehand, so a point that runs again after its
worker died is recorded once, in the same run).

The work is the stages' own (:func:`flows.evaluate.write_evaluation`,
:func:`flows.score.score_model`) on the point's settings, in a temporary folder: the model,
metrics and pictures reach MLflow, and nothing is left on the worker's disk.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import tracking

SWEEP_TAG = "saeflow.sweep_id"
POINT_TAG = "saeflow.point"
POINT_KEY_TAG = "saeflow.point_key"
SETTINGS_TAG = "saeflow.sweep_settings"
ERROR_TAG = "saeflow.error"
WORKER_TAG = "saeflow.worker"
"""Point run tag: ``<worker address> pid <pid>`` of the worker that ran it."""
TRAIN_METRICS = ("loss", "reconstruction", "weight_decay", "sparsity")


class PointFailed(Exception):
    """A point's work raised: the message is the one line recorded on its run."""


@dataclass(frozen=True)
class PointJob:
    """Everything a worker needs for one point (sent to it by Dask, so plain data)."""

    sweep_id: str
    index: int
    settings: dict[str, Any]
    """The point's own settings, ``{"train.beta": 3.0, ...}``."""
    params: dict[str, Any]
    """params.yaml with the point's settings applied."""
    run_id: str
    parent_run_id: str
    tracking_uri: str
    patches: str
    transform: str
    labeled: str
    registered: str | None
    """Register the model under this name (``--register all``); None: only log it."""
    version_tags: dict[str, str] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    """Worker address -> torch threads for a point on it (cores / task slots on its host)."""


def run_point(job: PointJob) -> dict:
    """Train, evaluate and score the point, then record it; returns its status, metrics,
    compute seconds (train + evaluate + score), run id and timing (its worker, when it
    started and ended by the wall clock, the seconds of compute and of recording). A
    failure is recorded on the run (status FAILED, tag ``saeflow.error``) and raised as
    :class:`PointFailed`."""
    from mlflow.tracking import MlflowClient

    started = time.time()  # the wall clock: the sweep lines points up across workers
    c = MlflowClient(tracking_uri=job.tracking_uri, registry_uri=job.tracking_uri)
    address = _use_threads(job.threads)
    if _parent_status(c, job) == "KILLED":
        return {"index": job.index, "status": "KILLED", "run_id": job.run_id}  # cancelled
    c.update_run(job.run_id, status="RUNNING")
    # which worker runs the point (a second attempt, after a worker died, overwrites it)
    c.set_tag(job.run_id, WORKER_TAG, f"{address or 'local'} pid {os.getpid()}")
    with tempfile.TemporaryDirectory(prefix=f"saeflow-point-{job.index}-") as tmp:
        start = time.perf_counter()
        try:
            sae, metrics, files = _compute(job, Path(tmp))
        except Exception as exc:
            line = " ".join(str(exc).split()) or type(exc).__name__
            _end(c, job, "FAILED", {ERROR_TAG: line[:4000]})
            raise PointFailed(f"point {job.index}: {line}") from None
        compute = time.perf_counter() - start
        if _parent_status(c, job) == "KILLED":  # the sweep was cancelled meanwhile
            _end(c, job, "KILLED")
            return {"index": job.index, "status": "KILLED", "run_id": job.run_id}
        recording = time.perf_counter()
        version = _record(c, job, sae, metrics, files, Path(tmp) / "model", compute)
        recorded = time.perf_counter() - recording
    return {"index": job.index, "status": "FINISHED", "run_id": job.run_id,
            "metrics": metrics, "compute_seconds": compute, "version": version,
            "timing": {"worker": address or "local", "started": started, "ended": time.time(),
                       "compute": compute, "record": recorded}}


def _use_threads(threads: dict[str, int]) -> str | None:
    """Torch's threads: this worker's share of its host's cores (no oversubscription).
    Returns the worker's address (None outside a Dask worker)."""
    import torch

    try:
        from distributed import get_worker

        address = get_worker().address
    except (ImportError, ValueError):  # not on a Dask worker (a test calls it directly)
        return None
    n = threads.get(address)
    if n:
        torch.set_num_threads(int(n))
    return address


@functools.lru_cache(maxsize=4)
def _score_inputs(labeled: str, transform: str, patches: str, stamp: tuple) -> dict:
    """The labeled images and transform, read once per worker process (``stamp``: the
    files' mtimes, so a changed file is read again)."""
    from flows.score import read_inputs

    return read_inputs(labeled, transform, patches)


def _compute(job: PointJob, tmp: Path) -> tuple[Any, dict, dict[str, Path]]:
    from flows.evaluate import evaluate_settings, evaluation_patches, write_evaluation
    from flows.score import score_model
    from flows.train import train_settings
    from sae_core import SparseAutoencoder
    from sae_core.config import SAEConfig
    from sae_core.dynamics import DynamicsRecorder, write_dynamics
    from sae_core.patch_store import read_patch_store
    from sae_core.score import ScoreConfig
    from sae_core.tables import write_loss_csv

    where = f"point {job.index}"
    p = job.params
    try:
        model_settings, every = train_settings(p["train"], where)
        SAEConfig(**model_settings)
        score_config = ScoreConfig.from_dict(p["score"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    split, n_pairs = evaluate_settings(p["evaluate"], where)
    store = read_patch_store(job.patches)
    # as the pipeline's stages name them on their MLflow run: train/loss.csv, sparsity/...
    files = {name: tmp / folder / name for folder, names in (
        ("train", ("loss.csv", "dynamics.parquet")),
        ("sparsity", ("sparsity.json", "units.parquet", "filters.png", "rho_hat.png",
                      "rho_hat.csv", "loss.png", "reconstructions.png", "dynamics.png")))
        for name in names}
    for f in files.values():
        f.parent.mkdir(exist_ok=True)
    rows = store.rows("train")
    recorder = DynamicsRecorder(rows, every=every, seed=model_settings.get("random_state") or 0)
    sae = SparseAutoencoder(**model_settings, callbacks=[recorder]).fit(rows)
    sae.callbacks = None
    sae.save(tmp / "model")
    write_loss_csv(files["loss.csv"], sae.history_)
    dynamics = recorder.result()
    write_dynamics(files["dynamics.parquet"], dynamics)
    last = sae.history_[-1]
    train = {k: float(last[k]) for k in TRAIN_METRICS}
    train["iterations"] = int(sae.n_iter_)
    X = evaluation_patches(store, split, job.patches)
    sparsity = write_evaluation(sae, X, tuple(store.patch_shape), split, n_pairs, {
        "sparsity_metrics": files["sparsity.json"], "units": files["units.parquet"],
        "filters_png": files["filters.png"], "rho_hat_png": files["rho_hat.png"],
        "rho_hat_csv": files["rho_hat.csv"], "loss_png": files["loss.png"],
        "reconstructions_png": files["reconstructions.png"],
        "dynamics_png": files["dynamics.png"]}, dynamics=dynamics)
    stamp = tuple(os.stat(f).st_mtime_ns for f in (job.labeled, job.transform, job.patches))
    score = score_model(sae, score_config,
                        **_score_inputs(job.labeled, job.transform, job.patches, stamp))
    return sae, {"train": train, "sparsity": sparsity, "score": score}, files


def _record(c, job: PointJob, sae, metrics: dict, files: dict[str, Path], model: Path,
            compute: float) -> str | None:
    """The point's metrics, pictures and model on its run; the version if registered
    (a version this run already has, from an attempt cut short, is kept, not doubled)."""
    from mlflow.entities import Metric, RunTag

    from flows.stage_support import model_sha256

    sha = model_sha256(model)
    now = int(time.time() * 1000)
    values = {f"{stage}/{k}": v for stage in ("train", "sparsity", "score")
              for k, v in metrics[stage].items()}
    values["sweep/compute_seconds"] = compute
    # one request for every metric and tag, one upload for the files: recording is most
    # of a point's overhead (each request is a transaction on the store)
    # the model first: MLflow copies the run's metrics onto a logged model, so logging
    # it before the metrics skips that copy
    model_uri = tracking.log_model(c, job.run_id, model)
    c.log_batch(job.run_id, metrics=[
        Metric(k, float(v), now, 0) for k, v in sorted(values.items())
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v], tags=[
        RunTag(tracking.MODEL_TAG, sha), RunTag("saeflow.stages", "train,evaluate,score")])
    c.log_artifacts(job.run_id, str(files["loss.csv"].parents[1]))
    version = None
    if job.registered:
        have = c.search_model_versions(f"name = '{job.registered}' and run_id = '{job.run_id}'")
        if have:
            version = str(have[0].version)
        else:
            settings = {k: str(getattr(sae, k)) for k in tracking.SETTINGS}
            version = tracking.register_version(c, model_uri, job.registered, {
                **settings, **job.version_tags,
                "model_sha256": sha, "run_id": job.run_id, SWEEP_TAG: job.sweep_id,
                POINT_TAG: str(job.index)})
    _end(c, job, "FINISHED")
    return version


def _end(c, job: PointJob, status: str, tags: dict[str, str] | None = None) -> None:
    for k, v in (tags or {}).items():
        c.set_tag(job.run_id, k, v)
    c.set_terminated(job.run_id, status)


def _parent_status(c, job: PointJob) -> str:
    return c.get_run(job.parent_run_id).info.status

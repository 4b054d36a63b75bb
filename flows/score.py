"""Stage 5, score: downstream classification with the learned features against raw pixels
on the same split (params.yaml ``score``) -> ``metrics/score.json``. Adds it to the
pipeline's MLflow run."""

from __future__ import annotations

from prefect import flow

from flows import tracking
from flows.lineage import input_hashes
from flows.stage_support import (
    compute_timer,
    model_sha256,
    prefect_tags,
    read_section,
    tracking_enabled,
    tracking_settings,
)


def read_inputs(labeled: str, transform: str, patches: str) -> dict:
    """What scoring a model needs besides the model, read and checked: the labeled images
    (one shape) with their labels, the patches' fitted transform and the patch settings
    (the patch store's own record of them). Keyword arguments of :func:`score_model`."""
    import numpy as np

    from sae_core.dataset import read_dataset
    from sae_core.patch_store import read_patch_store
    from sae_core.patches import PatchConfig
    from sae_core.transform import PatchTransform

    data = read_dataset(labeled)
    if data.labels is None:
        raise ValueError(f"{labeled}: the dataset has no labels")
    shapes = {img.shape for img in data.images}
    if len(shapes) != 1:
        raise ValueError(f"{labeled}: images of {len(shapes)} different shapes; scoring "
                         "needs one shape")
    return {"images": np.stack(data.images), "labels": data.labels,
            "transform": PatchTransform.load(transform),
            "patch_config": PatchConfig.from_dict(read_patch_store(patches).config)}


def score_model(sae, config, *, images, labels, transform, patch_config) -> dict:
    """The score metrics of one model (``ScoreResult.metrics()``): its features of the
    labeled images, (n_images, n_features), against raw pixels, on the split and with the
    classifier of ``config``. Features are extracted on the model's device (CUDA when
    train.device is auto and a GPU is present; the CPU gives the same bytes run to run)."""
    from sae_core.device import resolve_device
    from sae_core.score import score as run_score

    return run_score(sae, images, labels, config, transform=transform,
                     patch_config=patch_config,
                     device=str(resolve_device(sae.device))).metrics()


def score(model: str, labeled: str, transform: str, patches: str, score_metrics: str,
          params_file: str = "params.yaml") -> dict:
    """Features of the labeled images (the model's filters applied as the score settings
    say, with the patches' own transform) against raw pixels, one linear classifier each."""
    from sae_core import SparseAutoencoder
    from sae_core.io import write_json
    from sae_core.outputs import check_paths
    from sae_core.score import SCORE_METRICS, ScoreConfig

    c = tracking.client() if tracking_enabled() else None  # fail fast on a bad store
    params, cfg = read_section(params_file, "score")
    try:
        config = ScoreConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{params_file}: score: {exc}") from None
    check_paths(inputs={"params": params_file, "model": model, "labeled": labeled,
                        "transform": transform, "patches": patches},
                outputs={"score_metrics": (score_metrics, SCORE_METRICS)})
    sae = SparseAutoencoder.load(model)
    inputs = read_inputs(labeled, transform, patches)
    run_id = None
    if c is not None:  # the record is opened before any output is written
        run_id = tracking.attach_run(
            c, tracking_settings(params)[0], model_sha256=model_sha256(model), params=params,
            section="score", tags={**input_hashes([model, labeled, transform, patches]),
                                   **prefect_tags("score")})
    with tracking.failed_on_error(c, run_id):
        with compute_timer("score") as timer:
            metrics = score_model(sae, config, **inputs)
            # timings go to MLflow only: the metrics file stays the same bytes run to run
            timings = {k: metrics.pop(k) for k in list(metrics)
                       if k.endswith("_seconds") or k.endswith("_per_second")}
            write_json(score_metrics, metrics, SCORE_METRICS)
        print(f"score: accuracy {metrics['accuracy']:.4f} with "
              f"{metrics.get('n_features', '?')} SAE features vs {metrics['raw_accuracy']:.4f} "
              f"with raw pixels ({metrics['n_train']} train / {metrics['n_test']} test) -> "
              f"{score_metrics}")
        if c is not None:
            tracking.log_stage(c, run_id, "score", metrics={**metrics, **timings},
                               artifacts={"score": score_metrics})
            tracking.complete_stage(c, run_id, "score")
            print(f"score: added to MLflow run {run_id}")
    return {**metrics, "seconds": timer["seconds"]}


score_flow = flow(name="score", log_prints=False, persist_result=False)(score)

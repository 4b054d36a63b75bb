"""``saeflow summary``: after ``dvc repro``, where the model, metrics and plots are, the key
numbers, and how to open the MLflow and Prefect UIs on them. Standard library + PyYAML."""

from __future__ import annotations

import json
from pathlib import Path

from flows.project import pipeline_paths, project_root
from flows.tracking import default_uri


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def mlflow_ui(uri: str) -> list[str]:
    """How to open the MLflow UI on the store in use: a tracking server is its own UI."""
    where = "(experiment 'saeflow', model 'saeflow-sae')"
    if uri.startswith(("http://", "https://")):
        return [f"  MLflow UI   {uri}   {where}"]
    return [f"  MLflow UI   .venv/bin/mlflow ui --backend-store-uri {uri}",
            f"              then open http://127.0.0.1:5000 {where}"]


def summary_text(dvc_yaml: str = "dvc.yaml") -> str:
    paths = pipeline_paths(dvc_yaml)
    root = project_root()
    train, sparsity, score = (_load(paths[k]) for k in
                              ("train_metrics", "sparsity_metrics", "score_metrics"))
    lines = ["", "saeflow pipeline summary", ""]
    lines.append(f"  model     {paths['model']}/ (safetensors + config.json)")
    lines.append(f"  metrics   {paths['train_metrics']}, {paths['sparsity_metrics']}, "
                 f"{paths['score_metrics']}; per unit: {paths['units']}; over training: "
                 f"{paths['dynamics']}")
    pics = [paths[k] for k in ("filters_png", "rho_hat_png", "loss_png", "reconstructions_png",
                               "dynamics_png")]
    lines.append(f"  plots     {', '.join(pics)}")
    lines.append(f"            {paths['loss_csv']}, {paths['rho_hat_csv']} (dvc plots show)")
    lines.append("")
    if train:
        lines.append(f"  train     loss {train.get('loss', float('nan')):.5f} after "
                     f"{train.get('iterations')} iterations ({train.get('seconds')} s)")
    if sparsity:
        near = sparsity.get("frac_units_near_target")
        lines.append(
            f"  sparsity  rho_hat in [{sparsity.get('rho_hat_min', 0):.4f}, "
            f"{sparsity.get('rho_hat_max', 0):.4f}] (target {sparsity.get('rho')}); "
            + (f"{100 * near:.0f}% of units within [rho/2, 2 rho]; " if near is not None else "")
            + f"{sparsity.get('dead_units')} dead; FVU {sparsity.get('fvu', 0):.3f}")
    if score:
        lines.append(f"  score     accuracy {score.get('accuracy', 0):.4f} with SAE features vs "
                     f"{score.get('raw_accuracy', 0):.4f} with raw pixels "
                     f"(macro-F1 {score.get('macro_f1', 0):.4f} vs "
                     f"{score.get('raw_macro_f1', 0):.4f})")
    lines += [
        "",
        *mlflow_ui(default_uri(root)),
        "  audit       .venv/bin/saeflow audit        (which settings made which model)",
        "  Prefect UI  .venv/bin/saeflow server status  (the Prefect server's UI address, and "
        "every service in use)",
        "  sweep       .venv/bin/saeflow sweep -S train.beta=0.3,1,3,10 -S "
        "train.rho=0.01,0.05   (on Dask; one setting: .venv/bin/dvc exp run -S train.beta=1)",
        "",
    ]
    return "\n".join(lines)

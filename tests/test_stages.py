"""The stage bodies in-process (no Prefect, no MLflow): determinism, and bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from flows.project import pipeline_paths

ROOT = Path(__file__).resolve().parents[1]
PATHS = pipeline_paths(ROOT / "dvc.yaml")


def _params(tmp: Path, **changes) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["patches"].update(n_patches=600, heldout_fraction=0.25)
    params["train"].update(max_iter=15)
    for section, values in changes.items():
        params[section].update(values)
    f = tmp / "params.yaml"
    f.write_text(yaml.safe_dump(params))
    return f


def _run_all(tmp: Path, params: Path) -> dict[str, Path]:
    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from flows.patches import patches
    from flows.score import score
    from flows.train import train

    p = {k: str(tmp / v) for k, v in PATHS.items()}
    ingest(p["images"], p["images_manifest"], p["labeled"], p["labeled_manifest"],
           params_file=str(params))
    patches(p["images"], p["patches"], p["transform"], params_file=str(params))
    train(p["patches"], p["model"], p["train_metrics"], p["loss_csv"], p["dynamics"],
          params_file=str(params))
    evaluate(p["model"], p["patches"], p["dynamics"], p["sparsity_metrics"], p["units"],
             p["filters_png"], p["rho_hat_png"], p["rho_hat_csv"], p["loss_png"],
             p["reconstructions_png"], p["dynamics_png"], params_file=str(params))
    score(p["model"], p["labeled"], p["transform"], p["patches"], p["score_metrics"],
          params_file=str(params))
    return {k: Path(v) for k, v in p.items()}


def _digest(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    import os

    os.environ["SAEFLOW_TRACKING"] = "0"
    try:
        runs = []
        for name in ("a", "b"):
            tmp = tmp_path_factory.mktemp(name)
            runs.append(_run_all(tmp, _params(tmp)))
        return runs
    finally:
        del os.environ["SAEFLOW_TRACKING"]


def test_same_params_same_data_same_bytes(two_runs):
    a, b = two_runs
    for name in PATHS:
        if name == "train_metrics":  # holds the fit's wall time (DESIGN's `seconds`)
            continue
        assert _digest(a[name]) == _digest(b[name]), name


def test_train_metrics_differ_only_in_seconds(two_runs):
    import json

    a, b = (json.loads(r["train_metrics"].read_text()) for r in two_runs)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_missing_patch_store_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from flows.train import train

    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    params = _params(tmp_path)
    with pytest.raises(ValueError, match=r"no-such\.arrow") as info:
        train(str(tmp_path / "no-such.arrow"), str(tmp_path / "model"),
              str(tmp_path / "train.json"), str(tmp_path / "loss.csv"),
              str(tmp_path / "dynamics.parquet"), params_file=str(params))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("section, change, message", [
    ("train", {"rho": 1.5}, "rho"),
    ("train", {"bogus": 1}, "unknown key"),
    ("evaluate", {"split": "nope"}, "split"),
    ("evaluate", {"n_reconstructions": 0}, "n_reconstructions must be an integer >= 1"),
    ("train", {"max_iter": "abc"}, r"params.yaml: train: max_iter"),
    ("train", {"max_iter": None}, r"params.yaml: train: max_iter"),
    ("train", {"dynamics_every": 0}, r"params.yaml: train.dynamics_every must be an integer"),
])
def test_bad_settings_fail_before_writing(two_runs, tmp_path, monkeypatch, section, change,
                                         message):
    from flows.evaluate import evaluate
    from flows.train import train

    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    run = two_runs[0]
    params = _params(tmp_path, **{section: change})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        if section == "train":
            train(str(run["patches"]), str(out / "model"), str(out / "t.json"),
                  str(out / "loss.csv"), str(out / "d.parquet"), params_file=str(params))
        else:
            evaluate(str(run["model"]), str(run["patches"]), str(run["dynamics"]),
                     *(str(out / f"{i}") for i in range(8)), params_file=str(params))
    assert not out.exists()


def test_empty_heldout_split_is_named(two_runs, tmp_path, monkeypatch):
    from flows.evaluate import evaluate
    from flows.patches import patches

    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    params = _params(tmp_path, patches={"heldout_fraction": 0.0})
    store = tmp_path / "p.arrow"
    patches(str(two_runs[0]["images"]), str(store), str(tmp_path / "t.safetensors"),
            params_file=str(params))
    with pytest.raises(ValueError, match="'heldout' split is empty"):
        evaluate(str(two_runs[0]["model"]), str(store), str(two_runs[0]["dynamics"]),
                 *(str(tmp_path / f"o{i}") for i in range(8)), params_file=str(params))


def test_mlflow_runs_across_stages(two_runs, tmp_path, monkeypatch):
    """train opens a run and registers the model; evaluate adds to it; evaluate re-run with
    other settings opens a finished continuation run pointing at the training run. Paths
    may be given as ./relative (the md5 tags use DVC's normalised form)."""
    import shutil

    from flows import tracking
    from flows.evaluate import evaluate
    from flows.lineage import md5_file
    from flows.train import train

    monkeypatch.setenv("SAEFLOW_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAEFLOW_TRACKING", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(two_runs[0]["patches"], tmp_path / "p.arrow")
    params = _params(tmp_path)
    train("./p.arrow", "model", "train.json", "loss.csv", "dynamics.parquet",
          params_file=str(params))
    outs = [f"o{i}.png" if i != 1 else "units.parquet" for i in range(8)]
    outs[0] = "sparsity.json"
    outs[4] = "rho.csv"
    evaluate("model", "./p.arrow", "dynamics.parquet", *outs, params_file=str(params))
    changed = _params(tmp_path, evaluate={"n_reconstructions": 3})
    evaluate("model", "p.arrow", "dynamics.parquet", *outs, params_file=str(changed))
    c = tracking.client()
    exp = c.get_experiment_by_name("saeflow")
    first, second = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert first.data.tags["saeflow.stages"] == "train,evaluate"
    assert first.data.tags["dvc.md5:p.arrow"] == md5_file(tmp_path / "p.arrow")
    assert "sparsity/fvu" in first.data.metrics and "train/loss" in first.data.metrics
    assert "train/dynamics.parquet" in {a.path for a in c.list_artifacts(first.info.run_id,
                                                                         "train")}
    assert "sparsity/o7.png" in {a.path for a in c.list_artifacts(first.info.run_id,
                                                                  "sparsity")}
    assert second.info.status == "FINISHED" and second.data.tags["saeflow.stages"] == "evaluate"
    assert second.data.tags["saeflow.trained_in"] == first.info.run_id
    assert second.data.tags["git.commit"] and second.data.params["evaluate.n_reconstructions"] \
        == "3"
    (version,) = c.search_model_versions("name = 'saeflow-sae'")
    assert version.run_id == first.info.run_id and version.tags["beta"] == "3.0"


def test_train_refuses_a_model_path_holding_user_files_before_fitting(two_runs, tmp_path,
                                                                      monkeypatch):
    """`saeflow stage train --model results` where results/ is the user's: refused before
    the fit, the folder untouched, no metrics or loss file written."""
    from flows.train import train

    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "notes.txt").write_text("my notes")
    params = _params(tmp_path)
    with pytest.raises(ValueError, match=r"results: exists and is not a saeflow model folder "
                       r"\(it holds notes.txt, sub\); nothing was written"):
        train(str(two_runs[0]["patches"]), str(results), str(tmp_path / "t.json"),
              str(tmp_path / "loss.csv"), str(tmp_path / "d.parquet"), params_file=str(params))
    assert sorted(p.name for p in results.rglob("*")) == ["notes.txt", "sub"]
    assert (results / "notes.txt").read_text() == "my notes"
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "loss.csv").exists()
    assert not (tmp_path / "d.parquet").exists()

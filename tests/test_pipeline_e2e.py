"""End to end, as a user runs it: `dvc repro` in a fresh git repository holding a copy of
the project (small settings), then what it left behind: outputs, metrics, the MLflow run and
registered model, `saeflow audit`, a no-op second `dvc repro`, and queued DVC experiments
whose runs land in the project's own MLflow store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support import BIN, clean_env, copy_project, run

DESIGN_KEYS = {
    "train": {"loss", "reconstruction", "weight_decay", "sparsity", "iterations", "seconds"},
    "sparsity": {"rho", "rho_hat_mean", "rho_hat_min", "rho_hat_max", "frac_units_near_target",
                 "dead_units", "kl_total", "l0_mean", "hoyer_mean", "mse", "fvu"},
    "score": {"accuracy", "macro_f1", "raw_accuracy", "raw_macro_f1", "n_train", "n_test"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    env = clean_env(**prefect_server)
    root = copy_project(tmp_path_factory.mktemp("project"), env=env)
    start = time.perf_counter()
    first = run([str(BIN / "dvc"), "repro"], root, env)
    seconds = time.perf_counter() - start
    return {"root": root, "env": env, "first": first, "seconds": seconds}


def _paths(root: Path) -> dict[str, str]:
    from flows.project import pipeline_paths

    return pipeline_paths(root / "dvc.yaml")


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(root: Path):
    c = _client(root)
    exp = c.get_experiment_by_name("saeflow")
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_every_declared_output_exists(project):
    root = project["root"]
    for name, path in _paths(root).items():
        p = root / path
        assert p.exists(), f"{name}: {path} missing"
        assert p.is_dir() or p.stat().st_size > 0, f"{name}: {path} is empty"
    for stage in ("ingest", "patches", "train", "evaluate", "score"):
        assert f"Running stage '{stage}'" in project["first"].stdout


def test_train_records_the_units_dynamics_and_evaluate_draws_them(project):
    """The train stage's dynamics table covers the fit (iteration 0 to the last), shows the
    units driven down, and reaches the MLflow run beside its picture."""
    from sae_core.dynamics import read_dynamics

    root = project["root"]
    dyn = read_dynamics(root / _paths(root)["dynamics"])
    assert dyn.iteration[0] == 0 and dyn.iteration[-1] == 40  # SMALL's max_iter
    assert dyn.rho_hat.shape == (dyn.iteration.size, 25) and dyn.exact
    assert dyn.rho_hat[-1].mean() < dyn.rho_hat[0].mean()
    assert (root / _paths(root)["dynamics_png"]).read_bytes().startswith(b"\x89PNG")
    run = _runs(root)[0]
    c = _client(root)
    assert "train/dynamics.parquet" in {a.path for a in c.list_artifacts(run.info.run_id,
                                                                         "train")}
    assert "sparsity/dynamics.png" in {a.path for a in c.list_artifacts(run.info.run_id,
                                                                        "sparsity")}


def test_metrics_have_the_design_keys_with_sane_values(project):
    root, paths = project["root"], _paths(project["root"])
    train = json.loads((root / paths["train_metrics"]).read_text())
    sparsity = json.loads((root / paths["sparsity_metrics"]).read_text())
    score = json.loads((root / paths["score_metrics"]).read_text())
    assert DESIGN_KEYS["train"] <= set(train)
    assert DESIGN_KEYS["sparsity"] <= set(sparsity)
    assert DESIGN_KEYS["score"] <= set(score)
    assert train["iterations"] == 40
    assert train["loss"] == pytest.approx(
        train["reconstruction"] + train["weight_decay"] + train["sparsity"], rel=1e-6)
    assert sparsity["rho"] == 0.01
    assert 0 < sparsity["rho_hat_min"] <= sparsity["rho_hat_mean"] <= sparsity["rho_hat_max"] < 1
    assert 0 <= sparsity["frac_units_near_target"] <= 1 and sparsity["dead_units"] == 0
    assert 0 < sparsity["fvu"] < 1.5 and sparsity["n_examples"] == 250  # the held-out patches
    assert 0.5 < score["raw_accuracy"] <= 1 and 0 < score["accuracy"] <= 1
    assert score["n_train"] > score["n_test"] > 0


def test_mlflow_run_has_params_tags_metrics_and_model(project):
    root = project["root"]
    (run,) = _runs(root)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["train.beta"] == "3.0" and params["train.rho"] == "0.01"
    assert params["patches.n_patches"] == "1250" and "score.classifier" in params
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
    assert tags["git.commit"] == head
    patches = _paths(root)["patches"]
    md5 = hashlib.md5((root / patches).read_bytes()).hexdigest()
    assert tags[f"dvc.md5:{patches}"] == md5
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    dvc_md5 = {d["path"]: d["md5"] for d in lock["stages"]["train"]["deps"]}
    assert dvc_md5[patches] == md5  # the tag is DVC's own hash of the input
    for stage in ("train", "evaluate", "score"):
        assert tags[f"prefect.flow_run_id.{stage}"]
    assert set(tags["saeflow.stages"].split(",")) == {"train", "evaluate", "score"}
    for key in ("train/loss", "sparsity/rho_hat_mean", "sparsity/fvu", "score/accuracy",
                "score/raw_accuracy"):
        assert key in metrics
    c = _client(root)
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "sparsity")}
    assert "sparsity/filters.png" in artifacts and "sparsity/rho_hat.png" in artifacts


def test_registered_version_carries_the_sparsity_settings(project):
    root = project["root"]
    c = _client(root)
    (version,) = c.search_model_versions("name = 'saeflow-sae'")
    tags = version.tags
    assert (tags["penalty"], tags["rho"], tags["beta"], tags["weight_decay"],
            tags["n_components"]) == ("kl", "0.01", "3.0", "0.0001", "25")
    assert version.run_id == _runs(root)[0].info.run_id
    import mlflow.pyfunc
    import numpy as np

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/saeflow-sae/{version.version}")
    codes = model.predict(np.full((3, 64), 0.5))
    assert codes.shape == (3, 25) and ((codes > 0) & (codes < 1)).all()


def test_audit_lists_the_model(project):
    root, env = project["root"], project["env"]
    done = run([str(BIN / "saeflow"), "audit", "--format", "json"], root, env)
    rows = json.loads(done.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert (row["version"], row["penalty"], row["beta"], row["rho"]) == (1, "kl", 3.0, 0.01)
    assert row["accuracy"] is not None and row["rho_hat_mean"] is not None
    none = run([str(BIN / "saeflow"), "audit", "--format", "json", "--where", "beta<1"],
                root, env)
    assert json.loads(none.stdout) == []


def test_second_repro_runs_no_stage(project):
    root, env = project["root"], project["env"]
    before = len(_runs(root))
    start = time.perf_counter()
    done = run([str(BIN / "dvc"), "repro"], root, env)
    seconds = time.perf_counter() - start
    assert "Running stage" not in done.stdout
    assert len(_runs(root)) == before
    print(f"no-op dvc repro: {seconds:.2f} s")


def test_queued_experiments_land_in_the_project_store(project):
    root, env = project["root"], project["env"]
    before = len(_runs(root))
    for beta in ("1", "0.5"):
        run([str(BIN / "dvc"), "exp", "run", "--queue", "-S", f"train.beta={beta}"], root, env)
    # two queue workers, as a sweep runs them: both write the project's store at once
    run([str(BIN / "dvc"), "queue", "start", "-j", "2"], root, env)
    deadline = time.time() + 600
    asked = 0.0
    while time.time() < deadline:
        # `dvc queue status` costs a second of CPU (DVC's start-up): it is asked every 15 s,
        # or at once when both runs have their score; the store is read every 2 s
        scored = sum("score/accuracy" in r.data.metrics for r in _runs(root)[before:])
        if scored == 2 or time.time() - asked > 15:
            asked = time.time()
            status = run([str(BIN / "dvc"), "queue", "status"], root, env).stdout
            if "Queued" not in status and "Running" not in status:
                break
        time.sleep(2)
    assert "Failed" not in status, status
    runs = _runs(root)
    assert len(runs) == before + 2
    assert sorted(float(r.data.params["train.beta"]) for r in runs[before:]) == [0.5, 1.0]
    for r in runs[before:]:
        assert r.data.tags.get("dvc.experiment")
        assert "score/accuracy" in r.data.metrics
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))


def test_prefect_driven_run_is_recorded_in_mlflow_and_dvc(project, tmp_path):
    """`saeflow pipeline --push`: the stages as subflows of one Prefect flow run, then dvc
    commit, then dvc push to the default remote."""
    root, env = project["root"], project["env"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["max_iter"] = 41  # a change, so that DVC would re-run train
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = tmp_path / "remote"
    run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "mine", str(remote)], root, env)
    before = len(_runs(root))
    done = run([str(BIN / "saeflow"), "pipeline", "--push"], root, env)
    assert "dvc commit" in done.stdout and "dvc push" in done.stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    model = next(o for o in lock["train"]["outs"] if o["path"] == _paths(root)["model"])
    listing = remote / "files" / "md5" / model["md5"][:2] / model["md5"][2:]
    assert listing.is_file(), "the model's directory listing is not in the remote"
    run([str(BIN / "dvc"), "remote", "remove", "--local", "mine"], root, env)
    runs = _runs(root)
    assert len(runs) == before + 1
    tags = runs[-1].data.tags
    assert tags["prefect.flow_run_id.pipeline"] and tags["prefect.flow_run_id.train"]
    assert json.loads((root / _paths(root)["train_metrics"]).read_text())["iterations"] == 41
    status = run([str(BIN / "dvc"), "status"], root, env).stdout
    assert "up to date" in status, status


def test_report_of_a_sweep_and_of_one_run(project):
    root, env = project["root"], project["env"]
    done = run([str(BIN / "saeflow"), "report", "--last", "3", "--out", "sweep.html"],
                root, env)
    assert "3 run(s)" in done.stdout
    page = (root / "sweep.html").read_text()
    assert "sweep over train.beta" in page
    assert "How the sparsity term switches the units off" in page
    assert "the units over training, side by side" in page
    assert "final rho_hat per unit, side by side" in page
    assert page.count("data:image/png;base64,") >= 3 * 4 + 1  # 4 pictures a run + the sweep
    c = _client(root)
    (report_run,) = [r for r in _runs(root) if "saeflow.report_of" in r.data.tags]
    assert len(report_run.data.tags["saeflow.report_of"].split(",")) == 3
    assert [a.path for a in c.list_artifacts(report_run.info.run_id, "report")] == [
        "report/sweep.html"]
    run([str(BIN / "saeflow"), "report", "--out", "one.html"], root, env)
    newest = [r for r in _runs(root) if "sparsity/rho_hat_mean" in r.data.metrics][-1]
    assert "report/one.html" in {a.path for a in c.list_artifacts(newest.info.run_id,
                                                                   "report")}

"""Team mode on real services, as the README's team-mode section sets it up: an MLflow
tracking server on PostgreSQL with basic auth that serves the artifacts itself, a Prefect
server on PostgreSQL with an API auth string, and a shared DVC remote. A project is pointed
at them with environment variables and `dvc remote` alone; `dvc repro` runs; then everything
is looked up through the servers, the data goes through the remote into a second clone, and
eight pipelines at once are all recorded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import (
    BIN,
    Databases,
    clean_env,
    copy_project,
    free_port,
    run,
    wait_for,
)

from flows import servers

ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-tests"
USER, USER_PASSWORD = "alice", "alice-password-for-tests"
PREFECT_AUTH = "team:prefect-password-for-tests"
STAGES = ("ingest", "patches", "train", "evaluate", "score")


def _request(url: str, auth: str | None = None, data: dict | None = None) -> tuple[int, str]:
    return servers._request(url, auth=auth, data=data, timeout=20)


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):
    """The README's servers, each on its own databases and loopback port."""
    tmp = tmp_path_factory.mktemp("team")
    dbs = Databases()
    procs: list[subprocess.Popen] = []
    try:
        mlflow_db, auth_db, prefect_db = dbs.create(), dbs.create(), dbs.create()
        (tmp / "mlflow-auth.ini").write_text(
            "[mlflow]\ndefault_permission = EDIT\n"
            f"database_uri = {dbs.url(auth_db)}\nadmin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n")
        mlflow_port, prefect_port = free_port(), free_port()
        base = clean_env()
        mlflow_env = {**base, "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "mlflow-auth.ini"),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "secret-for-tests"}
        prefect_env = {**base, "PREFECT_HOME": str(tmp / "prefect-server"),
                       "PREFECT_API_DATABASE_CONNECTION_URL": dbs.url(prefect_db, "asyncpg"),
                       "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        logs = {"mlflow": tmp / "mlflow.log", "prefect": tmp / "prefect.log"}
        commands = {
            "mlflow": ([BIN / "mlflow", "server", "--app-name", "basic-auth",
                        "--backend-store-uri", dbs.url(mlflow_db),
                        "--artifacts-destination", tmp / "mlartifacts",
                        "--host", "127.0.0.1", "--port", mlflow_port,
                        "--uvicorn-opts", "--timeout-worker-healthcheck 60"], mlflow_env),
            "prefect": ([BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                         "--port", prefect_port], prefect_env)}
        for name, (cmd, env) in commands.items():
            with open(logs[name], "w") as log:
                procs.append(subprocess.Popen([str(c) for c in cmd], env=env, cwd=tmp,
                                              stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        prefect_url = f"http://127.0.0.1:{prefect_port}/api"
        wait_for(lambda: _request(f"{mlflow_url}/health")[0] == 200, 240, "mlflow server",
                 procs[0], logs["mlflow"])
        wait_for(lambda: servers.prefect_problem(prefect_url, PREFECT_AUTH) is None, 240,
                 "prefect server", procs[1], logs["prefect"])
        # the admin creates a team member (MLflow's REST API), who runs the pipeline
        status, body = _request(f"{mlflow_url}/api/2.0/mlflow/users/create",
                                auth=f"{ADMIN}:{ADMIN_PASSWORD}",
                                data={"username": USER, "password": USER_PASSWORD})
        assert status == 200, body
        remote = tmp / "dvc-remote"
        remote.mkdir()
        client_env = {
            "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_USERNAME": USER,
            "MLFLOW_TRACKING_PASSWORD": USER_PASSWORD, "PREFECT_API_URL": prefect_url,
            "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
            # a local Prefect home of the user's own: team mode must never start a server here
            "PREFECT_HOME": str(tmp / "user-prefect-home")}
        yield {"tmp": tmp, "env": client_env, "mlflow": mlflow_url, "prefect": prefect_url,
               "remote": remote, "logs": logs}
    finally:
        for p in procs:  # each in its own session: its workers go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        dbs.drop_all()


def _server_log(team, name: str = "mlflow", lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log that are not successful requests (for a
    failure message: what the server did while a client waited on it)."""
    text = team["logs"][name].read_text(errors="replace").splitlines()
    kept = [ln for ln in text if '" 200 OK' not in ln and '" 201 ' not in ln]
    return f"\n--- {name} server log (last {lines} lines, requests that failed or none) ---\n" \
        + "\n".join(kept[-lines:])


def _client(team):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"] = USER
    os.environ["MLFLOW_TRACKING_PASSWORD"] = USER_PASSWORD
    return MlflowClient(tracking_uri=team["mlflow"], registry_uri=team["mlflow"])


def _digests(root: Path, paths: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, rel in paths.items():
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.md5()
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
        out[name] = h.hexdigest()
    return out


@pytest.fixture(scope="module")
def repro(team):
    """`dvc repro`, `dvc push` and a commit of dvc.lock, in a project configured by
    environment variables and `dvc remote` alone (the README's member commands)."""
    env = clean_env(**team["env"])
    root = copy_project(team["tmp"] / "alice", env=env)
    run([BIN / "dvc", "remote", "add", "-d", "team", team["remote"]], root, env)
    run(["git", "commit", "-q", "-am", "the team's DVC remote"], root, env)
    status = run([BIN / "saeflow", "server", "status"], root, env, check=False)
    assert status.returncode == 0, status.stdout + status.stderr + _server_log(team)
    first = run([BIN / "dvc", "repro"], root, env)
    push = run([BIN / "dvc", "push"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "pipeline run"], root, env)
    return {"root": root, "env": env, "first": first, "push": push, "status": status}


def test_status_checks_every_team_service(team, repro):
    lines = repro["status"].stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["Prefect", "MLflow", "DVC"]
    assert all(" ok " in ln for ln in lines), lines
    assert f"{team['prefect']}  UI" in lines[0] and f"(user {USER})" in lines[1]
    assert str(team["remote"]) in lines[2]


def test_run_metrics_artifacts_and_version_through_the_mlflow_server(team, repro):
    from flows.project import pipeline_paths

    root = repro["root"]
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    c = _client(team)
    exp = c.get_experiment_by_name("saeflow")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # served by the server
    (r,) = c.search_runs([exp.experiment_id])
    assert r.data.params["train.max_iter"] == "40" and r.data.tags["mlflow.user"] == USER
    for key in ("train/loss", "sparsity/fvu", "score/accuracy"):
        assert key in r.data.metrics
    local = c.download_artifacts(r.info.run_id, "sparsity/filters.png", str(team["tmp"]))
    paths = pipeline_paths(root / "dvc.yaml")
    assert Path(local).read_bytes() == (root / paths["filters_png"]).read_bytes()
    (v,) = c.search_model_versions("name = 'saeflow-sae'")
    tags = c.get_model_version("saeflow-sae", v.version).tags
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    patches_md5 = next(d["md5"] for d in lock["train"]["deps"] if d["path"] == paths["patches"])
    images_md5 = next(d["md5"] for d in lock["patches"]["deps"] if d["path"] == paths["images"])
    assert tags[f"dvc.md5:{paths['patches']}"] == patches_md5
    assert tags[f"dvc.md5:{paths['images']}"] == images_md5
    assert (tags["dvc.remote"], tags["dvc.remote_url"]) == ("team", str(team["remote"]))
    import mlflow.pyfunc
    import numpy as np

    mlflow.set_tracking_uri(team["mlflow"])
    codes = mlflow.pyfunc.load_model(f"models:/saeflow-sae/{v.version}").predict(
        np.full((2, 64), 0.5))
    assert codes.shape == (2, 25)


def test_stage_flow_runs_are_in_the_prefect_server(team, repro):
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs()\n"
            "    flows = {f.id: f.name for f in c.read_flows()}\n"
            "    print(json.dumps([[flows[r.flow_id], str(r.id), r.state.type.value] "
            "for r in runs]))\n")
    env = clean_env(**team["env"])
    done = run([sys.executable, "-c", code], repro["root"], env)
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(name for name, _, _ in runs) == sorted(STAGES)
    assert {state for _, _, state in runs} == {"COMPLETED"}
    (r,) = _client(team).search_runs([_client(team).get_experiment_by_name(
        "saeflow").experiment_id])
    ids = {name: run_id for name, run_id, _ in runs}
    for stage in ("train", "evaluate", "score"):
        assert r.data.tags[f"prefect.flow_run_id.{stage}"] == ids[stage]
    # no local Prefect server was started beside the team's
    assert not (Path(team["env"]["PREFECT_HOME"]) / "server.pid").exists()


def test_a_teammate_pulls_identical_bytes(team, repro):
    from flows.project import pipeline_paths

    root, env = repro["root"], repro["env"]
    paths = pipeline_paths(root / "dvc.yaml")
    clone = team["tmp"] / "bob"
    run(["git", "clone", "-q", root, clone], team["tmp"], env)
    run([BIN / "dvc", "pull"], clone, env)
    cached = {k: v for k, v in paths.items() if (clone / v).exists()}
    # every cached output (data, model, per-unit table) comes back; metrics and plots live
    # in git or are re-made by the stage (cache: false)
    assert {"images", "labeled", "patches", "transform", "model", "units"} <= set(cached)
    assert _digests(clone, cached) == _digests(root, cached)
    status = run([BIN / "dvc", "status"], clone, env).stdout
    assert "changed outs" not in status


def test_requests_without_credentials_are_refused(team, repro):
    search = f"{team['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _request(search)[0] == 401
    assert _request(search, auth=f"{USER}:wrong")[0] == 401
    assert _request(search, auth=f"{USER}:{USER_PASSWORD}")[0] == 200
    flows_url = f"{team['prefect']}/flows/filter"
    assert _request(flows_url, data={"limit": 1})[0] == 401
    assert _request(flows_url, auth=PREFECT_AUTH, data={"limit": 1})[0] == 200
    env = clean_env(**{k: v for k, v in team["env"].items()
                       if k not in ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")})
    done = run([BIN / "saeflow", "server", "status"], repro["root"], env, check=False)
    assert done.returncode == 1
    assert "FAIL" in done.stdout and "credentials" in done.stdout
    stage = run([BIN / "saeflow", "stage", "train", "--patches", "data/patches.arrow",
                 "--model", "m2", "--train-metrics", "t2.json", "--loss-csv", "l2.csv",
                 "--dynamics", "d2.parquet"],
                repro["root"], env, check=False)
    assert stage.returncode != 0 and "Traceback" not in stage.stderr
    assert "401" in stage.stderr or "credentials" in stage.stderr, stage.stderr
    assert not (repro["root"] / "m2").exists()


def test_eight_pipelines_at_once_are_all_recorded_on_the_server(team, tmp_path):
    from support import check_concurrent_runs, start_concurrent_pipelines

    env = clean_env(**team["env"])
    results = start_concurrent_pipelines(tmp_path, env, registered="saeflow-team-8")
    try:
        check_concurrent_runs(_client(team), results, registered="saeflow-team-8")
    except AssertionError as exc:
        raise AssertionError(f"{exc}{_server_log(team)}") from None


def test_no_server_worker_was_killed(team):
    """Last in the module, after the eight pipelines: uvicorn's supervisor kills an MLflow
    worker that does not answer its ping in time (5 s unless the README's
    --timeout-worker-healthcheck), and on a busy machine its replacement, still importing,
    is killed again: the server stops answering. None may have died."""
    log = team["logs"]["mlflow"].read_text(errors="replace")
    assert "Uvicorn running" in log
    died = [ln for ln in log.splitlines() if "died" in ln]
    assert not died, "\n".join(died) + _server_log(team)

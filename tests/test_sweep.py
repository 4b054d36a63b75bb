"""Sweeps as a user runs them: `saeflow sweep` in a DVC + git project, on a local Dask
cluster and on an existing one (`dask scheduler` + `dask worker` processes started here on
loopback), on the session's Prefect server and the project's MLflow store.

The tests of this module run in order on one project. The grid's parsing, the keys and
the thread division are unit-tested at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import yaml
from support import BIN, TINY, clean_env, copy_project, free_port, run, wait_for

from flows.sweep import point_overhead, resources_of_points, torch_threads
from flows.sweep_grid import apply_point, parse_grid, point_key, read_sweep_file

GRID = ["-S", "train.beta=1,3", "-S", "train.rho=0.01,0.05"]


@pytest.fixture(scope="module")
def project(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "proj"
    env = clean_env(**prefect_server)
    copy_project(root, TINY, env)
    return {"root": root, "env": env}


def _saeflow(project, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
    return run([BIN / "saeflow", *args], project["root"], project["env"], timeout=timeout,
               check=check)


def _client(project):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project['root'] / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _sweep_id(out: str) -> str:
    line = next(x for x in out.splitlines() if x.startswith("sweep ") and "points," in x)
    return line.split()[1].rstrip(":")


def _runs(project, sweep_id: str, kind: str) -> list:
    c = _client(project)
    exp = c.get_experiment_by_name("saeflow")
    return c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`saeflow.sweep_id` = '{sweep_id}' and tags.`saeflow.kind` = '{kind}'"))


@pytest.fixture(scope="module")
def first(project):
    """The 4-point beta x rho sweep on a local cluster of 2 workers."""
    done = _saeflow(project, "sweep", *GRID, "--workers", "2")
    return {"done": done, "id": _sweep_id(done.stdout)}


def test_a_4_point_sweep_on_2_local_workers_gives_4_children_under_one_parent(project, first):
    sid = first["id"]
    (parent,) = _runs(project, sid, "sweep")
    children = _runs(project, sid, "point")
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    seen = set()
    for r in children:
        assert r.info.status == "FINISHED"
        settings = json.loads(r.data.tags["saeflow.sweep_settings"])
        # each child's params are its point's settings (the others are params.yaml's)
        assert float(r.data.params["train.beta"]) == settings["train.beta"]
        assert float(r.data.params["train.rho"]) == settings["train.rho"]
        assert r.data.params["train.max_iter"] == "10"
        seen.add((settings["train.beta"], settings["train.rho"]))
        for key in ("train/loss", "sparsity/rho_hat_mean", "score/accuracy"):
            assert key in r.data.metrics
        # the rho_hat the point measured is near the rho it was given
        assert r.data.metrics["sparsity/rho_hat_mean"] == pytest.approx(
            settings["train.rho"], rel=0.5)
        pictures = {a.path for a in _client(project).list_artifacts(r.info.run_id, "sparsity")}
        assert "sparsity/filters.png" in pictures
    assert seen == {(1, 0.01), (1, 0.05), (3, 0.01), (3, 0.05)}
    # every point's model is registered (the default) and tagged with the sweep
    versions = _client(project).search_model_versions(
        f"name = 'saeflow-sae' and tags.`saeflow.sweep_id` = '{sid}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in children)
    table = (project["root"] / "sweeps" / f"{sid}.csv").read_text().splitlines()
    assert table[0].startswith("point,train.beta,train.rho,status") and len(table) == 5
    # the same table as a Prefect artifact
    port = project["env"]["PREFECT_SERVER_API_PORT"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/artifacts/filter", method="POST",
        data=json.dumps({"artifacts": {"key": {"any_": [f"saeflow-sweep-{sid}"]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (artifact,) = json.loads(response.read())
    assert artifact["type"] == "table" and len(json.loads(artifact["data"])) == 4
    assert "4 run now" in first["done"].stdout and "overhead per point" in first["done"].stdout


def test_the_same_sweep_again_trains_nothing(project, first):
    before = {r.info.run_id: r.info.end_time for r in _runs(project, first["id"], "point")}
    done = _saeflow(project, "sweep", *GRID, "--workers", "2")
    assert _sweep_id(done.stdout) == first["id"]
    assert "0 run now, 4 already finished" in done.stdout
    after = {r.info.run_id: r.info.end_time for r in _runs(project, first["id"], "point")}
    assert after == before  # no new run, none touched


def test_audit_and_report_of_a_sweep(project, first, tmp_path):
    done = _saeflow(project, "audit", "--sweep", first["id"], "--format", "json")
    rows = json.loads(done.stdout)
    assert [r["point"] for r in rows] == [0, 1, 2, 3]
    assert {r["status"] for r in rows} == {"FINISHED"}
    out = tmp_path / "sweep.html"
    done = _saeflow(project, "report", "--sweep", first["id"], "--out", str(out))
    html = out.read_text()
    assert "train.beta" in html and "train.rho" in html and html.count("<img") >= 5
    bad = _saeflow(project, "audit", "--sweep", "nosuchsweep", check=False)
    assert bad.returncode == 2 and "no such sweep" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def dask_cluster(project):
    """`dask scheduler` and two `dask worker` processes (no nanny: a killed worker stays
    dead), on loopback; all killed afterwards (a graceful close waits for the scheduler
    the workers may have lost)."""
    port = free_port()
    env = project["env"]
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"tcp://127.0.0.1:{port}"
    for _ in range(2):
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
             "--no-dashboard"], cwd=project["root"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "workers": procs[1:]}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_an_existing_cluster_a_failing_point_and_a_second_patch_setting(project, dask_cluster):
    """Through --dask-address: a point with a bad setting is recorded FAILED and the others
    finish; a point with other patch settings trains on its own patch store."""
    sweep = project["root"] / "points.yaml"
    sweep.write_text(yaml.safe_dump([
        {"train.beta": 2.0},
        {"train.rho": 2.0},  # out of range: this point fails
        {"patches.whitening": "none", "train.beta": 2.0},
    ]))
    done = _saeflow(project, "sweep", "--file", str(sweep), "--dask-address",
                    dask_cluster["address"], "--register", "none", check=False)
    assert done.returncode == 4, done.stderr[-3000:]
    runs = {int(r.data.tags["saeflow.point"]): r for r in _runs(project, _sweep_id(done.stdout),
                                                               "point")}
    assert [runs[i].info.status for i in range(3)] == ["FINISHED", "FAILED", "FINISHED"]
    assert "rho" in runs[1].data.tags["saeflow.error"]
    assert runs[2].data.params["patches.whitening"] == "none"
    stores = list((project["root"] / "sweeps" / "patches").glob("*/patches.arrow"))
    assert len(stores) == 1
    # a different patch setting gives a different model from the same training settings
    assert runs[0].data.tags["saeflow.model_sha256"] != runs[2].data.tags["saeflow.model_sha256"]


def _running_points(c, max_iter: int) -> list:
    """The point runs of this module's project that a worker is running now, among those
    with ``train.max_iter`` = ``max_iter`` (the test's own sweep)."""
    exp = c.get_experiment_by_name("saeflow")
    return exp and c.search_runs([exp.experiment_id], filter_string=(
        "tags.`saeflow.kind` = 'point' and attributes.status = 'RUNNING' and "
        "tags.`saeflow.worker` LIKE '%pid%' and "
        f"params.`train.max_iter` = '{max_iter}'"))


def test_a_worker_killed_mid_point_the_point_runs_elsewhere_and_is_recorded_once(
        project, dask_cluster):
    env = project["env"]
    proc = subprocess.Popen(
        [str(BIN / "saeflow"), "sweep", "-S", "train.beta=0.5,1.5", "-S",
         "train.max_iter=60", "--dask-address", dask_cluster["address"], "--register", "best"],
        cwd=project["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = _client(project)

        wait_for(lambda: _running_points(c, 60), 300, "a point running", proc)
        point = _running_points(c, 60)[0]
        pid = int(point.data.tags["saeflow.worker"].split(" pid ")[1])
        victim, survivor = sorted(dask_cluster["workers"], key=lambda p: p.pid != pid)
        assert victim.pid == pid
        victim.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert victim.poll() is not None and survivor.poll() is None
    assert all(f"pid {survivor.pid}" in r.data.tags["saeflow.worker"]
               for r in _runs(project, _sweep_id(out), "point"))
    runs = _runs(project, _sweep_id(out), "point")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.tags["saeflow.point"]) for r in runs) == [0, 1]
    # --register best: one version, the best point's (by score/accuracy)
    sid = _sweep_id(out)
    (version,) = _client(project).search_model_versions(
        f"name = 'saeflow-sae' and tags.`saeflow.sweep_id` = '{sid}'")
    best = max(runs, key=lambda r: r.data.metrics["score/accuracy"])
    assert version.run_id == best.info.run_id
    assert f"registered as version {version.version}" in out


def test_ctrl_c_cancels_cleanly(project):
    """SIGINT mid-sweep: exit 130, one line saying so, the parent and the unfinished points
    KILLED (none left RUNNING or SCHEDULED), and no worker process outlives the command."""
    proc = subprocess.Popen(
        [str(BIN / "saeflow"), "sweep", "-S", "train.beta=0.7,1.7,2.7,3.7", "-S",
         "train.max_iter=200", "--workers", "2", "--register", "none"],
        cwd=project["root"], env=project["env"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    c = _client(project)
    try:
        wait_for(lambda: _running_points(c, 200), 300, "a point running", proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "the local cluster's worker processes"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "cancelled" in err and "Traceback" not in err
    # nor the local cluster's teardown logs (a nanny killing a worker mid-point, a
    # heartbeat finding the scheduler gone): the cancellation is reported in one line
    assert "distributed." not in err, err[-3000:]
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.monotonic() < deadline, "a Dask worker outlived the cancelled sweep"
        time.sleep(0.5)
    exp = c.get_experiment_by_name("saeflow")
    mine = c.search_runs([exp.experiment_id], filter_string="params.`train.max_iter` = '200'")
    statuses = [r.info.status for r in mine]
    assert statuses and not {"RUNNING", "SCHEDULED"} & set(statuses), statuses
    assert "KILLED" in statuses


def test_promote_writes_the_point_into_params_and_dvc_repro_makes_its_model(project, first):
    c = _client(project)
    (point,) = [r for r in _runs(project, first["id"], "point")
                if r.data.tags["saeflow.point"] == "2"]  # beta 3, rho 0.01
    before = (project["root"] / "params.yaml").read_text()
    done = _saeflow(project, "sweep", "--promote", f"{first['id']}/2")
    assert "train.beta=3" in done.stdout
    after = (project["root"] / "params.yaml").read_text()
    params = yaml.safe_load(after)
    assert params["train"]["beta"] == 3 and params["train"]["rho"] == 0.01
    assert len(after.splitlines()) == len(before.splitlines())  # layout and comments kept
    _saeflow(project, "stage", "train", "--patches", "data/patches.arrow", "--model",
             "models/sae", "--train-metrics", "metrics/train.json", "--loss-csv",
             "plots/loss.csv", "--dynamics", "metrics/dynamics.parquet")
    sha = json.loads((project["root"] / "models/sae/config.json").read_text())["weights_sha256"]
    assert sha == c.get_run(point.info.run_id).data.tags["saeflow.model_sha256"]
    # a setting changed since the sweep: promoting would not reproduce the point
    text = after.replace("max_iter: 10", "max_iter: 11")
    (project["root"] / "params.yaml").write_text(text)
    bad = _saeflow(project, "sweep", "--promote", f"{first['id']}/1", check=False)
    assert bad.returncode == 2 and "train.max_iter is 11 now" in bad.stderr
    assert (project["root"] / "params.yaml").read_text() == text  # nothing written


def test_an_unreachable_cluster_is_one_line_and_records_nothing(project):
    port = free_port()  # nothing listens there
    done = _saeflow(project, "sweep", "-S", "train.beta=7.5", "--dask-address",
                    f"tcp://127.0.0.1:{port}", check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"Dask cluster tcp://127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    c = _client(project)
    exp = c.get_experiment_by_name("saeflow")
    assert not c.search_runs([exp.experiment_id], filter_string="params.`train.beta` = '7.5'")


# --- units ---------------------------------------------------------------------------


def test_the_grid_is_dvcs_product_with_hydra_types():
    points = parse_grid(["train.beta=0.3,1", "train.penalty=kl,l1", "train.k=null"])
    assert points == [
        {"train.beta": 0.3, "train.penalty": "kl", "train.k": None},
        {"train.beta": 0.3, "train.penalty": "l1", "train.k": None},
        {"train.beta": 1, "train.penalty": "kl", "train.k": None},
        {"train.beta": 1, "train.penalty": "l1", "train.k": None}]
    assert [p["train.rho"] for p in parse_grid(["train.rho=range(1,4)"])] == [1, 2, 3]


@pytest.mark.parametrize("spec, message", [
    ("train.beta=(", "cannot parse"), ("train.beta=1,2", "given twice"),
])
def test_a_bad_grid_is_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_grid(["train.beta=1", spec] if "twice" in message else [spec])
    assert "\n" not in str(info.value)


def test_unknown_keys_are_refused_before_anything_runs(project):
    done = _saeflow(project, "sweep", "-S", "train.bta=1,2", check=False)
    assert done.returncode == 2 and "no setting 'bta' in train" in done.stderr
    done = _saeflow(project, "sweep", "-S", "ingest.sources=[]", check=False)
    assert done.returncode == 2 and "SECTION one of patches, train" in done.stderr


def test_sweep_file_errors(tmp_path):
    with pytest.raises(ValueError, match="sweep file not found"):
        read_sweep_file(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("points: 3\n")
    with pytest.raises(ValueError, match="expected a list of points"):
        read_sweep_file(tmp_path / "bad.yaml")


def test_point_keys_change_with_settings_and_data():
    params = {"patches": {"a": 1}, "train": {"beta": 3.0}, "evaluate": {}, "score": {}}
    key = point_key(params, {"images": "x"})
    assert key == point_key(apply_point(params, {}), {"images": "x"})
    assert key != point_key(apply_point(params, {"train.beta": 1.0}), {"images": "x"})
    assert key != point_key(params, {"images": "y"})
    assert params["train"]["beta"] == 3.0  # apply_point copies


def test_threads_divide_each_hosts_cores_between_its_task_slots():
    workers = {"tcp://a:1": {"host": "a", "nthreads": 1}, "tcp://a:2": {"host": "a", "nthreads": 1},
               "tcp://b:1": {"host": "b", "nthreads": 2}}
    cores = {"tcp://a:1": 8, "tcp://a:2": 8, "tcp://b:1": 2}
    assert torch_threads(cores, workers) == {"tcp://a:1": 4, "tcp://a:2": 4, "tcp://b:1": 1}


def test_points_claim_a_gpu_only_where_they_train_on_one():
    cpu = {"w": {"resources": {}}}
    gpu = {"w": {"resources": {"GPU": 1}}}
    assert resources_of_points("auto", cpu) == {}
    assert resources_of_points("auto", gpu) == {"GPU": 1}
    assert resources_of_points("cuda", cpu) == {"GPU": 1}
    assert resources_of_points("cpu", gpu) == {}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_overhead_splits_slot_time_into_compute_bookkeeping_dispatch_and_idle_end():
    def point(worker, started, ended, compute, record=0.2):
        return {"worker": worker, "started": started, "ended": ended, "compute": compute,
                "record": record}

    # worker a: two points back to back after 1 s of dispatch, 0.5 s between them;
    # worker b (2 slots): two points at once, one 3 s late; b's slots then idle to the end
    timings = [point("a", 101, 111, 9.5), point("a", 111.5, 121, 9.0),
               point("b", 100.5, 106, 5.0), point("b", 103, 108, 4.0)]
    o = point_overhead(100.0, timings, {"a": 1, "b": 2}, wall=21.0)
    assert o["slots"] == 3 and o["points"] == 4
    assert o["in_task"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert o["between"] == pytest.approx((1.0 + 0.5 + 0.5 + 3.0) / 4)
    assert o["per_point"] == pytest.approx(o["in_task"] + o["between"])
    assert o["compute"] == pytest.approx(27.5 / 4) and o["record"] == pytest.approx(0.2)
    used = sum(t["compute"] for t in timings) + 4 * o["per_point"]
    assert 3 * 21.0 == pytest.approx(used + 4 * o["idle_end"])
    assert point_overhead(100.0, [], {"a": 1}, wall=1.0) is None

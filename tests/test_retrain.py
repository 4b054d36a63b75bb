"""Retraining as a user runs it: `saeflow retrain` in a DVC + git project whose feature
images are a folder of PNGs, on the local persistent Prefect server and the project's
MLflow store; then `saeflow reproduce`, and the schedule served by `saeflow serve`.

The tests of this module run in order on one project: each retrain builds on the last.
"Better" and "worse" models come from their settings (1, 25 or 2 hidden units), never from
edited metrics.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import BIN, TINY, clean_env, copy_project, run, wait_for

NAME = "saeflow-sae"


def _png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    lo, hi = float(image.min()), float(image.max())
    Image.fromarray(np.uint8(np.round(255 * (image - lo) / (hi - lo)))).save(path)


@pytest.fixture(scope="module")
def project(prefect_server, tmp_path_factory):
    """A project reading its feature images from ``photos/`` (4 of the built-in ones; the
    5th is added by a test), with a deliberately poor first model (1 hidden unit)."""
    from sae_core.data import load_natural_images

    root = tmp_path_factory.mktemp("retrain") / "proj"
    changes = {**TINY, "train": {"max_iter": 10, "n_components": 1},
               "ingest": {"sources": [{"type": "image_folder", "path": "photos"}]}}
    env = clean_env(**prefect_server)
    copy_project(root, changes, env)
    images = load_natural_images()
    (root / "photos").mkdir()
    for i in range(4):
        _png(root / "photos" / f"img{i}.png", images[i])
    return {"root": root, "env": env, "spare": images[4]}


def _saeflow(project, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
    done = run([BIN / "saeflow", *args], project["root"], project["env"], timeout=timeout,
               check=check)
    assert "temporary server" not in done.stderr
    return done


def _set(project, section: str, **values) -> None:
    file = project["root"] / "params.yaml"
    params = yaml.safe_load(file.read_text())
    params[section].update(values)
    file.write_text(yaml.safe_dump(params, sort_keys=False))


def _client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project['root'] / 'mlflow.db'}"
    # the registry too: a client without one uses the process's registry URI, which a test
    # module run before this one in the same test process may have set
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(project) -> dict[str, str]:
    return {a: str(v) for a, v in _client(project).get_registered_model(NAME).aliases.items()}


def _versions(project) -> list:
    return sorted(_client(project).search_model_versions(f"name = '{NAME}'"),
                  key=lambda v: int(v.version))


def _dvc_clean(project) -> None:
    done = run([BIN / "dvc", "status", "--json"], project["root"], project["env"])
    assert json.loads(done.stdout) == {}, done.stdout


def _api(env: dict, path: str, body: dict | None = None):
    """The Prefect REST API of the test's server (no Prefect import in this process)."""
    url = f"http://127.0.0.1:{env['PREFECT_SERVER_API_PORT']}/api{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _retrain_runs(env: dict) -> list[dict]:
    """Flow runs of saeflow-retrain that have started, newest first."""
    return _api(env, "/flow_runs/filter", {
        "flows": {"name": {"any_": ["saeflow-retrain"]}},
        "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED", "PENDING"]}}},
        "sort": "START_TIME_DESC", "limit": 50})


def test_first_retrain_runs_every_stage_and_makes_the_first_champion(project):
    done = _saeflow(project, "retrain")
    assert "retrain: ran ingest, patches, train, evaluate, score" in done.stdout
    assert "version 1: first champion" in done.stdout
    assert _aliases(project) == {"champion": "1"}
    tags = _versions(project)[0].tags
    assert tags["saeflow.decision"] == "first champion"
    assert tags["saeflow.champion_version"] == "none"
    assert 0 < float(tags["saeflow.metric_value"]) <= 1
    _dvc_clean(project)
    # the decision is also the flow run's markdown artifact
    flow_run = _retrain_runs(project["env"])[0]
    assert flow_run["state_type"] == "COMPLETED"
    arts = _api(project["env"], "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    assert any(a["type"] == "markdown" and "first champion" in a["data"] for a in arts)


def test_unchanged_data_run_nothing_and_register_nothing(project):
    lock = (project["root"] / "dvc.lock").read_bytes()
    done = _saeflow(project, "retrain")
    assert "every stage is up to date" in done.stdout
    assert "retrain: no change" in done.stdout
    assert not [ln for ln in done.stdout.splitlines()  # no stage but ingest ran
                if ln.startswith(("patches:", "train:", "evaluate:", "score:"))]
    assert len(_versions(project)) == 1
    assert (project["root"] / "dvc.lock").read_bytes() == lock  # nothing re-committed
    _dvc_clean(project)


def test_new_images_in_the_folder_give_a_new_version(project):
    before = _versions(project)[0].tags["data.md5"]
    _png(project["root"] / "photos" / "img4.png", project["spare"])
    done = _saeflow(project, "retrain")
    assert "retrain: ran ingest, patches, train, evaluate, score" in done.stdout
    versions = _versions(project)
    assert len(versions) == 2 and versions[1].tags["data.md5"] != before
    assert versions[1].tags["saeflow.decision"] in ("promoted", "challenger")
    _dvc_clean(project)


def test_a_better_model_takes_champion_and_the_old_one_becomes_previous(project):
    old = _aliases(project)["champion"]
    _set(project, "train", n_components=25)
    done = _saeflow(project, "retrain")
    assert "retrain: ran train, evaluate, score" in done.stdout  # not ingest or patches
    assert "version 3: promoted" in done.stdout
    aliases = _aliases(project)
    assert aliases["champion"] == "3" and aliases["previous"] == old
    tags = _versions(project)[2].tags
    assert tags["saeflow.champion_version"] == old
    assert float(tags["saeflow.metric_value"]) > float(tags["saeflow.champion_value"])
    # the same labeled data and settings: the champion's recorded value is used
    assert tags["saeflow.champion_value_source"].startswith("recorded in run")
    run_tags = _client(project).get_run(tags["run_id"]).data.tags
    assert run_tags["saeflow.decision"] == "promoted"  # on the MLflow run too
    _dvc_clean(project)


def test_a_worse_model_becomes_challenger_against_a_re_scored_champion(project):
    """2 hidden units, scored with a changed classifier setting: the champion is scored
    again with that setting (its transform and patches fetched from the DVC cache)."""
    _set(project, "train", n_components=2)
    _set(project, "score", C=0.5)
    done = _saeflow(project, "retrain")
    assert "version 4: challenger" in done.stdout
    aliases = _aliases(project)
    assert aliases["champion"] == "3" and aliases["challenger"] == "4"
    tags = _versions(project)[3].tags
    assert tags["saeflow.champion_value_source"] == "re-measured on the current data"
    assert float(tags["saeflow.metric_value"]) < float(tags["saeflow.champion_value"])
    _dvc_clean(project)


def test_the_champion_re_measured_here_matches_its_recorded_value(project, monkeypatch):
    """A sparsity metric: on the data and settings the champion was evaluated with, its
    recorded value is used; measured again here (as after a data change) it is the same
    number; on another split it is measured, not copied."""
    from flows.champion import GateSettings, _measure, alias_version, champion_value
    from flows.project import pipeline_paths

    monkeypatch.chdir(project["root"])
    c = _client(project)
    champ = alias_version(c, NAME, "champion")
    gate = GateSettings("sparsity/fvu", "minimize", 0.0)
    params = yaml.safe_load((project["root"] / "params.yaml").read_text())
    paths = pipeline_paths("dvc.yaml")
    args = {"registered": NAME, "experiment": "saeflow", "champion": champ, "gate": gate,
            "paths": paths, "root": project["root"]}
    recorded, source = champion_value(c, params=params, **args)
    assert source.startswith("recorded in run")
    runs = c.search_runs([c.get_experiment_by_name("saeflow").experiment_id])
    again = _measure(c, NAME, champ, runs, gate, params, paths, project["root"])
    assert again == pytest.approx(recorded, rel=1e-9)
    params["evaluate"]["split"] = "train"
    on_train, source = champion_value(c, params=params, **args)
    assert source == "re-measured on the current data" and on_train != recorded


def test_a_failure_in_score_moves_no_alias_and_fails_the_runs(project):
    before = _aliases(project)
    _set(project, "train", random_state=1)
    _set(project, "score", pool="median")
    done = _saeflow(project, "retrain", check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("saeflow: error: params.yaml: score: ")
    assert "pool" in done.stderr and "median" in done.stderr
    assert _aliases(project) == before
    c = _client(project)
    newest = _versions(project)[-1]
    assert "saeflow.decision" not in newest.tags
    assert c.get_run(newest.run_id).info.status == "FAILED"
    assert _retrain_runs(project["env"])[0]["state_type"] == "FAILED"
    # the stages that completed are recorded; score, which failed, is what is left to run
    done = run([BIN / "dvc", "status", "--json"], project["root"], project["env"])
    assert list(json.loads(done.stdout)) == ["score"]
    _set(project, "score", pool="max")


def test_audit_shows_aliases_decisions_and_the_champion_history(project):
    rows = json.loads(_saeflow(project, "audit", "--format", "json").stdout)
    by_version = {r["version"]: r for r in rows}
    assert by_version[3]["aliases"] == "champion" and by_version[3]["decision"] == "promoted"
    assert by_version[4]["aliases"] == "challenger"
    assert "previous" in {r["aliases"] for r in rows if r["version"] < 3}
    assert by_version[5]["aliases"] is None and by_version[5]["decision"] is None  # failed
    history = json.loads(_saeflow(project, "audit", "--history", "--format", "json").stdout)
    assert [h["version"] for h in history][-1] == 3
    assert history[0]["decision"] == "first champion"
    assert all(h["metric"] == "score/accuracy" and h["reason"] for h in history)
    table = _saeflow(project, "audit", "--history").stdout
    assert table.splitlines()[0].split()[:3] == ["when", "version", "decision"]


def test_the_champion_is_reproduced_byte_for_byte_in_a_worktree(project):
    done = _saeflow(project, "reproduce", f"models:/{NAME}@champion")
    assert "-> identical" in done.stdout, done.stdout + done.stderr
    worktrees = run(["git", "worktree", "list"], project["root"], project["env"]).stdout
    assert len(worktrees.splitlines()) == 1  # the temporary worktree is gone


def test_a_version_whose_commit_or_data_is_missing_is_one_line(project):
    c = _client(project)
    c.set_model_version_tag(NAME, "1", "git.commit", "0" * 40)
    done = _saeflow(project, "reproduce", f"models:/{NAME}/1", check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"saeflow: error: {NAME} version 1: its git commit "
                                   f"{'0' * 40} is not in the repository at "
                                   f"{project['root']}")
    md5 = _versions(project)[1].tags["dvc.md5:data/images.parquet"]
    (project["root"] / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    done = _saeflow(project, "reproduce", f"models:/{NAME}/2", check=False)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"data/images.parquet: md5 {md5} is not in the DVC cache" in done.stderr


# --- the schedule ----------------------------------------------------------------------------


def _deployment(project) -> dict:
    return _api(project["env"], f"/deployments/name/saeflow-retrain/{project['root'].name}")


def test_schedule_cron_timezone_and_concurrency_limit_are_read_back(project):
    _saeflow(project, "schedule", "--cron", "0 3 * * 1", "--timezone", "Europe/Paris")
    d = _deployment(project)
    (sched,) = d["schedules"]
    assert sched["schedule"]["cron"] == "0 3 * * 1"
    assert sched["schedule"]["timezone"] == "Europe/Paris"
    assert d["global_concurrency_limit"]["limit"] == 1
    assert d["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert d["parameters"]["project"] == str(project["root"])
    listed = _saeflow(project, "schedule", "--list").stdout
    assert f"saeflow-retrain/{project['root'].name}  cron '0 3 * * 1' (Europe/Paris)" in listed
    _saeflow(project, "schedule", "--pause")
    assert _deployment(project)["paused"] is True
    _saeflow(project, "schedule", "--resume")
    assert _deployment(project)["paused"] is False
    bad = _saeflow(project, "schedule", "--cron", "61 * * * *", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("saeflow: error: --cron '61 * * * *'")


def test_an_overlapping_retrain_is_cancelled(project):
    """While another process holds the project's retrain slot, `saeflow retrain` ends
    Cancelled at once, with exit status 3, and changes nothing."""
    hold = ("import sys, time\nfrom flows import servers\nservers.use_prefect()\n"
            "from pathlib import Path\nfrom flows.retrain import project_slot\n"
            "with project_slot(Path(sys.argv[1]).resolve()):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(project["root"])],
                              cwd=project["root"], env=project["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        versions = len(_versions(project))
        done = _saeflow(project, "retrain", check=False)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "another retrain of" in done.stderr and "cancelled" in done.stderr
        assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr
        assert _retrain_runs(project["env"])[0]["state_type"] == "CANCELLED"
        assert len(_versions(project)) == versions
    finally:
        holder.send_signal(signal.SIGINT)  # leaves the slot, which later tests need free
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            raise


def test_missed_runs_only_the_latest_runs_when_serving_resumes(project, tmp_path):
    """Three runs fell due while nothing served: `saeflow serve` cancels the two older
    ones and runs the latest; stopping it leaves the schedule active."""
    from datetime import datetime, timedelta, timezone

    d = _deployment(project)
    now = datetime.now(timezone.utc)
    created = [_api(project["env"], f"/deployments/{d['id']}/create_flow_run", {
        "state": {"type": "SCHEDULED", "state_details": {
            "scheduled_time": (now - timedelta(minutes=m)).isoformat()}}})["id"]
        for m in (3, 2, 1)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # the runner asks for due runs every 2 s instead of Prefect's 10
        serve = subprocess.Popen([BIN / "saeflow", "serve"], cwd=project["root"],
                                 env={**project["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        def state(i):
            return _api(project["env"], f"/flow_runs/{created[i]}")["state_type"]

        wait_for(lambda: state(2) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 300,
                 "the latest missed run", serve, log)
        assert state(2) == "COMPLETED", log.read_text()[-3000:]
        for i in (0, 1):
            run_ = _api(project["env"], f"/flow_runs/{created[i]}")
            assert run_["state_type"] == "CANCELLED"
            assert "superseded" in run_["state"]["message"]
        assert "2 missed run(s) cancelled" in log.read_text()
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            rc = serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    text = log.read_text()
    assert rc == 0, text
    for noise in ("Traceback", "ConnectError", "temporary server"):
        assert noise not in text, text
    assert _deployment(project)["paused"] is False  # stopping serve is not pausing
    _saeflow(project, "schedule", "--delete")
    listed = _saeflow(project, "schedule", "--list").stdout
    assert project["root"].name not in listed

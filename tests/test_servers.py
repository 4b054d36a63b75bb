"""The local persistent Prefect server (Prefect's own background mode), the guard against
Prefect's temporary per-process server, `saeflow server status`, stages that import only
what they use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import BIN, clean_env, copy_project, free_port, run, seed_prefect_home, wait_for

from flows import servers


def _server_pid(home: Path) -> int:
    return int((home / "server.pid").read_text())


def test_ephemeral_mode_is_off_so_a_missing_url_is_an_error(subprocess_env, tmp_path):
    """Prefect's default profile allows the temporary per-process server; saeflow's
    defaults must turn it off (a renamed setting would silently bring it back)."""
    code = ("import os\nfrom flows import servers\n"
            "os.environ.pop('PREFECT_API_URL', None)\n"
            "for k, v in servers.PREFECT_DEFAULTS.items(): os.environ[k] = v\n"
            "from prefect.client.orchestration import get_client\n"
            "try:\n    get_client(sync_client=True)\nexcept ValueError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"  # as Prefect's default profile
    env["PREFECT_HOME"] = str(tmp_path)  # no profile of the user's either
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "refused: No Prefect API URL provided" in done.stdout, done.stdout + done.stderr


def test_importing_the_flows_before_use_prefect_never_starts_a_temporary_server(
        subprocess_env, tmp_path):
    """A command that imports a flow module before calling use_prefect (a slip that once
    made `saeflow schedule --list` start a temporary server, 13 s) fails loudly instead."""
    code = ("import os\nos.environ.pop('PREFECT_API_URL', None)\n"
            "import flows.retrain\n"
            "from prefect.client.orchestration import get_client\n"
            "try:\n    get_client(sync_client=True)\nexcept ValueError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "refused: No Prefect API URL provided" in done.stdout, done.stdout + done.stderr
    assert "temporary server" not in done.stderr


def test_team_url_is_used_as_is(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.delenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", raising=False)
    assert servers.use_prefect() == "http://127.0.0.1:1/api"
    assert os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "false"


def test_local_server_is_one_persistent_prefect_server(prefect_server):
    home = Path(prefect_server["PREFECT_HOME"])
    env = clean_env(**prefect_server)
    pid = _server_pid(home)
    url = f"http://127.0.0.1:{prefect_server['PREFECT_SERVER_API_PORT']}/api"
    assert servers.prefect_problem(url) is None
    # started by Prefect's background mode: Prefect's own uvicorn app, on loopback only
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"prefect.server.api.server:create_app" in cmdline
    assert cmdline[cmdline.index(b"--host") + 1] == b"127.0.0.1"
    # in its own session: a Ctrl-C in the terminal that started it does not reach it
    assert os.getsid(pid) != os.getsid(0)
    again = run([BIN / "saeflow", "server", "start"], home, env)
    assert "already running" in again.stdout and _server_pid(home) == pid
    status = run([BIN / "saeflow", "server", "status"], home, env)
    assert f"{url}  UI {url.removesuffix('/api')}; local persistent server (pid {pid}" in (
        status.stdout)
    assert "MLflow" in status.stdout and "DVC remote" in status.stdout


def test_concurrent_first_use_starts_one_server(tmp_path):
    """Four commands that find no server at once start one (a file lock), and all use it."""
    settings = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_API_PORT":
                str(free_port())}
    env = clean_env(**settings)
    procs = [subprocess.Popen([BIN / "saeflow", "server", "start"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, outs
        said = [o[0] for o in outs]
        assert sum("started" in s for s in said) == 1, said
        assert sum("already running" in s for s in said) == 3, said
        pid = _server_pid(tmp_path / "home")
        port = settings["PREFECT_SERVER_API_PORT"]
        listeners = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True,
                                   text=True).stdout
        ours = [ln for ln in listeners.splitlines()
                if "prefect.server.api.server:create_app" in ln and f"--port {port}" in ln]
        assert len(ours) == 1 and ours[0].split()[0] == str(pid), ours
    finally:
        stop = run([BIN / "saeflow", "server", "stop"], tmp_path, env)
    assert f"pid {pid}" in stop.stdout
    wait_for(lambda: not servers._pid_alive(pid), 30, "server exit")
    assert not (tmp_path / "home" / "server.pid").exists()
    again = run([BIN / "saeflow", "server", "stop"], tmp_path, env)
    assert "no local Prefect server running" in again.stdout


@pytest.mark.parametrize("content", ["dead", "foreign", "garbled"])
def test_a_pid_file_of_no_prefect_server_is_replaced_and_never_signalled(tmp_path, monkeypatch,
                                                                        prefect_db, content):
    """After a reboot, a kill -9 or a start interrupted before Prefect wrote it, the pid
    file names a dead process, an unrelated live one (a reused pid) or nothing; Prefect
    itself would refuse to start ("already running"). saeflow replaces it, and never
    signals the process it names."""
    home = seed_prefect_home(tmp_path / "home", prefect_db)
    other = subprocess.Popen(["true"] if content == "dead" else ["sleep", "120"])
    if content == "dead":
        other.wait()
    (home / "server.pid").write_text("" if content == "garbled" else str(other.pid))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(free_port()))
    pid = None
    try:
        url, started = servers.start_local()
        assert started and servers.prefect_problem(url) is None
        assert _server_pid(home) != other.pid
    finally:
        pid = servers.stop_local()
        assert servers.stop_local() is None
        if content == "foreign":
            assert other.poll() is None, "saeflow signalled a process that is not its server"
        other.kill()
        other.wait()
    assert pid is not None and not servers._pid_alive(pid)


def test_a_server_not_started_from_this_home_is_refused(tmp_path, monkeypatch):
    """Whatever else answers on the port (another user's Prefect server, another program)
    is never used silently: a one-line error says how to choose."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(server.server_address[1]))
    try:
        with pytest.raises(servers.ServiceError, match=r"not started from PREFECT_HOME=.* "
                           r"PREFECT_API_URL.* PREFECT_SERVER_API_PORT") as info:
            servers.start_local()
        status = servers.prefect_status()
    finally:
        server.shutdown()
    assert "\n" not in str(info.value)
    assert not status.ok and "not started from PREFECT_HOME" in status.detail


def test_a_server_of_this_home_on_another_port_is_named(prefect_server, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", prefect_server["PREFECT_HOME"])
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(free_port()))
    with pytest.raises(servers.ServiceError, match=f"runs on port "
                       f"{prefect_server['PREFECT_SERVER_API_PORT']}, not"):
        servers.start_local()


def test_a_taken_port_is_one_line_and_starts_no_temporary_server(tmp_path):
    """Something else listens on the port: the stage fails in one line naming the port,
    before writing anything, and no Prefect server of any kind is left behind."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = clean_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_API_PORT=str(port))
        project = copy_project(tmp_path / "p", git=False)
        done = run([BIN / "saeflow", "stage", "ingest", "--images", "i.parquet",
                    "--images-manifest", "i.json"], project, env, check=False, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"saeflow: error: port {port} on 127.0.0.1 is in use by another "
                     "program; choose another with PREFECT_SERVER_API_PORT"]
    assert not (project / "i.parquet").exists()
    assert not (tmp_path / "home" / "server.pid").exists()


def test_status_names_each_unreachable_service_in_one_line(tmp_path):
    dead = free_port()
    env = clean_env(PREFECT_API_URL=f"http://127.0.0.1:{dead}/api",
                    MLFLOW_TRACKING_URI=f"http://127.0.0.1:{dead}")
    done = run([BIN / "saeflow", "server", "status"], tmp_path, env, check=False)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    prefect = next(ln for ln in lines if ln.startswith("Prefect"))
    mlflow = next(ln for ln in lines if ln.startswith("MLflow"))
    assert "FAIL" in prefect and f"127.0.0.1:{dead}/api" in prefect and "refused" in prefect
    assert "FAIL" in mlflow and "refused" in mlflow
    assert "Traceback" not in done.stderr


def test_status_refuses_a_foreign_sqlite_file(tmp_path):
    import sqlite3

    db = tmp_path / "mine.db"
    with sqlite3.connect(db) as con:
        con.execute("create table notes (text)")
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}",
                    PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    done = run([BIN / "saeflow", "server", "status"], tmp_path, env, check=False)
    assert "not an MLflow store" in done.stdout and done.returncode == 1


STAGE_ARGS = {
    "ingest": ["--images", "d/images.parquet", "--images-manifest", "d/images.json",
               "--labeled", "d/labeled.parquet", "--labeled-manifest", "d/labeled.json"],
    "patches": ["--images", "d/images.parquet", "--patches", "d/patches.arrow",
                "--transform", "d/transform.safetensors"],
    "train": ["--patches", "d/patches.arrow", "--model", "m", "--train-metrics", "t.json",
              "--loss-csv", "loss.csv", "--dynamics", "d.parquet"],
    "evaluate": ["--model", "m", "--patches", "d/patches.arrow", "--dynamics", "d.parquet",
                 "--sparsity-metrics",
                 "s.json", "--units", "u.parquet", "--filters-png", "f.png", "--rho-hat-png",
                 "r.png", "--rho-hat-csv", "r.csv", "--loss-png", "l.png",
                 "--reconstructions-png", "rec.png", "--dynamics-png", "dy.png"],
    "score": ["--model", "m", "--labeled", "d/labeled.parquet", "--transform",
              "d/transform.safetensors", "--patches", "d/patches.arrow", "--score-metrics",
              "sc.json"],
}
NEVER = {"ingest": {"torch", "mlflow"}, "patches": {"torch", "mlflow"},
         "train": {"matplotlib"}}
PROBE = ("import atexit, json, sys\n"
         "atexit.register(lambda: print('MODULES', json.dumps(sorted({m.split('.')[0] "
         "for m in sys.modules}))))\n"
         "from flows.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def test_each_stage_runs_in_its_own_process_importing_only_what_it_uses(prefect_server,
                                                                       tmp_path):
    """Every stage as DVC runs it (tracking on, the persistent server), in order; the
    libraries each process loaded, read at its exit."""
    project = copy_project(tmp_path / "p", git=False)
    env = clean_env(**prefect_server)
    loaded = {}
    for stage, args in STAGE_ARGS.items():
        done = run([sys.executable, "-c", PROBE, "stage", stage, *args], project, env)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MODULES "))
        loaded[stage] = set(json.loads(line.removeprefix("MODULES ")))
    for stage, never in NEVER.items():
        assert not (loaded[stage] & never), f"{stage} imported {loaded[stage] & never}"
    assert {"torch", "mlflow"} <= loaded["train"]
    assert "matplotlib" in loaded["evaluate"] and "prefect" in loaded["ingest"]


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "--push"], "no default DVC remote"),
    (["pipeline", "--push", "--no-dvc-commit"], "--push needs the outputs recorded"),
])
def test_push_without_a_remote_is_refused_before_any_work(tmp_path, argv, message):
    project = copy_project(tmp_path / "p", git=False)
    (project / ".dvc").mkdir(exist_ok=True)
    env = clean_env(PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    start = time.monotonic()
    done = run([BIN / "saeflow", *argv], project, env, check=False)
    assert done.returncode == 2 and message in done.stderr
    assert time.monotonic() - start < 60 and not (project / "data" / "images.parquet").exists()


def _processes_with(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (a stage's and its children's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_stage_killed_by_sigkill_leaves_only_the_persistent_server(tmp_path, prefect_db,
                                                                     monkeypatch):
    """A stage started with no server running starts the persistent one (that is its
    job); killed with SIGKILL mid-fit, it leaves nothing else behind, and the server left
    is the recorded one, which the next stage reuses."""
    from flows.ingest import ingest
    from flows.patches import patches

    project = copy_project(tmp_path / "p", {"train": {"max_iter": 100_000}}, git=False)
    home = seed_prefect_home(tmp_path / "home", prefect_db)
    env = clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(free_port()),
                    SAEFLOW_TRACKING="0")
    with monkeypatch.context() as here:  # the train stage's input, made in this process
        here.chdir(project)
        here.setenv("SAEFLOW_TRACKING", "0")
        ingest("i.parquet", "i.json")
        patches("i.parquet", "p.arrow", "t.safetensors")
    assert not (home / "server.pid").exists()  # the train stage starts it
    marker = f"SAEFLOW_TEST_MARK={tmp_path.name}"
    log = tmp_path / "train.log"
    try:
        with open(log, "w") as fh:
            stage = subprocess.Popen(
                [BIN / "saeflow", "stage", "train", "--patches", "p.arrow", "--model", "m",
                 "--train-metrics", "t.json", "--loss-csv", "l.csv", "--dynamics",
                 "d.parquet"], cwd=project,
                env={**env, "SAEFLOW_TEST_MARK": tmp_path.name}, stdout=fh, stderr=fh)
        wait_for(lambda: "train: iteration" in log.read_text(), 300, "the fit", stage, log)
        stage.send_signal(signal.SIGKILL)
        stage.wait()
        time.sleep(1)
        server_pid = int((home / "server.pid").read_text())
        # the server is started with an environment of its own (no marker): nothing the
        # stage started is left but it
        assert _processes_with(marker) == []
        assert servers._pid_alive(server_pid)
        status = run([BIN / "saeflow", "server", "status"], project, env, check=False)
        assert f"local persistent server (pid {server_pid}," in status.stdout, status.stdout
        assert not (project / "m").exists()  # the model is written only after the fit
    finally:
        run([BIN / "saeflow", "server", "stop"], project, env, timeout=120, check=False)
    assert not servers._pid_alive(server_pid)

"""The stage server (``flows.stage_server``) and its client (``flows.launcher``).

The servers started here preload nothing heavy and start no Prefect server: the
``SAEFLOW_STAGE_ENTRY`` hook points them at a tiny module written per test, and
``PREFECT_API_URL`` is set (to a port nothing listens on). Clients run as subprocesses, so
that their stdin/stdout/stderr, pid and signals are real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flows import launcher

CLIENT = ("import sys; from flows.launcher import run_in_server; "
          "sys.exit(run_in_server(sys.argv[1:]))")
#: a client that gets SIGTERM after it set up its forwarding but before its request is sent
EARLY_SIGTERM_CLIENT = (
    "import os, signal, sys\n"
    "from flows import launcher\n"
    "send = launcher._send_request\n"
    "def early(sock, argv):\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    send(sock, argv)\n"
    "launcher._send_request = early\n"
    "def no_server(paths):\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    raise launcher._Fallback('no server here')\n"
    "if os.environ.get('SFL_NO_SERVER'):\n"
    "    launcher._start_server = no_server\n"
    "sys.exit(launcher.run_in_server(sys.argv[1:]))\n")

ENTRY = '''
import json, os, signal, sys, time

main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
if os.environ.get("SFL_BREAK") and getattr(main_spec, "name", "") == "flows.stage_server":
    raise RuntimeError("broken on purpose")


def _wait_for(path, seconds=15.0):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def main(argv):
    import flows.launcher

    cmd, *rest = argv
    if cmd == "exit":
        return int(rest[0])
    if cmd == "sysexit":
        raise SystemExit(int(rest[0]))
    if cmd == "raise":
        raise RuntimeError("boom")
    if cmd == "echo":
        print("out:" + " ".join(rest))
        print("err:" + " ".join(rest), file=sys.stderr)
        return 0
    if cmd == "origin":
        print(flows.launcher.__file__)
        return 0
    if cmd == "info":
        print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
                          "env": os.environ.get(rest[0]), "argv": sys.argv[1:],
                          "in_server": flows.launcher.IN_SERVER}))
        return 0
    if cmd == "stdin":
        print(sys.stdin.read().upper())
        return 0
    if cmd == "term":  # SIGTERM writes the marker and ends with status 7
        def on_term(signum, frame):
            open(rest[0], "w").close()
            sys.exit(7)
        signal.signal(signal.SIGTERM, on_term)
    if cmd in ("term", "sleep"):
        print(f"ready {os.getpid()}", flush=True)
        time.sleep(30)
        return 0
    if cmd == "wait":  # runs until the file rest[0] exists, then ends with status rest[1]
        print(f"ready {os.getpid()}", flush=True)
        return int(rest[1]) if _wait_for(rest[0], 60.0) else 98
    if cmd == "barrier":  # only passes when the other command runs at the same time
        open(rest[0], "w").close()
        return 0 if _wait_for(rest[1]) else 1
    return 99
'''


def _alive(pid: int) -> bool:
    return launcher._alive(pid)


def _wait_until(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Env:
    """A private runtime directory, the entry module and the client's environment."""

    def __init__(self, base: Path, subprocess_env: dict) -> None:
        self.base = base
        self.rt = base / "rt"
        (base / "sfl_entry.py").write_text(ENTRY)
        env = dict(subprocess_env)
        for name in list(env):
            if name.startswith(("SAEFLOW_", "PREFECT_")):
                del env[name]
        env["PYTHONPATH"] = f"{base}{os.pathsep}{env['PYTHONPATH']}"
        env[launcher.ENV_RUNTIME_DIR] = str(self.rt)
        env[launcher.ENV_ENTRY] = "sfl_entry:main"
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
        self.env = env

    def run(self, *args: str, extra: dict | None = None, cwd: Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        env = {**self.env, **(extra or {})}
        return subprocess.run([launcher.sys.executable, "-c", CLIENT, *args], env=env,
                              cwd=cwd or self.base, input=input, capture_output=True,
                              text=True, timeout=60)

    def popen(self, *args: str, extra: dict | None = None,
              client: str = CLIENT) -> subprocess.Popen:
        return subprocess.Popen([launcher.sys.executable, "-c", client, *args],
                                env={**self.env, **(extra or {})}, cwd=self.base,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def infos(self) -> list[dict]:
        return [info for _, info in launcher._infos(str(self.rt))]

    def sockets(self) -> list[str]:
        return sorted(p.name for p in self.rt.glob("*.sock")) if self.rt.exists() else []

    def server_pids(self) -> set[int]:
        pids = {info["pid"] for info in self.infos()}
        for log in self.rt.glob("*.log") if self.rt.exists() else []:
            pids |= {int(p) for p in re.findall(r"\[(\d+)\] starting", log.read_text())}
        return pids


@pytest.fixture
def sfl(subprocess_env, monkeypatch):
    # a short path: a Unix socket's path is limited to 107 bytes
    base = Path(tempfile.mkdtemp(prefix="sfl-", dir="/tmp"))
    env = Env(base, subprocess_env)
    monkeypatch.setenv(launcher.ENV_RUNTIME_DIR, str(env.rt))
    try:
        yield env
    finally:
        pids = env.server_pids()
        launcher.stop_servers(wait=5.0)
        for pid in pids:
            if _alive(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        ours = b"flows.stage_server" in f.read()
                except OSError:
                    ours = False
                if ours:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def _info(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------- tests


def test_exit_status_and_streams_pass_through(sfl):
    proc = sfl.run("echo", "a", "b")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "out:a b\n"
    assert proc.stderr == "err:a b\n"  # nothing extra when the server works
    assert len(sfl.sockets()) == 1
    assert sfl.run("exit", "3").returncode == 3
    assert sfl.run("sysexit", "4").returncode == 4
    proc = sfl.run("raise")
    assert proc.returncode == 1
    assert "RuntimeError: boom" in proc.stderr


def test_cwd_env_argv_and_stdin_are_the_clients(sfl):
    work = sfl.base / "work dir"
    work.mkdir()
    proc = sfl.run("info", "SFL_VALUE", extra={"SFL_VALUE": "x y"}, cwd=work)
    info = _info(proc)
    assert Path(info["cwd"]).resolve() == work.resolve()
    assert info["env"] == "x y"
    assert info["argv"] == ["info", "SFL_VALUE"]
    assert info["in_server"] is True
    (server,) = sfl.infos()
    assert info["ppid"] == server["pid"]  # run by the server, not by the client
    assert info["env"] == "x y" and sfl.run("info", "SFL_VALUE").stdout.count("null") == 1
    proc = sfl.run("stdin", input="hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "HELLO\n"


def test_one_server_serves_many_and_a_new_key_starts_another(sfl):
    first = _info(sfl.run("info", "X"))
    second = _info(sfl.run("info", "X"))
    assert first["ppid"] == second["ppid"]
    assert first["pid"] != second["pid"]
    (status,) = launcher.server_status()
    assert status["pid"] == first["ppid"] and status["served"] == 2
    assert status["responding"] and status["running"] == 0
    # SAEFLOW_* variables are part of the key: another server
    other = _info(sfl.run("info", "X", extra={"SAEFLOW_TEST_FLAVOUR": "b"}))
    assert other["ppid"] != first["ppid"]
    assert len(launcher.server_status()) == 2
    assert len(sfl.sockets()) == 2


def test_concurrent_requests(sfl):
    assert sfl.run("exit", "0").returncode == 0  # warm
    a, b = str(sfl.base / "a"), str(sfl.base / "b")
    p1 = sfl.popen("barrier", a, b)
    p2 = sfl.popen("barrier", b, a)
    assert p1.wait(timeout=30) == 0, p1.stderr.read()
    assert p2.wait(timeout=30) == 0, p2.stderr.read()
    p1.stdout.close(), p1.stderr.close(), p2.stdout.close(), p2.stderr.close()
    assert len(launcher.server_status()) == 1


def test_disabled_runs_in_process(sfl):
    proc = subprocess.Popen([launcher.sys.executable, "-c", CLIENT, "info", "X"],
                            env={**sfl.env, "SAEFLOW_STAGE_SERVER": "0"}, cwd=sfl.base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    info = json.loads(out)
    assert info["pid"] == proc.pid and info["in_server"] is True
    assert err == ""
    assert sfl.sockets() == []


def test_server_that_cannot_start_falls_back_with_one_line(sfl):
    proc = subprocess.Popen([launcher.sys.executable, "-c", CLIENT, "info", "X"],
                            env={**sfl.env, "SFL_BREAK": "1"}, cwd=sfl.base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["pid"] == proc.pid  # ran in-process
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("saeflow: the stage server is unavailable")
    assert "broken on purpose" in lines[0]
    assert lines[0].endswith("running in-process")
    assert sfl.sockets() == []
    assert not any(_alive(pid) for pid in sfl.server_pids())


def test_unusable_runtime_dir_falls_back(sfl):
    blocker = sfl.base / "file"
    blocker.write_text("")
    proc = sfl.run("exit", "5", extra={launcher.ENV_RUNTIME_DIR: str(blocker / "rt")})
    assert proc.returncode == 5
    assert proc.stderr.count("\n") == 1 and "running in-process" in proc.stderr


def test_idle_server_stops_and_removes_its_socket(sfl):
    assert sfl.run("exit", "0", extra={launcher.ENV_IDLE: "0.5"}).returncode == 0
    (info,) = sfl.infos()
    assert _wait_until(lambda: not _alive(info["pid"]))
    assert sfl.sockets() == [] and sfl.infos() == []
    assert launcher.server_status() == []


def test_signals_reach_the_child(sfl):
    marker = sfl.base / "terminated"
    proc = sfl.popen("term", str(marker))
    assert proc.stdout.readline().startswith("ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7  # the child's handler ran and its status came back
    assert marker.exists()
    proc.stdout.close(), proc.stderr.close()

    proc = sfl.popen("sleep")
    child = int(proc.stdout.readline().split()[1])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not _alive(child)
    proc.stdout.close(), proc.stderr.close()


def test_a_killed_client_takes_its_child_along(sfl):
    proc = sfl.popen("sleep")
    child = int(proc.stdout.readline().split()[1])
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()
    assert _wait_until(lambda: not _alive(child))
    assert launcher.server_status()[0]["running"] == 0


def test_stop_servers(sfl):
    assert sfl.run("exit", "0").returncode == 0
    (info,) = sfl.infos()
    assert launcher.stop_servers() == 1
    assert not _alive(info["pid"])
    assert sfl.sockets() == [] and launcher.server_status() == []
    assert launcher.stop_servers() == 0


def test_key_follows_code_and_environment(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    module = pkg / "mod.py"
    module.write_text("x = 1\n")
    (pkg / "notes.txt").write_text("")
    env = {"PATH": "/bin", "PREFECT_API_URL": "http://a/api", "HOME": str(tmp_path)}

    def key(**changes):
        return launcher.compute_key(env={**env, **changes}, roots=[str(pkg)],
                                    cwd=str(tmp_path))

    base = key()
    assert key() == base
    assert key(PATH="/usr/bin") == base  # not a key variable
    assert key(MLFLOW_RUN_ID="abc") == base  # per-run variables are left out
    assert key(PREFECT__FLOW_RUN_ID="abc") == base
    assert key(PREFECT_API_URL="http://b/api") != base
    assert key(OMP_NUM_THREADS="1") != base
    assert key(SAEFLOW_ANYTHING="1") != base
    (pkg / "notes.txt").write_text("more")  # not a .py file
    assert key() == base
    st = module.stat()
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key() != base
    touched = key()
    (tmp_path / "prefect.toml").write_text("[api]\nurl = 'http://c/api'\n")
    assert key() != touched


def test_runtime_dir_is_private(tmp_path, monkeypatch):
    path = tmp_path / "rt"
    monkeypatch.setenv(launcher.ENV_RUNTIME_DIR, str(path))
    assert launcher.runtime_dir() == str(path)
    assert path.stat().st_mode & 0o777 == 0o700
    path.chmod(0o755)
    launcher.runtime_dir()
    assert path.stat().st_mode & 0o777 == 0o700
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(PermissionError, match="belongs to uid"):
        launcher.runtime_dir()


def test_launcher_imports_nothing_heavy(python, subprocess_env, repo_root):
    code = ("import sys, flows.launcher; "
            "print(sorted(m for m in ('torch', 'numpy', 'prefect', 'mlflow', 'sklearn') "
            "if m in sys.modules))")
    proc = subprocess.run([python, "-c", code], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_killed_server_is_replaced(sfl):
    first = _info(sfl.run("info", "X"))
    os.kill(first["ppid"], signal.SIGKILL)  # leaves its socket and info file behind
    assert _wait_until(lambda: not _alive(first["ppid"]))
    second = _info(sfl.run("info", "X"))
    assert second["ppid"] != first["ppid"]
    assert [s["pid"] for s in launcher.server_status()] == [second["ppid"]]


def test_use_server(monkeypatch):
    monkeypatch.delenv(launcher.ENV_DISABLE, raising=False)
    monkeypatch.setattr(launcher, "IN_SERVER", False)
    assert launcher.use_server()
    monkeypatch.setenv(launcher.ENV_DISABLE, "0")
    assert not launcher.use_server()
    monkeypatch.setenv(launcher.ENV_DISABLE, "1")
    monkeypatch.setattr(launcher, "IN_SERVER", True)  # never from inside a server
    assert not launcher.use_server()


def test_messages_are_read_one_at_a_time():
    """The pid and the exit status can arrive in one read: neither may be lost."""
    import socket
    import threading

    a, b = socket.socketpair()
    with a, b, open(os.devnull) as null:
        launcher.send_msg(a, {"pid": 1}, [null.fileno()])
        launcher.send_msg(a, {"exit": 3})

        def rest() -> None:  # more than a socket buffer holds: from another thread
            launcher.send_msg(a, {"big": "x" * 300_000})
            a.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=rest)
        writer.start()
        msg, fds = launcher.recv_msg(b, maxfds=3)
        assert msg == {"pid": 1} and len(fds) == 1
        os.close(fds[0])
        assert launcher.recv_msg(b) == ({"exit": 3}, [])
        assert launcher.recv_msg(b) == ({"big": "x" * 300_000}, [])
        assert launcher.recv_msg(b) is None
        writer.join()


def test_a_signal_before_the_child_exists_is_passed_on(sfl):
    assert sfl.run("exit", "0").returncode == 0  # warm
    proc = sfl.popen("sleep", client=EARLY_SIGTERM_CLIENT)
    out, err = proc.communicate(timeout=30)
    # held until the pid came, then passed on: the child died of it (no 30 s sleep)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert launcher.server_status()[0]["running"] == 0

    # nothing was started (a new key, whose server cannot start): the signal is this
    # process's own after all, not run in-process
    proc = sfl.popen("info", "X", client=EARLY_SIGTERM_CLIENT,
                     extra={"SFL_NO_SERVER": "1", "SAEFLOW_TEST_FLAVOUR": "b"})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err
    assert out == ""


def test_a_lost_server_still_yields_the_commands_status(sfl):
    marker = sfl.base / "go"
    proc = sfl.popen("wait", str(marker), "5")
    child = int(proc.stdout.readline().split()[1])
    (info,) = sfl.infos()
    os.kill(info["pid"], signal.SIGKILL)
    assert _wait_until(lambda: not _alive(info["pid"]))
    assert _alive(child)  # the command outlives its server
    marker.touch()
    assert proc.wait(timeout=30) == 5  # its own status, not a guess
    assert "lost the stage server" in proc.stderr.read()
    assert not _alive(child)
    proc.stdout.close(), proc.stderr.close()


def test_stopping_finishes_running_commands(sfl):
    marker = sfl.base / "go"
    proc = sfl.popen("wait", str(marker), "6")
    proc.stdout.readline()
    (info,) = sfl.infos()
    assert launcher.stop_servers(wait=0) == 1
    assert _wait_until(lambda: sfl.sockets() == [])  # takes no new commands ...
    assert _alive(info["pid"])  # ... but waits for the one it runs
    second = _info(sfl.run("info", "X"))  # a new command goes to a new server
    assert second["ppid"] != info["pid"]
    marker.touch()
    assert proc.wait(timeout=30) == 6
    assert proc.stderr.read() == ""  # the status came from the server, as usual
    assert _wait_until(lambda: not _alive(info["pid"]))
    proc.stdout.close(), proc.stderr.close()


def test_server_runs_the_installed_code_not_the_working_folders_copy(sfl, tmp_path):
    """DVC runs queued experiments in copies of the project, with a `flows/` folder in the
    working directory. The server must import the packages the client's key was computed
    from, never the copy in the working folder (which `python -m` would put first)."""
    copy = sfl.base / "copy"
    shutil.copytree(Path(launcher.__file__).parent, copy / "flows")
    (copy / "flows" / "launcher.py").write_text(
        (copy / "flows" / "launcher.py").read_text() + "\n# a different copy\n")
    # the client runs as the `saeflow` console script does: the working folder is not on
    # its sys.path
    console = "import sys; del sys.path[0]; " + CLIENT
    proc = subprocess.run([launcher.sys.executable, "-c", console, "origin"], env=sfl.env,
                          cwd=copy, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # served, no fallback notice
    assert proc.stdout.strip() == launcher.__file__
    (info,) = sfl.infos()
    assert all(not r.startswith(str(copy)) for r in info.get("roots", []))

"""The services a pipeline run talks to, and the one saeflow may start: Prefect's own
persistent server.

Local (the default, one user):

- Prefect: when ``PREFECT_API_URL`` is unset, one persistent Prefect server per Prefect home
  (``PREFECT_HOME``, default ``~/.prefect``), started on first use with Prefect's own
  background mode (``prefect server start --background``) on 127.0.0.1, port
  ``PREFECT_SERVER_API_PORT`` (default 4200), and stopped with ``prefect server stop``.
  saeflow keeps no process of its own: the server is Prefect's, its pid file is Prefect's.
- MLflow: a SQLite file in the project (:mod:`flows.tracking`).

Team (the same code; environment variables and ``dvc remote`` only): ``PREFECT_API_URL`` +
``PREFECT_API_AUTH_STRING``, ``MLFLOW_TRACKING_URI`` + ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, and a default DVC remote.

No saeflow process ever starts Prefect's temporary per-process ("ephemeral") server:
:func:`use_prefect` turns that mode off before Prefect is imported, so a missing API URL is
an error, never a silent 5-8 s server per process.

Standard library only (it runs before Prefect is imported, and in ``saeflow server``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PREFECT_DEFAULTS = {
    # never start the temporary per-process server (Prefect's default profile allows it)
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
    # offline machines otherwise log telemetry failures
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the stages print their own one-line summaries; Prefect's per-run INFO lines are noise
    "PREFECT_LOGGING_LEVEL": "WARNING",
}
LOCAL_HOST = "127.0.0.1"
DEFAULT_PORT = 4200  # Prefect's own default
START_TIMEOUT_S = 120.0
"""A fresh Prefect database is migrated on first start: 11 s on a quiet 2-core machine."""
PID_FILE = "server.pid"  # Prefect's name for its background server's pid file


class ServiceError(RuntimeError):
    """A service cannot be started or reached (reported in one line)."""


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser(
    ).resolve()


def local_port() -> int:
    raw = os.environ.get("PREFECT_SERVER_API_PORT", str(DEFAULT_PORT))
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ValueError(f"PREFECT_SERVER_API_PORT={raw!r}: not a port number")
    return port


def local_api_url() -> str:
    return f"http://{LOCAL_HOST}:{local_port()}/api"


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def _auth_header(auth: str | None) -> dict[str, str]:
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def _request(url: str, *, auth: str | None = None, data: dict | None = None,
             timeout: float = 3.0) -> tuple[int, str]:
    """(HTTP status, body) of a GET (or a JSON POST when ``data`` is given); status 0 with the
    reason when nothing answered."""
    body = None if data is None else json.dumps(data).encode()
    headers = {**_auth_header(auth), **({"Content-Type": "application/json"} if body else {})}
    req = urllib.request.Request(url, data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # http(s) URLs only
            return resp.status, resp.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.reason or ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, " ".join(str(reason).split()) or type(exc).__name__


def prefect_problem(api_url: str, auth: str | None = None, timeout: float = 3.0) -> str | None:
    """None if the Prefect API answers (and, where an auth string is given or required,
    accepts it); else what is wrong, in a few words."""
    status, reason = _request(api_url.rstrip("/") + "/health", timeout=timeout)
    if status != 200:
        return f"no answer ({reason})" if status == 0 else f"health check: HTTP {status}"
    # /health is public; a read of the API shows whether the credentials are accepted
    status, reason = _request(api_url.rstrip("/") + "/flows/filter", auth=auth,
                              data={"limit": 1}, timeout=timeout)
    if status in (401, 403):
        return (f"HTTP {status}: credentials refused" if auth else
                f"HTTP {status}: the server needs credentials (set PREFECT_API_AUTH_STRING)")
    if status != 200:
        return f"HTTP {status} {reason}".strip() if status else f"no answer ({reason})"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie has exited: it only waits for its parent to collect it
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _server_port(pid: int) -> int | None:
    """The port of the Prefect server with this pid, read from its command line; None when
    the process is gone or is not a Prefect server (a pid reused after a reboot)."""
    if not _pid_alive(pid):
        return None
    if not Path("/proc/self/cmdline").exists():  # no /proc: trust the pid file
        return local_port()
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"prefect.server.api.server:create_app" not in args or b"--port" not in args:
        return None
    try:
        return int(args[args.index(b"--port") + 1])
    except (IndexError, ValueError):
        return None


def home_server(home: Path | None = None) -> tuple[int, int] | None:
    """(pid, port) of the running server that the Prefect home's pid file names, if any."""
    pid = _read_pid(home or prefect_home())
    port = _server_port(pid) if pid is not None else None
    return None if port is None else (pid, port)


def _port_free(port: int) -> bool:
    """Nothing listens on the port (connections in TIME_WAIT do not count, as for Prefect's
    own check)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCAL_HOST, port))
        except OSError:
            return False
    return True


def _prefect_cli(*args: str, env: dict[str, str], cwd: Path,
                 timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``prefect ARGS`` with this interpreter, in its own session: the background server
    it may start must not get the terminal's Ctrl-C meant for a stage."""
    try:
        return subprocess.run([sys.executable, "-m", "prefect", *args],
                              env={**env, "COLUMNS": "1000"},  # one-line messages
                              cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`prefect {' '.join(args)}` did not finish within "
                           f"{timeout:.0f} s") from None


def _server_env(home: Path) -> dict[str, str]:
    """The environment of the local server: this one less every Prefect, MLflow, DVC and
    saeflow setting (a team's API URL, auth string or database must not leak into it),
    plus its own: this home, loopback, the port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_", "SAEFLOW_"))}
    env.update(PREFECT_DEFAULTS)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": LOCAL_HOST,
                "PREFECT_SERVER_API_PORT": str(local_port()),
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"})
    return env


@contextlib.contextmanager
def _start_lock(home: Path):
    """One starter (or stopper) at a time: eight stages that find no server start one."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        fh = open(home / "saeflow-server.lock", "a")  # closed by the with below
    except OSError as exc:
        raise ServiceError(f"PREFECT_HOME={home}: {exc.strerror}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _other_port(home: Path, running: int, wanted: int) -> ServiceError:
    return ServiceError(f"the Prefect server of PREFECT_HOME={home} runs on port {running}, "
                        f"not PREFECT_SERVER_API_PORT={wanted}; `saeflow server stop` stops it")


def start_local(timeout: float = START_TIMEOUT_S) -> tuple[str, bool]:
    """Make sure the local persistent Prefect server of this Prefect home answers on its
    port; (API URL, started now). A server that this home did not start, or a port taken
    by another program, is a one-line ServiceError (never silently someone else's)."""
    url, home, port = local_api_url(), prefect_home(), local_port()
    mine = home_server(home)
    if mine is not None and mine[1] == port and prefect_problem(url, timeout=1.0) is None:
        return url, False
    with _start_lock(home):
        mine = home_server(home)
        started = False
        if mine is None:
            # absent, or left by a reboot or a kill -9 (Prefect would refuse to start)
            (home / PID_FILE).unlink(missing_ok=True)
            if _request(url.rstrip("/") + "/health", timeout=2.0)[0] != 0:
                raise ServiceError(f"a server not started from PREFECT_HOME={home} answers "
                                   f"at {url}: point saeflow at it with PREFECT_API_URL, or "
                                   "choose another port with PREFECT_SERVER_API_PORT")
            if not _port_free(port):
                raise ServiceError(f"port {port} on {LOCAL_HOST} is in use by another "
                                   "program; choose another with PREFECT_SERVER_API_PORT")
            done = _prefect_cli("server", "start", "--background", "--host", LOCAL_HOST,
                                "--port", str(port), env=_server_env(home), cwd=home)
            mine = home_server(home)
            if done.returncode != 0 or mine is None:
                lines = [ln.strip() for ln in (done.stdout + done.stderr).splitlines()
                         if ln.strip()]
                why = lines[-1] if lines else f"exit status {done.returncode}"
                raise ServiceError(f"could not start the Prefect server at {url}: {why}")
            started = True
        elif mine[1] != port:
            raise _other_port(home, mine[1], port)
        # started now, or by another saeflow process a moment ago: wait until it answers
        deadline = time.monotonic() + timeout
        while (problem := prefect_problem(url, timeout=1.0)) is not None:
            if not _pid_alive(mine[0]):
                (home / PID_FILE).unlink(missing_ok=True)
                raise ServiceError(f"the Prefect server at {url} exited while starting; run "
                                   f"`prefect server start --port {port}` to see why")
            if time.monotonic() > deadline:
                raise ServiceError(f"the Prefect server at {url} did not answer within "
                                   f"{timeout:.0f} s ({problem})")
            time.sleep(0.2)
    return url, started


def stop_local(timeout: float = 30.0) -> int | None:
    """Stop this Prefect home's server with ``prefect server stop`` and wait until it has
    exited (so the port is free). Returns its pid, or None if none was running. A pid file
    naming any other process is removed, never acted on."""
    home = prefect_home()
    with _start_lock(home):
        mine = home_server(home)
        if mine is None:
            (home / PID_FILE).unlink(missing_ok=True)
            return None
        pid = mine[0]
        _prefect_cli("server", "stop", env=_server_env(home), cwd=home)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    return pid


def use_prefect() -> str:
    """Prepare this process for Prefect (call before importing it): the defaults above,
    and an API URL: ``PREFECT_API_URL`` if set (a team server), else the local persistent
    server, started if it is not running. Returns the URL."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    url, started = start_local()
    if started:
        print(f"saeflow: started the Prefect server at {url} (UI {ui_url(url)}; "
              "`saeflow server stop` stops it)", file=sys.stderr)
    os.environ["PREFECT_API_URL"] = url
    return url


# --- status of every configured service -------------------------------------------------


@dataclass(frozen=True)
class ServiceStatus:
    service: str
    where: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.service:10s} {'ok  ' if self.ok else 'FAIL'} {self.where}  {self.detail}"


def prefect_status() -> ServiceStatus:
    team = os.environ.get("PREFECT_API_URL")
    if team:
        problem = prefect_problem(team, os.environ.get("PREFECT_API_AUTH_STRING"))
        return ServiceStatus("Prefect", team, problem is None,
                             f"UI {ui_url(team)}" if problem is None else problem)
    url, home, port = local_api_url(), prefect_home(), local_port()
    mine = home_server(home)
    if mine is not None and mine[1] != port:
        return ServiceStatus("Prefect", url, False, str(_other_port(home, mine[1], port)))
    problem = prefect_problem(url)
    if mine is not None:
        detail = (f"UI {ui_url(url)}; local persistent server (pid {mine[0]}, PREFECT_HOME "
                  f"{home})")
        return ServiceStatus("Prefect", url, problem is None,
                             detail if problem is None else f"pid {mine[0]}: {problem}")
    if _request(url.rstrip("/") + "/health", timeout=2.0)[0] != 0:
        return ServiceStatus("Prefect", url, False, f"a server not started from PREFECT_HOME="
                             f"{home} answers here (set PREFECT_API_URL to use it, or "
                             "PREFECT_SERVER_API_PORT)")
    return ServiceStatus("Prefect", url, True, "local server not running (it starts on "
                         "first use, or with `saeflow server start`)")


def mlflow_status(uri: str) -> ServiceStatus:
    """Whether the tracking store answers: a SQLite file is read (read-only), a server is
    asked for one experiment with the credentials of the environment, a database is
    connected to."""
    if uri.startswith(("http://", "https://")):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        auth = f"{user}:{password}" if user else None
        # a basic-auth server checks a password hash per request: allow it time
        status, reason = _request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
                                  "?max_results=1", auth=auth, timeout=15.0)
        if status == 200:
            return ServiceStatus("MLflow", uri, True, "tracking server" +
                                 (f" (user {user})" if user else ""))
        if status in (401, 403):
            hint = ("credentials refused" if auth else "the server needs credentials (set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")
            return ServiceStatus("MLflow", uri, False, f"HTTP {status}: {hint}")
        return ServiceStatus("MLflow", uri, False, f"no answer ({reason})" if status == 0
                             else f"HTTP {status} {reason}".strip())
    if uri.startswith("sqlite:///"):
        from flows.tracking import sqlite_store_problem

        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            return ServiceStatus("MLflow", uri, True, "local store (created on first run)")
        problem = sqlite_store_problem(db)
        if problem:
            return ServiceStatus("MLflow", uri, False, problem)
        return ServiceStatus("MLflow", uri, True, "local store")
    from flows.tracking import database_problem, redact

    problem = database_problem(uri)
    if problem:
        return ServiceStatus("MLflow", redact(uri), False, f"cannot connect: {problem}")
    return ServiceStatus("MLflow", redact(uri), True, "database store")


def dvc_status(root: Path) -> ServiceStatus:
    """The project's default DVC remote, and whether it can be listed."""
    from flows.lineage import default_remote

    try:
        remote = default_remote(root)
    except ValueError as exc:
        return ServiceStatus("DVC remote", str(root), False, str(exc))
    if remote is None:
        return ServiceStatus("DVC remote", "-", True, "none configured (local cache only; "
                             "a team adds one with `dvc remote add -d NAME URL`)")
    name, url = remote
    problem = remote_problem(root, name)
    return ServiceStatus("DVC remote", url, problem is None,
                         f"remote {name!r}" if problem is None else problem)


def remote_problem(root: Path, name: str) -> str | None:
    """None if DVC can reach the remote ``name``; else why not."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            odb = repo.cloud.get_remote_odb(name)
            if odb.fs.protocol == "local":
                # dvc push creates the folder: its nearest existing ancestor must be writable
                folder = Path(odb.path)
                while not folder.exists() and folder != folder.parent:
                    folder = folder.parent
                if not os.access(folder, os.W_OK):
                    return f"{odb.path}: not writable"
            else:
                odb.fs.exists(odb.path)  # reaches the remote; raises when it cannot
    except Exception as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None

"""Run ``saeflow`` commands in a warm, preloaded fork server (the "stage server").

DVC starts every pipeline stage as a fresh process. Importing torch, scikit-learn, mlflow
and prefect costs 4-6 s, and a Prefect flow without ``PREFECT_API_URL`` starts a temporary
Prefect server (5-8 s more) in every process. ``run_in_server`` instead hands the command
to a long-lived server that imported all of that once (and runs one Prefect server for
all stages): the server forks, the child takes over the caller's stdin/stdout/stderr,
working directory and environment, runs the command and its exit status comes back. Once
warm a command pays ~0.1 s instead of ~10 s. Nothing has to be started by hand: the first
call starts the server, which stops by itself after 15 idle minutes.

This module is the client. It imports only the standard library (and lazily), so that
``saeflow`` stays quick to start; the server is ``flows.stage_server``. ``flows.cli``
hands a command over with ``if use_server(): return run_in_server(argv)``: ``use_server``
is false inside a server child (``IN_SERVER``) and with ``SAEFLOW_STAGE_SERVER=0``.
``server_status()`` and ``stop_servers()`` back ``saeflow server status|stop``.

Which server: a key (SHA-256) of the Python interpreter, the (path, size, mtime) of every
``.py`` file of the ``flows`` and ``sae_core`` packages, the site-packages directories'
mtimes (a ``pip install`` changes them), Prefect's configuration files, and the environment
variables that could change what the server preloaded (``PREFECT_*``, ``MLFLOW_*``,
``OMP_*``, ``MKL_*``, ``OPENBLAS_*``, ``CUDA_*``, ``TORCH_*``, ``PYTHON*``, ``SAEFLOW_*``,
``LD_LIBRARY_PATH``, ``HOME``, ``LANG``, ``LC_*``; see ``KEY_ENV_EXCLUDE`` for the per-run
variables left out). Edit the code or change such a variable and the next command starts a
new server; a newer server asks the stale ones (same interpreter, packages and environment,
older code) to stop once their running commands end.

Where: a directory private to the user, ``$SAEFLOW_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/saeflow``, else ``/tmp/saeflow-<uid>`` (mode 0700, owner checked), holds
per key ``<key16>.sock`` (the socket), ``.json`` (what ``server_status`` reports), ``.log``
(the server's log), ``.prefect.log`` (its Prefect server's log) and ``.lock``.

Environment:

- ``SAEFLOW_STAGE_SERVER=0``: never use the server; run every command in-process.
- ``SAEFLOW_STAGE_SERVER_IDLE``: seconds a server waits idle before it stops (900).
- ``SAEFLOW_STAGE_SERVER_START_TIMEOUT``: seconds to wait for a server to start (90).
- ``SAEFLOW_RUNTIME_DIR``: the directory above.
- ``SAEFLOW_STAGE_ENTRY``: ``module:function`` to run instead of ``flows.cli:main``, called
  with the argument list; the server then preloads only that module (a test hook).

If the server cannot be used (no Unix sockets, the directory cannot be made, the server
dies while starting) the command runs in-process after a one-line notice on stderr.

Protocol (one connection per command, length-prefixed JSON, see ``send_msg``): the client
sends ``{"op": "run", ...}`` with its fds 0-2; the child sends ``{"pid": N}`` once it leads
its own process group, and ``{"child_exit": N}`` just before it exits; the server sends
``{"exit": N}`` (negative: killed by signal -N) once it has reaped the child. The child
keeps its own copy of the connection, so a client whose server dies (killed, OOM) still
waits for the command and gets its status from the child. The client's SIGINT, SIGTERM and
SIGHUP forwarding is in place before the request goes out; signals that come before the
pid is known are held and passed on with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import time
from typing import Any

#: True in a stage-server child and in the in-process fallback: ``flows.cli`` must then run
#: the command itself instead of handing it to ``run_in_server`` again.
IN_SERVER = False

DEFAULT_ENTRY = "flows.cli:main"
DEFAULT_IDLE_TIMEOUT = 900.0
DEFAULT_START_TIMEOUT = 90.0
PACKAGES = ("flows", "sae_core")
PROTOCOL = 2

ENV_DISABLE = "SAEFLOW_STAGE_SERVER"
ENV_RUNTIME_DIR = "SAEFLOW_RUNTIME_DIR"
ENV_IDLE = "SAEFLOW_STAGE_SERVER_IDLE"
ENV_START_TIMEOUT = "SAEFLOW_STAGE_SERVER_START_TIMEOUT"
ENV_ENTRY = "SAEFLOW_STAGE_ENTRY"

KEY_ENV_PREFIXES = ("PREFECT_", "MLFLOW_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "TORCH_",
                    "PYTHON", "SAEFLOW_", "LC_")
KEY_ENV_NAMES = ("LD_LIBRARY_PATH", "HOME", "LANG")
#: Variables that differ from run to run and are read only when used, never at import:
#: keying on them would start a server per stage. ``PREFECT__*`` are Prefect's own
#: per-run variables (flow run id ...).
KEY_ENV_EXCLUDE = ("SAEFLOW_STAGE_SERVER", "SAEFLOW_TIMINGS", "SAEFLOW_TRACKING",
                   "SAEFLOW_PROJECT_ROOT", "SAEFLOW_PIPELINE_RUN_ID", "MLFLOW_RUN_ID",
                   "MLFLOW_TRACKING_URI", "PREFECT__")

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 64 << 20


class _Fallback(Exception):
    """The server cannot take the command; it runs in-process (after a notice)."""


# --------------------------------------------------------------------------- the key


def package_roots() -> list[str]:
    """The directories of the ``flows`` and ``sae_core`` packages, found without importing
    anything heavy (``find_spec`` of a top-level package only reads its location)."""
    import importlib.util

    roots: list[str] = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.extend(os.path.abspath(p) for p in spec.submodule_search_locations)
    return roots


def _key_env_items(env: dict[str, str]) -> list[tuple[str, str]]:
    items = []
    for name in sorted(env):
        if not (name.startswith(KEY_ENV_PREFIXES) or name in KEY_ENV_NAMES):
            continue
        if name in KEY_ENV_EXCLUDE or name.startswith(tuple(x for x in KEY_ENV_EXCLUDE
                                                            if x.endswith("_"))):
            continue
        items.append((name, env[name]))
    return items


def _prefect_config_digest(env: dict[str, str], cwd: str) -> str:
    """Prefect reads its settings once, at import, also from files: profiles.toml, and
    ``.env``, ``prefect.toml`` and ``pyproject.toml``'s ``[tool.prefect]`` in the working
    directory. Their Prefect content goes into the key."""
    h = hashlib.sha256()
    home = env.get("PREFECT_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                   ".prefect")
    for path in (env.get("PREFECT_PROFILES_PATH") or os.path.join(home, "profiles.toml"),):
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            pass
    for name in (".env", "prefect.toml", "pyproject.toml"):
        try:
            with open(os.path.join(cwd, name), "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        if name == ".env":
            data = b"\n".join(line for line in data.splitlines() if b"PREFECT_" in line)
        elif name == "pyproject.toml" and b"tool.prefect" not in data:
            continue
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def key_parts(env: dict[str, str] | None = None, roots: list[str] | None = None,
              cwd: str | None = None) -> dict[str, Any]:
    """The pieces of the server key: ``code`` (package files and installed packages) and
    ``env`` (variables and Prefect configuration) digests, and the interpreter."""
    env = dict(os.environ) if env is None else env
    roots = package_roots() if roots is None else roots
    cwd = os.getcwd() if cwd is None else cwd

    code = hashlib.sha256()
    for root in sorted(roots):
        code.update(b"root\0" + os.fsencode(root) + b"\0")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames
                                 if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                rel = os.path.relpath(path, root)
                code.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode(
                    "utf-8", "surrogateescape"))
    # installing, upgrading or removing a distribution changes its site-packages directory
    for entry in sys.path:
        if os.path.basename(entry) in ("site-packages", "dist-packages"):
            try:
                code.update(f"site\0{entry}\0{os.stat(entry).st_mtime_ns}\0".encode(
                    "utf-8", "surrogateescape"))
            except OSError:
                pass

    envh = hashlib.sha256()
    for name, value in _key_env_items(env):
        envh.update(f"{name}\0{value}\0".encode("utf-8", "surrogateescape"))
    envh.update(_prefect_config_digest(env, cwd).encode())
    return {"python": sys.executable, "version": sys.version, "roots": sorted(roots),
            "code": code.hexdigest(), "env": envh.hexdigest()}


def compute_key(env: dict[str, str] | None = None, roots: list[str] | None = None,
                cwd: str | None = None) -> str:
    """The server key: a hex SHA-256 of ``key_parts`` and the protocol version."""
    parts = key_parts(env, roots, cwd)
    blob = json.dumps([PROTOCOL, parts], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------- runtime directory


def runtime_dir(create: bool = True) -> str:
    """The user's private directory for sockets, info and log files (mode 0700, owned by
    the user; a directory that someone else owns is refused with ``PermissionError``)."""
    path = os.environ.get(ENV_RUNTIME_DIR)
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg):
            path = os.path.join(xdg, "saeflow")
        else:
            path = f"/tmp/saeflow-{os.getuid()}"
    path = os.path.abspath(path)
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass
    import stat

    st = os.lstat(path)  # FileNotFoundError when create=False and it does not exist
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class ServerPaths:
    """The files of the server for one key inside the runtime directory."""

    def __init__(self, directory: str, key: str) -> None:
        stem = os.path.join(directory, key[:16])
        self.directory = directory
        self.key = key
        self.socket = stem + ".sock"
        self.info = stem + ".json"
        self.log = stem + ".log"
        self.prefect_log = stem + ".prefect.log"
        self.lock = stem + ".lock"


# ------------------------------------------------------------------------------ messages


def send_msg(sock: socket.socket, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    """One length-prefixed JSON message, with ``fds`` passed along (SCM_RIGHTS)."""
    data = json.dumps(obj).encode()
    data = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[Any, list[int]] | None:
    """The next message and the fds that came with it; None at end of stream.

    Reads exactly one message, never beyond it: the server sends several on one connection
    (the child's pid, later its exit status), and when they arrive together the bytes of
    the next one must stay in the socket for the next call."""
    fds: list[int] = []
    try:
        if maxfds:  # the fds ride on the message's first byte
            head, got, flags, _ = socket.recv_fds(sock, _HEADER.size, maxfds)
            fds.extend(got)
            if flags & getattr(socket, "MSG_CTRUNC", 0):
                raise OSError("file descriptors were truncated")
            if not head:
                _close_fds(fds)
                return None
            head = _recv_exact(sock, _HEADER.size - len(head), head)
        else:
            head = _recv_exact(sock, _HEADER.size)
        if head is None:
            _close_fds(fds)
            return None
        (size,) = _HEADER.unpack(head)
        if size > _MAX_MESSAGE:
            raise OSError(f"message of {size} bytes is too large")
        body = _recv_exact(sock, size)
        if body is None:
            _close_fds(fds)
            return None
        return json.loads(body), fds
    except BaseException:
        _close_fds(fds)
        raise


def _recv_exact(sock: socket.socket, size: int, buf: bytes = b"") -> bytes | None:
    """``buf`` plus exactly ``size`` more bytes; None at end of stream (also midway)."""
    want = len(buf) + size
    while len(buf) < want:
        chunk = sock.recv(min(want - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _connect(path: str, timeout: float | None = None) -> socket.socket | None:
    """A connection to a listening server at ``path``; None when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise _Fallback(f"cannot connect to {path}: {exc}") from exc
    return sock


# ------------------------------------------------------------------------------- client


def resolve_entry(spec: str):
    """``"module:function"`` -> the function."""
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"entry point {spec!r} is not of the form module:function")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def entry_point() -> str:
    return os.environ.get(ENV_ENTRY) or DEFAULT_ENTRY


def run_local(argv: list[str]) -> int:
    """Run the command in this process (``SAEFLOW_STAGE_SERVER=0`` or the fallback)."""
    global IN_SERVER
    IN_SERVER = True
    rc = resolve_entry(entry_point())(list(argv))
    return 0 if rc is None else rc


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def use_server() -> bool:
    """Whether a command should go to the stage server: not when already in one (or in the
    in-process fallback), nor with ``SAEFLOW_STAGE_SERVER=0``."""
    return not IN_SERVER and os.environ.get(ENV_DISABLE, "").strip() != "0"


def run_in_server(argv: list[str]) -> int:
    """Run ``saeflow ARGV`` in the stage server (starting it if needed) with this process's
    stdin/stdout/stderr, working directory and environment; return its exit status
    (128 + N when signal N ended it). SIGINT, SIGTERM and SIGHUP sent to this process are
    passed on, also those that arrive before the child exists (they are held until its pid
    is known). Falls back to running in-process; see the module documentation."""
    argv = [str(a) for a in argv]
    if (not use_server() or not hasattr(socket, "AF_UNIX") or not hasattr(socket, "send_fds")
            or not hasattr(os, "fork")):
        return run_local(argv)
    forwarder = _Forwarder()
    forwarder.install()  # before the request goes out: no window where a signal kills us
    try:
        try:
            sock, first = _submit(argv)
        except (_Fallback, OSError) as exc:
            forwarder.restore(reraise=True)  # a held signal was meant for this process
            detail = " ".join(str(exc).split())
            print(f"saeflow: the stage server is unavailable ({detail}); running in-process",
                  file=sys.stderr, flush=True)
            return run_local(argv)
        try:
            return _wait(sock, first, forwarder)
        finally:
            sock.close()
    finally:
        forwarder.restore()


class _Forwarder:
    """Passes SIGINT, SIGTERM and SIGHUP on to the child's process group. Installed before
    the request is sent; a signal that comes before the child's pid is known is held and
    passed on as soon as it is (the child then ends as if it had got it itself)."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.held: list[int] = []
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.pid is None:
            self.held.append(signum)
        else:
            _signal_child(self.pid, signum)

    def set_pid(self, pid: int) -> None:
        self.pid = pid
        while self.held:
            _signal_child(pid, self.held.pop(0))

    def restore(self, reraise: bool = False) -> None:
        """Put the previous handlers back; with ``reraise``, deliver the held signals to
        this process (nothing was started that could take them)."""
        import signal

        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            # None: a handler not set from Python; the default is the nearest we can do
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        held, self.held = self.held, []
        if reraise:
            for sig in dict.fromkeys(held):
                signal.raise_signal(sig)


def _signal_child(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _submit(argv: list[str]) -> tuple[socket.socket, dict]:
    """Send the request; return the connection and the first reply: ``{"pid": N}`` once
    the child runs (or ``{"exit": N}`` when it ended before it could say so)."""
    try:
        key = compute_key()
        paths = ServerPaths(runtime_dir(), key)
    except OSError as exc:
        raise _Fallback(f"no runtime directory: {exc}") from exc
    for _ in range(3):
        sock = _connect(paths.socket) or _start_server(paths)
        try:
            _send_request(sock, argv)
            reply = recv_msg(sock)
        except OSError:
            reply = None
        if reply is None:  # the server went away (idled out) before taking it: again
            sock.close()
            continue
        msg = reply[0]
        if isinstance(msg, dict) and ("pid" in msg or "exit" in msg):
            return sock, msg
        sock.close()
        raise _Fallback(str(msg.get("error", "unexpected reply") if isinstance(msg, dict)
                            else "unexpected reply"))
    raise _Fallback("the server kept closing the connection")


def _std_fds() -> tuple[list[int], list[int]]:
    """fds 0, 1 and 2 to pass on (/dev/null for a closed one) and those opened here."""
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            fds.append(null)
            opened.append(null)
    return fds, opened


def _send_request(sock: socket.socket, argv: list[str]) -> None:
    for stream in (sys.stdout, sys.stderr):  # what this process printed comes first
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    umask = os.umask(0o022)
    os.umask(umask)
    request = {"op": "run", "argv": argv, "argv0": sys.argv[0] if sys.argv else "saeflow",
               "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
    fds, opened = _std_fds()
    try:
        send_msg(sock, request, fds)
    finally:
        _close_fds(opened)


def _start_server(paths: ServerPaths) -> socket.socket:
    """Start the server for ``paths`` (one client at a time, under a lock) and connect."""
    import fcntl

    timeout = _float_env(ENV_START_TIMEOUT, DEFAULT_START_TIMEOUT)
    deadline = time.monotonic() + timeout
    try:
        lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _Fallback(f"cannot open {paths.lock}: {exc}") from exc
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another client is starting it
                if time.monotonic() > deadline:
                    raise _Fallback(f"another client has been starting the server for "
                                    f"{timeout:.0f} s") from None
                time.sleep(0.05)
        sock = _connect(paths.socket)
        if sock is None:
            _spawn(paths, deadline)
            sock = _connect(paths.socket)
        if sock is None:
            raise _Fallback(f"the server started but {paths.socket} does not answer")
        return sock
    finally:
        os.close(lock)


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)[-400:]


SERVER_BOOTSTRAP = (
    "import sys; del sys.path[0]; import runpy; "
    "runpy.run_module('flows.stage_server', run_name='__main__', alter_sys=True)")
"""How the server is started: like ``python -m flows.stage_server``, but with the working
folder taken off sys.path *before* ``flows`` is imported. With ``-m`` a client working in a
copy of the project (DVC's experiment folders) made the server import that copy's
``flows`` -- code other than the key's, from a folder that is deleted afterwards."""


def _spawn(paths: ServerPaths, deadline: float) -> None:
    """Start ``python -m flows.stage_server`` detached and wait until it says it is ready;
    it reports on a pipe: ``pid N`` at once, ``ready`` when it listens; end of file
    without ``ready`` means it died."""
    import select
    import subprocess

    roots = package_roots()
    cmd = [sys.executable, "-c", SERVER_BOOTSTRAP, "--socket", paths.socket,
           "--key", paths.key,
           "--idle-timeout", str(_float_env(ENV_IDLE, DEFAULT_IDLE_TIMEOUT)),
           "--entry", entry_point()]
    for parent in dict.fromkeys(os.path.dirname(r) for r in roots):
        cmd += ["--path", parent]
    read_end, write_end = os.pipe()
    cmd += ["--ready-fd", str(write_end)]
    try:
        log = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        _close_fds([read_end, write_end])
        raise _Fallback(f"cannot write {paths.log}: {exc}") from exc
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(write_end,), start_new_session=True)
    except OSError as exc:
        _close_fds([read_end])
        raise _Fallback(f"cannot start {sys.executable}: {exc}") from exc
    finally:
        _close_fds([write_end, log])
    buf = b""
    server_pid = None
    server_fd = None  # its pidfd, to see it gone
    try:
        while b"ready\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if server_pid:
                    _terminate(server_pid)
                raise _Fallback(f"the server did not start in time; see {paths.log}")
            if not select.select([read_end], [], [], remaining)[0]:
                continue
            chunk = os.read(read_end, 4096)
            if not chunk:
                # the pipe closes a moment before the process is gone: wait for that, so
                # that no half-exited server outlives this call
                if server_fd is not None:
                    select.select([server_fd], [], [], max(0.0, deadline - time.monotonic()))
                elif server_pid is not None:
                    while _alive(server_pid) and time.monotonic() < deadline:
                        time.sleep(0.01)
                tail = _log_tail(paths.log)
                raise _Fallback("the server exited while starting"
                                + (f": {tail}" if tail else "") + f" (log: {paths.log})")
            buf += chunk
            if server_pid is None and buf.startswith(b"pid ") and b"\n" in buf:
                server_pid = int(buf[4:buf.index(b"\n")])
                server_fd = _pidfd(server_pid)  # it cannot exit unseen: it holds the pipe
    finally:
        os.close(read_end)
        if server_fd is not None:
            os.close(server_fd)
        try:  # the launcher process forks the server off and exits at once
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _terminate(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive (in containers nobody may reap it)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _exit_status(code: int) -> int:
    """A wait status as the server reports it (negative: killed by that signal) -> the
    shell's exit status."""
    return 128 - code if code < 0 else code


def _wait(sock: socket.socket, first: dict, forwarder: _Forwarder) -> int:
    """Until the child's exit status arrives. The server sends it once it has reaped the
    child; the child itself sends its pid first and, just before it exits, its own status
    (``child_exit``). The child holds its end of the connection too, so if the server dies
    the connection still ends only when the child does, with the child's own status."""
    msg: Any = first
    pid: int | None = None
    pidfd: int | None = None  # opened while the child surely exists: immune to pid reuse
    child_code: int | None = None
    try:
        while True:
            if isinstance(msg, dict):
                if "pid" in msg and pid is None:
                    pid = int(msg["pid"])
                    pidfd = _pidfd(pid)
                    forwarder.set_pid(pid)
                if "exit" in msg:
                    return _exit_status(int(msg["exit"]))
                if "child_exit" in msg:
                    child_code = int(msg["child_exit"])
            try:
                reply = recv_msg(sock)
            except OSError:
                reply = None
            if reply is None:
                break
            msg = reply[0]
        if pid is not None:  # the server is gone: wait for the command itself to end
            _wait_gone(pid, pidfd)
        if child_code is not None:
            print(f"saeflow: lost the stage server while pid {pid} ran; it ended with "
                  f"status {_exit_status(child_code)}", file=sys.stderr, flush=True)
            return _exit_status(child_code)
        print(f"saeflow: lost the stage server while pid {pid} ran; its exit status is "
              f"unknown", file=sys.stderr, flush=True)
        return 1
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_gone(pid: int, pidfd: int | None) -> None:
    """Until process ``pid`` (not a child of this process, so no waitpid) has ended."""
    import select

    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has exited
        return
    while _alive(pid):
        time.sleep(0.05)


# ------------------------------------------------------------------- status and stopping


def _ask(path: str, request: dict, timeout: float = 3.0) -> dict | None:
    try:
        sock = _connect(path, timeout=timeout)
    except _Fallback:
        return None
    if sock is None:
        return None
    try:
        send_msg(sock, request)
        reply = recv_msg(sock)
        return reply[0] if reply else None
    except OSError:
        return None
    finally:
        sock.close()


def _infos(directory: str) -> list[tuple[str, dict]]:
    found = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                found.append((path, json.load(f)))
        except (OSError, ValueError):
            continue
    return found


def server_status() -> list[dict]:
    """The running stage servers of this user: socket, pid, key, started (epoch seconds),
    uptime_s, idle_s, running (commands now), served (commands so far), prefect_api_url,
    log. Info files of servers that died are removed."""
    try:
        directory = runtime_dir(create=False)
    except OSError:
        return []
    servers = []
    now = time.time()
    for path, info in _infos(directory):
        pid = info.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        live = _ask(info.get("socket", ""), {"op": "status"}) or {}
        entry = {k: info.get(k) for k in ("socket", "pid", "key", "started",
                                          "prefect_api_url", "log", "python")}
        entry["uptime_s"] = round(now - float(info.get("started") or now), 1)
        entry["responding"] = bool(live)
        for k in ("running", "served", "idle_s", "stopping"):
            if k in live:
                entry[k] = live[k]
        servers.append(entry)
    return servers


def stop_servers(wait: float = 15.0) -> int:
    """Ask every stage server of this user to stop (each finishes the commands it runs);
    wait up to ``wait`` seconds for them to exit. Returns how many were asked."""
    asked = []
    for entry in server_status():
        pid = entry["pid"]
        if _ask(entry.get("socket") or "", {"op": "stop"}) is None:
            try:  # not answering: only signal a process that is a stage server
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"flows.stage_server" not in f.read():
                        continue
            except OSError:
                pass
            _terminate(pid)
        asked.append(pid)
    deadline = time.monotonic() + wait
    while any(_alive(p) for p in asked) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(asked)

"""The stage server: a preloading fork server for ``saeflow`` commands.

Started by ``flows.launcher`` (never by hand) as
``python -m flows.stage_server --socket PATH --key KEY --ready-fd N ...``. It

1. forks itself off (the launcher process exits at once) and reports its pid on the
   ready pipe;
2. unless ``PREFECT_API_URL`` is set, starts ``prefect server start`` on a free local port
   (its own session, killed with the server, also when the server is killed: PDEATHSIG)
   and sets ``PREFECT_API_URL`` before anything imports prefect, which reads its settings
   at import;
3. meanwhile imports the heavy modules (torch, scikit-learn, mlflow, prefect, matplotlib
   with Agg, pandas, pyarrow, ``flows.cli`` and the modules that ``preload()`` of
   ``flows.cli``, else of ``flows.stages``, names), or only the entry module when
   ``--entry`` is not ``flows.cli:main``;
4. waits for the Prefect server's ``/api/health``;
5. listens on a temporary name and renames it onto ``--socket``: a client that connects
   finds a ready server, never a half-started one (and a client that finds nothing can
   tell "no server" from "starting", and sees the server die through the ready pipe);
6. writes ``ready`` on the pipe and serves: per request it checks that the peer is the
   same user (SO_PEERCRED), forks a child that takes the client's fds 0-2, cwd, env,
   umask and argv, runs the entry point and exits with its status. The child sends the
   client its pid (once it leads its own process group) and, just before it exits, its
   own status; the parent sends the exit status once it has reaped the child (negative:
   killed by that signal). Signals are blocked across ``fork`` until the child has reset
   the server's handlers, so that a signal the client passes on at once is not lost.

One thread, one ``selectors`` loop: the server never forks while another thread could
hold a lock. It stops when idle for ``--idle-timeout`` seconds with no child running, on
SIGTERM or a ``stop`` request (after its children end), or when its Prefect server dies;
it then removes its socket and info file and stops the Prefect server. Stopping never
drops a running command: the server takes no new connections (and serves those already
queued), then keeps running until every child has ended and its status has been sent. A
client that disappears (its connection closes) gets its child's process group SIGTERMed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

from flows import launcher

HEAVY_MODULES = ("torch", "sklearn.linear_model", "mlflow", "prefect", "prefect.flows",
                 "prefect.flow_engine", "prefect.task_engine",
                 # a first sqlite-backed MLflow run imports these: 0.8 s
                 "mlflow.store.tracking.sqlalchemy_store", "git",
                 "matplotlib", "matplotlib.pyplot", "pandas", "pyarrow", "pyarrow.parquet",
                 "flows.cli")
#: where the project lists its own modules to preload: ``preload() -> list[str]``
PRELOAD_HOOKS = ("flows.cli", "flows.stages")


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig():
    """A preexec_fn that has the kernel SIGTERM the child when the server dies (Linux);
    resolved here, since the forked child must not import."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


def _exit_code(code: object) -> int:
    """SystemExit's code as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


class StageServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths = launcher.ServerPaths(os.path.dirname(os.path.abspath(args.socket)),
                                          args.key)
        self.paths.socket = os.path.abspath(args.socket)
        self.entry = args.entry
        self.idle_timeout = args.idle_timeout
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.prefect: object | None = None  # subprocess.Popen
        self.prefect_url: str | None = None
        self.listener: socket.socket | None = None
        self.socket_ino: int | None = None
        self.selector: selectors.BaseSelector | None = None
        self.wakeup: tuple[int, int] | None = None
        self.children: dict[int, socket.socket | None] = {}
        self.served = 0
        self.stopping: str | None = None
        self.stop_requested: str | None = None
        self.parts: dict = {}
        self.pid = os.getpid()  # atexit cleanup runs in this process only, not in children

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        t0 = time.perf_counter()
        self.parts = launcher.key_parts()  # before PREFECT_API_URL changes the env
        mine = launcher.compute_key()
        if mine != self.args.key:
            # serving under a key whose code this process does not run would hand every
            # later client other code than it asked for: refuse (the client then runs the
            # command in-process)
            _log(f"error: this process runs code {mine[:16]}, not the requested "
                 f"{self.args.key[:16]} (files changed, or another copy of the packages "
                 f"was imported: {', '.join(self.parts.get('roots', []))}); exiting")
            raise SystemExit(3)
        self._fix_sys_path()
        atexit.register(self.cleanup)
        if "PREFECT_API_URL" not in os.environ:
            self._start_prefect()
        self._preload()
        if self.prefect is not None:
            self._wait_prefect()
        self._check_fork_safety()
        os.chdir(self.paths.directory)  # do not pin the first client's directory
        self._listen()
        self._stop_stale_servers()
        _log(f"ready in {time.perf_counter() - t0:.2f} s on {self.paths.socket}")

    def _fix_sys_path(self) -> None:
        """Make sure the packages are the client's ones (the bootstrap already took the
        working folder off sys.path)."""
        for parent in reversed(self.args.path or []):
            if parent not in sys.path:
                sys.path.insert(0, parent)

    def _start_prefect(self) -> None:
        import subprocess

        port = _free_port()
        self.prefect_url = f"http://127.0.0.1:{port}/api"
        env = dict(os.environ)
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env.pop("PREFECT_API_URL", None)
        log = os.open(self.paths.prefect_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.prefect = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True, preexec_fn=_pdeathsig())
        finally:
            os.close(log)
        os.environ["PREFECT_API_URL"] = self.prefect_url
        _log(f"started the Prefect server (pid {self.prefect.pid}) at {self.prefect_url}")

    def _preload(self) -> None:
        import importlib

        if self.entry != launcher.DEFAULT_ENTRY:
            names = [self.entry.partition(":")[0]]
        else:
            if "MPLBACKEND" not in os.environ:
                os.environ["MPLBACKEND"] = "Agg"
            names = list(HEAVY_MODULES)
        for name in names:
            self._import(importlib, name, required=self.entry != launcher.DEFAULT_ENTRY)
        if self.entry == launcher.DEFAULT_ENTRY:
            for hook in PRELOAD_HOOKS:
                try:
                    preload = getattr(importlib.import_module(hook), "preload", None)
                    if not callable(preload):
                        continue
                    extra = list(preload() or [])
                except Exception as exc:
                    _log(f"{hook}.preload() failed: {type(exc).__name__}: {exc}")
                    continue
                for name in extra:
                    self._import(importlib, name, required=False)
                break
        launcher.resolve_entry(self.entry)  # fails now rather than in every child
        _skip_exit_teardown()

    @staticmethod
    def _import(importlib, name: str, required: bool) -> None:
        t = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:
            if required:
                raise
            _log(f"could not preload {name}: {type(exc).__name__}: {exc}")
            return
        _log(f"preloaded {name} in {time.perf_counter() - t:.2f} s")

    def _wait_prefect(self) -> None:
        import http.client

        timeout = launcher._float_env(launcher.ENV_START_TIMEOUT, launcher.DEFAULT_START_TIMEOUT)
        deadline = time.monotonic() + timeout
        port = int(self.prefect_url.rsplit(":", 1)[1].split("/")[0])
        while True:
            rc = self.prefect.poll()
            if rc is not None:
                tail = launcher._log_tail(self.paths.prefect_log)
                raise RuntimeError(f"the Prefect server exited with status {rc}: {tail}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/api/health")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    _log(f"the Prefect server is healthy at {self.prefect_url}")
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server was not healthy after {timeout:.0f} s; "
                                   f"see {self.paths.prefect_log}")
            time.sleep(0.1)

    def _check_fork_safety(self) -> None:
        import threading

        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            _log(f"warning: threads running before fork: {others}")
        torch = sys.modules.get("torch")
        if torch is not None:
            with contextlib.suppress(Exception):
                if torch.cuda.is_initialized():
                    _log("warning: CUDA was initialised in the server: children cannot use it")

    def _listen(self) -> None:
        path = self.paths.socket
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(tmp)
        os.chmod(tmp, 0o600)
        listener.listen(64)
        self.listener = listener
        info = {"pid": os.getpid(), "socket": path, "key": self.args.key,
                "started": self.started, "prefect_api_url": self.prefect_url
                or os.environ.get("PREFECT_API_URL"), "prefect_pid": getattr(
                    self.prefect, "pid", None), "log": self.paths.log,
                "python": sys.executable, "entry": self.entry, "parts": self.parts}
        fd = os.open(self.paths.info + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        os.replace(self.paths.info + ".tmp", self.paths.info)
        os.replace(tmp, path)
        self.socket_ino = os.stat(path).st_ino

    def _stop_stale_servers(self) -> None:
        """Servers of older code for the same interpreter, packages and environment will
        never be used again: ask them to stop (they finish what they run)."""
        mine = self.parts
        for path, info in launcher._infos(self.paths.directory):
            if path == self.paths.info or info.get("pid") == os.getpid():
                continue
            theirs = info.get("parts") or {}
            if (theirs.get("python") == mine.get("python")
                    and theirs.get("roots") == mine.get("roots")
                    and theirs.get("env") == mine.get("env")
                    and theirs.get("code") != mine.get("code")
                    and info.get("entry") == self.entry
                    and float(info.get("started") or 0) < self.started):
                if launcher._ask(info.get("socket", ""), {"op": "stop"}) is not None:
                    _log(f"asked the stale server {info.get('pid')} to stop")

    # -------------------------------------------------------------------- serving

    def serve(self) -> None:
        sel = self.selector = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.wakeup = (r, w)
        sel.register(r, selectors.EVENT_READ, "wakeup")
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.last_activity = time.monotonic()
        while True:
            self._reap()
            if self.stop_requested and not self.stopping:
                self._begin_stop(self.stop_requested)
            if (self.prefect is not None and not self.stopping
                    and self.prefect.poll() is not None):
                self._begin_stop(f"the Prefect server exited ({self.prefect.returncode})")
            if self.stopping and not self.children:
                break
            timeout = 5.0
            if not self.children and not self.stopping:
                idle = time.monotonic() - self.last_activity
                if idle >= self.idle_timeout:
                    self._begin_stop(f"idle for {idle:.0f} s")
                    continue
                timeout = min(timeout, self.idle_timeout - idle)
            for key, _ in sel.select(max(0.0, timeout)):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wakeup":
                    with contextlib.suppress(OSError):
                        while os.read(r, 512):
                            pass
                else:
                    self._client_gone(key.data, key.fileobj)
        _log(f"stopping ({self.stopping}); served {self.served} command(s)")

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = f"signal {signal.Signals(signum).name}"

    def _begin_stop(self, reason: str) -> None:
        """Stop taking requests: take the socket away, serve what is already queued."""
        self.stopping = reason
        _log(f"stop requested: {reason}")
        self._remove_files()
        if self.listener is not None:
            self.listener.setblocking(False)
            while self._accept():
                pass
            with contextlib.suppress(Exception):
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _accept(self) -> bool:
        """Take one connection, if one waits; False when none does."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            _log(f"accept failed: {exc}")
            return False
        try:
            self._handle(conn)
        except Exception:
            _log("request failed:\n" + traceback.format_exc())
            conn.close()
        return True

    def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(5.0)
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", cred)
        except (AttributeError, OSError):
            uid = os.getuid()  # no SO_PEERCRED: the 0700 directory is the only guard
        if uid != os.getuid():
            _log(f"refused a connection from uid {uid}")
            conn.close()
            return
        try:
            got = launcher.recv_msg(conn, maxfds=3)
        except (OSError, ValueError) as exc:
            _log(f"bad request: {exc}")
            got = None
        if got is None:
            conn.close()
            return
        request, fds = got
        op = request.get("op") if isinstance(request, dict) else None
        if op == "run" and len(fds) == 3:
            self.last_activity = time.monotonic()
            self._fork(conn, request, fds)  # conn stays open until the child's status
            return
        launcher._close_fds(fds)
        try:
            if op == "status":
                launcher.send_msg(conn, self._status())
            elif op == "stop":
                self.stop_requested = self.stop_requested or "stop request"
                launcher.send_msg(conn, {"ok": True})
            else:
                launcher.send_msg(conn, {"error": f"bad request {op!r} with {len(fds)} fds"})
        except OSError as exc:
            _log(f"cannot reply: {exc}")
        conn.close()

    def _status(self) -> dict:
        self._reap()  # a child that ended a moment ago is no longer "running"
        return {"pid": os.getpid(), "key": self.args.key, "started": self.started,
                "running": len(self.children), "served": self.served,
                "idle_s": round(time.monotonic() - self.last_activity, 1),
                "stopping": self.stopping, "prefect_api_url": os.environ.get("PREFECT_API_URL")}

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals stay blocked across fork until the child has put the default handlers
        # back: a SIGTERM the client passes on at once must not run this server's
        # handlers in the child (and be lost there); it waits, then acts as usual.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            launcher._close_fds(fds)
            with contextlib.suppress(OSError):
                launcher.send_msg(conn, {"error": f"fork failed: {exc}"})
            conn.close()
            return
        if pid == 0:  # the child: never returns
            code = 70
            try:
                code = self._child(conn, request, fds, mask)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        launcher._close_fds(fds)
        with contextlib.suppress(OSError):  # the child does it too; whoever comes first
            os.setpgid(pid, pid)
        self.children[pid] = conn
        self.served += 1
        # the child sends its pid itself; this end only listens for the client leaving
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _client_gone(self, pid: int, conn: object = None) -> None:
        """The client closed its connection before its child ended: stop the child."""
        if pid not in self.children or (conn is not None and self.children[pid] is not conn):
            return  # reaped already (a stale event): the pid may belong to someone else
        conn = self.children[pid]
        if conn is not None:
            with contextlib.suppress(Exception):
                self.selector.unregister(conn)
            conn.close()
            self.children[pid] = None
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        _log(f"client of child {pid} went away; sent SIGTERM")

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 1 << 8
            if not done:
                continue
            code = os.waitstatus_to_exitcode(status)
            conn = self.children.pop(pid)
            self.last_activity = time.monotonic()
            if conn is not None:
                with contextlib.suppress(Exception):
                    self.selector.unregister(conn)
                with contextlib.suppress(OSError):
                    launcher.send_msg(conn, {"exit": code})
                conn.close()

    # ---------------------------------------------------------------------- child

    def _child(self, conn: socket.socket, request: dict, fds: list[int],
               mask: set) -> int:
        """In the forked child: become the client's process, run the entry, exit.

        The child keeps its copy of the connection: it sends the client its pid (once it
        leads its own process group, so that the client can signal the group) and, just
        before it exits, its own exit status. Should the server die meanwhile, the
        connection ends only when the child does, and the client still learns the
        command's status."""
        interrupted = False
        code = 1
        try:
            with contextlib.suppress(OSError):
                os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(OSError):
                launcher.send_msg(conn, {"pid": os.getpid()})
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a held signal acts now
            atexit.unregister(self.cleanup)
            self.prefect = None
            self.selector.close()
            for s in (self.listener, *self.children.values()):
                if s is not None:
                    s.close()
            launcher._close_fds(list(self.wakeup))
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            launcher._close_fds([fd for fd in fds if fd > 2])
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.reconfigure(line_buffering=stream is sys.stderr or stream.isatty())
            env = dict(request.get("env") or {})
            if "PREFECT_API_URL" not in env and "PREFECT_API_URL" in os.environ:
                env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
            os.environ.clear()
            os.environ.update(env)
            os.umask(int(request.get("umask", 0o022)))
            argv = [str(a) for a in request.get("argv") or []]
            sys.argv = [str(request.get("argv0") or "saeflow"), *argv]
            launcher.IN_SERVER = True
            os.chdir(request["cwd"])
            func = launcher.resolve_entry(self.entry)
            try:
                code = _exit_code(func(argv))
            except SystemExit as exc:
                code = _exit_code(exc.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            interrupted, code = True, 130
        except BaseException:
            with contextlib.suppress(BaseException):
                sys.excepthook(*sys.exc_info())
            code = 1
        _finish_child()
        with contextlib.suppress(BaseException):
            launcher.send_msg(conn, {"child_exit": -signal.SIGINT if interrupted else code})
        if interrupted:  # die of SIGINT as the interpreter does
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return code

    # -------------------------------------------------------------------- cleanup

    def _remove_files(self) -> None:
        with contextlib.suppress(OSError):
            if self.socket_ino is not None and os.stat(self.paths.socket).st_ino == self.socket_ino:
                os.unlink(self.paths.socket)
        self.socket_ino = None
        with contextlib.suppress(OSError, ValueError):
            with open(self.paths.info, encoding="utf-8") as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(self.paths.info)

    def cleanup(self) -> None:
        if os.getpid() != self.pid:
            return
        self._remove_files()
        proc, self.prefect = self.prefect, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except Exception:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.wait(timeout=5)
            _log("stopped the Prefect server")


def _skip_exit_teardown() -> None:
    """torch deregisters its ~130 operator libraries in ``weakref.finalize`` exit hooks:
    50 ms of freeing memory that ``os._exit`` frees anyway. Children skip that for the
    libraries loaded in the server (those a command registers itself still run)."""
    import weakref

    registry = getattr(weakref.finalize, "_registry", {})
    for fin, info in list(registry.items()):
        if getattr(info.func, "__module__", "") == "torch.library":
            fin.atexit = False


def _finish_child() -> None:
    """What the interpreter does on exit: join non-daemon threads (and run
    ``threading._register_atexit`` hooks, which Prefect uses to drain its services), run
    the atexit handlers (MLflow, Prefect, logging), flush stdio."""
    import threading

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.stage_server",
                                description="saeflow's preloading fork server (internal)")
    p.add_argument("--socket", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--idle-timeout", type=float, default=launcher.DEFAULT_IDLE_TIMEOUT)
    p.add_argument("--entry", default=launcher.DEFAULT_ENTRY)
    p.add_argument("--path", action="append", help="directory holding the packages")
    p.add_argument("--ready-fd", type=int, help="pipe to report 'pid N' and 'ready' on")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ready = args.ready_fd
    if ready is not None:  # detach: the launcher reaps its child at once
        if os.fork():
            os._exit(0)
        with contextlib.suppress(OSError):
            os.write(ready, f"pid {os.getpid()}\n".encode())
    server = StageServer(args)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    _log(f"starting the stage server for {args.socket} (entry {args.entry})")
    try:
        server.start()
    except BaseException:
        _log("start-up failed:\n" + traceback.format_exc())
        server.cleanup()
        return 1
    if ready is not None:
        with contextlib.suppress(OSError):
            os.write(ready, b"ready\n")
        os.close(ready)
    try:
        server.serve()
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise

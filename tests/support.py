"""Helpers for the tests that run the project as a user does: copies of the project in
fresh git repositories, free loopback ports, clean environments, commands with their output
shown on failure, and PostgreSQL databases that the tests create and drop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = {
    "patches": {"n_patches": 1250, "heldout_fraction": 0.2},
    "train": {"max_iter": 40},
}
"""Settings that keep a whole pipeline run to a few seconds of compute."""
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def project_files() -> list[str]:
    """What a clone of the project holds: tracked files plus new, not-ignored ones."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def copy_project(dest: Path, changes: dict | None = None, env: dict | None = None,
                 git: bool = True) -> Path:
    """A copy of the project at ``dest`` with ``changes`` ({section: {key: value}}) applied
    to params.yaml, committed to a fresh git repository."""
    for f in project_files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in (changes if changes is not None else SMALL).items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:
        env = env or clean_env()
        run(["git", "init", "-q", "-b", "main"], dest, env)
        run(["git", "add", "-A"], dest, env)
        run(["git", "commit", "-q", "-m", "project"], dest, env)
    return dest


ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""For every process a test starts: torch's CPU ops on one thread. The tests' problems are
tiny and they run many processes at once on a 2-core machine, where each process's OpenMP
pool of two threads spins waiting for the other: eight pipelines at once took 160 CPU
seconds (92 s) with two threads each and 122 (74 s) with one. (The test processes
themselves: conftest.py.)"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow, Prefect, saeflow or DVC setting, with the
    virtual environment first on PATH (DVC runs `saeflow` by name) and :data:`ONE_THREAD`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "SAEFLOW_", "DVC_"))}
    env.update(GIT_ID)
    env.update(ONE_THREAD)
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"})
    env.update(extra)
    return env


def run(cmd, cwd, env, timeout=900, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, (f"{cmd} failed ({done.returncode}):\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: the process exited ({proc.returncode})\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s\n{tail}")
        time.sleep(0.25)


def seed_prefect_home(home: Path, prefect_db: Path) -> Path:
    """``home`` (created) holding a copy of the migrated Prefect database ``prefect_db``
    (the ``prefect_db`` fixture), so that its first server start skips the migrations."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prefect_db, home / "prefect.db")
    return home


# --- PostgreSQL --------------------------------------------------------------------------

PG_URL = os.environ.get("SAEFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
"""The server the tests create their databases on (CI: the machine's PostgreSQL)."""


def postgres_problem() -> str | None:
    """None if PostgreSQL answers at PG_URL; else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=5) as con:
            con.execute("select 1")
    except Exception as exc:  # any failure: the reason is shown in the skip
        return " ".join(str(exc).split())
    return None


class Databases:
    """Databases created for one test module, each with a unique name, dropped at the end
    (``url(name, driver)`` gives the SQLAlchemy URL of one)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        import psycopg

        name = f"saeflow_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'create database "{name}"')
        self.names.append(name)
        return name

    @staticmethod
    def url(name: str, driver: str = "psycopg") -> str:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(PG_URL)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return urlunsplit(parts._replace(scheme=scheme, path=f"/{name}"))

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as con:
            for name in self.names:
                con.execute(f'drop database if exists "{name}" with (force)')
        self.names.clear()


# --- eight pipelines at once ---------------------------------------------------------------

TINY = {"patches": {"n_patches": 500, "heldout_fraction": 0.2}, "train": {"max_iter": 10}}
EXPERIMENTS = ("saeflow-a", "saeflow-b")


def start_concurrent_pipelines(tmp: Path, env: dict, n: int = 8,
                               registered: str = "saeflow-sae") -> list[dict]:
    """``n`` `saeflow pipeline` runs started at once, each in its own copy of the project
    (seed i, experiment EXPERIMENTS[i % 2], one registered model for all), on the store and
    Prefect server that ``env`` names. Returns each run's seed, experiment and result."""
    procs = []
    for i in range(n):
        experiment = EXPERIMENTS[i % 2]
        changes = {**TINY, "train": {**TINY["train"], "random_state": i},
                   "tracking": {"experiment": experiment, "registered_model": registered}}
        project = copy_project(tmp / f"p{i}", changes, git=False)
        procs.append((i, experiment, subprocess.Popen(
            [str(BIN / "saeflow"), "pipeline", "--no-dvc-commit"], cwd=project, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results = []
    try:
        for i, experiment, p in procs:
            out, err = p.communicate(timeout=1200)
            results.append({"seed": i, "experiment": experiment, "rc": p.returncode,
                            "stdout": out, "stderr": err})
    finally:
        for _, _, p in procs:  # none outlives a failed test
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def check_concurrent_runs(client, results: list[dict], registered: str) -> None:
    """Every run exited 0 with nothing on stderr but progress, and is recorded once: one
    MLflow run in its own experiment, one model version, all version numbers distinct."""
    failed = [(r["seed"], r["rc"], r["stderr"][-1500:]) for r in results if r["rc"] != 0]
    assert not failed, failed
    for r in results:
        noise = [ln for ln in r["stderr"].splitlines()
                 if ln.strip() and not ln.startswith(("train: iteration", "saeflow: started"))]
        assert not noise, (r["seed"], noise)
    runs = {}
    for experiment in EXPERIMENTS:
        exp = client.get_experiment_by_name(experiment)
        for run_ in client.search_runs([exp.experiment_id]):
            seed = int(run_.data.params["train.random_state"])
            assert EXPERIMENTS[seed % 2] == experiment, (seed, experiment)
            assert seed not in runs, f"seed {seed} recorded twice"
            runs[seed] = run_
    assert sorted(runs) == [r["seed"] for r in results]
    for run_ in runs.values():
        assert {"train/loss", "sparsity/fvu", "score/accuracy"} <= set(run_.data.metrics)
    versions = client.search_model_versions(f"name = '{registered}'")
    numbers = sorted(int(v.version) for v in versions)
    assert numbers == list(range(1, len(results) + 1)), numbers
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs.values())

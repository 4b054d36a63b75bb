"""Shared fixtures: small deterministic data sets and the exercise's natural patches.

Every test runs on the CPU. torch is limited to one thread: the problems here are tiny,
and on a small machine whose cores are busy an OpenMP pool of several threads spins
against itself (a 0.5 ms objective evaluation then takes 25 ms).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

MANY_PROCESSES = ("test_concurrency.py", "test_sweep.py", "test_team_mode.py")
"""Modules that each start many processes (eight pipelines at once, Dask clusters, the
team's servers): under ``pytest -n 2 --dist loadfile`` (the Makefile's) they run one after
another in one test process, never two at once, which on a 2-core machine starves the
servers they test past their timeouts."""


def scheduling_unit(nodeid: str) -> str:
    """The unit a test is scheduled in: its module's path, or ``many-processes`` for the
    modules of :data:`MANY_PROCESSES`."""
    module = nodeid.split("::", 1)[0]
    return "many-processes" if Path(module).name in MANY_PROCESSES else module


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` by :func:`scheduling_unit`: each module whole in one test process
    (its module-scoped fixtures built once, its tests in order), the modules of
    :data:`MANY_PROCESSES` as one unit. (xdist's ``--dist loadgroup`` cannot do this under
    pytest 9.2: it renames ``item._nodeid``, which pytest 9.2 no longer reads, so it groups
    nothing.) Other modes keep xdist's own scheduler."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ManyProcessesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return ManyProcessesTogether(config, log)


@pytest.fixture
def small_X() -> np.ndarray:
    """200 examples, 16 features, uniform in [0.1, 0.9] (valid for every penalty)."""
    return np.random.default_rng(0).uniform(0.1, 0.9, size=(200, 16))


@pytest.fixture
def other_X() -> np.ndarray:
    """Data of the same shape as ``small_X`` but different values."""
    return np.random.default_rng(1).uniform(0.1, 0.9, size=(200, 16))


@pytest.fixture(scope="session")
def natural_X() -> np.ndarray:
    """The exercise's training set: 10,000 normalised 8x8 patches of whitened photos."""
    from sae_core.patches import natural_patches

    return natural_patches(10_000, 8, seed=0)


@pytest.fixture(scope="session")
def whitened_images() -> list[np.ndarray]:
    """The built-in photographs, 1/f-whitened (the images natural_patches samples from)."""
    from sae_core.data import load_natural_images
    from sae_core.patches import whiten_1f

    return [whiten_1f(img) for img in load_natural_images()]


@pytest.fixture(scope="session")
def patches4(whitened_images) -> np.ndarray:
    """50 normalised 4x4 natural patches (16 inputs), as natural_patches(50, 4, seed=0)."""
    from sae_core.patches import normalize_ufldl, sample_patches

    return normalize_ufldl(sample_patches(whitened_images, 50, 4, seed=0))


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for a child Python that imports the project from the repository root."""
    import os

    from support import ONE_THREAD

    env = {**os.environ, **ONE_THREAD}
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def prefect_db(tmp_path_factory) -> Path:
    """A Prefect database migrated to Prefect's head revision, made once per test run and
    shared by its test processes (a file lock): seeded into a fresh Prefect home, it spares
    that home's first server start Prefect's 116 SQLite migrations (~17 s of CPU each).
    Made by Prefect itself (`prefect server database upgrade`). The first start on a truly
    fresh database stays tested (test_servers: concurrent first use; team mode, PostgreSQL).
    """
    import fcntl
    import os

    from support import BIN, clean_env, run

    base = tmp_path_factory.getbasetemp()
    # under xdist each test process has its own base folder; their parent is this run's
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    db = root / "prefect-db" / "prefect.db"
    with open(root / "prefect-db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            home = root / "prefect-db-making"
            home.mkdir(exist_ok=True)
            run([BIN / "prefect", "server", "database", "upgrade", "-y"], home,
                clean_env(PREFECT_HOME=str(home)), timeout=600)
            db.parent.mkdir(exist_ok=True)
            (home / "prefect.db").replace(db)
    return db


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, prefect_db):
    """The local persistent Prefect server, as saeflow starts it, in a Prefect home and on a
    port of the test session's own; stopped (and checked gone) at the end. Yields the
    environment variables that point saeflow at it."""
    from support import BIN, clean_env, free_port, run, seed_prefect_home

    from flows.servers import _pid_alive

    home = seed_prefect_home(tmp_path_factory.mktemp("prefect-home"), prefect_db)
    settings = {"PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(free_port())}
    env = clean_env(**settings)
    try:
        run([BIN / "saeflow", "server", "start"], home, env, timeout=300)
        pid = int((home / "server.pid").read_text())
        yield settings
    finally:
        run([BIN / "saeflow", "server", "stop"], home, env, timeout=120)
    assert not _pid_alive(pid), "the Prefect server outlived `saeflow server stop`"


@pytest.fixture(scope="session")
def postgres():
    """PostgreSQL for the team-mode tests: a skip with the reason on a machine without it,
    a failure on CI (whose .ci/run starts it)."""
    import os

    from support import PG_URL, postgres_problem

    problem = postgres_problem()
    if problem is not None:
        message = f"PostgreSQL at {PG_URL} does not answer: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PG_URL

"""The test suite's own scheduling under ``pytest -n 2 --dist loadfile`` (the Makefile's):
each module whole in one test process, and the modules that start many processes as one
unit, so that no two of them load the machine at once (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import conftest


def test_many_process_modules_are_one_unit_and_the_rest_one_unit_per_module():
    unit = conftest.scheduling_unit
    assert {unit(f"tests/{name}::test_x[a::b]") for name in conftest.MANY_PROCESSES} == {
        "many-processes"}
    assert unit("tests/test_io.py::test_a[1]") == unit("tests/test_io.py::test_b")
    assert unit("tests/test_io.py::test_a") == "tests/test_io.py"
    assert unit("tests/test_config.py::test_a") != unit("tests/test_io.py::test_a")


def test_other_distribution_modes_keep_xdist_schedulers():
    for dist in ("load", "loadgroup", "loadscope"):
        config = SimpleNamespace(getvalue={"dist": dist}.get)
        assert conftest.pytest_xdist_make_scheduler(config, log=None) is None


def test_a_run_keeps_the_many_process_modules_in_one_worker(tmp_path):
    """A real ``pytest -n 2 --dist loadfile`` with this conftest, on modules named as the
    many-process ones with others between them: the many-process modules share one worker,
    and every module stays whole in one."""
    (tmp_path / "conftest.py").write_text(
        (conftest.REPO_ROOT / "tests" / "conftest.py").read_text())
    body = textwrap.dedent("""
        import os, time
        def test_{i}():
            time.sleep(0.1)  # both workers busy: a module cannot finish before the next starts
            with open(os.environ["WHO"], "a") as f:
                f.write(f"{{__name__}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")
    """)
    heavy = [name.removesuffix(".py") for name in conftest.MANY_PROCESSES]
    modules = ["test_a", heavy[0], "test_m", *heavy[1:], "test_z", "test_zz"]
    for name in modules:
        (tmp_path / f"{name}.py").write_text("".join(body.format(i=i) for i in range(3)))
    who = tmp_path / "who.txt"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist",
                           "loadfile", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WHO": str(who)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    workers: dict[str, set[str]] = {}
    for line in who.read_text().splitlines():
        module, worker = line.split()
        workers.setdefault(module, set()).add(worker)
    assert set(workers) == set(modules)
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len(set.union(*(workers[name] for name in heavy))) == 1, workers

"""Orchestration overhead of the default pipeline, per stage, with the persistent Prefect
server.

Each stage is run as DVC runs it: its dvc.yaml command (``saeflow stage NAME ...``) in a
fresh process, against the local persistent Prefect server (warm) and the project's MLflow
store. Its wall time is split into

- imports: a fresh interpreter importing, in the same order, the modules the stage process
  loaded outside its own work: before it (Prefect, MLflow, torch, scikit-learn ... as the
  stage needs them) and after it (recording to MLflow); modules loaded inside the work are
  part of its compute time;
- compute: the stage's own work (reading, maths, writing its outputs), as it times itself
  (``$SAEFLOW_TIMINGS``);
- overhead: the rest: interpreter start and exit, the Prefect flow run, opening the MLflow
  store and recording to it. Target: at most 1.0 s per stage.

Also timed, in a fresh copy of the project: the first ``dvc repro`` on a fresh machine (the
Prefect server is started and both stores are created inside it), a forced ``dvc repro``
with the server warm (wall against the stages' compute, as earlier versions reported it), a
no-op ``dvc repro`` and ``saeflow --help``. Prints a table, writes
benchmarks/results/overhead.json.

    python benchmarks/overhead.py [--repeats 5] [--out benchmarks/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("ingest", "patches", "train", "evaluate", "score")
IMPORT_TIMER = """
import importlib, json, sys, time

def load(names):
    start = time.perf_counter()
    for name in names:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:
                pass
    return time.perf_counter() - start

before, during, after = json.loads(sys.stdin.read())
seconds = load(before)   # timed: what the stage loaded before its work
load(during)             # untimed: loaded inside the work, so part of its compute time
seconds += load(after)   # timed: loaded afterwards (recording to MLflow, Prefect's exit)
print(seconds)
"""


def project_copy(dest: Path, env: dict) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for f in files.splitlines():
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "x"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "SAEFLOW_", "DVC_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_API_PORT": str(free_port()),
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org",
    })
    return env


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def stage_commands(project: Path) -> dict[str, list[str]]:
    """Each stage's dvc.yaml command with its ${paths.X} filled in."""
    import yaml

    doc = yaml.safe_load((project / "dvc.yaml").read_text())
    paths = next(v["paths"] for v in doc["vars"] if "paths" in v)
    out = {}
    for name, spec in doc["stages"].items():
        cmd = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], spec["cmd"])
        out[name] = shlex.split(cmd)
    return out


def read_timings(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def repro(cwd: Path, env: dict, timings: Path, force: bool = False) -> dict:
    timings.unlink(missing_ok=True)
    env = {**env, "SAEFLOW_TIMINGS": str(timings)}
    wall = timed([str(BIN / "dvc"), "repro", *(["--force"] if force else [])], cwd, env)
    stages = read_timings(timings)
    compute = sum(s["seconds"] for s in stages)
    return {"wall_s": wall, "compute_s": compute, "wall_minus_compute_per_stage_s":
            (wall - compute) / len(STAGES)}


def import_seconds(record: dict, env: dict) -> float:
    """A fresh interpreter importing what the stage loaded outside its own work, in the
    order the stage did."""
    before, after, at_exit = (record[k] for k in ("modules_before", "modules_after",
                                                  "modules_at_exit"))
    seen = set(before)
    during = [m for m in after if m not in seen]
    seen |= set(during)
    later = [m for m in at_exit if m not in seen]
    done = subprocess.run([sys.executable, "-c", IMPORT_TIMER], env=env, check=True,
                          input=json.dumps([before, during, later]), capture_output=True,
                          text=True)
    return float(done.stdout.strip())


def per_stage(project: Path, env: dict, tmp: Path, repeats: int) -> dict:
    """Each stage ``repeats`` times, its import timing right after each run (so that both
    see the same machine load); medians."""
    commands = stage_commands(project)
    samples: dict[str, list[tuple[float, float, float]]] = {s: [] for s in STAGES}
    heavy: dict[str, list[str]] = {}
    for r in range(repeats):
        for stage in STAGES:
            timings = tmp / f"stage-{stage}-{r}.jsonl"
            wall = timed(commands[stage], project, {**env, "SAEFLOW_TIMINGS": str(timings)})
            (record,) = read_timings(timings)
            samples[stage].append((wall, record["seconds"], import_seconds(record, env)))
            heavy[stage] = sorted({m.split(".")[0] for m in record["modules_at_exit"]}
                                  & {"torch", "mlflow", "sklearn", "matplotlib", "prefect",
                                     "pandas", "dvc"})
    out = {}
    for stage in STAGES:
        wall, compute, imports = (statistics.median(x) for x in zip(*samples[stage],
                                                                     strict=True))
        overheads = [w - c - i for w, c, i in samples[stage]]
        out[stage] = {"wall_s": wall, "compute_s": compute, "imports_s": imports,
                      "overhead_s": statistics.median(overheads),
                      "overhead_range_s": [min(overheads), max(overheads)],
                      "heavy_modules": heavy[stage]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="saeflow-overhead-") as t:
        tmp = Path(t)
        env = base_env(tmp)
        project = project_copy(tmp / "project", env)
        try:
            results["first_repro"] = repro(project, env, tmp / "t0.jsonl")
            results["warm_repro"] = repro(project, env, tmp / "t1.jsonl", force=True)
            results["per_stage"] = per_stage(project, env, tmp, args.repeats)
            results["noop_repro_s"] = min(timed([str(BIN / "dvc"), "repro"], project, env)
                                          for _ in range(3))
            results["help_s"] = min(timed([str(BIN / "saeflow"), "--help"], project, env)
                                    for _ in range(5))
        finally:
            subprocess.run([str(BIN / "saeflow"), "server", "stop"], cwd=project, env=env,
                           capture_output=True)
    rows = results["per_stage"]
    print(f"{'stage':10s} {'wall s':>7s} {'compute s':>10s} {'imports s':>10s} "
          f"{'overhead s':>11s} {'(range)':>13s}  libraries loaded")
    for stage, r in rows.items():
        lo, hi = r["overhead_range_s"]
        print(f"{stage:10s} {r['wall_s']:7.2f} {r['compute_s']:10.2f} {r['imports_s']:10.2f} "
              f"{r['overhead_s']:11.2f} {f'({lo:.2f}-{hi:.2f})':>13s}  "
              f"{', '.join(r['heavy_modules'])}")
    worst = max(r["overhead_s"] for r in rows.values())
    mean = statistics.mean(r["overhead_s"] for r in rows.values())
    results["max_overhead_per_stage_s"], results["mean_overhead_per_stage_s"] = worst, mean
    print(f"overhead beyond imports: {mean:.2f} s per stage on average, {worst:.2f} s at most "
          "(target <= 1.0 s)")
    for key, label in (("first_repro", "first dvc repro (server starts, stores created)"),
                       ("warm_repro", "dvc repro --force, server warm")):
        r = results[key]
        print(f"{label}: wall {r['wall_s']:.2f} s, stage compute {r['compute_s']:.2f} s, "
              f"(wall - compute) / stage {r['wall_minus_compute_per_stage_s']:.2f} s")
    print(f"no-op dvc repro: {results['noop_repro_s']:.2f} s; "
          f"saeflow --help: {results['help_s']:.3f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

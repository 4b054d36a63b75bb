"""Orchestration overhead of the default pipeline: wall time of `dvc repro` against the
sum of the stages' own compute (each stage times its reading, maths and writing and appends
it to $SAEFLOW_TIMINGS), side by side for

- saeflow as shipped: stages run by the preloaded stage server (imports once, one shared
  Prefect server), in three states: first (a fresh machine: Prefect's database and the
  MLflow store are created inside the run), cold (stores exist, no server running: it
  starts inside the run, as after a code change or 15 idle minutes) and warm (server up,
  the steady state while one works on a project);
- the plain design it replaces: every stage a fresh process (SAEFLOW_STAGE_SERVER=0) that
  imports everything and starts Prefect's temporary server.

Each variant runs in its own fresh copy of the project (a git repository), with the default
params.yaml. Also timed: a no-op `dvc repro` and `saeflow --help`. Prints a table and the
ratios, writes benchmarks/results/overhead.json.

    python benchmarks/overhead.py [--skip-plain] [--out benchmarks/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_STAGES = 5


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


def base_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "SAEFLOW_", "DVC_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect"),
        "SAEFLOW_RUNTIME_DIR": str(tmp / "servers"),
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


def repro(cwd: Path, env: dict, timings: Path, force: bool = False) -> dict:
    timings.unlink(missing_ok=True)
    env = {**env, "SAEFLOW_TIMINGS": str(timings)}
    wall = timed([str(BIN / "dvc"), "repro", *(["--force"] if force else [])], cwd, env)
    stages = [json.loads(line) for line in timings.read_text().splitlines()]
    compute = sum(s["seconds"] for s in stages)
    return {"wall_s": wall, "compute_s": compute, "overhead_s": wall - compute,
            "overhead_per_stage_s": (wall - compute) / N_STAGES,
            "stages": {s["stage"]: round(s["seconds"], 3) for s in stages}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-plain", action="store_true", help="skip the process-per-stage run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="saeflow-overhead-") as t:
        tmp = Path(t)
        env = base_env(tmp)
        served = project_copy(tmp / "served", env)
        stop = [str(BIN / "saeflow"), "server", "stop"]
        results["served_first"] = repro(served, env, tmp / "t0.jsonl")
        subprocess.run(stop, cwd=served, env=env, capture_output=True)
        results["served_cold"] = repro(served, env, tmp / "t1.jsonl", force=True)
        results["served_warm"] = repro(served, env, tmp / "t2.jsonl", force=True)
        results["noop_repro_s"] = min(timed([str(BIN / "dvc"), "repro"], served, env)
                                      for _ in range(3))
        results["help_s"] = min(timed([str(BIN / "saeflow"), "--help"], served, env)
                                for _ in range(5))
        subprocess.run(stop, cwd=served, env=env, capture_output=True)
        if not args.skip_plain:
            plain_env = {**env, "SAEFLOW_STAGE_SERVER": "0",
                         "PREFECT_HOME": str(tmp / "prefect-plain")}
            plain = project_copy(tmp / "plain", plain_env)
            repro(plain, plain_env, tmp / "t3.jsonl")  # first run: creates the stores
            results["plain_warm"] = repro(plain, plain_env, tmp / "t4.jsonl", force=True)
    rows = [("served, first run on a fresh machine", results["served_first"]),
            ("served, cold (server starts in the run)", results["served_cold"]),
            ("served, warm (server already up)", results["served_warm"])]
    if "plain_warm" in results:
        rows.append(("process per stage, temporary Prefect server", results["plain_warm"]))
    print(f"{'variant':46s} {'wall s':>8s} {'compute s':>10s} {'overhead/stage s':>17s}")
    for name, r in rows:
        print(f"{name:46s} {r['wall_s']:8.2f} {r['compute_s']:10.2f} "
              f"{r['overhead_per_stage_s']:17.2f}")
    print(f"stage compute (warm): {results['served_warm']['stages']}")
    print(f"no-op dvc repro: {results['noop_repro_s']:.2f} s; "
          f"saeflow --help: {results['help_s']:.3f} s")
    if "plain_warm" in results:
        ratio = (results["plain_warm"]["overhead_s"] / results["served_warm"]["overhead_s"])
        results["overhead_ratio_plain_over_served_warm"] = ratio
        print(f"overhead, process per stage / served warm: {ratio:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

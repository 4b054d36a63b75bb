"""A 16-point beta x rho sweep of the exercise (the default params.yaml: 64-25-64 KL,
400 L-BFGS iterations, evaluate and score), on 2 workers, three ways, in one run:

- DVC's queue: ``dvc exp run --queue -S ... -S ...`` (the same grid syntax), then
  ``dvc queue start -j 2``, until every experiment has finished; each experiment is a copy
  of the repository and a fresh process per stage (train, evaluate, score);
- ``saeflow sweep`` on a local Dask cluster of 2 workers, cold (the command starts the
  cluster, whose workers import torch and the rest once);
- ``saeflow sweep --force`` on a warm existing cluster (``dask scheduler`` + 2 ``dask
  worker --nthreads 1``, warmed by a 2-point sweep), for the overhead per point: each
  point's time on its task slot beyond its compute (train + evaluate + score), that is
  the bookkeeping and recording in its task plus the slot's wait for it after the slot's
  previous point (dispatch); the slots left idle at the end while the last points finish
  are shown apart (``flows.sweep.point_overhead``).

Both record every point in the project's MLflow store, on the same persistent Prefect
server; ingest and patches are done (and committed) before any timing. Targets: the sweep
at least 3x faster than the DVC queue; at most 0.5 s overhead per point on a warm cluster.
Prints a table; writes benchmarks/results/sweep.json.

    python benchmarks/sweep.py [--out benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import BIN, ROOT, base_env, free_port, project_copy

GRID = ["-S", "train.beta=0.3,1,3,10", "-S", "train.rho=0.01,0.02,0.05,0.1"]


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                 f"{done.stderr[-3000:]}")
    return seconds, done.stdout


def dvc_queue(project: Path, env: dict) -> dict:
    dvc = [str(BIN / "dvc")]
    start = time.perf_counter()
    run([*dvc, "exp", "run", "--queue", *GRID], project, env)
    run([*dvc, "queue", "start", "-j", "2"], project, env)
    while True:
        _, status = run([*dvc, "queue", "status"], project, env)
        states = re.findall(r"\b(Queued|Running|Success|Failed)\b", status)
        if states and not {"Queued", "Running"} & set(states):
            break
        time.sleep(2)
    seconds = time.perf_counter() - start
    ok = states.count("Success")
    if ok != 16:
        sys.exit(f"the DVC queue finished {ok} of 16 experiments:\n{status}")
    run([*dvc, "queue", "stop"], project, env)
    return {"seconds": seconds, "experiments": ok}


def sweep_line(out: str) -> dict:
    m = re.search(r"points: ([\d.]+) s on (\d+) task slot\(s\); ([\d.]+) s compute and "
                  r"(-?[\d.]+) s overhead per point \(([\d.]+) s in its task, ([\d.]+) s of it "
                  r"recording; ([\d.]+) s dispatch\); slots idle at the end ([\d.]+) s", out)
    if not m:
        sys.exit(f"no overhead line in the sweep's output:\n{out[-2000:]}")
    return {"points_seconds": float(m[1]), "slots": int(m[2]), "compute_per_point": float(m[3]),
            "overhead_per_point": float(m[4]), "in_task_per_point": float(m[5]),
            "recording_per_point": float(m[6]), "dispatch_per_point": float(m[7]),
            "idle_end_per_point": float(m[8])}


def warm_cluster(project: Path, env: dict):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                               str(port), "--dashboard-address", ":0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1",
                                "--no-dashboard"], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for _ in range(2)]
    return address, procs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "python": platform.python_version()}, "points": 16,
                     "workers": 2}
    with tempfile.TemporaryDirectory(prefix="saeflow-bench-sweep-") as tmp_:
        tmp = Path(tmp_)
        env = base_env(tmp)
        project = project_copy(tmp / "project", env)
        saeflow = str(BIN / "saeflow")
        try:
            run([saeflow, "server", "start"], project, env)
            run([str(BIN / "dvc"), "repro", "patches"], project, env)
            run(["git", "add", "-A"], project, env)
            run(["git", "commit", "-q", "-m", "data"], project, env)
            print("DVC queue: 16 experiments, 2 at a time ...", flush=True)
            results["dvc_queue"] = dvc_queue(project, env)
            print(f"  {results['dvc_queue']['seconds']:.1f} s", flush=True)
            print("saeflow sweep, local cluster of 2 workers (cold) ...", flush=True)
            seconds, out = run([saeflow, "sweep", *GRID, "--workers", "2"], project, env)
            results["sweep_cold"] = {"seconds": seconds, **sweep_line(out)}
            print(f"  {seconds:.1f} s", flush=True)
            address, procs = warm_cluster(project, env)
            try:
                run([saeflow, "sweep", "-S", "train.random_state=1,2", "--dask-address",
                     address, "--register", "none"], project, env)  # warms both workers
                print("saeflow sweep --force, warm existing cluster ...", flush=True)
                seconds, out = run([saeflow, "sweep", *GRID, "--force", "--dask-address",
                                    address], project, env)
                results["sweep_warm"] = {"seconds": seconds, **sweep_line(out)}
                print(f"  {seconds:.1f} s", flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
        finally:
            subprocess.run([saeflow, "server", "stop"], cwd=project, env=env,
                           capture_output=True)
    q, cold, warm = results["dvc_queue"], results["sweep_cold"], results["sweep_warm"]
    results["speedup_cold"] = q["seconds"] / cold["seconds"]
    results["speedup_warm"] = q["seconds"] / warm["seconds"]
    rows = [("DVC queue (dvc exp run --queue; dvc queue start -j 2)", q["seconds"], "", ""),
            ("saeflow sweep, local cluster (cold)", cold["seconds"],
             f"{cold['overhead_per_point']:.2f}", f"{results['speedup_cold']:.1f}x"),
            ("saeflow sweep, warm cluster", warm["seconds"], f"{warm['overhead_per_point']:.2f}",
             f"{results['speedup_warm']:.1f}x")]
    print(f"\n16-point beta x rho sweep of the exercise, 2 workers ({os.cpu_count()} cores)")
    print(f"{'case':58s} {'wall s':>8s} {'overhead s/pt':>14s} {'vs DVC':>7s}")
    for name, wall, over, ratio in rows:
        print(f"{name:58s} {wall:8.1f} {over:>14s} {ratio:>7s}")
    print(f"compute per point: {warm['compute_per_point']:.2f} s (train + evaluate + score)")
    print(f"targets: >= 3x the DVC queue ({'met' if results['speedup_cold'] >= 3 else 'MISSED'}"
          f", cold); <= 0.5 s overhead per point on a warm cluster "
          f"({'met' if warm['overhead_per_point'] <= 0.5 else 'MISSED'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

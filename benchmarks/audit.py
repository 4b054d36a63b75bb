"""``saeflow audit`` at sweep scale: synthetic MLflow stores of 1,000 to 100,000 model
versions, on the local SQLite store and on a tracking server backed by PostgreSQL.

Each store holds what the pipeline writes: per version its training run (all params of
params.yaml, the provenance tags, the train / sparsity / score metrics) and the version
with its settings as tags; 2% of the versions have their score on a separate run that a
later stage opened for the model (tagged ``saeflow.trained_in``; the own run lacks it),
0.5% have no score at all, a few carry champion
decisions and aliases. MLflow creates the schema and the experiment; the rows are then
inserted in bulk into MLflow's own tables (executemany on SQLite, COPY on PostgreSQL),
since 100,000 versions through the client would take hours. A store grows from one size
to the next.

Timed, each in a fresh process (``saeflow audit`` with ``MLFLOW_TRACKING_URI`` set; wall
time, and peak RSS as /usr/bin/time reports it; the filtered cases the best of
``--repeats``), output to a file:

- tags: ``--where penalty=kl --where beta>=1 --limit 100``
- metric: ``--where accuracy>0.9 --limit 100``
- rare: ``--where accuracy>0.9698 --limit 100`` (about 1 version in 1,000 matches: the
  audit reads most of the store to find 100)
- all: no filter, every row

and the implementation before this one (``git show 9da3bad:flows/audit.py``, which fetches
everything and filters in Python; up to 10,000 versions, with the same filters, its list
cut to 100 rows) for the ratios. Target: a filtered audit over 100,000 versions returning
at most 100 rows in under 5 s on both stores. Prints a table, writes
benchmarks/results/audit.json and audit.md.

    python benchmarks/audit.py [--sizes 1000,10000,100000] [--stores sqlite,server]
                               [--repeats 3] [--rare-max 10000] [--old-rev 9da3bad]
                               [--old-max 10000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_URL = os.environ.get("SAEFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
EXPERIMENT, MODEL = "saeflow", "saeflow-sae"  # params.yaml's tracking defaults
CASES = {
    "tags": ["--where", "penalty=kl", "--where", "beta>=1", "--limit", "100"],
    "metric": ["--where", "accuracy>0.9", "--limit", "100"],
    "rare": ["--where", "accuracy>0.9698", "--limit", "100"],
    "all": [],
}
TARGET_S = 5.0
OLD_REV = "9da3bad"
"""The last commit of flows/audit.py before the paged rewrite (one search of everything,
filtered in Python)."""
OLD_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import old_audit
from flows.audit import parse_filter, parse_limit
args = sys.argv[2:]
filters = [parse_filter(args[i + 1]) for i, a in enumerate(args) if a == "--where"]
limit = parse_limit(args[args.index("--limit") + 1]) if "--limit" in args else None
rows = old_audit.audit_rows(None, filters)
sys.stdout.write(old_audit.format_rows(rows[:limit] if limit else rows, "csv"))
"""

# --- the synthetic store --------------------------------------------------------------------

PENALTIES = ("kl", "kl", "l1", "topk")
TRAIN_KEYS = ("loss", "reconstruction", "weight_decay", "sparsity", "iterations", "seconds")
SPARSITY_KEYS = ("rho", "rho_hat_mean", "rho_hat_min", "rho_hat_max", "frac_units_near_target",
                 "dead_units", "kl_total", "l0_mean", "hoyer_mean", "mse", "fvu", "seconds")
SCORE_KEYS = ("accuracy", "macro_f1", "raw_accuracy", "raw_macro_f1", "n_train", "n_test",
              "seconds_features", "seconds")
DATA = "data/patches.parquet"


def base_params() -> dict[str, str]:
    """params.yaml flattened as the pipeline logs it (``section.key`` -> text)."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from flows.tracking import flatten

    return flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))


def synth(i: int, params: dict[str, str]) -> dict:
    """Version ``i``'s rows: its run (tags, params, metrics), its version tags and maybe a
    separate score run. Deterministic in ``i``."""
    rnd = random.Random(i)
    hexid = lambda: f"{rnd.getrandbits(128):032x}"  # noqa: E731
    run_id, sha = hexid(), f"{rnd.getrandbits(256):064x}"
    penalty = PENALTIES[i % 4]
    s = {"penalty": penalty, "n_components": rnd.choice((25, 64, 100, 196)),
         "rho": rnd.choice((0.01, 0.05, 0.1)), "beta": rnd.choice((0.5, 1.0, 3.0, 5.0)),
         "weight_decay": rnd.choice((0.0, 0.0001, 0.001)),
         "l1_coefficient": rnd.choice((0.0001, 0.001, 0.01)),
         "k": rnd.choice((5, 10, 20)) if penalty == "topk" else None,
         "solver": rnd.choice(("lbfgs", "adam")), "max_iter": rnd.choice((100, 400))}
    start = 1_700_000_000_000 + i * 60_000
    data = rnd.randrange(10)  # 10 data versions, 50 commits
    data_md5 = hashlib.md5(f"data {data}".encode()).hexdigest()
    dataset = hashlib.sha256(f"dataset {data}".encode()).hexdigest()
    commit = hashlib.sha1(f"commit {rnd.randrange(50)}".encode()).hexdigest()
    metrics = {f"train/{k}": rnd.random() for k in TRAIN_KEYS}
    metrics |= {f"sparsity/{k}": rnd.random() for k in SPARSITY_KEYS}
    score = {f"score/{k}": rnd.random() for k in SCORE_KEYS}
    score["score/accuracy"] = rnd.uniform(0.80, 0.97)
    fate = rnd.random()  # 2%: score on a separate run; 0.5%: no score
    if fate >= 0.025:
        metrics |= score
    run_params = {**params, **{f"train.{k}": str(v) for k, v in s.items()}}
    run_tags = {"mlflow.user": "bench", "mlflow.runName": f"{penalty}-{i}",
                "git.commit": commit, "git.dirty": "False", f"dvc.md5:{DATA}": data_md5,
                "dvc.remote": "none", "saeflow.dataset_sha256": dataset,
                "saeflow.model_sha256": sha, "saeflow.stages": "train,evaluate,score",
                **{f"prefect.flow_run_id.{st}": str(uuid.UUID(int=rnd.getrandbits(128)))
                   for st in ("train", "evaluate", "score", "pipeline")}}
    vtags = {**{k: str(v) for k, v in s.items()}, f"dvc.md5:{DATA}": data_md5,
             "dvc.remote": "none", "data.md5": data_md5, "dataset_sha256": dataset,
             "git.commit": commit, "model_sha256": sha, "run_id": run_id}
    if i % 97 == 0:
        vtags |= {"saeflow.decision": "promoted" if i % 2 else "no change",
                  "saeflow.metric": "score/accuracy",
                  "saeflow.value": str(score["score/accuracy"])}
    runs = [{"id": run_id, "start": start, "name": f"{penalty}-{i}", "tags": run_tags,
             "params": run_params, "metrics": metrics}]
    if fate < 0.02:
        runs.append({"id": hexid(), "start": start + 30_000, "name": f"{penalty}-{i}-score",
                     "tags": {**run_tags, "saeflow.stages": "score",
                              "saeflow.trained_in": run_id}, "params": run_params,
                     "metrics": score})
    return {"version": i, "run_id": run_id, "created": start + 20_000, "tags": vtags,
            "runs": runs}


def table_rows(first: int, last: int, exp_id: int, params: dict[str, str],
               art: str) -> dict[str, list[tuple]]:
    """Versions first..last as rows of MLflow's tables (columns as in :data:`COLUMNS`)."""
    out: dict[str, list[tuple]] = {t: [] for t in COLUMNS}
    for i in range(first, last + 1):
        v = synth(i, params)
        for r in v["runs"]:
            out["runs"].append((r["id"], r["name"], "UNKNOWN", "", "", "bench", "FINISHED",
                                r["start"], r["start"] + 20_000, "", "active",
                                f"{art}/{r['id']}/artifacts", exp_id))
            out["tags"] += [(k, val, r["id"]) for k, val in r["tags"].items()]
            out["params"] += [(k, val, r["id"]) for k, val in r["params"].items()]
            for k, val in r["metrics"].items():
                out["metrics"].append((k, val, r["start"], r["id"], 0, False))
                out["latest_metrics"].append((k, val, r["start"], 0, False, r["id"]))
        source = f"{art}/{v['run_id']}/artifacts/model"
        out["model_versions"].append((MODEL, i, v["created"], v["created"], "None", source,
                                      v["run_id"], "READY", source, "default"))
        out["model_version_tags"] += [(k, val, MODEL, i, "default")
                                      for k, val in v["tags"].items()]
    return out


COLUMNS = {
    "runs": ("run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id",
             "status", "start_time", "end_time", "source_version", "lifecycle_stage",
             "artifact_uri", "experiment_id"),
    "tags": ("key", "value", "run_uuid"),
    "params": ("key", "value", "run_uuid"),
    "metrics": ("key", "value", "timestamp", "run_uuid", "step", "is_nan"),
    "latest_metrics": ("key", "value", "timestamp", "step", "is_nan", "run_uuid"),
    "model_versions": ("name", "version", "creation_time", "last_updated_time",
                       "current_stage", "source", "run_id", "status", "storage_location",
                       "workspace"),
    "model_version_tags": ("key", "value", "name", "version", "workspace"),
}


def prepare(uri: str, art: Path) -> int:
    """MLflow creates the schema, the experiment and the registered model; the id of the
    experiment."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = c.create_experiment(EXPERIMENT, artifact_location=str(art))
    c.create_registered_model(MODEL)
    return int(exp_id)


def grow(uri: str, first: int, last: int, exp_id: int, art: Path) -> float:
    """Insert versions first..last (with their runs) in bulk; seconds taken."""
    start = time.perf_counter()
    params = base_params()
    step = 2000
    for lo in range(first, last + 1, step):
        rows = table_rows(lo, min(last, lo + step - 1), exp_id, params, str(art))
        if uri.startswith("sqlite:///"):
            import sqlite3

            con = sqlite3.connect(uri[len("sqlite:///"):])
            with con:
                for table, cols in COLUMNS.items():
                    con.executemany(f"insert into {table} ({', '.join(cols)}) values "
                                    f"({', '.join('?' * len(cols))})", rows[table])
            con.close()
        else:
            import psycopg

            with psycopg.connect(pg_dsn(uri)) as con, con.cursor() as cur:
                for table, cols in COLUMNS.items():
                    with cur.copy(f"copy {table} ({', '.join(cols)}) from stdin") as cp:
                        for row in rows[table]:
                            cp.write_row(row)
    if not uri.startswith("sqlite:///"):
        import psycopg

        # the planner's statistics, as autovacuum keeps them on a server in use (without
        # them PostgreSQL picks nested loops over the fresh tables: 10 s for 100 runs)
        with psycopg.connect(pg_dsn(uri), autocommit=True) as con:
            con.execute("analyze")
    set_aliases(uri, last)
    return time.perf_counter() - start


def set_aliases(uri: str, newest: int) -> None:
    """champion, previous and challenger among the newest versions."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for alias, version in (("champion", newest - 3), ("previous", newest - 40),
                           ("challenger", newest)):
        c.set_registered_model_alias(MODEL, alias, str(max(1, version)))


def pg_dsn(uri: str) -> str:
    return uri.replace("postgresql+psycopg://", "postgresql://")


# --- stores ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """One store kind: ``uri`` for building it, ``audit_uri`` for the audit."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp, self.proc, self.db = kind, tmp, None, None
        self.art = tmp / f"{kind}-artifacts"
        if kind == "sqlite":
            self.uri = self.audit_uri = f"sqlite:///{tmp / 'mlflow.db'}"
            return
        import psycopg

        self.db = f"saeflow_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'create database "{self.db}"')
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(PG_URL)
        self.uri = urlunsplit(parts._replace(scheme="postgresql+psycopg", path=f"/{self.db}"))
        self.audit_uri = ""

    def start_server(self) -> None:
        """``mlflow server`` on the PostgreSQL store (after MLflow made its schema)."""
        port = free_port()
        self.log = self.tmp / "mlflow-server.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", self.uri,
                 "--artifacts-destination", str(self.art), "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "2",
                 "--uvicorn-opts", "--timeout-worker-healthcheck 60"],  # as the README
                cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=clean_env())
        self.audit_uri = f"http://127.0.0.1:{port}"
        import urllib.request

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.audit_uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer /health within 180 s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        if self.db:
            import psycopg

            with psycopg.connect(PG_URL, autocommit=True) as con:
                con.execute(f'drop database if exists "{self.db}" with (force)')


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "SAEFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- timing ---------------------------------------------------------------------------------


TIME = Path("/usr/bin/time")


def timed(cmd: list[str], cwd: Path, env: dict, out: Path, tries: int = 3) -> dict:
    """Wall seconds and peak RSS (MiB) of one fresh process; its stdout to ``out``. The
    peak is GNU time's report of the process (from its exec on) where /usr/bin/time exists:
    ``os.wait4`` of a child forked from this process, which holds the synthetic rows,
    would count this process's pages until the child's exec. A process ended by a signal
    from outside (a shared machine) is run again, up to ``tries`` times in all."""
    stats = out.with_suffix(".time")
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd] if TIME.exists() else cmd
    for attempt in range(1, tries + 1):
        with open(out, "w") as fh, open(out.with_suffix(".err"), "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(wrapped, cwd=cwd, env=env, stdout=fh, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        report = stats.read_text() if stats.exists() else ""
        if code == 0:
            break
        if "signal" not in report or attempt == tries:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}; {report.strip()}): "
                               f"{out.with_suffix('.err').read_text()[-2000:]}")
        print(f"  ({' '.join(cmd[-4:])}: {report.strip()}; run again)", flush=True)
    kib = int(report.split()[-1]) if TIME.exists() else usage.ru_maxrss
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(kib / 1024, 1),
            "attempts": attempt}


def rows_of(out: Path) -> list[str]:
    import csv

    return [r["version"] for r in csv.DictReader(io.StringIO(out.read_text()))]


def measure(store: Store, size: int, work: Path, old_dir: Path | None, repeats: int,
            rare_max: int) -> list[dict]:
    """Each case on the store as it is: the new audit (the best of ``repeats`` fresh
    processes for the filtered cases), and the old one once if ``old_dir``."""
    env = {**clean_env(), "MLFLOW_TRACKING_URI": store.audit_uri}
    # untimed: a server's workers answer their first requests slowly (imports), and the
    # store's pages come into the OS's cache: both old and new are timed warm
    for _ in range(2):
        timed([str(BIN / "saeflow"), "audit", "--limit", "1"], work, env, work / "warm.txt")
    results = []
    for case, args in CASES.items():
        if case == "rare" and size > rare_max:
            continue
        record = {"store": store.kind, "versions": size, "case": case}
        out = work / f"{store.kind}-{size}-{case}.csv"
        tries = [timed([str(BIN / "saeflow"), "audit", "--format", "csv", *args], work, env,
                       out) for _ in range(repeats if "--limit" in args else 1)]
        new = min(tries, key=lambda t: t["wall_s"])
        new_rows = rows_of(out)
        record.update(new=new, new_tries_s=[t["wall_s"] for t in tries], rows=len(new_rows))
        if old_dir is not None:
            old_out = work / f"{store.kind}-{size}-{case}-old.csv"
            start = time.perf_counter()
            try:
                old = timed([sys.executable, "-c", OLD_DRIVER, str(old_dir), "--format",
                             "csv", *args], work, env, old_out)
            except RuntimeError as exc:  # e.g. one search of every run outlasting the
                # client's read timeout on a server: a result too, not the end of the run
                record["old_error"] = (f"failed after {time.perf_counter() - start:.0f} s: "
                                       + str(exc).strip().splitlines()[-1][-300:])
            else:
                old_rows = rows_of(old_out)
                record.update(old=old, old_rows=len(old_rows),
                              same_versions=old_rows == new_rows,
                              ratio=round(old["wall_s"] / new["wall_s"], 2))
        results.append(record)
        line = (f"  {store.kind:6s} {size:>7,} {case:6s} {new['wall_s']:7.2f} s "
                f"{new['peak_rss_mib']:6.0f} MiB {len(new_rows):>7,} rows")
        if "old_error" in record:
            line += f" | old {record['old_error'][:120]}"
        if "old" in record:
            line += (f" | old {record['old']['wall_s']:7.2f} s "
                     f"{record['old']['peak_rss_mib']:6.0f} MiB x{record['ratio']:.1f}"
                     + ("" if record["same_versions"] else " (different rows)"))
        print(line, flush=True)
    return results


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = ["# saeflow audit at sweep scale", "",
             f"{m['platform']}, {m['cpus_usable']} CPUs (load average 1/5/15 min before "
             f"{'/'.join(map(str, m['load_average_before_after'][:3]))}, after "
             f"{'/'.join(map(str, m['load_average_before_after'][3:]))}), MLflow "
             f"{m['mlflow']}. Wall time of a fresh `saeflow audit --format csv` process "
             f"(imports included; the filtered cases the best of {record['repeats']}) and its "
             "peak RSS. Old: the implementation before "
             f"({record['old_rev']}:flows/audit.py, run once), up to {record['old_max']:,} "
             "versions; its list is cut to 100 rows where the new one has --limit 100.",
             "", "| store | versions | case | rows | new s | new MiB | old s | old MiB | "
             "old/new |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        old = r.get("old")
        flag = "" if not old or r["same_versions"] else " (rows differ)"
        if old:
            old_cells = (f"{old['wall_s']:.2f} | {old['peak_rss_mib']:.0f} | "
                         f"{r['ratio']:.1f}x{flag} |")
        elif "old_error" in r:
            old_cells = f"{r['old_error'].split(':')[0]} | - | - |"
        else:
            old_cells = "- | - | - |"
        lines.append(
            f"| {r['store']} | {r['versions']:,} | {r['case']} | {r['rows']:,} | "
            f"{r['new']['wall_s']:.2f} | {r['new']['peak_rss_mib']:.0f} | " + old_cells)
    lines += ["", "Cases: " + "; ".join(f"{k}: `{' '.join(v) or '(no filter, all rows)'}`"
                                        for k, v in CASES.items())
              + f" (rare up to {record['rare_max']:,} versions).", "",
              "Store: per version its run (all of params.yaml as params, provenance tags, "
              "train/sparsity/score metrics) and the version with its settings as tags; 2% "
              "of the versions have their score on a separate run of a later stage "
              "(tagged saeflow.trained_in), 0.5% none (each such row costs a search of the "
              "runs by that tag).", "",
              f"Target: tags and metric (filtered, at most 100 rows) under {TARGET_S:.0f} s "
              "at the largest size on both stores: "
              + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in
                          record["target"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--stores", default="sqlite,server")
    ap.add_argument("--old-rev", default=OLD_REV,
                    help="git revision of the old flows/audit.py (default: the last one "
                    "before the paged rewrite)")
    ap.add_argument("--old-max", type=int, default=10_000,
                    help="time the old implementation up to this many versions")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per filtered case (the best is kept)")
    ap.add_argument("--rare-max", type=int, default=10_000,
                    help="time the rare case up to this many versions (above, it reads the "
                    "whole store, as the all case does)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the cases of audit.partial.json (an interrupted run) and measure "
                    "only the others (the stores are built again)")
    args = ap.parse_args(argv)
    # a terminated run still stops its server and drops its database (finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    stores = args.stores.split(",")
    import mlflow

    results, builds = [], []
    load_before = os.getloadavg()
    partial = Path(args.out) / "audit.partial.json"  # the results so far, if the run dies
    if args.resume and partial.exists():
        results = json.loads(partial.read_text())
    done = {(r["store"], r["versions"]) for r in results}
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saeflow-audit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.chdir(tmp)  # MLflow's Default experiment points at ./mlruns: not the project's
        old_dir = tmp / "old"
        old_dir.mkdir()
        (old_dir / "old_audit.py").write_text(subprocess.run(
            ["git", "show", f"{args.old_rev}:flows/audit.py"], cwd=ROOT, check=True,
            capture_output=True, text=True).stdout)
        for kind in stores:
            store_tmp = tmp / kind
            store_tmp.mkdir()
            store = Store(kind, store_tmp)
            try:
                exp_id = prepare(store.uri, store.art)
                if kind == "server":
                    store.start_server()
                have = 0
                for size in sizes:
                    seconds = grow(store.uri, have + 1, size, exp_id, store.art)
                    builds.append({"store": kind, "versions": size, "insert_s": round(seconds, 1)})
                    print(f"{kind}: {size:,} versions ({seconds:.0f} s to insert "
                          f"{size - have:,})", flush=True)
                    have = size
                    if (kind, size) in done:
                        continue
                    work = store_tmp / "work"
                    work.mkdir(exist_ok=True)
                    results += measure(store, size, work,
                                       old_dir if size <= args.old_max else None,
                                       args.repeats, args.rare_max)
                    partial.write_text(json.dumps(results, indent=2) + "\n")
            finally:
                store.close()
    largest = max(sizes)
    target = {f"{r['store']} {r['case']}": r["new"]["wall_s"] < TARGET_S for r in results
              if r["versions"] == largest and r["case"] in ("tags", "metric")}
    record = {
        "task": "saeflow audit over synthetic stores of registered model versions",
        "machine": {"cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(), "mlflow": mlflow.__version__,
                    "load_average_before_after": [round(x, 2) for x in (
                        *load_before, *os.getloadavg())]},
        "repeats": args.repeats, "rare_max": args.rare_max,
        "old_rev": args.old_rev, "old_max": args.old_max, "cases": CASES,
        "target_s": TARGET_S, "target": target, "builds": builds, "results": results,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audit.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    text = markdown(record)
    (out_dir / "audit.md").write_text(text)
    partial.unlink(missing_ok=True)
    print("\n" + text)
    print(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

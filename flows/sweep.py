"""``saeflow sweep``: many sparsity settings at once, on Dask (prefect-dask's
``DaskTaskRunner``), on a local cluster or an existing one.

The flow (``saeflow-sweep``):

1. ingest and patches, where DVC says they are stale, once, in this process; recorded in
   dvc.lock as ``dvc commit`` records them (every point shares them);
2. a patch store for each distinct ``patches`` setting the points use besides
   params.yaml's (``sweeps/patches/<key>/``, kept: the next sweep with that setting reuses
   it), each one task on the cluster;
3. one MLflow parent run, and a child run per point, made before any point runs;
4. each point (train, evaluate, score, record) as one Prefect task on a Dask worker, which
   imports torch once and runs many points; a point that fails is recorded FAILED and the
   others go on; a worker that dies mid-point has its point run again elsewhere, into the
   same child run;
5. the table of points: a Prefect table artifact, ``sweeps/<id>.csv`` (also on the parent
   run), and the best point (params.yaml's ``retrain`` metric and direction).

The sweep's id is its points' keys (settings + data md5), so running the same sweep again
finds its finished points and skips them; ``--force`` makes a new sweep of the same points.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows import sweep_grid, sweep_records, tracking
from flows.sweep_point import PointJob, run_point
from sae_core.outputs import csv_with_header

SWEEP_DIR = "sweeps"
"""Under the project: patch stores of swept patch settings, and each sweep's CSV."""
REGISTER = ("all", "best", "none")
SWEEP_CSV = csv_with_header("a saeflow sweep table (CSV)", "point,")


@task(name="patch-store", persist_result=False)
def patch_store_task(images: str, folder: str, settings: dict) -> dict:
    """The patch store and transform of one ``patches`` setting, in ``folder``."""
    from flows.patches import make_patch_store

    Path(folder).mkdir(parents=True, exist_ok=True)
    return make_patch_store(images, str(Path(folder) / "patches.arrow"),
                            str(Path(folder) / "transform.safetensors"), settings)


@task(name="sweep-point", persist_result=False)
def point_task(job: PointJob) -> dict:
    """One point on a worker (:func:`flows.sweep_point.run_point`)."""
    return run_point(job)


def task_runner(workers: int, address: str | None):
    """prefect-dask's runner: the cluster at ``address``, else a local cluster of
    ``workers`` processes with one task slot each (the point divides the cores)."""
    from prefect_dask import DaskTaskRunner

    # the scheduler of a local cluster runs in this process: its INFO lines (every worker
    # and client coming and going) would bury the progress bar
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        import dask

        # a wrong address is reported in 10 s rather than Dask's 30
        dask.config.set({"distributed.comm.timeouts.connect": "10s"})
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": ":0", "silence_logs": logging.WARNING})


def torch_threads(cores: dict[str, int], workers: dict[str, dict]) -> dict[str, int]:
    """Worker address -> torch threads for a point there: its host's cores divided by the
    task slots of every worker on that host (``workers``: the scheduler's worker info)."""
    slots: dict[str, int] = {}
    for info in workers.values():
        slots[info["host"]] = slots.get(info["host"], 0) + int(info["nthreads"])
    return {addr: max(1, int(cores.get(addr) or 1) // max(1, slots[info["host"]]))
            for addr, info in workers.items()}


def resources_of_points(device: str, workers: dict[str, dict]) -> dict[str, float]:
    """The Dask resources a point claims: one ``GPU`` where points train on CUDA
    (``train.device: cuda``, or ``auto`` on a cluster whose workers advertise GPUs, started
    with ``--resources GPU=1``), so that a GPU worker runs one point at a time."""
    has_gpus = any("GPU" in (w.get("resources") or {}) for w in workers.values())
    if device == "cuda" or (device == "auto" and has_gpus):
        return {"GPU": 1}
    return {}


def _connect(runner) -> None:
    """Start the local cluster, or reach the existing one; one line if it cannot be."""
    try:
        runner.client  # noqa: B018 - prefect-dask connects on first use
    except OSError as exc:
        where = runner.address or "the local Dask cluster"
        raise OSError(f"Dask cluster {where}: {' '.join(str(exc).split())}") from None


def _running(client) -> int:
    """Points executing now, on every worker."""
    try:
        counts = client.run(lambda dask_worker: len(dask_worker.state.executing))
    except Exception:  # a worker going away mid-call: the next poll counts again
        return -1
    return sum(counts.values())


@flow(name="saeflow-sweep", log_prints=False, persist_result=False)
def sweep_flow(project: str, points: list[dict], grid: list[str], register_mode: str = "all",
               force: bool = False, params_file: str = "params.yaml",
               dvc_yaml: str = "dvc.yaml") -> dict:
    """Run the points (see the module docstring); returns the sweep id, the points' rows,
    the best point and the counts."""
    from prefect.context import get_run_context

    from flows.champion import GateSettings
    from flows.dvc_state import commit_stages, is_stale
    from flows.lineage import md5_file
    from flows.params import load_params
    from flows.pipeline import run_stage
    from flows.project import pipeline_paths
    from flows.stage_support import tracking_enabled, tracking_settings
    from flows.stages import BY_NAME

    root = Path(project).resolve()
    os.chdir(root)
    params = load_params(params_file)
    gate = GateSettings.from_params(params, params_file)
    experiment, registered = tracking_settings(params)
    paths = pipeline_paths(dvc_yaml)
    if not tracking_enabled():
        raise ValueError("sweep records every point in MLflow; it cannot run with "
                         "SAEFLOW_TRACKING=0")
    c = tracking.client()
    ran = [s for s in ("ingest", "patches") if is_stale(root, s)]
    for name in ran:
        run_stage(BY_NAME[name], paths, params_file)
    commit_stages(root, ran)
    data = {"images": md5_file(paths["images"]), "labeled": md5_file(paths["labeled"])}
    full = [sweep_grid.apply_point(params, p) for p in points]
    keys = [sweep_grid.point_key(p, data) for p in full]
    sid = sweep_grid.sweep_id(keys) + (f"-{int(time.time())}" if force else "")
    tags = {**tracking.git_tags(), "dvc.md5:images": data["images"],
            "dvc.md5:labeled": data["labeled"]}
    runner = get_run_context().task_runner
    if sweep_records.unfinished(c, experiment, sid, keys):
        _connect(runner)  # an unreachable cluster fails here, before anything is recorded
    parent = sweep_records.open_sweep(c, experiment, sid, params=params, grid=grid, tags=tags)
    runs = sweep_records.open_points(c, experiment, sid, parent, points, keys, full, tags)
    todo = [i for i in range(len(points)) if runs[i].info.status != "FINISHED"]
    print(f"sweep {sid}: {len(points)} points, {len(points) - len(todo)} already finished; "
          f"MLflow parent run {parent}", file=sys.stderr)
    try:
        stores, failed = _patch_stores(runner, full, todo, params, paths, data["images"], root)
        # each store's md5 once, for its points' version tags (as train tags its version)
        md5s = {store: md5_file(root / store) for i, (store, _) in stores.items()
                if i not in failed}
        jobs = [PointJob(sweep_id=sid, index=i, settings=points[i], params=full[i],
                         run_id=runs[i].info.run_id, parent_run_id=parent,
                         tracking_uri=c.tracking_uri, patches=str(root / stores[i][0]),
                         transform=str(root / stores[i][1]),
                         labeled=str(root / paths["labeled"]),
                         registered=registered if register_mode == "all" else None,
                         version_tags={"git.commit": tags["git.commit"],
                                       "data.md5": md5s[stores[i][0]]})
                for i in todo if i not in failed]
        for i, error in failed.items():
            c.set_tag(runs[i].info.run_id, "saeflow.error", error)
            c.set_terminated(runs[i].info.run_id, "FAILED")
        outcome = _run_points(runner, jobs, params["train"].get("device", "auto"),
                              len(points) - len(todo), len(failed))
    except BaseException:
        _cancel(c, parent, sid, experiment)
        raise
    point_runs = sweep_records.children(c, tracking.experiment_id(c, experiment), sid)
    rows = sweep_records.point_rows(point_runs)
    best = sweep_records.best_run(point_runs, gate.metric, gate.direction)
    best_version = None
    if best is not None and register_mode == "best":
        best_version = _register_best(c, best, registered, sid)
    n_failed = sum(r["status"] == "FAILED" for r in rows)
    csv_path = _publish(c, parent, sid, rows, root)
    tracking.log_stage(c, parent, "sweep", metrics={
        "points": len(rows), "failed": n_failed, "ran": outcome["ran"],
        **({"best_point": int(best.data.tags["saeflow.point"])} if best else {})})
    if best is not None:
        c.set_tag(parent, "saeflow.best_run", best.info.run_id)
    c.set_terminated(parent, "FINISHED")
    return {"sweep_id": sid, "parent_run": parent, "rows": rows, "csv": str(csv_path),
            "ran": outcome["ran"], "skipped": len(points) - len(todo), "failed": n_failed,
            "overhead": outcome.get("overhead"),
            "best_run": best.info.run_id if best else None, "best_version": best_version,
            "metric": gate.metric, "stages_run": ran}


def _patch_stores(runner, full, todo, params, paths, images_md5, root):
    """Index -> (patch store, transform) of each point to run, and index -> error for
    points whose patch setting failed. params.yaml's own setting uses the project's store
    (made current above); any other is made once, as a task, or found from a former sweep."""
    stores: dict[int, tuple[str, str]] = {}
    wanted: dict[str, tuple[Path, dict]] = {}
    for i in todo:
        if full[i]["patches"] == params["patches"]:
            stores[i] = (paths["patches"], paths["transform"])
            continue
        key = sweep_grid.patch_key(full[i], images_md5)
        folder = root / SWEEP_DIR / "patches" / key
        stores[i] = (str(folder / "patches.arrow"), str(folder / "transform.safetensors"))
        if not Path(stores[i][1]).is_file():  # written after the store: both or remade
            wanted[key] = (folder, full[i]["patches"])
    images = str(root / paths["images"])
    futures = {key: patch_store_task.with_options(task_run_name=f"patch-store-{key}").submit(
        images, str(folder), settings) for key, (folder, settings) in wanted.items()}
    errors: dict[str, str] = {}
    for key, fut in futures.items():
        state = fut.wrapped_future.result()
        if not state.is_completed():
            exc = state.result(raise_on_failure=False)
            errors[key] = f"patches: {' '.join(str(exc).split())}"
    failed = {i: errors[k] for i in todo if full[i]["patches"] != params["patches"]
              and (k := sweep_grid.patch_key(full[i], images_md5)) in errors}
    if futures:
        print(f"sweep: made {len(futures) - len(errors)} patch store(s) under "
              f"{SWEEP_DIR}/patches", file=sys.stderr)
    return stores, failed


def _run_points(runner, jobs: list[PointJob], device: str, skipped: int,
                failed_before: int) -> dict:
    """Submit the points, with a progress bar (done, failed, running, time left)."""
    import dask
    from tqdm import tqdm

    if not jobs:  # every point finished before: no cluster to start
        return {"ran": 0, "failed": failed_before}
    client = runner.client
    workers = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(os.cpu_count)
    threads = torch_threads(cores, workers)
    resources = resources_of_points(device, workers)
    jobs = [PointJob(**{**j.__dict__, "threads": threads}) for j in jobs]
    slots = {address: int(w["nthreads"]) for address, w in workers.items()}
    start, submitted = time.perf_counter(), time.time()
    with dask.annotate(resources=resources) if resources else _nothing():
        futures = {point_task.with_options(task_run_name=f"point-{j.index}").submit(j): j
                   for j in jobs}
    bar = tqdm(total=len(jobs) + skipped + failed_before, initial=skipped + failed_before,
               unit="point", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    failed, remaining = failed_before, set(futures)
    last_poll = 0.0
    running = 0
    try:
        while remaining:
            for fut in [f for f in remaining if f.wrapped_future.done()]:
                remaining.discard(fut)
                if not _succeeded(fut):
                    failed += 1
                bar.update(1)
            if time.monotonic() - last_poll > 1.0:
                running, last_poll = _running(client), time.monotonic()
            bar.set_postfix_str(f"failed {failed}, running {max(running, 0)}", refresh=False)
            time.sleep(0.1)
    except BaseException:
        # nothing more starts: queued points are cancelled, and a local cluster's workers
        # stop now (an existing cluster's keep running; their points see the sweep KILLED)
        client.cancel([f.wrapped_future for f in remaining])
        if client.cluster is not None:
            _quiet_teardown(client)
            client.cluster.close()
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    timings = []  # of the points finished now (a cancelled point returns none)
    for fut in futures:
        value = fut.wrapped_future.result().result(raise_on_failure=False) \
            if _succeeded(fut) else None
        if isinstance(value, dict) and "timing" in value:
            timings.append(value["timing"])
    return {"ran": len(jobs), "failed": failed,
            "overhead": point_overhead(submitted, timings, slots, wall)}


def point_overhead(submitted: float, timings: list[dict], slots: dict[str, int],
                   wall: float) -> dict | None:
    """What the points cost beyond their compute (train + evaluate + score), from each
    finished point's ``timing`` (:func:`flows.sweep_point.run_point`: its worker, start and
    end by the wall clock, compute and recording seconds); ``slots``: worker -> task slots,
    ``submitted``: when the points were submitted (wall clock), ``wall``: seconds from then
    to the last result.

    Per point: ``in_task`` = (end - start) - compute (the MLflow bookkeeping and recording
    on the worker), and ``between`` = the time its task slot waited for it after the slot's
    previous point (or the submission): dispatch and Prefect's task run. ``per_point`` =
    mean(in_task + between), the overhead the sweep adds to each point. ``idle_end`` (per
    point): slots left idle at the end while the last points finish (unequal points, not
    overhead), so that slots * wall = sum(compute + in_task + between) + n * idle_end."""
    import heapq

    if not timings:
        return None
    n = len(timings)
    in_task = [t["ended"] - t["started"] - t["compute"] for t in timings]
    between = []
    for worker, k in slots.items():
        free = [submitted] * max(1, k)  # when each of its slots was last free
        for t in sorted((t for t in timings if t["worker"] == worker),
                        key=lambda t: t["started"]):
            between.append(max(0.0, t["started"] - heapq.heappop(free)))
            heapq.heappush(free, t["ended"])
    total_slots = sum(max(1, k) for k in slots.values())
    used = sum(t["ended"] - t["started"] for t in timings) + sum(between)
    return {"wall": wall, "slots": total_slots, "points": n,
            "compute": sum(t["compute"] for t in timings) / n,
            "per_point": (sum(in_task) + sum(between)) / n,
            "in_task": sum(in_task) / n, "between": sum(between) / n,
            "record": sum(t["record"] for t in timings) / n,
            "idle_end": max(0.0, total_slots * wall - used) / n}


def _quiet_teardown(client) -> None:
    """Silence a local cluster's logs before it is closed under running points.

    Closing it stops worker processes that are mid-point: their nannies kill them after
    a few seconds, and in between a worker's heartbeat may find the scheduler gone, which
    Dask logs as an error with a traceback (and the nannies warn of every kill). Each of
    these is the cancellation the user asked for; the sweep reports it in one line."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    try:
        client.run(_silence_distributed_logs)
    except Exception:  # a worker already gone needs no silencing
        pass


def _silence_distributed_logs() -> None:
    """Run on each worker of a local cluster that is about to be closed."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _succeeded(fut) -> bool:
    """Whether a point's future ended in a finished point (a worker lost too many times,
    or a point that raised, counts as failed; its run says why)."""
    if fut.wrapped_future.status != "finished":
        return False
    state = fut.wrapped_future.result()
    return bool(state.is_completed())


def _cancel(c, parent: str, sid: str, experiment: str) -> None:
    """Ctrl-C or an error: the parent and every point not finished end KILLED (a point
    still running on a remote worker sees its parent KILLED and records nothing more)."""
    try:
        for run in sweep_records.children(c, tracking.experiment_id(c, experiment), sid):
            if run.info.status in ("SCHEDULED", "RUNNING"):
                c.set_terminated(run.info.run_id, "KILLED")
        c.set_terminated(parent, "KILLED")
    except Exception:  # the interruption itself is what to report
        pass


def _register_best(c, best, registered: str, sid: str) -> str:
    """``--register best``: the best point's logged model becomes a version."""
    from flows.sweep_point import POINT_TAG, SWEEP_TAG

    tags = best.data.tags
    settings = {k: best.data.params.get(f"train.{k}", "") for k in tracking.SETTINGS}
    return tracking.register_version(c, tags[tracking.MODEL_URI_TAG], registered, {
        **settings, "model_sha256": tags.get(tracking.MODEL_TAG, ""),
        "run_id": best.info.run_id, "git.commit": tags.get("git.commit", ""),
        SWEEP_TAG: sid, POINT_TAG: tags.get(POINT_TAG, "")})


def _publish(c, parent: str, sid: str, rows: list[dict], root: Path) -> Path:
    """The table as ``sweeps/<id>.csv`` (atomic), on the parent run, and as a Prefect
    table artifact."""
    from prefect.artifacts import create_table_artifact

    from flows.audit import format_rows
    from sae_core.io import atomic_path

    columns = sweep_records.sweep_columns(rows)
    path = root / SWEEP_DIR / f"{sid}.csv"
    with atomic_path(path, SWEEP_CSV) as tmp:
        Path(tmp).write_text(format_rows(rows, "csv", columns))
    c.log_artifact(parent, str(path), "sweep")
    create_table_artifact(key=f"saeflow-sweep-{sid}".lower(), table=[
        {k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows],
        description=f"saeflow sweep {sid}: {len(rows)} points")
    return path


def run_sweep(points: list[dict], grid: list[str], *, workers: int, address: str | None,
              register: str, force: bool, params_file: str, dvc_yaml: str,
              run_flow) -> Any:
    """The flow on its Dask runner (``run_flow``: the CLI's flow caller)."""
    from flows.project import project_root

    if register not in REGISTER:
        raise ValueError(f"--register must be one of {', '.join(REGISTER)}; got {register!r}")
    if address is None and workers < 1:
        raise ValueError(f"--workers must be >= 1; got {workers}")
    flow_ = sweep_flow.with_options(task_runner=task_runner(workers, address))
    return run_flow(flow_, project=str(project_root()), points=points, grid=grid,
                    register_mode=register, force=force, params_file=params_file,
                    dvc_yaml=dvc_yaml)

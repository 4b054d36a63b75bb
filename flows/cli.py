"""The ``saeflow`` command line.

Heavy libraries (torch, scikit-learn) are imported inside the commands, never at module
level, so ``saeflow --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows import servers


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    """Central-difference check of every penalty's gradient, in float64."""
    from sae_core.config import SAEConfig
    from sae_core.gradcheck import check_gradient
    from sae_core.patches import natural_patches

    X = natural_patches(args.samples, args.patch, seed=0)
    worst = 0.0
    for penalty in ("kl", "l1", "topk"):
        cfg = SAEConfig(n_components=args.hidden, penalty=penalty, dtype="float64",
                        k=max(1, args.hidden // 3), l1_coefficient=1e-2)
        paths = [("autograd", False)] + ([("fused", True)] if penalty == "kl" else [])
        for name, fused in paths:
            diff = check_gradient(cfg, X, fused=fused)
            worst = max(worst, diff)
            print(f"{penalty:5s} {name:9s} ||g_num - g|| / ||g_num + g|| = {diff:.3e}")
    ok = worst < 1e-9
    print("gradient check " + ("passed" if ok else "FAILED") + f" (worst {worst:.3e}, limit 1e-9)")
    return 0 if ok else 1


def _cmd_exercise(args: argparse.Namespace) -> int:
    """The UFLDL exercise end to end on the built-in natural images."""
    import time

    from sae_core import SparseAutoencoder
    from sae_core.io import MODEL, write_json
    from sae_core.outputs import PNG, check_paths
    from sae_core.patches import natural_patches
    from sae_core.plots import filter_grid_figure, save_figure
    from sae_core.stats import SPARSITY_METRICS, sparsity_stats

    out = Path(args.out)
    check_paths(inputs={"patches": args.patches},
                outputs={"model": (out / "model", MODEL),
                         "sparsity": (out / "sparsity.json", SPARSITY_METRICS),
                         "filters": (out / "filters.png", PNG)})
    if args.patches:
        from sae_core.patch_store import read_patch_store

        store = read_patch_store(args.patches)
        X = store.train
        side = store.patch_shape[0]
        print(f"training on {X.shape[0]} patches of {args.patches}")
    else:
        side = 8
        print(f"sampling {args.n_patches} 8x8 patches from the built-in natural images ...")
        X = natural_patches(args.n_patches, 8, seed=args.seed)
    if len(store.patch_shape if args.patches else (8, 8)) != 2 or X.shape[1] != side * side:
        raise ValueError(f"{args.patches}: the exercise needs grayscale square patches")
    sae = SparseAutoencoder(25, rho=0.01, beta=3.0, weight_decay=1e-4, max_iter=args.iterations,
                            random_state=args.seed)
    start = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - start
    last = sae.history_[-1]
    stats = sparsity_stats(sae, X)
    rho_hat = stats.rho_hat
    sae.save(out / "model")
    write_json(out / "sparsity.json", stats.metrics(), SPARSITY_METRICS)
    save_figure(filter_grid_figure(sae.components_, (side, side), title="25 filters learned "
                                   "on natural patches (rho 0.01, beta 3)"), out / "filters.png")
    n = X.shape[1]
    print(f"trained {n}-25-{n} for {sae.n_iter_} L-BFGS iterations in {seconds:.2f} s")
    print(f"loss {last['loss']:.5f} = reconstruction {last['reconstruction']:.5f} "
          f"+ weight decay {last['weight_decay']:.5f} + sparsity {last['sparsity']:.5f}")
    m = stats.metrics()
    print(f"rho_hat per unit in [{rho_hat.min():.4f}, {rho_hat.max():.4f}] (target 0.01); "
          f"{100 * m['frac_units_near_target']:.0f}% of units within [rho/2, 2 rho]; "
          f"{m['dead_units']} dead; FVU {m['fvu']:.3f}")
    print(f"model:   {out / 'model'}\nfilters: {out / 'filters.png'}\n"
          f"metrics: {out / 'sparsity.json'}")
    return 0


def _stage_kwargs(args: argparse.Namespace) -> dict:
    """The stage's path options (and ``--data-dir`` where the stage has it) as its keyword
    arguments."""
    from flows.stages import BY_NAME

    kwargs = {name: getattr(args, name) for name in BY_NAME[args.stage].path_args}
    if getattr(args, "data_dir", None) is not None:
        kwargs["data_dir"] = args.data_dir
    return {**kwargs, "params_file": args.params}


def _cmd_direct(args: argparse.Namespace) -> int:
    """``saeflow ingest`` / ``saeflow patches``: the stage's body in this process, without
    Prefect (no server needed); the same options as ``saeflow stage NAME``."""
    from flows.stages import BY_NAME

    BY_NAME[args.stage].body()(**_stage_kwargs(args))
    return 0


_DEBUG = False


class _NoFlowRunTracebacks:
    """Console log filter: a flow run's own error report (a traceback) is dropped, since
    the command reports the error in one line (the Prefect API still gets the record)."""

    def filter(self, record) -> bool:
        return not (record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
                    and record.levelno >= 40)


def _run_flow(fn, **kwargs):
    """Call a Prefect flow with flow-run heartbeats off: they exist to spot crashed
    long-running deployments, and joining their thread costs ~1 s per flow run."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    # its "still processing items" notice at exit is about its own queue draining
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    quiet = _NoFlowRunTracebacks()
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    if not _DEBUG:
        for h in handlers:
            h.addFilter(quiet)
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return fn(**kwargs)
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _cmd_stage(args: argparse.Namespace) -> int:
    """One pipeline stage as its Prefect flow, in this process (what dvc.yaml calls). Only
    the stage's own module is imported, so a stage loads only the libraries it uses."""
    from flows.stages import BY_NAME

    servers.use_prefect()
    _run_flow(BY_NAME[args.stage].flow(), **_stage_kwargs(args))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """All five stages as subflows of one Prefect flow run in this process, then
    ``dvc commit`` (and ``dvc push`` with --push)."""
    if args.push and args.no_dvc_commit:
        raise ValueError("--push needs the outputs recorded in dvc.lock; drop --no-dvc-commit")
    if args.push:
        from flows.lineage import default_remote
        from flows.project import project_root

        if default_remote(project_root()) is None:
            raise ValueError("--push: the project has no default DVC remote (add one with "
                             "`dvc remote add -d NAME URL`)")
    servers.use_prefect()
    from flows.pipeline import pipeline_flow

    _run_flow(pipeline_flow, params_file=args.params, dvc_yaml=args.dvc_yaml,
              record_in_dvc=not args.no_dvc_commit, push=args.push)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """HTML report of one pipeline run or a comparison of several (MLflow + Prefect)."""
    from flows.stage_support import tracking_settings_of

    servers.use_prefect()
    from flows.report import report_flow

    experiment, _ = tracking_settings_of(args.params)
    run_ids = args.run
    if args.sweep:
        from flows.sweep_records import sweep_rows

        run_ids = [r["run_id"] for r in sweep_rows(args.sweep, params_file=args.params)
                   if r["status"] == "FINISHED"]
        if not run_ids:
            raise ValueError(f"--sweep {args.sweep}: no finished point to report")
    _run_flow(report_flow, out=args.out, run_ids=run_ids, where=args.where, last=args.last,
              experiment=experiment)
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    """The retraining flow once, now, in this process (see flows/retrain.py)."""
    from flows.project import project_root

    servers.use_prefect()
    from flows.retrain import retrain_flow

    state = _run_flow(retrain_flow, project=str(project_root()), params_file=args.params,
                      dvc_yaml=args.dvc_yaml, return_state=True)
    if state.is_cancelled():
        print(f"saeflow: retrain cancelled: {state.message}", file=sys.stderr)
        return 3
    state.result()  # a failed run raises its error here
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Many settings at once on Dask (see flows/sweep.py); or promote a point."""
    from flows.params import load_params
    from flows.sweep_grid import check_points, parse_grid, read_sweep_file

    if args.promote:
        from flows.sweep_records import promote

        settings = promote(args.promote, args.params)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"sweep: wrote {shown} into {args.params}; `dvc repro` now makes this model")
        return 0
    if args.file and args.set_param:
        raise ValueError("sweep: give the points as -S options or as --file, not both")
    points = read_sweep_file(args.file) if args.file else parse_grid(args.set_param)
    check_points(points, load_params(args.params), args.params)
    servers.use_prefect()
    from flows.audit import format_rows
    from flows.sweep import run_sweep
    from flows.sweep_records import sweep_columns

    try:
        result = run_sweep(points, list(args.set_param) or [f"file:{args.file}"],
                           workers=args.workers, address=args.dask_address,
                           register=args.register, force=args.force, params_file=args.params,
                           dvc_yaml=args.dvc_yaml, run_flow=_run_flow)
    except KeyboardInterrupt:
        print("saeflow: sweep cancelled: unfinished points are recorded KILLED; run the same "
              "sweep again to finish it", file=sys.stderr)
        return 130
    rows = result["rows"]
    sys.stdout.write(format_rows(rows, "table", sweep_columns(rows)))
    sid = result["sweep_id"]
    print(f"sweep {sid}: {len(rows)} points, {result['ran']} run now, {result['skipped']} "
          f"already finished, {result['failed']} failed; table {result['csv']}")
    if result["best_run"]:
        best = next(r for r in rows if r["run_id"] == result["best_run"])
        print(f"best by {result['metric']}: point {best['point']} ({best['settings']}); "
              f"`saeflow sweep --promote {sid}/{best['point']}` writes it into params.yaml"
              + (f"; registered as version {result['best_version']}"
                 if result["best_version"] else ""))
    if result["overhead"]:
        o = result["overhead"]
        print(f"points: {o['wall']:.1f} s on {o['slots']} task slot(s); {o['compute']:.2f} s "
              f"compute and {o['per_point']:.2f} s overhead per point ({o['in_task']:.2f} s "
              f"in its task, {o['record']:.2f} s of it recording; {o['between']:.2f} s "
              f"dispatch); slots idle at the end {o['idle_end']:.2f} s per point")
    print(f"see `saeflow audit --sweep {sid}` and `saeflow report --sweep {sid}`")
    return 4 if result["failed"] else 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    """Create, list, pause, resume or delete the project's scheduled retraining on the
    persistent (or team) Prefect server."""
    url = servers.use_prefect()  # before Prefect is imported: its settings are read then
    from flows import deployment
    from flows.project import project_root

    root = project_root()
    if args.list:
        rows = deployment.list_deployments()
        for r in rows:
            print(f"{r['deployment']}  cron {r['cron']!r} ({r['timezone']})  "
                  f"{'PAUSED' if r['paused'] else 'active'}  concurrency "
                  f"{r['concurrency_limit']} ({r['collision_strategy']})  {r['project']}")
        if not rows:
            print(f"no scheduled retraining on {url}")
        return 0
    for flag, action in (("pause", "paused"), ("resume", "resumed"), ("delete", "deleted")):
        if getattr(args, flag):
            name = (deployment.delete(root, args.name) if flag == "delete" else
                    deployment.set_paused(root, args.name, flag == "pause"))
            print(f"schedule: {action} {name}")
            return 0
    if not args.cron:
        raise ValueError("schedule: give --cron EXPR (or --list, --pause, --resume, --delete)")
    name = deployment.schedule(root, args.name, args.cron, args.timezone, args.params,
                               args.dvc_yaml)
    print(f"schedule: {name} on {url}, cron {args.cron!r} ({args.timezone or 'UTC'}); at most "
          "one run at a time. Runs execute while `saeflow serve` runs.")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Execute the project's scheduled retraining runs until interrupted."""
    url = servers.use_prefect()  # before Prefect is imported
    from flows import deployment
    from flows.project import project_root

    print(f"serve: serving the scheduled runs of {deployment.FLOW_NAME}/"
          f"{deployment.deployment_name(project_root(), args.name)} from {url} "
          "(Ctrl-C stops serving; the schedule stays)", file=sys.stderr)
    try:
        deployment.serve(project_root(), args.name)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    """Rebuild a registered model from its recorded commit and data; compare the bytes."""
    from flows.project import project_root
    from flows.reproduce import reproduce

    r = reproduce(args.model, project_root())
    print(f"reproduce: {r['name']} version {r['version']}: registered sha256 "
          f"{r['registered'][:16]}..., rebuilt {r['rebuilt'][:16]}... -> "
          + ("identical" if r["identical"] else "DIFFERENT"))
    if r["dirty"]:
        print(f"reproduce: note: the version was trained from a working tree that differed "
              f"from commit {r['commit'][:12]} (git.dirty); the recorded settings were used, "
              "uncommitted code changes (if any) could not be")
    return 0 if r["identical"] else 1


def _cmd_audit(args: argparse.Namespace) -> int:
    """Which sparsity settings produced which registered model versions."""
    from flows.audit import iter_audit_rows, iter_format, parse_filter, parse_limit

    limit = parse_limit(args.limit)
    if args.sweep:
        from flows.audit import format_rows
        from flows.sweep_records import sweep_columns, sweep_rows

        rows = sweep_rows(args.sweep, params_file=args.params)
        sys.stdout.write(format_rows(rows, args.format, sweep_columns(rows)))
        return 0
    if args.history:
        from flows.audit import format_history, history_rows

        sys.stdout.write(format_history(history_rows(args.model, params_file=args.params),
                                        args.format))
        return 0
    filters = [parse_filter(w) for w in args.where]
    # written a block at a time as MLflow's pages arrive: memory stays that of one page
    rows = iter_audit_rows(args.model, filters, params_file=args.params, limit=limit)
    for text in iter_format(rows, args.format):
        sys.stdout.write(text)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    """Where the pipeline's outputs are, its key numbers, and how to open the UIs."""
    from flows.summary import summary_text

    print(summary_text(args.dvc_yaml))
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    """The services in use: start or stop the local persistent Prefect server, or check
    every configured service (Prefect, MLflow, the DVC remote), one line each."""
    if args.action == "start":
        url, started = servers.start_local()
        print(f"Prefect server {'started' if started else 'already running'} at {url} "
              f"(UI {servers.ui_url(url)})")
        return 0
    if args.action == "stop":
        pid = servers.stop_local()
        print(f"stopped the Prefect server (pid {pid})" if pid else
              "no local Prefect server running")
        return 0
    from flows.project import project_root
    from flows.tracking import default_uri

    root = project_root()
    statuses = [servers.prefect_status(), servers.mlflow_status(default_uri(root)),
                servers.dvc_status(root)]
    for s in statuses:
        print(s.line())
    return 0 if all(s.ok for s in statuses) else 1


def _add_stage_paths(p: argparse.ArgumentParser, stage) -> None:
    """A stage's path options, named after dvc.yaml's paths (``--images``, ``--model``...):
    one vocabulary for ``saeflow stage NAME`` and the direct commands."""
    for name in stage.path_args:
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="PATH",
                       required=name not in stage.optional,
                       help=("reads" if name in stage.inputs else "writes") + " this path")
    if stage.name == "ingest":
        p.add_argument("--data-dir", default=None,
                       help="where downloads go (relative to params; default data)")
    p.set_defaults(stage=stage.name)


def build_parser() -> argparse.ArgumentParser:
    import sae_core
    from flows.stages import BY_NAME, STAGES

    parser = argparse.ArgumentParser(
        prog="saeflow",
        description="Sparse-autoencoder feature-learning experiments.",
    )
    parser.add_argument("--version", action="version", version=f"saeflow {sae_core.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # the options several commands share, declared once
    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("--params", default="params.yaml", help="the settings file")
    dvc_yaml = argparse.ArgumentParser(add_help=False)
    dvc_yaml.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gradcheck", help="check every penalty's gradient by central differences")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--patch", type=int, default=4, help="patch side (inputs = patch**2)")
    p.add_argument("--hidden", type=int, default=6)
    p.set_defaults(func=_cmd_gradcheck)

    for name, help_ in (("ingest", "read the sources of params.yaml into Parquet datasets "
                                   "(no Prefect)"),
                        ("patches", "cut, whiten and normalise patches of a dataset (no Prefect)")):
        p = sub.add_parser(name, help=help_, parents=[params])
        _add_stage_paths(p, BY_NAME[name])
        p.set_defaults(func=_cmd_direct)

    p = sub.add_parser("exercise", help="run the UFLDL sparse-autoencoder exercise")
    p.add_argument("--out", default="outputs/exercise", help="output folder")
    p.add_argument("--n-patches", type=int, default=10_000,
                   help="patches to sample from the built-in images (without --patches)")
    p.add_argument("--patches", metavar="PATH",
                   help="train on this patch store (from `saeflow patches`)")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_exercise)

    p = sub.add_parser("stage", help="run one pipeline stage as a Prefect flow (what dvc.yaml "
                       "calls)")
    stage_sub = p.add_subparsers(dest="stage", metavar="NAME", required=True)
    for st in STAGES:
        sp = stage_sub.add_parser(st.name, help=st.help, parents=[params])
        _add_stage_paths(sp, st)
        sp.set_defaults(func=_cmd_stage)

    p = sub.add_parser("pipeline", help="run all stages as one Prefect flow, then dvc commit",
                       parents=[params, dvc_yaml])
    p.add_argument("--no-dvc-commit", action="store_true",
                   help="do not record the outputs in dvc.lock afterwards")
    p.add_argument("--push", action="store_true",
                   help="afterwards, dvc push the outputs to the default DVC remote (team)")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("report", help="HTML report of a run, or a comparison of several",
                       parents=[params])
    p.add_argument("--out", default="report.html", help="HTML file to write")
    p.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                   help="an MLflow run to report (repeatable); default: the newest runs")
    p.add_argument("--last", type=int, default=1, help="report the newest N pipeline runs")
    p.add_argument("--where", action="append", default=[], metavar="FILTER",
                   help="keep runs matching e.g. 'train.beta>=1' or 'score/accuracy>0.9'")
    p.add_argument("--sweep", metavar="SWEEP_ID",
                   help="the finished points of a sweep, with the metrics plotted against "
                   "the swept settings")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("retrain", help="refresh the sources, run the stale stages, and "
                       "promote the new model only if it beats the champion", parents=[params,
                                                                                   dvc_yaml])
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("sweep", help="many settings at once on Dask: a grid (-S, as `dvc exp "
                       "run -S`) or a sweep file; or --promote a point into params.yaml",
                       parents=[params, dvc_yaml])
    p.add_argument("-S", "--set-param", action="append", default=[],
                   metavar="SECTION.KEY=VALUES", help="e.g. train.beta=0.3,1,3 or "
                   "train.rho=range(0.01,0.06,0.01) (repeatable; the grid is their product)")
    p.add_argument("--file", help="a sweep file: a YAML list of points ({train.beta: 3, ...})")
    p.add_argument("--workers", type=int, default=2,
                   help="local Dask workers, one point at a time each (default 2)")
    p.add_argument("--dask-address", metavar="tcp://HOST:8786",
                   help="run on this existing Dask cluster instead of a local one")
    p.add_argument("--register", choices=("all", "best", "none"), default="all",
                   help="register every point's model (default, tagged with the sweep id), "
                   "only the best one, or none (models stay logged on their runs)")
    p.add_argument("--force", action="store_true",
                   help="run every point again, as a new sweep (default: skip finished ones)")
    p.add_argument("--promote", metavar="SWEEP_ID/POINT",
                   help="write that point's settings into params.yaml (or give its run id)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("schedule", help="scheduled retraining on the Prefect server: create "
                       "(--cron), --list, --pause, --resume or --delete", parents=[params,
                                                                                  dvc_yaml])
    p.add_argument("--cron", help='cron expression, e.g. "0 3 * * 1"')
    p.add_argument("--timezone", metavar="TZ", help="IANA time zone of the cron (default UTC)")
    p.add_argument("--name", default=None,
                   help="deployment name (default: the project folder's name)")
    what = p.add_mutually_exclusive_group()
    for flag, text in (("list", "list the scheduled retraining deployments"),
                       ("pause", "pause the schedule"), ("resume", "resume the schedule"),
                       ("delete", "delete the deployment and its scheduled runs")):
        what.add_argument(f"--{flag}", action="store_true", help=text)
    p.set_defaults(func=_cmd_schedule)

    p = sub.add_parser("serve", help="execute the scheduled retraining runs (until Ctrl-C)")
    p.add_argument("--name", default=None,
                   help="deployment name (default: the project folder's name)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("reproduce", help="rebuild a registered model from its commit and data "
                       "and compare its sha256")
    p.add_argument("model", metavar="MODEL_URI",
                   help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("audit", help="which sparsity settings produced which models (MLflow)",
                       parents=[params])
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--where", action="append", default=[], metavar="FILTER",
                   help="keep versions matching e.g. 'beta>=1' or 'penalty=topk' (repeatable)")
    p.add_argument("--limit", default=None, metavar="N",
                   help="show at most N rows, newest version first (default: all)")
    p.add_argument("--model", default=None,
                   help="registered model name (default: params.yaml tracking.registered_model)")
    p.add_argument("--history", action="store_true",
                   help="the champion changes over time: when, which version, the metric "
                   "values and why")
    p.add_argument("--sweep", metavar="SWEEP_ID",
                   help="the points of a sweep: settings, status, metrics, run ids")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("summary", help="where the outputs are and how to open the UIs",
                       parents=[dvc_yaml])
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("server", help="the services in use: status of Prefect, MLflow and the "
                       "DVC remote; start or stop the local Prefect server")
    p.add_argument("action", choices=("status", "start", "stop"), nargs="?", default="status")
    p.set_defaults(func=_cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    global _DEBUG
    _DEBUG = bool(args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except Exception as exc:
        if args.debug:
            raise
        line, expected = describe_error(exc)
        print(f"saeflow: error: {line}", file=sys.stderr)
        return 2 if expected else 1


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(the one line a user sees, whether the error is about the user's input, files or
    services (exit 2) rather than a bug (exit 1)). The line is the message, naming the file
    or setting at fault; for MLflow and its database, the store and the cause; for
    anything unexpected, its type."""
    from flows.tracking import store_error

    line = store_error(exc)
    if line is not None:
        return line + " (run with --debug for the traceback)", True
    detail = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, OSError, FloatingPointError, servers.ServiceError)):
        return detail, True
    return (f"unexpected {type(exc).__name__}: {detail} (run with --debug for the "
            "traceback)"), False


def entry() -> None:
    """The console script: :func:`main`, then a quick exit. Interpreter shutdown runs full
    garbage collections over every object the libraries made at import (torch,
    scikit-learn, MLflow, Prefect): 1.6-2.0 s of every stage process here, for nothing.
    Freezing those objects first (``gc.freeze``) skips them (0.2 s); atexit handlers,
    finalizers and buffered writes still run as usual."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()

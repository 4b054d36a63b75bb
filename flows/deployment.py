"""Scheduled retraining on the persistent (or team) Prefect server: the ``saeflow-retrain``
deployment of a project, and the process that serves its runs.

- ``saeflow schedule --cron EXPR [--timezone TZ]`` creates (or updates) the deployment
  ``saeflow-retrain/<name>`` (name: the project folder's): a Prefect cron schedule, the
  project's path and settings files as parameters, and a deployment concurrency limit of
  one run with the CANCEL_NEW strategy (a scheduled run that would overlap a running one is
  cancelled before it starts; see :mod:`flows.retrain` for why cancel, not queue).
- ``saeflow serve`` runs a Prefect Runner for that deployment, in this process: each
  scheduled run executes in a subprocess, as Prefect's ``serve`` does. Stopping it leaves the
  schedule as it is (pausing is ``saeflow schedule --pause``, a decision of its own).
- Runs missed while nothing served: when serving starts, of the scheduled runs already due
  only the latest runs; the older ones end Cancelled ("superseded"). A retrain runs
  whatever is stale, so one run does the work of all the missed ones.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

from flows.retrain import FLOW_NAME

SUPERSEDED = "missed while nothing was serving; superseded by the run due at {}"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def deployment_name(root: Path, name: str | None) -> str:
    return name or root.name


def _read(client, name: str):
    """The deployment ``saeflow-retrain/<name>``, or None."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
    except ObjectNotFound:
        return None


def check_cron(cron: str, timezone: str | None) -> None:
    """A cron expression or time zone that Prefect's own schedule refuses is a one-line
    ValueError."""
    import pydantic
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        what = f"--timezone {timezone!r}" if "timezone" in err.get("loc", ()) else \
            f"--cron {cron!r}"
        raise ValueError(f"{what}: {err['msg'].removeprefix('Value error, ')}") from None


def _deployment(name: str, *, parameters: dict, schedules: list, paused: bool):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.retrain import retrain_flow

    return retrain_flow.to_deployment(
        name=name, parameters=parameters, schedules=schedules, paused=paused,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="saeflow: refresh the sources, run the stale stages, gate the new model "
                    "on the champion")


def _owner_check(existing, root: Path, name: str) -> None:
    project = (existing.parameters or {}).get("project")
    if project and Path(project).resolve() != root:
        raise ValueError(f"deployment {FLOW_NAME}/{name} retrains {project}, not {root}; "
                         "choose another --name")


def schedule(root: Path, name: str | None, cron: str, timezone: str | None,
             params_file: str, dvc_yaml: str) -> str:
    """Create or update the project's deployment on this cron schedule; its full name."""
    from prefect.schedules import Cron

    check_cron(cron, timezone)
    name = deployment_name(root, name)
    with _client() as client:
        existing = _read(client, name)
    if existing is not None:
        _owner_check(existing, root, name)
    _deployment(name, parameters={"project": str(root), "params_file": params_file,
                                  "dvc_yaml": dvc_yaml},
                schedules=[Cron(cron, timezone=timezone)], paused=False).apply()
    return f"{FLOW_NAME}/{name}"


def describe(d) -> dict:
    """A deployment as ``saeflow schedule --list`` shows it (all read from the API)."""
    sched = [s.schedule for s in d.schedules]
    options = d.concurrency_options
    gcl = d.global_concurrency_limit
    return {"deployment": f"{FLOW_NAME}/{d.name}",
            "cron": ", ".join(getattr(s, "cron", str(s)) for s in sched) or "-",
            "timezone": ", ".join(str(getattr(s, "timezone", None) or "UTC") for s in sched)
            or "-",
            "paused": d.paused,
            "concurrency_limit": gcl.limit if gcl is not None else None,
            "collision_strategy": (options.collision_strategy.value if options is not None
                                   else None),
            "project": (d.parameters or {}).get("project", "")}


def list_deployments() -> list[dict]:
    """Every ``saeflow-retrain`` deployment on the server."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        found = client.read_deployments(flow_filter=FlowFilter(
            name=FlowFilterName(any_=[FLOW_NAME])))
    return [describe(d) for d in sorted(found, key=lambda d: d.name)]


def _existing(client, root: Path, name: str | None):
    name = deployment_name(root, name)
    d = _read(client, name)
    if d is None:
        raise ValueError(f"no deployment {FLOW_NAME}/{name} on the Prefect server (create it "
                         "with `saeflow schedule --cron EXPR`)")
    _owner_check(d, root, name)
    return d


def set_paused(root: Path, name: str | None, paused: bool) -> str:
    with _client() as client:
        d = _existing(client, root, name)
        (client.pause_deployment if paused else client.resume_deployment)(d.id)
    return f"{FLOW_NAME}/{d.name}"


def delete(root: Path, name: str | None) -> str:
    with _client() as client:
        d = _existing(client, root, name)
        client.delete_deployment(d.id)
    return f"{FLOW_NAME}/{d.name}"


def drop_missed_runs(deployment_id, now: datetime.datetime | None = None,
                     paused: bool = False) -> list:
    """The missed-runs policy: of the deployment's scheduled runs already due, keep the
    latest (none if the deployment is paused) and end the others Cancelled. Returns the
    runs cancelled."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    now = now or datetime.datetime.now(datetime.timezone.utc)
    with _client() as client:
        due = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=now)))
        due.sort(key=lambda r: r.expected_start_time)
        keep = None if paused or not due else due[-1]
        dropped = [r for r in due if r is not keep]
        for r in dropped:
            message = (SUPERSEDED.format(keep.expected_start_time.isoformat()) if keep else
                       "missed while nothing was serving; the deployment is paused")
            client.set_flow_run_state(r.id, Cancelled(message=message), force=True)
    return dropped


def serve(root: Path, name: str | None) -> None:
    """Serve the project's deployment until interrupted: first the missed-runs policy,
    then a Prefect Runner executing each scheduled run in a subprocess."""
    from prefect.runner import Runner
    from prefect.schedules import Cron

    with _client() as client:
        d = _existing(client, root, name)
    dropped = drop_missed_runs(d.id, paused=d.paused)
    if dropped:
        print(f"serve: {len(dropped)} missed run(s) cancelled (only the latest due one runs)")
    schedules = [Cron(s.schedule.cron, timezone=s.schedule.timezone) for s in d.schedules
                 if getattr(s.schedule, "cron", None)]
    runner = Runner(name=f"saeflow-serve-{d.name}", pause_on_shutdown=False)
    served = _deployment(d.name, parameters=d.parameters, schedules=schedules, paused=d.paused)

    async def run() -> None:
        await runner.aadd_deployment(served)
        await runner.start()

    asyncio.run(run())

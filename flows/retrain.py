"""The retraining flow (``saeflow-retrain``): refresh the sources, run what is stale, and
let the new model replace the champion only if it beats it.

1. Ingest re-reads the sources (DVC cannot see an image folder gain files, only the
   params that name it); its outputs are rewritten byte-identical when nothing changed.
2. Every stage that DVC then finds stale runs, in order, in this process, each as a
   subflow; only the stages that ran are recorded in dvc.lock (``dvc commit STAGE``).
3. If a new model was trained (or there is no champion yet), the champion gate
   (:mod:`flows.champion`) decides, the aliases move, and the decision is recorded on the
   version (tags), on its MLflow run (tags) and as a Prefect markdown artifact.

A stage that fails stops the flow before any alias moves: the MLflow runs this flow made
and the flow run end FAILED (the stages that completed are still recorded in dvc.lock, so
the next retrain resumes from the failed one). No two retrains of one project overlap: each
holds the project's Prefect global concurrency limit (one slot); a retrain that finds it
taken ends Cancelled at once (a retrain runs whatever is stale, so the next one does the
work a cancelled one would have done, and nothing piles up behind a slow run).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows import champion as gate_
from flows import tracking
from flows.dvc_state import commit_stages, is_stale
from flows.params import load_params
from flows.pipeline import parent_of_stages, run_stage
from flows.project import pipeline_paths
from flows.stage_support import model_sha256, tracking_enabled, tracking_settings
from flows.stages import STAGES

FLOW_NAME = "saeflow-retrain"
MODEL_STAGES = {"train", "evaluate", "score"}
"""A champion's stages: all must have completed for its model."""


class RetrainRunning(RuntimeError):
    """Another retrain of the project holds its concurrency slot."""


def slot_name(root: Path) -> str:
    """The project's Prefect global concurrency limit: one per project folder."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return f"saeflow-retrain-{root.name[:40]}-{digest}"


class _NoSlotServiceErrors:
    def filter(self, record) -> bool:
        return "ConcurrencySlotAcquisition" not in record.getMessage()


_SLOT_SERVICE_ERRORS = _NoSlotServiceErrors()


@contextmanager
def project_slot(root: Path) -> Iterator[str]:
    """Hold the project's retrain slot (created with limit 1 on first use); taken:
    :class:`RetrainRunning`, without waiting. The slot is a lease that Prefect renews
    while this process lives, so a killed retrain frees it when the lease runs out."""
    import logging

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    name = slot_name(root)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    # Prefect's slot service logs a refused request, with its traceback, from its own
    # thread (after the refusal has reached this one): the refusal is reported in one line
    logging.getLogger("prefect._internal.concurrency").addFilter(_SLOT_SERVICE_ERRORS)
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(name, occupy=1, max_retries=0, strict=True))
        except ConcurrencySlotAcquisitionError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, httpx.HTTPStatusError)
                    and cause.response.status_code == 423):
                raise
            raise RetrainRunning(f"another retrain of {root} is running (it holds the Prefect "
                                 f"concurrency limit {name}); this one was cancelled") from None
        yield name


@flow(name=FLOW_NAME, log_prints=False, persist_result=False)
def retrain_flow(project: str = ".", params_file: str = "params.yaml",
                 dvc_yaml: str = "dvc.yaml"):
    """Retrain the project at ``project`` (params and dvc.yaml paths relative to it);
    returns what ran and the decision. Ends Cancelled if another retrain of the project is
    running."""
    from prefect.states import Cancelled

    root = Path(project).resolve()
    os.chdir(root)  # dvc.yaml's paths are relative to the project (a served run starts elsewhere)
    try:
        with project_slot(root):
            return retrain(root, params_file, dvc_yaml)
    except RetrainRunning as exc:
        print(f"retrain: {exc}")
        return Cancelled(message=str(exc))


def retrain(root: Path, params_file: str, dvc_yaml: str) -> dict:
    """The flow's work, holding the project's slot."""
    if Path(params_file).resolve() != root / "params.yaml" or \
            Path(dvc_yaml).resolve() != root / "dvc.yaml":
        raise ValueError(f"{params_file}: retrain records in dvc.lock, which holds the "
                         "project's own params.yaml and dvc.yaml only")
    if not tracking_enabled():
        raise ValueError("retrain records its decision in MLflow; it cannot run with "
                         "SAEFLOW_TRACKING=0")
    params = load_params(params_file)
    gate = gate_.GateSettings.from_params(params, params_file)
    experiment, registered = tracking_settings(params)
    paths = pipeline_paths(dvc_yaml)
    c = tracking.client()
    is_stale(root, "ingest")  # a project DVC cannot read fails here, before any work
    ran: list[str] = []
    try:
        with parent_of_stages():
            for stage in STAGES:
                if stage.name != "ingest" and not is_stale(root, stage.name):
                    continue
                run_stage(stage, paths, params_file)
                # ingest always runs; it counts as run only if its outputs (or params) changed
                if stage.name != "ingest" or is_stale(root, "ingest"):
                    ran.append(stage.name)
    except BaseException:
        _fail_runs(c, experiment)
        raise
    finally:
        commit_stages(root, ran)
    print(f"retrain: ran {', '.join(ran)}; recorded in dvc.lock" if ran else
          "retrain: every stage is up to date")
    decision = _decide(c, gate, params, paths, root, experiment, registered, ran)
    flow_run_id = str(flow_run.id) if flow_run.id else None
    if decision.version is not None:
        tags = decision.tags(gate_.now_iso(), flow_run_id)
        gate_.apply_decision(c, registered, decision, tags)
        run_id = c.get_model_version(registered, decision.version).run_id
        for k, v in tags.items():  # the decision on the version's MLflow run too
            c.set_tag(run_id, k, v)
    _publish(decision, registered, ran)
    return {"stages_run": ran, "decision": decision.outcome, "version": decision.version,
            "champion": decision.champion, "value": decision.value,
            "champion_value": decision.champion_value, "reason": decision.reason}


def _decide(c, gate, params, paths, root, experiment, registered, ran) -> gate_.Decision:
    """The new model against the champion (see :mod:`flows.champion`)."""
    champion = gate_.alias_version(c, registered, gate_.CHAMPION)
    champ = champion.version if champion is not None else None
    if "train" not in ran and champion is not None:
        return gate_.no_change(champ, gate, "no stage that makes a model ran: the data, the "
                               "settings and the code of the model are unchanged")
    sha = model_sha256(paths["model"])
    version = gate_.version_of_model(c, registered, sha)
    if version is None:
        return gate_.no_change(champ, gate, f"the model in {paths['model']} is not "
                               f"registered in {registered}")
    done = gate_.completed_stages(gate_.model_runs(c, experiment, sha))
    if not MODEL_STAGES <= done:
        missing = ", ".join(sorted(MODEL_STAGES - done))
        raise ValueError(f"{registered} version {version.version}: its {missing} stage(s) did "
                         "not complete, so it cannot be compared")
    if champ == version.version:
        return gate_.no_change(champ, gate, f"version {champ} is already the champion")
    value = gate_.read_metric(paths, gate)
    if champion is None:
        return gate_.decide(version.version, value, None, None, gate)
    old, source = gate_.champion_value(c, registered=registered, experiment=experiment,
                                       champion=champion, gate=gate, params=params,
                                       paths=paths, root=root)
    return gate_.decide(version.version, value, champ, old, gate, source)


def _fail_runs(c, experiment: str) -> None:
    """End FAILED the MLflow runs this flow run's stages opened or added to."""
    if not flow_run.id:
        return
    try:
        exp_id = tracking.experiment_id(c, experiment)
        for run in c.search_runs([exp_id], filter_string=f"tags.`prefect.flow_run_id."
                                 f"pipeline` = '{flow_run.id}'"):
            c.set_terminated(run.info.run_id, "FAILED")
    except Exception:  # the stage's own error is the one to report
        pass


def _publish(decision: gate_.Decision, registered: str, ran: list[str]) -> None:
    """The decision on the terminal and as the flow run's markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    where = f"version {decision.version}: " if decision.version else ""
    print(f"retrain: {where}{decision.outcome} ({decision.reason})")
    if flow_run.id:
        create_markdown_artifact(markdown=decision.markdown(registered, ran),
                                 key="saeflow-retrain-decision",
                                 description=f"retrain decision: {decision.outcome}")


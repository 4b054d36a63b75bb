"""The champion gate of retraining: is a new model better than the one in use?

The registry's aliases say which model is which: ``champion`` (in use), ``previous`` (the
champion it replaced) and ``challenger`` (the newest model that did not beat it). A new
model is compared with the champion on the metric that params.yaml's ``retrain`` section
names, on the same data and settings: the champion's recorded value is used only when it
was measured on the current labeled data (score) or patches (sparsity) with the current
settings; otherwise the champion is re-scored on them here. Every decision is written on the
new version as ``saeflow.*`` tags, which ``saeflow audit`` reads back.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import tracking

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
FIRST, PROMOTED = "first champion", "promoted"
"""The decisions that make a version champion (``saeflow audit --history`` lists them)."""
NO_CHANGE = "no change"
DECISION_TAG = "saeflow.decision"
STAGE_OF = {"score": "score", "sparsity": "evaluate"}
"""Metric prefix -> the stage that measures it (its params section)."""
METRICS_FILE = {"score": "score_metrics", "sparsity": "sparsity_metrics"}
"""Metric prefix -> dvc.yaml's path of the metrics file holding it."""
DATA_OF = {"score": "labeled", "sparsity": "patches"}
"""Metric prefix -> dvc.yaml's path of the data it is measured on."""
KEYS = {"metric", "direction", "min_improvement"}


@dataclass(frozen=True)
class GateSettings:
    """params.yaml ``retrain``: ``metric`` (``score/<key>`` of metrics/score.json or
    ``sparsity/<key>`` of metrics/sparsity.json), ``direction`` (maximize | minimize) and
    ``min_improvement`` (>= 0: the margin a new model must beat the champion by)."""

    metric: str = "score/accuracy"
    direction: str = "maximize"
    min_improvement: float = 0.0

    @classmethod
    def from_params(cls, params: dict, params_file: str | os.PathLike) -> GateSettings:
        sec = params.get("retrain") or {}
        if not isinstance(sec, dict):
            raise ValueError(f"{params_file}: section 'retrain' is not a mapping")
        unknown = sorted(set(sec) - KEYS)
        if unknown:
            raise ValueError(f"{params_file}: unknown key(s) in retrain: {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(KEYS))}")
        s = cls(**sec)
        prefix, _, key = str(s.metric).partition("/")
        if prefix not in STAGE_OF or not key:
            raise ValueError(f"{params_file}: retrain.metric must be score/<key> or "
                             f"sparsity/<key>; got {s.metric!r}")
        if s.direction not in ("maximize", "minimize"):
            raise ValueError(f"{params_file}: retrain.direction must be maximize or minimize; "
                             f"got {s.direction!r}")
        m = s.min_improvement
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0:
            raise ValueError(f"{params_file}: retrain.min_improvement must be a number >= 0; "
                             f"got {m!r}")
        return s

    @property
    def prefix(self) -> str:
        return self.metric.partition("/")[0]

    @property
    def key(self) -> str:
        return self.metric.partition("/")[2]


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one retrain."""

    outcome: str
    """first champion | promoted | challenger | no change"""
    version: str | None
    """The new model's version (None: no new model)."""
    champion: str | None
    """The champion it was compared with (None: there was none)."""
    metric: str
    value: float | None
    champion_value: float | None
    reason: str
    champion_source: str = ""
    """Where the champion's value came from: its recorded run, or a re-score here."""

    def tags(self, decided_at: str, flow_run: str | None) -> dict[str, str]:
        """The ``saeflow.*`` version tags that record the decision."""
        tags = {DECISION_TAG: self.outcome, "saeflow.metric": self.metric,
                "saeflow.metric_value": _text(self.value),
                "saeflow.champion_version": self.champion or "none",
                "saeflow.champion_value": _text(self.champion_value),
                "saeflow.champion_value_source": self.champion_source or "-",
                "saeflow.reason": self.reason, "saeflow.decided_at": decided_at}
        if flow_run:
            tags["saeflow.retrain_flow_run"] = flow_run
        return tags

    def markdown(self, registered: str, stages: list[str]) -> str:
        """The Prefect artifact: the decision in a few lines."""
        lines = [f"# Retrain: {self.outcome}", "",
                 f"- stages run: {', '.join(stages) if stages else 'none (all up to date)'}"]
        if self.version:
            lines += [f"- new model: `{registered}` version {self.version}, "
                      f"{self.metric} = {_text(self.value)}",
                      "- champion compared with: "
                      + (f"version {self.champion}, {self.metric} = "
                         f"{_text(self.champion_value)} ({self.champion_source})"
                         if self.champion else "none")]
        lines += [f"- reason: {self.reason}"]
        return "\n".join(lines) + "\n"


def _text(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def decide(version: str, value: float, champion: str | None, champion_value: float | None,
           gate: GateSettings, champion_source: str = "") -> Decision:
    """The gate. No champion: the new model becomes it. Else the improvement, ``value -
    champion_value`` (maximize) or ``champion_value - value`` (minimize), must be > 0 and
    >= ``min_improvement`` for a promotion; otherwise the new model is the challenger."""
    if champion is None:
        return Decision(FIRST, version, None, gate.metric, value, None,
                        "no champion yet: the first model becomes champion")
    gain = value - champion_value if gate.direction == "maximize" else champion_value - value
    word = "higher" if gate.direction == "maximize" else "lower"
    if gain > 0 and gain >= gate.min_improvement:
        outcome = PROMOTED
        reason = (f"{gate.metric} {value:.6g} is {word} than champion version {champion}'s "
                  f"{champion_value:.6g} by {gain:.3g} (needed > 0 and >= "
                  f"{gate.min_improvement:g})")
    else:
        outcome = CHALLENGER
        reason = (f"{gate.metric} {value:.6g} against champion version {champion}'s "
                  f"{champion_value:.6g}: improvement {gain:.3g}, needed > 0 and >= "
                  f"{gate.min_improvement:g}")
    return Decision(outcome, version, champion, gate.metric, value, champion_value, reason,
                    champion_source)


def no_change(champion: str | None, gate: GateSettings, why: str) -> Decision:
    return Decision(NO_CHANGE, None, champion, gate.metric, None, None, why)


# --- the registry ---------------------------------------------------------------------------


def alias_version(c, name: str, alias: str):
    """The version under ``alias`` (None if the alias or the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def versions(c, name: str) -> list:
    """Every version of the registered model, newest first ([] if it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def version_of_model(c, name: str, model_sha256: str):
    """The newest version holding the model with these weights (None if none)."""
    return next((v for v in versions(c, name)
                 if (v.tags or {}).get("model_sha256") == model_sha256), None)


def model_runs(c, experiment: str, model_sha256: str) -> list:
    """The pipeline runs of the model with these weights, newest first."""
    exp_id = tracking.experiment_id(c, experiment)
    return c.search_runs([exp_id], filter_string=f"tags.`{tracking.MODEL_TAG}` = "
                         f"'{model_sha256}'", order_by=["attributes.start_time DESC"],
                         max_results=200)


def completed_stages(runs: list) -> set[str]:
    """The stages that completed for a model, over its runs (``saeflow.stages``)."""
    return {s for r in runs if r.info.status == "FINISHED"
            for s in r.data.tags.get("saeflow.stages", "").split(",") if s}


def apply_decision(c, name: str, decision: Decision, tags: dict[str, str]) -> None:
    """Tag the new version, then move the aliases: promoted or first -> ``previous`` to
    the old champion (if any) and ``champion`` to the new version; challenger ->
    ``challenger`` to it. The tags come first, so an alias never points to an undecided
    version; ``champion`` moves last, so a crash midway leaves the old champion in use."""
    for k, v in tags.items():
        c.set_model_version_tag(name, decision.version, k, v)
    if decision.outcome == CHALLENGER:
        c.set_registered_model_alias(name, CHALLENGER, decision.version)
        return
    if decision.champion is not None:
        c.set_registered_model_alias(name, PREVIOUS, decision.champion)
    c.set_registered_model_alias(name, CHAMPION, decision.version)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the champion's value on the current data ------------------------------------------------


def champion_value(c, *, registered: str, experiment: str, champion, gate: GateSettings,
                   params: dict, paths: dict[str, str], root: Path) -> tuple[float, str]:
    """(the champion's ``gate.metric`` on the current data and settings, where it came
    from). Its recorded value when one of its runs measured it on data with the current
    md5 and the current section of params.yaml; else it is measured again here: the
    sparsity statistics on the current patch store's split, or the score with the
    champion's own patch transform and patch settings (fetched by their recorded DVC md5)
    on the current labeled data, split and classifier."""
    from flows.lineage import md5_file

    section = STAGE_OF[gate.prefix]
    data = paths[DATA_OF[gate.prefix]]
    want = tracking.flatten({section: params.get(section) or {}})
    md5 = md5_file(data)
    sha = (champion.tags or {}).get("model_sha256", "")
    runs = model_runs(c, experiment, sha)
    for r in runs:
        if (gate.metric in r.data.metrics
                and r.data.tags.get(f"dvc.md5:{Path(data).as_posix()}") == md5
                and all(r.data.params.get(k) == v for k, v in want.items())):
            return r.data.metrics[gate.metric], f"recorded in run {r.info.run_id}"
    return _measure(c, registered, champion, runs, gate, params, paths, root), \
        "re-measured on the current data"


def _measure(c, registered, champion, runs, gate, params, paths, root) -> float:
    import mlflow.artifacts

    from sae_core import SparseAutoencoder

    with tempfile.TemporaryDirectory(prefix="saeflow-champion-") as tmp:
        # the version's artifacts as this client's store has them (a models:/ URI would be
        # resolved against the process's global registry, which may be another store)
        where = c.get_model_version_download_uri(registered, champion.version)
        with tracking.quiet():
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{where.rstrip('/')}/artifacts/sae", dst_path=tmp,
                tracking_uri=c.tracking_uri)
        sae = SparseAutoencoder.load(local)
        if gate.prefix == "sparsity":
            from sae_core.patch_store import read_patch_store
            from sae_core.stats import sparsity_stats

            split = (params.get("evaluate") or {}).get("split", "heldout")
            metrics = sparsity_stats(sae, read_patch_store(paths["patches"]).split(split)
                                     ).metrics()
        else:
            metrics = _rescore(sae, champion, runs, params, paths, root, Path(tmp))
    if gate.key not in metrics:
        raise ValueError(f"retrain.metric {gate.metric!r}: no such metric; {gate.prefix} "
                         f"metrics: {', '.join(sorted(metrics))}")
    return float(metrics[gate.key])


def _rescore(sae, champion, runs, params, paths, root, tmp: Path) -> dict:
    from flows.dvc_state import fetch_object
    from flows.score import read_inputs, score_model
    from sae_core.score import ScoreConfig

    tags = champion.tags or {}
    transform_tag = f"dvc.md5:{Path(paths['transform']).as_posix()}"
    transform_md5 = next((r.data.tags[transform_tag] for r in runs
                          if transform_tag in r.data.tags), None)
    if transform_md5 is None:
        raise ValueError(f"champion version {champion.version}: no run records the md5 of "
                         f"its patch transform ({paths['transform']}); it cannot be re-scored")
    remote = tags.get("dvc.remote")
    transform = fetch_object(root, transform_md5, tmp / "transform.safetensors",
                             paths["transform"], remote)
    patches = fetch_object(root, tags.get("data.md5", ""), tmp / "patches.arrow",
                           paths["patches"], remote)
    inputs = read_inputs(paths["labeled"], str(transform), str(patches))
    return score_model(sae, ScoreConfig.from_dict(params.get("score")), **inputs)


def read_metric(paths: dict[str, str], gate: GateSettings) -> float:
    """The new model's value of ``gate.metric``, from the metrics file its stage wrote."""
    import json

    path = paths[METRICS_FILE[gate.prefix]]
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the metrics ({exc})") from None
    value = metrics.get(gate.key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        names = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ValueError(f"retrain.metric {gate.metric!r}: {path} has no such number; "
                         f"numbers there: {', '.join(names)}")
    return float(value)


def champion_history(c, name: str) -> list[dict[str, Any]]:
    """Each time a version became champion, oldest first: when, which version, which it
    replaced, the metric values and the reason (from the decision tags)."""
    rows = []
    for v in versions(c, name):
        t = v.tags or {}
        if t.get(DECISION_TAG) not in (FIRST, PROMOTED):
            continue
        rows.append({"when": t.get("saeflow.decided_at", ""), "version": int(v.version),
                     "decision": t[DECISION_TAG], "replaced": t.get("saeflow.champion_version"),
                     "metric": t.get("saeflow.metric", ""),
                     "value": t.get("saeflow.metric_value"),
                     "champion_value": t.get("saeflow.champion_value"),
                     "reason": t.get("saeflow.reason", "")})
    return sorted(rows, key=lambda r: (r["when"], r["version"]))

"""``saeflow audit``: which sparsity settings produced which models.

One row per registered model version: its sparsity settings (the version's tags), the data
and code it came from, and the key metrics of its pipeline run(s) in MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import re
from typing import Any

from flows import tracking
from flows.champion import DECISION_TAG

SETTING_COLUMNS = ("penalty", "n_components", "rho", "beta", "weight_decay", "l1_coefficient",
                   "k", "solver")
PENALTY_SETTINGS = {"rho": "kl", "beta": "kl", "l1_coefficient": "l1", "k": "topk"}
"""Settings that only one penalty uses."""
METRIC_COLUMNS = {
    "loss": "train/loss",
    "rho_hat_mean": "sparsity/rho_hat_mean",
    "near_target": "sparsity/frac_units_near_target",
    "dead_units": "sparsity/dead_units",
    "l0_mean": "sparsity/l0_mean",
    "fvu": "sparsity/fvu",
    "accuracy": "score/accuracy",
    "raw_accuracy": "score/raw_accuracy",
}
COLUMNS = ("version", "aliases", "decision", *SETTING_COLUMNS, "data_md5", "git_commit",
           *METRIC_COLUMNS, "run_id", "created")
_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq,
        "=": operator.eq, ">": operator.gt, "<": operator.lt}
_FILTER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_./]*)\s*(>=|<=|!=|==|=|>|<)\s*(.*?)\s*$")


HISTORY_COLUMNS = ("when", "version", "decision", "replaced", "metric", "value",
                   "champion_value", "reason")


def history_rows(model: str | None = None, params_file: str = "params.yaml",
                 uri: str | None = None) -> list[dict]:
    """The champion changes, oldest first (:func:`flows.champion.champion_history`)."""
    from flows.champion import champion_history
    from flows.stage_support import tracking_settings_of

    name = model or tracking_settings_of(params_file)[1]
    return champion_history(tracking.client(uri, create=False), name)


def format_history(rows: list[dict], fmt: str) -> str:
    """The champion changes as a table (one line each, the reason last), JSON or CSV."""
    if fmt != "table":
        return format_rows(rows, fmt, HISTORY_COLUMNS)
    if not rows:
        return "no champion yet (run `saeflow retrain`)\n"
    return format_rows(rows, fmt, HISTORY_COLUMNS)


def parse_filter(text: str, columns=COLUMNS):
    """'beta>=1' -> (column, op, value). The grammar: COLUMN OP VALUE, with OP one of >=,
    <=, >, <, =, ==, != and VALUE a number for the ordering operators, a number or a word
    for the (in)equalities. A malformed filter, a column not in ``columns`` (None: any) or a
    value of the wrong type is a one-line ValueError that points at the problem."""
    m = _FILTER.match(text)
    if not m or not m.group(3):
        raise ValueError(f"--where {text!r}: expected COLUMN OP VALUE with OP one of "
                         ">=, <=, >, <, =, !=")
    column, op, value = m.groups()
    if value[0] in "<>=!":
        at = m.start(3)
        raise ValueError(f"--where {text!r}: unexpected {value[0]!r} at position {at + 1} "
                         f"(after {column}{op}); expected a value")
    if columns is not None and column not in columns:
        raise ValueError(f"--where {text!r}: unknown column {column!r}; columns: "
                         f"{', '.join(columns)}")
    if op in (">=", "<=", ">", "<") and _number(value) is None:
        raise ValueError(f"--where {text!r}: {op} compares numbers; {value!r} is not a number")
    return column, op, value


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def matches(row: dict, flt) -> bool:
    column, op, value = flt
    have = row.get(column)
    if have is None or have == "":
        return False
    a, b = _number(have), _number(value)
    if a is not None and b is not None:
        return _OPS[op](a, b)
    if op in ("=", "==", "!="):
        return _OPS[op](str(have), value)
    return False  # an ordering on text is not meaningful here


def audit_rows(model: str | None = None, filters=(), params_file: str = "params.yaml",
               uri: str | None = None) -> list[dict]:
    """The rows, newest version first, keeping those that match every filter."""
    from flows.stage_support import tracking_settings_of

    experiment, registered = tracking_settings_of(params_file)
    name = model or registered
    c = tracking.client(uri, create=False)
    from mlflow.exceptions import MlflowException

    if "'" in name or "\\" in name:
        raise ValueError(f"--model {name!r}: quotes and backslashes are not allowed")
    try:
        versions = c.search_model_versions(f"name = '{name}'")
        # search results carry no aliases: the registered model has them all
        aliases = _aliases(c, name) if versions else {}
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"MLflow: {' '.join(str(exc).split())}") from None
        versions, aliases = [], {}
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=5000,
                         order_by=["attributes.start_time DESC"]) if exp else []
    by_model: dict[str, list] = {}
    for r in runs:
        sha = r.data.tags.get(tracking.MODEL_TAG)
        if sha:
            by_model.setdefault(sha, []).append(r)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = dict(v.tags or {})
        row: dict[str, Any] = {"version": int(v.version),
                               "aliases": ",".join(aliases.get(str(v.version), [])) or None,
                               "decision": tags.get(DECISION_TAG)}
        for col in SETTING_COLUMNS:
            row[col] = _typed(tags.get(col))
        # settings that the penalty does not use are shown blank, not as their defaults
        for col, used_by in PENALTY_SETTINGS.items():
            if row["penalty"] != used_by:
                row[col] = None
        row["data_md5"] = tags.get("data.md5", "")
        row["git_commit"] = tags.get("git.commit", "")[:12]
        related = by_model.get(tags.get("model_sha256", ""), [])
        own = [r for r in runs if r.info.run_id == v.run_id]
        for col, key in METRIC_COLUMNS.items():
            row[col] = next((r.data.metrics[key] for r in own + related
                             if key in r.data.metrics), None)
        row["run_id"] = v.run_id
        row["created"] = _iso(v.creation_timestamp)
        if all(matches(row, f) for f in filters):
            rows.append(row)
    return rows


def _aliases(c, name: str) -> dict[str, list[str]]:
    """version -> its aliases, sorted."""
    out: dict[str, list[str]] = {}
    for alias, version in sorted(c.get_registered_model(name).aliases.items()):
        out.setdefault(str(version), []).append(alias)
    return out


def _typed(x: str | None) -> Any:
    if x is None or x == "None":
        return None
    n = _number(x)
    if n is None:
        return x
    return int(n) if n.is_integer() and "." not in x and "e" not in x.lower() else n


def _iso(ms: int | None) -> str:
    import datetime

    if not ms:
        return ""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def format_rows(rows: list[dict], fmt: str, columns: tuple[str, ...] = COLUMNS) -> str:
    """table (aligned text), json (a list of objects) or csv (a header row, then rows)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        return buf.getvalue()
    if not rows:
        return "no registered model versions match\n"
    shown = [c for c in columns if c not in ("created",)]
    cells = [[_cell(r.get(c)) for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"

"""``saeflow audit``: which sparsity settings produced which models.

One row per registered model version: its sparsity settings (the version's tags), the data
and code it came from, and the key metrics of its pipeline run(s) in MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import operator
import re
from collections.abc import Iterable, Iterator
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


PAGE_SIZE = 500
"""The most model versions (or runs) asked of MLflow in one request; rows are held a page
at a time."""
PROBE = 100
"""Versions read first, before deciding whether to leave the tag filters to MLflow."""
PUSH_BELOW = 0.2
"""The tag filters are left to MLflow's search once fewer than this share of the versions
read pass them. MLflow answers a tag filter by grouping every row of that tag, for every
page (0.7 s on SQLite, 1.6 s through a tracking server, at 100,000 versions); reading the
versions and filtering them here costs about 1 ms (SQLite) or 4 ms (server) a version: so
a filter that keeps most versions is cheaper here, a selective one there."""
THREADS = 6
"""Requests in flight at once (the aliases, the next page, a page's runs in parts, the
related-run searches): a tracking server and its database answer them in parallel."""
_TAG_OF = {"penalty": "penalty", "solver": "solver", "data_md5": "data.md5",
           "decision": DECISION_TAG}
"""Columns shown exactly as the text of a version tag: MLflow can match them itself."""
_UNSAFE = re.compile(r"['\\`]")


def parse_limit(text: str | None) -> int | None:
    """'100' -> 100 (the most rows to show); None -> None (all). Anything but a positive
    integer is a one-line ValueError."""
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--limit {text!r}: expected a positive integer (the most rows "
                         "to show)")
    return n


def version_filter(name: str, filters=(), tags: bool = True) -> str:
    """The filter string of MLflow's ``search_model_versions`` for the versions of ``name``
    that may match ``filters``: the model name, plus each filter MLflow's own search
    answers exactly (its grammar: ``name``, ``run_id``, ``version_number`` and, with
    ``tags``, ``tags.<key>`` with =, != or LIKE; all ANDed). Every filter is checked again
    on the row (:func:`matches`), so what is pushed down only has to keep a superset."""
    clauses = [f"name = '{name}'"]
    for clause in _clauses(filters):
        text = _clause_text(clause)
        if (tags or clause[0] != "tag") and text not in clauses:
            clauses.append(text)
    return " AND ".join(clauses)


def _clauses(filters) -> list[tuple[str, str, str, str]]:
    """(kind, key, op, value) search clauses implied by ``filters``; kind attr or tag."""
    out = []
    for column, op, value in filters:
        sql_op = "=" if op == "==" else op
        if column in PENALTY_SETTINGS:
            # a setting that its penalty does not use is blank, and a blank matches nothing
            out.append(("tag", "penalty", "=", PENALTY_SETTINGS[column]))
        elif column == "version":
            # an integer attribute: MLflow compares it as a number, as matches() does
            if re.fullmatch(r"\d+", value):
                out.append(("attr", "version_number", sql_op, str(int(value))))
        # the rest are text: only an (in)equality with a word (matches() compares numbers
        # as numbers: '3' equals '3.0', which the database's text comparison would miss)
        elif op in (">", ">=", "<", "<=") or _number(value) is not None or _UNSAFE.search(
                value):
            continue
        elif column in _TAG_OF:
            out.append(("tag", _TAG_OF[column], sql_op, value))
        elif column == "run_id":
            out.append(("attr", "run_id", sql_op, value))
        elif column == "git_commit" and sql_op == "=" and value.isalnum():
            # the column shows the commit's first 12 characters: a prefix of the tag
            out.append(("tag", "git.commit", "LIKE", value + "%"))
        # not pushed: settings stored as text ("3.0", "0.0001") that the filters compare
        # as numbers, aliases (the registered model's), created, and the metrics: a
        # version's metric comes from a related run when its own run lacks it, and no
        # search for the runs above a value can tell a run that fails from one that lacks
        # the metric without loading both
    return out


def _clause_text(clause: tuple[str, str, str, str]) -> str:
    kind, key, op, value = clause
    if kind == "tag":
        return f"tags.`{key}` {op} '{value}'"
    return f"{key} {op} {value}" if key == "version_number" else f"{key} {op} '{value}'"


def _tag_clauses_hold(tags: dict, clauses) -> bool:
    """Whether a version's tags pass the tag clauses (as the database would, near enough
    to measure how selective they are)."""
    for kind, key, op, value in clauses:
        if kind != "tag":
            continue
        have = tags.get(key)
        if have is None or (op == "=" and have != value) or (op == "!=" and have == value) \
                or (op == "LIKE" and not have.startswith(value[:-1])):
            return False
    return True


def iter_audit_rows(model: str | None = None, filters=(), params_file: str = "params.yaml",
                    uri: str | None = None, *, limit: int | None = None,
                    page_size: int = PAGE_SIZE) -> Iterator[dict]:
    """The rows, newest version first, that match every filter; at most ``limit``.

    Versions are read a page at a time, each page below the last version read (keyset
    paging: a version registered meanwhile neither repeats nor hides a row, and a deep page
    costs what the first does), with the filters MLflow answers exactly
    (:func:`version_filter`; its tag filters once they prove selective, see
    :data:`PUSH_BELOW`); the rest are checked here, those on the version's own tags before
    its runs are fetched. The metrics come from one ``search_runs`` by run id for a page's
    versions (in parallel parts), and, for a metric a version's own run lacks, from the
    newest of the runs that later stages opened for the model trained in it (tagged
    ``saeflow.trained_in``: evaluate or score re-run with other settings) that has it,
    looked up only for rows that can still match. With a
    limit, pages hold about as many versions as are likely to be needed, and nothing more
    is asked once ``limit`` rows have been produced. Memory: a page or two."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.exceptions import MlflowException

    from flows.stage_support import tracking_settings_of

    experiment, registered = tracking_settings_of(params_file)
    name = model or registered
    if "'" in name or "\\" in name:
        raise ValueError(f"--model {name!r}: quotes and backslashes are not allowed")
    c = tracking.client(uri, create=False)
    on_runs = [f for f in filters if f[0] in METRIC_COLUMNS]
    on_version = [f for f in filters if f[0] not in METRIC_COLUMNS]
    clauses = _clauses(filters)
    queries = {False: version_filter(name, filters, tags=False),
               True: version_filter(name, filters)}
    pushed = queries[False] == queries[True]  # nothing to decide without tag clauses
    aliases_early = any(f[0] == "aliases" for f in filters)
    left = limit
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            # search results carry no aliases: the registered model has them all
            aliases_f = pool.submit(_aliases, c, name)
            exp_f = pool.submit(c.get_experiment_by_name, experiment)
            st = _Progress()
            buffer: list[tuple[dict, str]] = []  # versions read that passed on_version
            page_f, bound, more = None, None, True

            def ask(size: int):
                query = queries[pushed] + ("" if bound is None else
                                           f" AND version_number < {bound}")
                return pool.submit(c.search_model_versions, query, max_results=size,
                                   order_by=["version_number DESC"])

            def fill(wanted: float | None) -> None:
                """Read pages until ``buffer`` holds a version or none are left; ask for
                the page after while this one's runs are fetched, if it will be needed."""
                nonlocal page_f, bound, more, pushed
                while not buffer and more:
                    if page_f is None:
                        size = _need(wanted, st.version_rate(), page_size)
                        page_f = ask(size if pushed or st.read else min(size, PROBE))
                    page, page_f = page_f.result(), None
                    more = bool(page) and bool(page.token)
                    if not page:
                        return
                    bound = int(page[-1].version)
                    aliases = aliases_f.result() if aliases_early else {}
                    for v in page:
                        tags = dict(v.tags or {})
                        st.read += 1
                        st.kept_by_tags += _tag_clauses_hold(tags, clauses)
                        row = _version_row(v, aliases)
                        if all(matches(row, f) for f in on_version):
                            buffer.append((row, row["run_id"] or ""))
                    st.vread += len(page)
                    st.vpassed += len(buffer)
                    if not pushed and st.kept_by_tags < PUSH_BELOW * st.read:
                        pushed, st.vread, st.vpassed = True, 0, 0  # selective: MLflow's
                    likely = len(buffer) * st.guess()
                    if more and (wanted is None or likely < wanted):
                        page_f = ask(_need(wanted and wanted - likely, st.version_rate(),
                                           page_size))

            def start(wanted: float | None):
                """The next versions, their own runs asked for: (experiment id, versions,
                futures), or None when no version is left."""
                fill(wanted)
                if not buffer:
                    return None
                n = _need(wanted, st.run_rate() if on_runs else 1.0, page_size)
                chunk = buffer[:n]
                del buffer[:n]
                st.seen += len(chunk)
                exp = exp_f.result()
                exp_id = exp.experiment_id if exp else ""
                return exp_id, chunk, _fetch_own(pool, c, exp_id, chunk, page_size)

            current = start(left)
            while current is not None:
                pending, related = _start_metrics(pool, c, *current, on_runs, page_size)
                st.likely = len(pending)  # those that their own run's values keep
                # the versions after these: their runs asked for while these finish
                ahead = None
                if left is None or len(pending) < left:
                    ahead = start(None if left is None else left - len(pending))
                rows = _finish_metrics(pending, related, on_runs)
                st.likely = 0
                if not aliases_early:
                    by_version = aliases_f.result()
                    for row in rows:
                        row["aliases"] = ",".join(by_version.get(str(row["version"]),
                                                                 [])) or None
                for row in rows:
                    yield row
                    st.shown += 1
                    if left is not None:
                        left -= 1
                        if left == 0:
                            return
                current = ahead if ahead is not None else start(left)
    except MlflowException as exc:
        raise ValueError(f"MLflow: {' '.join(str(exc).split())}") from None


class _Progress:
    """What the audit has read so far, to size what it asks for next."""

    def __init__(self) -> None:
        self.read = self.kept_by_tags = 0  # versions read; of them, passing the tag clauses
        self.vread = self.vpassed = 0  # since the search last changed: read; passing here
        self.seen = self.shown = 0  # versions whose runs were asked for; rows produced
        self.likely = 0  # rows of the versions at hand that their own runs do not rule out

    def run_rate(self) -> float | None:
        """Rows per version whose runs were fetched (None: none yet)."""
        return (self.shown + self.likely) / self.seen if self.seen else None

    def guess(self) -> float:
        """Rows per version whose runs are read: as measured, else 1 (all)."""
        rate = self.run_rate()
        return 1.0 if rate is None else rate

    def version_rate(self) -> float | None:
        """Rows per version read (None: none yet)."""
        return self.vpassed / self.vread * self.guess() if self.vread else None


def _need(wanted: float | None, rate: float | None, page_size: int) -> int:
    """How many versions to ask for (or fetch the runs of) for ``wanted`` more rows at
    ``rate`` rows per version (None: not known yet), with a margin where rows may be
    dropped; 25 to ``page_size``; ``page_size`` when every row is wanted."""
    if wanted is None:
        return page_size
    if rate is None:
        n = wanted
    elif rate <= 0:
        n = page_size
    else:
        n = wanted / rate * (1.0 if rate >= 1 else 1.25)
    return min(page_size, max(25, math.ceil(n)))


def audit_rows(model: str | None = None, filters=(), params_file: str = "params.yaml",
               uri: str | None = None, limit: int | None = None) -> list[dict]:
    """The rows, newest version first, keeping those that match every filter (at most
    ``limit``): :func:`iter_audit_rows` as a list."""
    return list(iter_audit_rows(model, filters, params_file, uri, limit=limit))


def _version_row(v, aliases: dict[str, list[str]]) -> dict[str, Any]:
    """A version's row from its own record and tags; its metrics still None."""
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
    row.update(dict.fromkeys(METRIC_COLUMNS))
    row["run_id"] = v.run_id
    row["created"] = _iso(v.creation_timestamp)
    return row


def _fetch_own(pool, c, exp_id: str, items: list[tuple[dict, str]], page_size: int) -> list:
    """The searches of the own runs of ``items`` ((row, run id) pairs) by run id, in
    up to four parallel parts of 25 or more: futures of lists of runs. (A tracking server
    answers parts at once: 6 ms a run in four parts, 10 ms in one, at 100,000 versions;
    SQLite takes 5 ms a run either way.)"""
    ids = [r["run_id"] for r, _ in items if r["run_id"] and not _UNSAFE.search(r["run_id"])]
    if not exp_id or not ids:
        return []
    step = max(25, math.ceil(len(ids) / 4))

    def search(part: list[str]) -> list:
        listed = ", ".join(f"'{i}'" for i in part)
        return list(_runs(c, exp_id, f"attributes.run_id IN ({listed})", len(part)))

    return [pool.submit(search, ids[i:i + step]) for i in range(0, len(ids), step)]


def _start_metrics(pool, c, exp_id: str, items: list[tuple[dict, str]], own_runs: list,
                   filters, page_size: int) -> tuple[list, dict]:
    """The metrics of ``items`` ((row, run id) pairs), begun: each version's own run's
    (``own_runs``: :func:`_fetch_own`) filled in, the rows that these values already rule
    out (on ``filters``) dropped, and for the others, the searches (in parallel) of the
    later stages' runs of the model trained in that run, for the metrics it lacks.
    Returns ([(row, run id, missing keys)], {run id: future}); :func:`_finish_metrics`
    ends it."""
    own: dict[str, dict[str, float]] = {}
    for f in own_runs:
        own.update((r.info.run_id, r.data.metrics) for r in f.result())
    keys = set(METRIC_COLUMNS.values())
    pending = []
    for row, trained in items:
        metrics = own.get(row["run_id"], {})
        for col, key in METRIC_COLUMNS.items():
            row[col] = metrics.get(key)
        if any(METRIC_COLUMNS[f[0]] in metrics and not matches(row, f) for f in filters):
            continue  # its own run's value is the one shown, and it fails the filter
        pending.append((row, trained, keys - metrics.keys()))
    wanted: dict[str, set[str]] = {}
    for _, trained, missing in pending:
        if exp_id and missing and trained and not _UNSAFE.search(trained):
            wanted.setdefault(trained, set()).update(missing)
    return pending, {trained: pool.submit(_related_metrics, c, exp_id, trained, keys,
                                          page_size)
                     for trained, keys in wanted.items()}


def _finish_metrics(pending: list, related: dict, filters) -> list[dict]:
    """The rows of :func:`_start_metrics` with the related runs' values filled in, those
    that match ``filters``."""
    kept = []
    for row, trained, missing in pending:
        found = related[trained].result() if trained in related else {}
        for col, key in METRIC_COLUMNS.items():
            if key in missing:
                row[col] = found.get(key)
        if all(matches(row, f) for f in filters):
            kept.append(row)
    return kept


def _related_metrics(c, exp_id: str, trained: str, wanted: set[str],
                     page_size: int) -> dict[str, float]:
    """Of the runs that later stages opened for the model trained in run ``trained``
    (:func:`flows.tracking.attach_run`), newest first: the first value of each metric in
    ``wanted``. (By that tag, not the model's sha256: few runs carry it, so the database
    reads only those; a sha256 search reads that tag of every run, 0.25-0.45 s at 100,000
    runs, which an unfiltered audit would pay for one version in 40.)"""
    found: dict[str, float] = {}
    for r in _runs(c, exp_id, f"tags.`{tracking.TRAINED_IN_TAG}` = '{trained}'", page_size,
                   order_by=["attributes.start_time DESC"]):
        for key in wanted - found.keys():
            if key in r.data.metrics:
                found[key] = r.data.metrics[key]
        if found.keys() >= wanted:
            break
    return found


def _runs(c, exp_id: str, filter_string: str, page_size: int, order_by=None) -> Iterator:
    """Every run of the experiment that matches ``filter_string``, a page at a time."""
    token = None
    while True:
        page = c.search_runs([exp_id], filter_string=filter_string,
                             max_results=max(1, min(page_size, 50_000)), order_by=order_by,
                             page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _aliases(c, name: str) -> dict[str, list[str]]:
    """version -> its aliases, sorted."""
    # search_registered_models, not get_registered_model: the latter loads every version
    # of the model to list the latest per stage (4.6 s at 100,000 versions)
    found = [m for m in c.search_registered_models(f"name = '{name}'", max_results=10)
             if m.name == name]
    out: dict[str, list[str]] = {}
    for alias, version in sorted(found[0].aliases.items() if found else ()):
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


TABLE_BLOCK = PAGE_SIZE
"""Rows a table is aligned over at a time (the widths of one block, never narrower than
the blocks above it)."""


def format_rows(rows: Iterable[dict], fmt: str, columns: tuple[str, ...] = COLUMNS) -> str:
    """table (aligned text), json (a list of objects) or csv (a header row, then rows)."""
    return "".join(iter_format(rows, fmt, columns))


def iter_format(rows: Iterable[dict], fmt: str, columns: tuple[str, ...] = COLUMNS,
                block: int = TABLE_BLOCK) -> Iterator[str]:
    """:func:`format_rows` a piece at a time, reading ``rows`` as it goes: a line per row
    for csv and json (the same text as ``json.dumps(rows, indent=2)``), a block of
    ``block`` rows for a table. A table's column widths are those of its first block;
    a later block with a wider cell widens its column and repeats the header above it, so
    every line lines up with the header above it without holding all rows."""
    if fmt == "json":
        n = 0
        for n, row in enumerate(rows, 1):
            text = json.dumps(row, indent=2).replace("\n", "\n  ")
            yield ("[\n  " if n == 1 else ",\n  ") + text
        yield "\n]\n" if n else "[]\n"
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()
        return
    shown = [c for c in columns if c not in ("created",)]
    widths = [len(c) for c in shown]
    header_at: list[int] | None = None
    cells: list[list[str]] = []

    def lines() -> str:
        nonlocal header_at
        for row in cells:
            widths[:] = [max(w, len(x)) for w, x in zip(widths, row, strict=True)]
        out = [] if widths == header_at else [shown]
        header_at = list(widths)
        out += cells
        cells.clear()
        return "".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True))
                       .rstrip() + "\n" for line in out)

    for row in rows:
        cells.append([_cell(row.get(c)) for c in shown])
        if len(cells) == block:
            yield lines()
    if cells:
        yield lines()
    elif header_at is None:
        yield "no registered model versions match\n"

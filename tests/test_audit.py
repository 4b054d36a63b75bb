"""saeflow audit's filters and output formats, and its MLflow query against a small real
store (paged, filtered in MLflow or here, limited); end to end in test_pipeline_e2e.py."""

from __future__ import annotations

import csv
import io
import json

import pytest

from flows import tracking
from flows.audit import (
    COLUMNS,
    METRIC_COLUMNS,
    _version_row,
    audit_rows,
    format_rows,
    iter_audit_rows,
    iter_format,
    matches,
    parse_filter,
    parse_limit,
    version_filter,
)

ROWS = [
    {"version": 2, "penalty": "topk", "beta": None, "rho": None, "k": 5, "accuracy": 0.97},
    {"version": 1, "penalty": "kl", "beta": 3.0, "rho": 0.01, "k": None, "accuracy": 0.95},
]


@pytest.mark.parametrize("text, kept", [
    ("beta>=1", [1]), ("beta<1", []), ("penalty=topk", [2]), ("penalty != kl", [2]),
    ("k==5", [2]), ("accuracy > 0.96", [2]), ("rho<=0.01", [1]),
])
def test_filters(text, kept):
    flt = parse_filter(text)
    assert [r["version"] for r in ROWS if matches(r, flt)] == kept


@pytest.mark.parametrize("text, message", [
    ("beta", "expected COLUMN OP VALUE"), ("beta>=", "expected COLUMN OP VALUE"),
    ("nope=1", "unknown column 'nope'"),
])
def test_bad_filter_is_a_one_line_error(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_filter(text)
    assert "\n" not in str(info.value)


def test_ordering_a_text_column_matches_nothing():
    """'beta>=1' on a row whose beta is blank or text keeps nothing, rather than guess."""
    assert not matches({"beta": None}, parse_filter("beta>=1"))
    assert not matches({"beta": "n/a"}, parse_filter("beta>=1"))


def test_json_and_csv_round_trip():
    rows = json.loads(format_rows(ROWS, "json"))
    assert rows == ROWS
    parsed = list(csv.DictReader(io.StringIO(format_rows(ROWS, "csv"))))
    assert list(parsed[0]) == list(COLUMNS)
    assert [r["penalty"] for r in parsed] == ["topk", "kl"]
    assert parsed[0]["beta"] == "" and parsed[1]["beta"] == "3.0"


def test_table_is_aligned_with_a_header():
    lines = format_rows(ROWS, "table").splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "decision", "penalty"]
    assert len(lines) == 3
    assert lines[1].index("topk") == lines[0].index("penalty")
    assert format_rows([], "table") == "no registered model versions match\n"


@pytest.mark.parametrize("text, message", [
    ("beta>>1", r"unexpected '>' at position 6 \(after beta>\); expected a value"),
    ("beta=<1", r"unexpected '<' at position 6"),
    ("beta>=abc", r">= compares numbers; 'abc' is not a number"),
    ("penalty<kl", r"< compares numbers; 'kl' is not a number"),
])
def test_malformed_or_mistyped_filters_are_refused_where_they_go_wrong(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_filter(text)
    assert "\n" not in str(info.value)


# --- the MLflow query: a small real store, paged two versions at a time -------------------

NAME, EXPERIMENT = "saeflow-sae", "saeflow"  # the defaults when there is no params.yaml
SCORE = {"score/accuracy", "score/raw_accuracy"}
SPARSITY = {"sparsity/rho_hat_mean", "sparsity/frac_units_near_target", "sparsity/dead_units",
            "sparsity/l0_mean", "sparsity/fvu"}
# version -> (settings, metrics of its own run, runs that later stages opened for its model
# (tagged saeflow.trained_in, as flows.tracking.attach_run tags them): newest last)
STORE = {
    1: ({"penalty": "kl", "beta": "3.0", "rho": "0.01"}, {"accuracy": 0.95}, []),
    2: ({"penalty": "topk", "k": "5"}, {"accuracy": 0.97}, []),
    # its own run has no score: the newest related run that has one gives it
    3: ({"penalty": "l1", "l1_coefficient": "0.001"}, {"accuracy": None},
        [{"accuracy": 0.5}, {"accuracy": 0.91}, {"loss": 9.0}]),
    # its own run's value is the one shown, not a related run's
    4: ({"penalty": "kl", "beta": "0.5", "rho": "0.05"}, {"accuracy": 0.85},
        [{"accuracy": 0.99}]),
    5: ({"penalty": "kl", "beta": "1.0", "rho": "0.01"}, {"accuracy": None}, []),
    6: ({"penalty": "kl", "beta": "5.0", "rho": "0.01", "solver": "adam",
         "saeflow.decision": "promoted"}, {"accuracy": 0.92}, []),
    7: ({"penalty": "topk", "k": "10", "git.commit": "c0ffee" * 6 + "abcd"},
        {"accuracy": 0.88}, []),
    8: ({"penalty": "kl", "beta": "3.0", "rho": "0.05", "data.md5": "d" * 32},
        {"accuracy": 0.99, "fvu": None}, [{"fvu": 0.25}]),
    9: ({"penalty": "kl", "beta": "2.0", "rho": "0.01"}, {"accuracy": 0.93}, []),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store written through the MLflow client as the pipeline writes it:
    per version a run (model sha256 tag, train/sparsity/score metrics) and the version
    with its settings as tags; some models also have separate runs of later stages."""
    from mlflow.entities import Metric

    tmp = tmp_path_factory.mktemp("audit-store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = c.create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))
    c.create_registered_model(NAME)
    t = 1_700_000_000_000

    def run(sha: str, metrics: dict, start: int) -> str:
        r = c.create_run(exp, start_time=start, tags={tracking.MODEL_TAG: sha})
        full = {"train/loss": 1.0, **{k: 0.5 for k in SPARSITY}, **{k: 0.8 for k in SCORE}}
        for col, value in metrics.items():
            key = METRIC_COLUMNS[col]
            groups = SCORE if key in SCORE else {key}
            for k in groups:
                full.pop(k, None)  # a missing score: the stage never ran on this run
            if value is not None:
                full[key] = value
        c.log_batch(r.info.run_id, metrics=[Metric(k, v, start, 0) for k, v in full.items()])
        c.set_terminated(r.info.run_id)
        return r.info.run_id

    for version, (settings, own, related) in STORE.items():
        sha = f"{version:064x}"
        run_id = run(sha, own, t + version * 1000)
        for j, metrics in enumerate(related, 1):
            r = c.create_run(exp, start_time=t + version * 1000 + j * 100,
                             tags={tracking.MODEL_TAG: sha, tracking.TRAINED_IN_TAG: run_id})
            c.log_batch(r.info.run_id, metrics=[
                Metric(METRIC_COLUMNS[k], v, 0, 0) for k, v in metrics.items()])
        tags = {"n_components": "25", "weight_decay": "0.0001", "solver": "lbfgs",
                "l1_coefficient": "None", "k": "None", "data.md5": "a" * 32,
                "git.commit": "b" * 40, "model_sha256": sha, "run_id": run_id, **settings}
        v = c.create_model_version(NAME, source=f"{tmp}/m{version}", run_id=run_id,
                                   tags=tags)
        assert int(v.version) == version
    c.set_registered_model_alias(NAME, "champion", "6")
    return {"uri": uri, "params": str(tmp / "no-params.yaml"), "client": c, "exp": exp}


@pytest.fixture(scope="module")
def reference(store) -> list[dict]:
    """Every row, filtered by nothing and computed the simple way: all versions, all runs
    of the experiment, each version's metrics from its own run and then from the runs
    that later stages opened for its model, newest first."""
    c = store["client"]
    versions = c.search_model_versions(f"name = '{NAME}'")
    runs = c.search_runs([store["exp"]], order_by=["attributes.start_time DESC"])
    aliases = {"6": ["champion"]}
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        row = _version_row(v, aliases)
        own = [r for r in runs if r.info.run_id == v.run_id]
        related = [r for r in runs if r.data.tags.get(tracking.TRAINED_IN_TAG) == v.run_id]
        for col, key in METRIC_COLUMNS.items():
            row[col] = next((r.data.metrics[key] for r in own + related
                             if key in r.data.metrics), None)
        rows.append(row)
    return rows


def audit(store, *texts, limit=None, page_size=2) -> list[dict]:
    return list(iter_audit_rows(None, [parse_filter(t) for t in texts], store["params"],
                                store["uri"], limit=limit, page_size=page_size))


def test_every_row_is_the_reference_row(store, reference):
    rows = audit(store)
    assert rows == reference and audit(store, page_size=500) == reference
    assert [r["version"] for r in rows] == list(range(9, 0, -1))
    by_version = {r["version"]: r for r in rows}
    assert by_version[3]["accuracy"] == 0.91  # the newest related run that has it
    assert by_version[4]["accuracy"] == 0.85  # its own run's, not the related 0.99
    assert by_version[8]["fvu"] == 0.25 and by_version[5]["accuracy"] is None
    assert by_version[6]["aliases"] == "champion" and by_version[6]["decision"] == "promoted"
    assert by_version[1]["k"] is None and by_version[2]["beta"] is None


@pytest.mark.parametrize("texts", [
    ("penalty=kl",), ("penalty!=kl",), ("penalty=topk", "k>=10"), ("beta>=1",),
    ("rho<0.02", "beta<=3"), ("solver=adam",), ("l1_coefficient>0",), ("accuracy>0.9",),
    ("accuracy<=0.9", "beta>=1"), ("fvu<0.3",), ("version>=4",), ("version!=2",),
    ("decision=promoted",), ("aliases=champion",), ("data_md5=" + "d" * 32,),
    ("git_commit=c0ffeec0ffee",), ("penalty=3",), ("weight_decay=0.0001",),
    ("penalty=kl", "penalty=topk"),
])
def test_pushed_down_filters_keep_what_filtering_everything_keeps(store, reference, texts):
    """MLflow's own search answers the filters it can (the name, words on tags, the version
    number); the rest are checked here: together the same rows as every row filtered here."""
    flts = [parse_filter(t) for t in texts]
    expected = [r for r in reference if all(matches(r, f) for f in flts)]
    assert audit(store, *texts) == expected
    assert audit(store, *texts, limit=2) == expected[:2]


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_tag_filters_left_to_mlflow_or_checked_here_keep_the_same_rows(store, reference,
                                                                      share, monkeypatch):
    """Whether the tag filters go to MLflow (a selective filter) or stay here (one that
    keeps most versions), the rows are the same."""
    import flows.audit

    monkeypatch.setattr(flows.audit, "PUSH_BELOW", share)  # 0: never pushed, 1.5: always
    for texts in (("penalty=kl", "beta>=1"), ("solver=adam",), ("git_commit=c0ffeec0ffee",),
                  ("penalty!=kl", "accuracy>0.9")):
        flts = [parse_filter(t) for t in texts]
        expected = [r for r in reference if all(matches(r, f) for f in flts)]
        assert audit(store, *texts) == expected, texts


def test_the_search_filter_pushes_down_only_what_mlflow_answers_exactly():
    def q(*texts):
        return version_filter(NAME, [parse_filter(t) for t in texts])

    assert q() == f"name = '{NAME}'"
    assert q("penalty=kl", "version>=3") == (f"name = '{NAME}' AND tags.`penalty` = 'kl' "
                                             "AND version_number >= 3")
    assert q("beta>=1") == f"name = '{NAME}' AND tags.`penalty` = 'kl'"  # only KL has a beta
    assert q("git_commit=abc123") == f"name = '{NAME}' AND tags.`git.commit` LIKE 'abc123%'"
    assert version_filter(NAME, [parse_filter("penalty=kl"), parse_filter("version<9")],
                          tags=False) == f"name = '{NAME}' AND version_number < 9"
    # numbers stored as text ("3.0"), numeric words, metrics, aliases: checked here only
    for texts in (("n_components=25",), ("penalty=3",), ("accuracy>0.9",),
                  ("aliases=champion",), ("version>=2.5",), ("penalty=it's",)):
        assert q(*texts) == f"name = '{NAME}'", texts


def test_limit_stops_early_with_the_newest_versions(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    pages = []
    search = MlflowClient.search_model_versions

    def counted(self, *args, **kwargs):
        page = search(self, *args, **kwargs)
        pages.append(len(page))
        return page

    monkeypatch.setattr(MlflowClient, "search_model_versions", counted)
    rows = audit(store, limit=3)
    assert [r["version"] for r in rows] == [9, 8, 7]
    assert sum(pages) <= 4 and len(pages) == 2  # two pages of two, not all nine versions
    pages.clear()
    assert [r["version"] for r in audit(store, "accuracy>0.9", limit=2)] == [9, 8]
    assert sum(pages) < 9
    assert audit_rows(None, [], store["params"], store["uri"], limit=1)[0]["version"] == 9


def test_a_metric_from_a_related_run_decides_the_filter(store):
    """Version 3's own run has no score; its related run's 0.91 is shown and filtered on.
    Version 4's own 0.85 is shown and filtered on, not its related run's 0.99."""
    kept = [r["version"] for r in audit(store, "accuracy>0.9")]
    assert 3 in kept and 4 not in kept
    assert [r["version"] for r in audit(store, "accuracy>0.98")] == [8]


@pytest.mark.parametrize("text", ["0", "-3", "x", "1.5", ""])
def test_a_bad_limit_is_a_one_line_error(text, capsys):
    from flows.cli import main

    assert main(["audit", "--limit", text]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit" in err and "positive integer" in err
    with pytest.raises(ValueError):
        parse_limit(text)
    assert parse_limit("100") == 100 and parse_limit(None) is None


def test_the_cli_streams_at_most_limit_rows(store, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["audit", "--params", store["params"], "--format", "json", "--limit", "2",
                 "--where", "penalty=kl"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == [9, 8]
    assert main(["audit", "--params", store["params"], "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10


def test_a_table_in_blocks_lines_up_under_the_header_above_it():
    """Widths come from each block of rows; a block with a wider cell repeats the header,
    so every line lines up with the nearest header above it."""
    rows = [{"version": 10, "penalty": "kl"}, {"version": 9, "penalty": "kl"},
            {"version": 8, "penalty": "topk-wide-word"}, {"version": 7, "penalty": "kl"},
            {"version": 6, "penalty": "kl"}]
    columns = ("version", "penalty", "beta")
    text = "".join(iter_format(iter(rows), "table", columns, block=2))
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("version")]
    assert headers == [0, 3]  # the third row widened the penalty column
    for i, line in enumerate(lines):
        header = lines[max(h for h in headers if h <= i)]
        if i not in headers:
            assert line.index(line.split()[1]) == header.index("penalty")
    assert "".join(iter_format(iter([]), "table")) == "no registered model versions match\n"
    assert len(lines) == 7

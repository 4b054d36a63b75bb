"""HTML report: escaping, the comparison table, embedded pictures, determinism."""

from __future__ import annotations

import ast
import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from sae_core.report import (
    RunSummary,
    differing_settings,
    flatten,
    format_value,
    render_report,
    write_report,
)

# the report checks the PNG signature and embeds the bytes as they are: two distinct
# byte strings behind the signature are enough to tell the pictures apart
PNG_A = b"\x89PNG\r\n\x1a\n" + b"picture A"
PNG_B = b"\x89PNG\r\n\x1a\n" + b"picture B"


class Tables(HTMLParser):
    """Collects every table as rows of (tag, class, text) cells; and every img src."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.imgs: list[dict] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "head": [], "body": []})
        elif tag == "thead":
            self._part = "head"
        elif tag == "tbody":
            self._part = "body"
        elif tag == "tr":
            self.tables[-1][self._part].append([])
        elif tag in ("td", "th"):
            self._cell = [tag, attrs.get("class"), ""]
        elif tag == "img":
            self.imgs.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][self._part][-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data


def parse(text: str) -> Tables:
    p = Tables()
    p.feed(text)
    p.close()
    return p


def runs_of_a_sweep(tmp_path: Path) -> list[RunSummary]:
    (tmp_path / "a.png").write_bytes(PNG_A)
    base = {"train": {"rho": 0.01, "beta": 3.0, "weight_decay": 1e-4}, "data": {"n": 10000}}
    return [
        RunSummary(
            "beta=3",
            params=base,
            metrics={"fvu": 0.25, "dead_units": 0, "accuracy": 0.981234567},
            pictures={"filters": tmp_path / "a.png", "rho_hat": PNG_B},
            run_id="abc123",
        ),
        RunSummary(
            "beta=0",
            params={**base, "train": {**base["train"], "beta": 0.0}},
            metrics={"fvu": 0.1, "dead_units": 2, "accuracy": None},
            pictures={"filters": PNG_B},
        ),
        RunSummary(
            "beta=10",
            params={**base, "train": {**base["train"], "beta": 10}, "extra": True},
            metrics={"fvu": float("nan"), "dead_units": np.int64(5), "kl_total": 1.5},
        ),
    ]


def test_single_run_shows_settings_metrics_and_pictures():
    run = RunSummary(
        "exercise",
        params={"train": {"rho": 0.01, "beta": 3.0, "k": None}},
        metrics={"fvu": 0.123456789, "dead_units": 0},
        pictures={"filter grid": PNG_A},
    )
    doc = parse(render_report([run], title="One run"))
    settings, metrics = doc.tables
    assert settings["class"] == "settings"
    assert [[c[2] for c in row] for row in settings["body"]] == [
        ["train.rho", "0.01"],
        ["train.beta", "3.0"],
        ["train.k", "null"],
    ]
    assert [[c[2] for c in row] for row in metrics["body"]] == [
        ["fvu", "0.123457"],
        ["dead_units", "0"],
    ]
    (img,) = doc.imgs
    assert img["alt"] == "filter grid"
    assert img["src"] == "data:image/png;base64," + base64.b64encode(PNG_A).decode()


def test_comparison_table_has_one_row_per_run_with_the_differing_settings(tmp_path):
    runs = runs_of_a_sweep(tmp_path)
    assert differing_settings(runs) == ["train.beta", "extra"]
    text = render_report(runs)
    doc = parse(text)
    comparison = doc.tables[0]
    assert comparison["class"] == "comparison"
    header = [c[2] for c in comparison["head"][1]]
    assert header == ["train.beta", "extra", "fvu", "dead_units", "accuracy", "kl_total"]
    assert all(c[1] == "differs" for c in comparison["head"][1][:2])  # highlighted
    assert all(c[1] != "differs" for c in comparison["head"][1][2:])
    rows = [[c[2] for c in row] for row in comparison["body"]]
    assert rows == [
        ["beta=3", "abc123", "3.0", "\u2014", "0.25", "0", "0.981235", "\u2014"],
        ["beta=0", "\u2014", "0.0", "\u2014", "0.1", "2", "\u2014", "\u2014"],
        ["beta=10", "\u2014", "10", "true", "nan", "5", "\u2014", "1.5"],
    ]
    for row in comparison["body"]:
        assert [c[1] for c in row[2:4]] == ["differs", "differs"]
    # the settings every run shares are listed once, not in the comparison
    shared = doc.tables[1]
    assert [[c[2] for c in row] for row in shared["body"]] == [
        ["train.rho", "0.01"],
        ["train.weight_decay", "0.0001"],
        ["data.n", "10000"],
    ]
    # pictures side by side, one row per caption: the filters of two runs, one rho_hat
    srcs = [img["src"] for img in doc.imgs]
    encoded = {b: "data:image/png;base64," + base64.b64encode(b).decode() for b in (PNG_A, PNG_B)}
    assert srcs == [encoded[PNG_A], encoded[PNG_B], encoded[PNG_B]]
    assert [img["alt"] for img in doc.imgs] == ["filters: beta=3", "filters: beta=0",
                                                "rho_hat: beta=3"]
    assert text.count("(no picture)") == 1 + 2  # beta=10 has none; beta=0, beta=10 no rho_hat


def test_identical_settings_are_reported_as_shared():
    runs = [RunSummary("a", params={"x": 1}), RunSummary("b", params={"x": 1})]
    assert differing_settings(runs) == []
    text = render_report(runs)
    assert "All runs share every setting." in text
    assert [[c[2] for c in row] for row in parse(text).tables[0]["body"]] == [["a"], ["b"]]


def test_every_string_is_escaped():
    evil = '<script>alert("x")</script>'
    run = RunSummary(
        evil,
        params={"a&b": evil, "nested": {"<k>": "'q'"}},
        metrics={'"m"': evil},
        pictures={evil: PNG_A},
        run_id="<id>",
    )
    for runs in ([run], [run, RunSummary("other", params={"a&b": 1})]):
        text = render_report(runs, title=evil)
        assert "<script>" not in text and "<k>" not in text and "<id>" not in text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text  # MarkupSafe's forms
        assert "a&amp;b" in text and "&#39;q&#39;" in text
        # the parsed page gives back the original strings
        doc = parse(text)
        cells = [c[2] for t in doc.tables for part in ("head", "body") for r in t[part] for c in r]
        assert evil in cells and "a&b" in cells
        assert any(img["alt"].startswith(evil) for img in doc.imgs)


def test_output_is_deterministic_and_written_atomically(tmp_path):
    runs = runs_of_a_sweep(tmp_path)
    text = render_report(runs, title="sweep")
    assert render_report(runs_of_a_sweep(tmp_path), title="sweep") == text
    out = tmp_path / "reports" / "report.html"
    write_report(out, runs, title="sweep")
    assert out.read_bytes() == text.encode("utf-8")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</html>\n")
    assert not re.search(r"20\d\d-\d\d-\d\d", text)  # no dates


def test_bad_input_is_a_one_line_value_error(tmp_path):
    with pytest.raises(ValueError, match="runs is empty"):
        render_report([])
    with pytest.raises(ValueError, match="'a' appears more than once"):
        render_report([RunSummary("a"), RunSummary("a")])
    with pytest.raises(ValueError, match=r"runs\[0\] must be a RunSummary"):
        render_report([{"name": "a"}])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        RunSummary("")
    with pytest.raises(ValueError, match="params of run 'a' must be a mapping"):
        RunSummary("a", params=[("beta", 3)])
    with pytest.raises(ValueError, match="picture 'f' of run 'a' must be a path or PNG bytes"):
        RunSummary("a", pictures={"f": 3})
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"picture 'f' of run 'a': .*missing\.png: file not found"):
        render_report([RunSummary("a", pictures={"f": missing})])
    with pytest.raises(ValueError, match="picture 'f' of run 'a': not a PNG image"):
        render_report([RunSummary("a", pictures={"f": b"GIF89a..."})])
    with pytest.raises(ValueError) as info:
        write_report(tmp_path / "r.html", [RunSummary("a", pictures={"f": b"x"})])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r.html").exists()


def test_formatting_helpers():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
    assert [format_value(v) for v in (1e-4, 3, True, None, [1, 0.5], np.float32(0.25), "x")] == [
        "0.0001", "3", "true", "null", "[1, 0.5]", "0.25", "x",
    ]


def test_sae_core_never_imports_pipeline_tools():
    forbidden = {"prefect", "mlflow", "dvc"}
    package = Path(__file__).resolve().parents[1] / "sae_core"
    offenders = []
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{source.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []
    assert len(list(package.rglob("*.py"))) > 3  # the scan saw the package

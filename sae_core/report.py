"""A self-contained HTML report of one run or a comparison of several (pure: no tracking).

:func:`render_report` turns a list of :class:`RunSummary` (a run's name, settings, metrics
and pictures) into one HTML page:

- one run: its settings, its metrics, its pictures with their captions;
- several runs: a comparison table with one row per run, whose columns are the settings
  that differ between the runs (highlighted) and the metrics; then the settings every run
  shares; then each picture of the runs side by side, one row per caption.

Pictures are PNG files or bytes embedded as base64 ``data:`` URIs, so the page needs no
other file. Every string from the input is HTML-escaped. The output is a function of the
input alone (no timestamps, no versions; settings and metrics in the order given, the
first run's order first), so the same runs give the same bytes. This module imports
neither prefect, mlflow nor dvc: the flows collect the runs and call it.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_core.io import atomic_path
from sae_core.outputs import HTML, HTML_GENERATOR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "\u2014"
"""Shown in a table cell for a setting or metric that a run does not have (an em dash)."""

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f0f0; }
.differs { background: #fff3b0; font-weight: bold; }
.pictures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #444; }
img { max-width: 32em; height: auto; image-rendering: pixelated; }
.run-id { color: #666; font-size: 0.85em; }
""".strip()


@dataclass(frozen=True)
class RunSummary:
    """What the report shows of one run.

    ``params`` may nest (a params.yaml section per stage): nested keys are shown joined by
    dots (``train.beta``). ``metrics`` maps names to numbers (or strings, None). Each
    picture is a caption mapped to a PNG file path or the PNG bytes.
    """

    name: str
    """The run's label in the report (unique among the runs of one report)."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The settings that produced the run."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    """Its results (sparsity statistics, accuracy, ...)."""
    pictures: Mapping[str, str | os.PathLike | bytes] = field(default_factory=dict)
    """Caption -> PNG path or bytes."""
    run_id: str | None = None
    """A tracking id (an MLflow run id, a DVC experiment name), shown beside the name."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"RunSummary name must be a non-empty string; got {self.name!r}")
        for attr in ("params", "metrics", "pictures"):
            value = getattr(self, attr)
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"RunSummary {attr} of run {self.name!r} must be a mapping; got "
                    f"{type(value).__name__}"
                )
            for key in value:
                if not isinstance(key, str):
                    raise ValueError(
                        f"RunSummary {attr} of run {self.name!r} has a non-string key {key!r}"
                    )
        for caption, picture in self.pictures.items():
            if not isinstance(picture, (bytes, bytearray, str, os.PathLike)):
                raise ValueError(
                    f"picture {caption!r} of run {self.name!r} must be a path or PNG bytes; "
                    f"got {type(picture).__name__}"
                )
        if self.run_id is not None and not isinstance(self.run_id, str):
            raise ValueError(f"RunSummary run_id of run {self.name!r} must be a string or None")


# ----------------------------------------------------------------------------- formatting
def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level, keys joined by dots: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_value(value: Any) -> str:
    """A setting as text: floats as their shortest round-trip repr (1e-4 -> 0.0001), bools
    and None as YAML writes them (true, false, null), lists as [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping) and not value:
        return "{}"
    scalar = _scalar(value)
    if scalar is not value:
        return format_value(scalar)
    return str(value)


def format_metric(value: Any) -> str:
    """A metric as text: floats to 6 significant digits, ints exactly, None as an em dash."""
    if value is None:
        return MISSING
    value = _scalar(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _scalar(value: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return value


def _is_number(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _union(keys: Iterable[Iterable[str]]) -> list[str]:
    """Keys in first-seen order, each once."""
    seen: dict[str, None] = {}
    for group in keys:
        for key in group:
            seen.setdefault(key, None)
    return list(seen)


def _png(run: RunSummary, caption: str) -> bytes:
    picture = run.pictures[caption]
    where = f"picture {caption!r} of run {run.name!r}"
    if isinstance(picture, (bytes, bytearray)):
        data = bytes(picture)
    else:
        p = Path(picture)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{where}: {p}: file not found") from None
        except OSError as exc:
            raise ValueError(f"{where}: {p}: cannot read ({exc.strerror})") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{where}: not a PNG image")
    return data


def _img(data: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="{uri}">'


def _key_value_table(rows: Sequence[tuple[str, str]], css_class: str, numeric: bool) -> str:
    if not rows:
        return '<p class="empty">(none)</p>'
    td = '<td class="num">' if numeric else "<td>"
    body = "".join(f"<tr><th>{_esc(k)}</th>{td}{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="{css_class}"><tbody>{body}</tbody></table>'


def _title_line(run: RunSummary) -> str:
    rid = f' <span class="run-id">({_esc(run.run_id)})</span>' if run.run_id else ""
    return f"{_esc(run.name)}{rid}"


# ----------------------------------------------------------------------------- sections
def _single(run: RunSummary) -> list[str]:
    params = flatten(run.params)
    parts = [f"<h2>{_title_line(run)}</h2>", "<h3>Settings</h3>"]
    parts.append(
        _key_value_table([(k, format_value(v)) for k, v in params.items()], "settings", False)
    )
    parts.append("<h3>Metrics</h3>")
    parts.append(
        _key_value_table([(k, format_metric(v)) for k, v in run.metrics.items()], "metrics", True)
    )
    if run.pictures:
        parts.append("<h3>Pictures</h3>")
        figures = "".join(
            f"<figure>{_img(_png(run, c), c)}<figcaption>{_esc(c)}</figcaption></figure>"
            for c in run.pictures
        )
        parts.append(f'<div class="pictures">{figures}</div>')
    return parts


def differing_settings(runs: Sequence[RunSummary]) -> list[str]:
    """The (flattened) settings whose value is not the same in every run (a setting that
    some run lacks counts as differing), in first-seen order."""
    flat = [flatten(r.params) for r in runs]
    keys = _union(f.keys() for f in flat)
    return [k for k in keys if len({format_value(f[k]) if k in f else None for f in flat}) > 1]


def _comparison(runs: Sequence[RunSummary]) -> list[str]:
    flat = [flatten(r.params) for r in runs]
    differ = differing_settings(runs)
    metrics = _union(r.metrics.keys() for r in runs)
    with_ids = any(r.run_id for r in runs)

    group = ['<th rowspan="2">run</th>']
    if with_ids:
        group.append('<th rowspan="2">run id</th>')
    if differ:
        group.append(f'<th colspan="{len(differ)}" class="differs">settings that differ</th>')
    if metrics:
        group.append(f'<th colspan="{len(metrics)}">metrics</th>')
    names = [f'<th class="differs">{_esc(k)}</th>' for k in differ]
    names += [f"<th>{_esc(k)}</th>" for k in metrics]
    head = f"<thead><tr>{''.join(group)}</tr><tr>{''.join(names)}</tr></thead>"

    rows = []
    for run, params in zip(runs, flat, strict=True):
        cells = [f'<th scope="row">{_esc(run.name)}</th>']
        if with_ids:
            cells.append(f"<td>{_esc(run.run_id or MISSING)}</td>")
        for k in differ:
            text = format_value(params[k]) if k in params else MISSING
            cells.append(f'<td class="differs">{_esc(text)}</td>')
        for k in metrics:
            value = run.metrics.get(k)
            css = ' class="num"' if _is_number(value) else ""
            cells.append(f"<td{css}>{_esc(format_metric(value))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    parts = [
        "<h2>Comparison</h2>",
        f'<table class="comparison">{head}<tbody>{"".join(rows)}</tbody></table>',
    ]
    if not differ:
        parts.append("<p>All runs share every setting.</p>")
    shared = [(k, format_value(flat[0][k])) for k in flat[0] if k not in differ]
    parts += ["<h3>Settings shared by all runs</h3>", _key_value_table(shared, "settings", False)]

    captions = _union(r.pictures.keys() for r in runs)
    if captions:
        parts.append("<h2>Pictures</h2>")
    for caption in captions:
        figures = []
        for run in runs:
            if caption in run.pictures:
                body = _img(_png(run, caption), f"{caption}: {run.name}")
            else:
                body = '<p class="empty">(no picture)</p>'
            figures.append(f"<figure>{body}<figcaption>{_esc(run.name)}</figcaption></figure>")
        parts.append(f"<h3>{_esc(caption)}</h3>")
        parts.append(f'<div class="pictures">{"".join(figures)}</div>')
    return parts


# ----------------------------------------------------------------------------- public
def render_report(runs: Sequence[RunSummary], title: str = "saeflow report",
                  overview: Mapping[str, str | os.PathLike | bytes] | None = None) -> str:
    """The HTML page (a str) for ``runs``: one run in detail, or several compared.
    ``overview``: pictures about all the runs together (caption -> PNG path or bytes, e.g.
    a sweep plot), shown first.

    Raises a one-line ValueError for no runs, a run that is not a RunSummary, two runs
    with the same name, or a picture that cannot be read or is not a PNG.
    """
    if isinstance(runs, RunSummary):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise ValueError("runs is empty: nothing to report")
    for i, run in enumerate(runs):
        if not isinstance(run, RunSummary):
            raise ValueError(f"runs[{i}] must be a RunSummary; got {type(run).__name__}")
    seen: set[str] = set()
    for run in runs:
        if run.name in seen:
            raise ValueError(f"run names must be unique; {run.name!r} appears more than once")
        seen.add(run.name)
    body = _single(runs[0]) if len(runs) == 1 else _comparison(runs)
    if overview:
        holder = RunSummary(name="overview", pictures=dict(overview))
        figures = [f"<figure>{_img(_png(holder, c), c)}<figcaption>{_esc(c)}</figcaption>"
                   "</figure>" for c in overview]
        body = ["<h2>Overview</h2>", f'<div class="pictures">{"".join(figures)}</div>', *body]
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        HTML_GENERATOR,
        f"<title>{_esc(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(title)}</h1>",
        *body,
        "</body>",
        "</html>",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    path: str | os.PathLike, runs: Sequence[RunSummary], title: str = "saeflow report",
    overview: Mapping[str, str | os.PathLike | bytes] | None = None,
) -> None:
    """Write :func:`render_report` to ``path`` (UTF-8), atomically."""
    text = render_report(runs, title, overview)
    with atomic_path(path, HTML) as tmp:
        tmp.write_bytes(text.encode("utf-8"))

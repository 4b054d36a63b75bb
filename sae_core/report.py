"""A self-contained HTML report of one run or a comparison of several (pure: no tracking).

:func:`render_report` turns a list of :class:`RunSummary` (a run's name, settings, metrics
and pictures) into one HTML page:

- one run: its settings, its metrics, the answer (sentences from its own numbers on how
  the sparsity term switched its units off, when given), its pictures with their captions;
- several runs: a comparison table with one row per run, whose columns are the settings
  that differ between the runs (highlighted) and the metrics; then the settings every run
  shares; then each run's answer; then each picture of the runs side by side, one row per
  caption.

Pictures are PNG files or bytes embedded as base64 ``data:`` URIs, so the page needs no
other file. The page is a Jinja2 template with autoescaping: every string from the input
is HTML-escaped. The output is a function of the
input alone (no timestamps, no versions; settings and metrics in the order given, the
first run's order first), so the same runs give the same bytes. This module imports
neither prefect, mlflow nor dvc: the flows collect the runs and call it.
"""

from __future__ import annotations

import base64
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
    answer: Sequence[str] = ()
    """Sentences answering how the sparsity term switched the units off, computed from the
    run's own numbers (:mod:`sae_core.answer`); shown in the report's answer section."""

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
        if isinstance(self.answer, str) or not all(isinstance(t, str) for t in self.answer):
            raise ValueError(f"RunSummary answer of run {self.name!r} must be a sequence of "
                             "strings")
        if self.run_id is not None and not isinstance(self.run_id, str):
            raise ValueError(f"RunSummary run_id of run {self.name!r} must be a string or None")


# ----------------------------------------------------------------------------- formatting
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


_TEMPLATE = "templates/report.html.j2"
"""The page (a Jinja2 template, every value autoescaped), filled by :func:`render_report`."""


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _single(run: RunSummary) -> dict[str, Any]:
    return {"name": run.name, "run_id": run.run_id,
            "settings": [(k, format_value(v)) for k, v in flatten(run.params).items()],
            "metrics": [(k, format_metric(v)) for k, v in run.metrics.items()],
            "answer": list(run.answer),
            "pictures": [(c, _uri(_png(run, c)), c) for c in run.pictures]}


def differing_settings(runs: Sequence[RunSummary]) -> list[str]:
    """The (flattened) settings whose value is not the same in every run (a setting that
    some run lacks counts as differing), in first-seen order."""
    flat = [flatten(r.params) for r in runs]
    keys = _union(f.keys() for f in flat)
    return [k for k in keys if len({format_value(f[k]) if k in f else None for f in flat}) > 1]


def _comparison(runs: Sequence[RunSummary]) -> dict[str, Any]:
    flat = [flatten(r.params) for r in runs]
    differ = differing_settings(runs)
    metrics = _union(r.metrics.keys() for r in runs)
    rows = [{"name": run.name, "run_id": run.run_id or MISSING,
             "settings": [format_value(params[k]) if k in params else MISSING for k in differ],
             "metrics": [(format_metric(run.metrics.get(k)), _is_number(run.metrics.get(k)))
                         for k in metrics]}
            for run, params in zip(runs, flat, strict=True)]
    captions = _union(r.pictures.keys() for r in runs)
    pictures = [(caption, [(f"{caption}: {run.name}",
                            _uri(_png(run, caption)) if caption in run.pictures else None,
                            run.name) for run in runs]) for caption in captions]
    return {"differ": differ, "metrics": metrics, "rows": rows,
            "answers": [(run.name, list(run.answer)) for run in runs if run.answer],
            "with_ids": any(r.run_id for r in runs),
            "shared": [(k, format_value(flat[0][k])) for k in flat[0] if k not in differ],
            "picture_rows": pictures}


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
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.PackageLoader("sae_core", "templates"),
                             autoescape=True, keep_trailing_newline=True)
    page = env.get_template(Path(_TEMPLATE).name)
    holder = RunSummary(name="overview", pictures=dict(overview or {}))
    return page.render(
        title=title, generator=Markup(HTML_GENERATOR), css=Markup(_CSS),
        overview=[(c, _uri(_png(holder, c)), c) for c in holder.pictures],
        single=_single(runs[0]) if len(runs) == 1 else None,
        **({} if len(runs) == 1 else _comparison(runs)))


def write_report(
    path: str | os.PathLike, runs: Sequence[RunSummary], title: str = "saeflow report",
    overview: Mapping[str, str | os.PathLike | bytes] | None = None,
) -> None:
    """Write :func:`render_report` to ``path`` (UTF-8), atomically."""
    text = render_report(runs, title, overview)
    with atomic_path(path, HTML) as tmp:
        tmp.write_bytes(text.encode("utf-8"))

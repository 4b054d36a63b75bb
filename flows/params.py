"""Reading params.yaml: the one place settings live, one section per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document at ``path`` (``what`` names it in errors: "params file"); a
    missing, unreadable or malformed file is a one-line ValueError."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValueError(f"{p}: {what} not found") from None
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"{p}: not valid YAML{line}") from None


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a dict; a missing or malformed file is a one-line ValueError."""
    params = read_yaml(path, "params file")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got "
                         f"{type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str, path: str | Path = "params.yaml") -> dict:
    """One stage's section; missing -> ValueError naming the file and the section."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: section {name!r} is missing or not a mapping")
    return value

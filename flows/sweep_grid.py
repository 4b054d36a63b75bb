"""A sweep's points: the grid in DVC's ``-S`` syntax (or a sweep file), each point's full
settings, and the keys that say when two points (or two sweeps) are the same.

``-S train.beta=0.3,1,3,10 -S train.rho=range(0.01,0.05,0.02)`` is parsed by Hydra's
override parser, as ``dvc exp run -S`` parses it (DVC depends on Hydra), so a grid means
the same here as in a DVC queue: the cartesian product of every option, the first option
varying slowest, values typed as Hydra types them (``1`` an int, ``0.3`` a float, ``null``
None). A sweep file is YAML: a list of points, each a mapping of ``section.key`` to a value.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

SWEPT_SECTIONS = ("patches", "train", "evaluate", "score")
"""The sections a point may change; ingest is shared by every point."""


def parse_grid(specs: list[str]) -> list[dict[str, Any]]:
    """``["train.beta=0.3,1", "train.rho=0.01"]`` -> the points, as ``{"train.beta": 0.3,
    "train.rho": 0.01}`` mappings, in DVC's order. A spec Hydra cannot parse, a repeated
    key or a glob sweep is a one-line ValueError naming the spec."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    keys: list[str] = []
    options: list[list[Any]] = []
    for spec in specs:
        try:
            (override,) = OverridesParser.create().parse_overrides([spec])
        except HydraException as exc:
            first = str(exc).splitlines()[1:2] or [str(exc)]
            raise ValueError(f"-S {spec!r}: cannot parse ({first[0].strip()})") from None
        key = override.key_or_group
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            raise ValueError(f"-S {spec!r}: glob sweeps are not supported")
        if key in keys:
            raise ValueError(f"-S {spec!r}: {key} is given twice")
        keys.append(key)
        values = (list(override.sweep_iterator()) if override.is_sweep_override()
                  else [override.value()])
        options.append([_plain(v) for v in values])
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*options)]


def _plain(value: Any) -> Any:
    """Hydra's parsed values as plain YAML values (lists and mappings included)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_sweep_file(path: str | Path) -> list[dict[str, Any]]:
    """The points of a sweep file (YAML: a list of ``{section.key: value}`` mappings, or
    ``points:`` holding one); a missing or malformed file is a one-line ValueError."""
    from flows.params import read_yaml

    p = Path(path)
    doc = read_yaml(p, "sweep file")
    points = doc.get("points") if isinstance(doc, dict) else doc
    if not isinstance(points, list) or not points or not all(
            isinstance(q, dict) and q for q in points):
        raise ValueError(f"{p}: expected a list of points, each a mapping of section.key "
                         "to a value (e.g. - {train.beta: 3, train.rho: 0.01})")
    return [{str(k): v for k, v in q.items()} for q in points]


def check_points(points: list[dict[str, Any]], params: dict, where: str) -> None:
    """Every key names a setting of a swept section that params.yaml has; else a one-line
    ValueError (a typo would otherwise sweep nothing)."""
    if not points:
        raise ValueError("sweep: no points (give -S SECTION.KEY=VALUES or --file)")
    for point in points:
        for key in point:
            section, _, name = key.partition(".")
            if section not in SWEPT_SECTIONS or not name or "." in name:
                raise ValueError(f"sweep: {key!r}: expected SECTION.KEY with SECTION one of "
                                 f"{', '.join(SWEPT_SECTIONS)}")
            if name not in (params.get(section) or {}):
                raise ValueError(f"sweep: {key!r}: {where} has no setting {name!r} in "
                                 f"{section}")


def apply_point(params: dict, point: dict[str, Any]) -> dict:
    """params.yaml's contents with the point's settings in place (a new dict)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    for key, value in point.items():
        section, _, name = key.partition(".")
        out[section][name] = value
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def patch_key(params: dict, images_md5: str) -> str:
    """Which patch store a point trains on: its ``patches`` settings and the images."""
    return _digest({"patches": params["patches"], "images": images_md5})[:16]


def point_key(params: dict, data: dict[str, str]) -> str:
    """A point's identity: every setting that shapes its model and its metrics, and the md5
    of the data (``data``: name -> md5). Equal keys, equal results (on the CPU)."""
    return _digest({**{s: params.get(s) for s in SWEPT_SECTIONS}, "data": data})


def sweep_id(keys: list[str]) -> str:
    """The sweep's id: its points' keys, in order. The same grid on the same data and
    settings is the same sweep, so a second run finds the first one's points."""
    return _digest(keys)[:12]


def describe(point: dict[str, Any]) -> str:
    """``beta=3 rho=0.01``: the point's settings, short."""
    return " ".join(f"{k.partition('.')[2]}={v}" for k, v in point.items())

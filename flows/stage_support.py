"""What every stage flow shares: its params section, the MLflow switch, Prefect ids, and
the stage's own compute time (for benchmarks/overhead.py). Standard library only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.params import load_params, section

TIMINGS_ENV = "SAEFLOW_TIMINGS"
"""If set, each stage appends its own compute time (and the modules it loaded) to this
JSON-lines file (benchmarks/overhead.py)."""
PARENT_ENV = "SAEFLOW_PIPELINE_RUN_ID"
"""Set by a parent flow (pipeline, retrain) to its flow run id, for the stages' run tags."""
TRACKING_ENV = "SAEFLOW_TRACKING"
"""Set to 0/off/false to run the stages without recording to MLflow."""


def read_section(params_file: str | os.PathLike, name: str,
                 allowed: set[str] | None = None) -> tuple[dict, dict]:
    """(whole params file, one section); unknown keys in the section are a ValueError."""
    params = load_params(params_file)
    sec = section(params, name, params_file)
    if allowed is not None:
        unknown = sorted(set(sec) - allowed)
        if unknown:
            raise ValueError(f"{params_file}: unknown key(s) in {name}: {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(allowed))}")
    return params, sec


def tracking_enabled() -> bool:
    return os.environ.get(TRACKING_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def tracking_settings(params: dict) -> tuple[str, str]:
    """(experiment name, registered model name) from params.yaml's ``tracking`` section."""
    t = params.get("tracking") or {}
    return str(t.get("experiment", "saeflow")), str(t.get("registered_model", "saeflow-sae"))


def tracking_settings_of(params_file: str | os.PathLike) -> tuple[str, str]:
    """:func:`tracking_settings` of a params file; the defaults when there is none (the
    read-only commands, audit and report, also work outside a project folder)."""
    params = load_params(params_file) if os.path.exists(params_file) else {}
    return tracking_settings(params)


@contextmanager
def compute_timer(stage: str) -> Iterator[dict]:
    """Times the stage's own work (reading, maths, writing its outputs) — not imports,
    Prefect or MLflow. With ``$SAEFLOW_TIMINGS`` set, the process appends, at its exit,
    the seconds and the modules it had loaded when the work began, when it ended and at
    exit, so that benchmarks/overhead.py can time the stage's imports apart."""
    import atexit
    import sys

    box: dict[str, Any] = {}
    target = os.environ.get(TIMINGS_ENV)
    before = list(sys.modules) if target else []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start
        if target:
            after = list(sys.modules)

            def record() -> None:
                with open(target, "a") as fh:
                    fh.write(json.dumps({"stage": stage, "seconds": box["seconds"],
                                         "modules_before": before, "modules_after": after,
                                         "modules_at_exit": list(sys.modules)}) + "\n")

            atexit.register(record)


def prefect_tags(stage: str) -> dict[str, str]:
    """``prefect.flow_run_id.<stage>`` (and the parent pipeline's flow run, if any)."""
    try:
        from prefect.runtime import flow_run
    except ImportError:  # pragma: no cover - prefect is a dependency
        return {}
    tags = {}
    if flow_run.id:
        tags[f"prefect.flow_run_id.{stage}"] = str(flow_run.id)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["prefect.flow_run_id.pipeline"] = parent
    return tags


def model_sha256(model_dir: str | os.PathLike) -> str:
    """The sha256 of a saved model's weights, as its config.json records it."""
    config = Path(model_dir) / "config.json"
    try:
        return json.loads(config.read_text())["weights_sha256"]
    except FileNotFoundError:
        raise ValueError(f"{config}: model not found (run the train stage first)") from None
    except (KeyError, ValueError):
        raise ValueError(f"{config}: not a saeflow model config (no weights_sha256)") from None

"""dvc.yaml, the stage table, the flows and params.yaml agree with each other."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from flows.project import pipeline_paths, project_root
from flows.stages import BY_NAME, STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# modules that record runs (MLflow, Prefect ids) but shape no output: not stage deps
RECORDING_ONLY = {"flows/tracking.py", "flows/project.py", "flows/lineage.py"}


def test_five_stages_in_order():
    assert [s.name for s in STAGES] == ["ingest", "patches", "train", "evaluate", "score"]
    assert list(DVC["stages"]) == [s.name for s in STAGES]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_flow_signature_matches_the_table(stage):
    fn = stage.flow().fn
    names = [p for p in inspect.signature(fn).parameters if p not in ("params_file", "data_dir")]
    assert names == list(stage.path_args)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_stage_passes_every_path_and_declares_it(stage):
    spec = DVC["stages"][stage.name]
    cmd = " ".join(spec["cmd"].split())
    assert cmd.startswith(f"saeflow stage {stage.name} ")
    passed = dict(re.findall(r"--([a-z-]+) \$\{paths\.([a-z_]+)\}", cmd))
    assert passed == {n.replace("_", "-"): n for n in stage.path_args}

    def declared(key):
        out = []
        for item in spec.get(key, []):
            out.append(next(iter(item)) if isinstance(item, dict) else item)
        return {m.group(1) for d in out if (m := re.fullmatch(r"\$\{paths\.(\w+)\}", d))}

    assert declared("deps") >= set(stage.inputs)
    assert declared("outs") | declared("metrics") | declared("plots") == set(stage.outputs)
    assert spec["params"] == [stage.name]


def _lazy_names(init: Path) -> dict[str, str]:
    """A package's names loaded on first use: ``if name == "X": from M import X`` in its
    ``__getattr__`` -> {"X": "M"}."""
    found = {}
    for fn in ast.parse(init.read_text()).body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__":
            for node in ast.walk(fn):
                if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                        and isinstance(node.test.comparators[0], ast.Constant)):
                    for stmt in node.body:
                        if isinstance(stmt, ast.ImportFrom):
                            found[node.test.comparators[0].value] = stmt.module
    return found


def _imports(path: Path) -> set[str]:
    """The project modules ``path`` imports: anywhere in a module (an import inside a
    function runs when it is called), but only at the top of a package's ``__init__``
    (its ``__getattr__`` imports are followed where a name is taken from the package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if path.name == "__init__.py" else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            package = _module_file(node.module)
            lazy = _lazy_names(package) if package and package.name == "__init__.py" else {}
            found |= {lazy.get(a.name, f"{node.module}.{a.name}") for a in node.names}
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def code_deps(module: str) -> set[str]:
    """The project files a stage module imports, directly or not, at module level or inside
    a function (lazy imports, and a package's ``__getattr__`` that loads its names on first
    use, as ``sae_core/__init__.py`` does): the real import graph, from the source."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        f = _module_file(name)
        if f is None or f in seen:
            continue
        seen.add(f)
        todo += [m for m in _imports(f) if m.split(".")[0] in ("flows", "sae_core")]
    return {p.relative_to(ROOT).as_posix() for p in seen} - RECORDING_ONLY


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    """dvc.yaml's code deps of each stage are its import graph, no more and no less: a code
    change the stage depends on makes DVC re-run it, and no other does."""
    deps = {d for d in DVC["stages"][stage.name]["deps"] if not d.startswith("${")}
    needed = code_deps(stage.module)
    assert not needed - deps, f"{stage.name}: add to dvc.yaml deps: {sorted(needed - deps)}"
    assert not deps - needed, f"{stage.name}: not imported, drop: {sorted(deps - needed)}"


def test_the_import_graph_sees_lazy_package_imports():
    """``from sae_core import SparseAutoencoder`` loads estimator.py through the package's
    ``__getattr__``: the graph must reach it and what it imports."""
    graph = code_deps("flows.evaluate")
    assert {"sae_core/__init__.py", "sae_core/estimator.py", "sae_core/train.py",
            "sae_core/lbfgs.py", "sae_core/objective.py"} <= graph


def _code_strings(path: Path) -> set[str]:
    """String literals of a module other than docstrings (any bare string statement)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs}


def test_paths_are_declared_once():
    paths = pipeline_paths(ROOT / "dvc.yaml")
    used = {n for s in STAGES for n in s.path_args}
    assert set(paths) == used
    for f in ("flows", "sae_core"):
        for py in (ROOT / f).glob("*.py"):
            strings = _code_strings(py)
            for p in paths.values():
                assert not any(p in s for s in strings), f"{py.name} hard-codes {p}"


def test_params_defaults_are_the_exercise():
    t = PARAMS["train"]
    assert (t["n_components"], t["penalty"], t["rho"], t["beta"], t["weight_decay"],
            t["max_iter"], t["solver"]) == (25, "kl", 0.01, 3.0, 1e-4, 400, "lbfgs")
    p = PARAMS["patches"]
    assert p["patch_size"] == 8
    assert round(p["n_patches"] * (1 - p["heldout_fraction"])) == 10_000
    assert PARAMS["ingest"]["labeled_sources"] == [{"type": "builtin_digits"}]


def test_unknown_stage_key_is_one_line_error(tmp_path):
    from flows.stage_support import read_section

    f = tmp_path / "params.yaml"
    f.write_text("evaluate:\n  split: heldout\n  bogus: 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in evaluate: bogus"):
        read_section(f, "evaluate", {"split"})


def test_project_root_of_a_dvc_experiment_copy_is_the_original(tmp_path, monkeypatch):
    monkeypatch.delenv("SAEFLOW_PROJECT_ROOT", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(copy) == tmp_path / "proj"
    (tmp_path / "proj" / "sub").mkdir()
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(tmp_path / "proj" / "sub") == tmp_path / "proj"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "proj"))
    assert project_root(tmp_path) == tmp_path / "proj"
    monkeypatch.setenv("SAEFLOW_PROJECT_ROOT", str(tmp_path))
    assert project_root(copy) == tmp_path


def test_default_store_is_absolute_sqlite_in_the_project(tmp_path, monkeypatch):
    from flows.tracking import default_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert default_uri(tmp_path).startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_uri(tmp_path) == "http://tracking:5000"


def test_stage_table_names_are_unique():
    assert len(BY_NAME) == len(STAGES)


def test_params_yaml_lists_every_setting():
    """So that `dvc exp run -S section.key=...` can set any of them (DVC refuses keys that
    are not in the file) and each appears in the MLflow params."""
    import dataclasses

    from flows.train import EVERY_KEY
    from sae_core.config import SAEConfig
    from sae_core.dynamics import DEFAULT_EVERY
    from sae_core.patches import PatchConfig
    from sae_core.score import ScoreConfig

    for section, cls in (("train", SAEConfig), ("score", ScoreConfig),
                         ("patches", PatchConfig)):
        # train's one stage setting (the dynamics sampling interval) is not the model's
        values = {k: v for k, v in PARAMS[section].items() if k != EVERY_KEY}
        assert set(values) == {f.name for f in dataclasses.fields(cls)}, section
        # the file's values are the library's defaults, but for the held-out patches
        held_out = {"n_patches": 12500, "heldout_fraction": 0.2} if section == "patches" else {}
        assert cls.from_dict(values) == cls(**held_out), section
    assert PARAMS["train"][EVERY_KEY] == DEFAULT_EVERY

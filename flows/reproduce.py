"""``saeflow reproduce MODEL_URI``: rebuild a registered model from its record and check
that the bytes are the same.

From the version's tags and its MLflow run: the git commit of the code, the DVC md5 of the
data it was made from, and the settings. The commit is checked out in a temporary git
worktree; the data is fetched by md5 from the project's DVC cache or its remote; the
recorded ``patches`` and ``train`` settings replace the worktree's params.yaml sections;
``dvc repro --single-item --force`` re-runs the stages up to the model (patches from the
image dataset when its md5 is recorded, else train from the patch store); the new model's
weights sha256 is compared with the registered one. Nothing is recorded in MLflow and the
project's own files are not touched.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_URI = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (the ``models:/`` is optional)
    -> (name, version, alias)."""
    m = _URI.match(uri.strip())
    if not m:
        raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION "
                         "(e.g. models:/saeflow-sae@champion)")
    return m["name"], m["version"], m["alias"]


def _setting(text: str):
    """A params value as MLflow recorded it (``str(value)``, lists as JSON) -> the value."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ValueError(f"git {' '.join(args)}: {last[0]}")
    return done


def resolve(c, uri: str):
    """The model version a URI names; a missing one is a one-line ValueError."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        return c.get_model_version(name, version)
    except MlflowException:
        raise ValueError(f"{uri}: no such registered model version") from None


def reproduce(uri: str, root: Path) -> dict:
    """Rebuild the version in a temporary worktree; its registered and rebuilt sha256."""
    import yaml

    from flows import tracking
    from flows.dvc_state import fetch_object
    from flows.project import pipeline_paths
    from flows.stage_support import model_sha256

    c = tracking.client(create=False)
    v = resolve(c, uri)
    tags = v.tags or {}
    label = f"{v.name} version {v.version}"
    commit, registered = tags.get("git.commit", "unknown"), tags.get("model_sha256")
    if not registered:
        raise ValueError(f"{label}: no model_sha256 tag (not registered by saeflow)")
    if commit == "unknown" or _git(root, "cat-file", "-e", f"{commit}^{{commit}}",
                                   check=False).returncode != 0:
        raise ValueError(f"{label}: its git commit {commit} is not in the repository at {root}")
    run = c.get_run(v.run_id)
    params = run.data.params
    sections = {s: {k.split(".", 1)[1]: _setting(x) for k, x in params.items()
                    if k.startswith(s + ".")} for s in ("patches", "train")}
    with tempfile.TemporaryDirectory(prefix="saeflow-reproduce-") as tmp:
        tree = Path(tmp) / "tree"
        _git(root, "worktree", "add", "--detach", "--quiet", str(tree), commit)
        try:
            paths = pipeline_paths(tree / "dvc.yaml")
            images_md5 = tags.get(f"dvc.md5:{paths['images']}")
            remote = tags.get("dvc.remote")
            if images_md5:
                fetch_object(root, images_md5, tree / paths["images"], paths["images"], remote)
                targets = ["patches", "train"]
            else:
                fetch_object(root, tags.get("data.md5", ""), tree / paths["patches"],
                             paths["patches"], remote)
                targets = ["train"]
            file = tree / "params.yaml"
            doc = yaml.safe_load(file.read_text())
            for s, values in sections.items():
                if values:
                    doc[s] = values
            file.write_text(yaml.safe_dump(doc, sort_keys=False))
            print(f"reproduce: {label} from commit {commit[:12]} in {tree}; dvc repro "
                  f"{' '.join(targets)}", file=sys.stderr)
            env = {**os.environ, "PYTHONPATH": str(tree), "SAEFLOW_TRACKING": "0",
                   "SAEFLOW_PROJECT_ROOT": str(tree)}
            done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item",
                                   "--force", "--no-commit", *targets], cwd=tree, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                raise ValueError(f"{label}: the re-run at commit {commit[:12]} failed: "
                                 f"{' '.join(tail)}")
            rebuilt = model_sha256(tree / paths["model"])
        finally:
            _git(root, "worktree", "remove", "--force", str(tree), check=False)
            _git(root, "worktree", "prune", check=False)
    return {"version": v.version, "name": v.name, "commit": commit,
            "dirty": run.data.tags.get("git.dirty") == "True", "registered": registered,
            "rebuilt": rebuilt, "identical": rebuilt == registered}

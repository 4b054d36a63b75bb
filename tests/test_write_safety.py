"""Every command against the same family of bad output paths: an input, another output,
a user's file or folder, a link to an input, a folder that cannot be written.

Each case asserts the refusal (a one-line message naming the path, exit status 2 on the
command line) and that no file in the project changed, byte for byte. The stage bodies are
driven for every output of every stage (the Python API); the commands themselves, as a user
runs them, for one case each."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.project import pipeline_paths
from flows.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
PATHS = pipeline_paths(ROOT / "dvc.yaml")


def tree(root: Path) -> dict[str, str]:
    """Every file (sha256), link (target) and folder under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel + "/"] = "folder"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with every pipeline output made once (tracking off)."""
    tmp = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["patches"].update(n_patches=400, heldout_fraction=0.25)
    params["train"].update(max_iter=5)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    old = os.environ.get("SAEFLOW_TRACKING")
    os.environ["SAEFLOW_TRACKING"] = "0"
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        for stage in STAGES:
            body = getattr(importlib.import_module(stage.module), stage.name)
            body(**{n: PATHS[n] for n in stage.path_args}, params_file="params.yaml")
    finally:
        os.chdir(cwd)
        if old is None:
            del os.environ["SAEFLOW_TRACKING"]
        else:
            os.environ["SAEFLOW_TRACKING"] = old
    return tmp


def _bad_paths(tmp: Path, stage, output: str) -> list[tuple[str, str]]:
    """(case, path for ``output``) for every bad kind of path, made under ``tmp``."""
    cases = [(f"same as input {name}", PATHS[name]) for name in stage.inputs]
    cases += [("same as input params", "params.yaml")]
    cases += [(f"same as output {name}", PATHS[name]) for name in stage.outputs
              if name != output][:2]
    user = tmp / "user"
    user.mkdir(exist_ok=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "folder").mkdir(exist_ok=True)
    (user / "folder" / "keep.txt").write_text("keep\n")
    (user / "config.json").write_text('{"name": "my settings", "accuracy": 1, "loss": 2}\n')
    cases += [("a user's file", "user/notes.txt"), ("a user's folder", "user/folder"),
              ("a user's JSON", "user/config.json"),
              ("inside a file", "user/notes.txt/x")]
    first_input = PATHS[stage.inputs[0]] if stage.inputs else "params.yaml"
    link = user / f"link-{output}"
    if not link.is_symlink():
        link.symlink_to(tmp / first_input)
    cases.append(("a link to an input", str(link.relative_to(tmp))))
    hard = user / f"hard-{output}"
    if not hard.exists():
        os.link(tmp / first_input if Path(tmp / first_input).is_file() else tmp / "params.yaml",
                hard)
    cases.append(("a hard link to an input", str(hard.relative_to(tmp))))
    return cases


CASES = [(stage, output) for stage in STAGES for output in stage.outputs]


@pytest.mark.parametrize(("stage", "output"), CASES,
                         ids=[f"{s.name}-{o}" for s, o in CASES])
def test_every_stage_output_refuses_every_bad_path(project, monkeypatch, stage, output):
    """For this output of this stage, each bad path is refused in one line naming it, and
    the project is left exactly as it was."""
    from sae_core.outputs import OutputError

    monkeypatch.chdir(project)
    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    body = getattr(importlib.import_module(stage.module), stage.name)
    for case, bad in _bad_paths(project, stage, output):
        before = tree(project)
        kwargs = {n: PATHS[n] for n in stage.path_args}
        kwargs[output] = bad
        with pytest.raises(OutputError) as info:
            body(**kwargs, params_file="params.yaml")
        message = str(info.value)
        assert "\n" not in message and bad in message, (case, message)
        assert "nothing was written" in message, (case, message)
        assert tree(project) == before, case


def test_a_link_to_saeflow_output_is_replaced_not_written_through(project, monkeypatch,
                                                                   tmp_path):
    """DVC's symlink cache: the link is replaced by the new file; its target (a cache
    entry) keeps its bytes."""
    from flows.train import train

    monkeypatch.chdir(project)
    monkeypatch.setenv("SAEFLOW_TRACKING", "0")
    cached = tmp_path / "cache-entry.json"
    shutil.copy(project / PATHS["train_metrics"], cached)
    original = cached.read_bytes()
    link = project / "user" / "linked-metrics.json"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(cached)
    train(PATHS["patches"], "user/model-for-link", str(link.relative_to(project)),
          "user/loss-for-link.csv", "user/dynamics-for-link.parquet")
    assert not link.is_symlink() and link.read_bytes() != b""
    assert cached.read_bytes() == original


def _cli(project: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    from support import BIN

    return subprocess.run([str(BIN / "saeflow"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def _read_only(path: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``path`` read-only: by its mode for a user, and for root (whom
    modes do not stop) through a read-only bind mount in a mount namespace of its own."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
        return argv
    import shlex

    q = shlex.quote(str(path))
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f"mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec "
            + " ".join(shlex.quote(a) for a in argv)]


COMMANDS = [
    ("ingest", ["ingest", "--images", "data/x.parquet", "--images-manifest", "data/x.parquet"],
     "output images_manifest is the same file as output images"),
    ("patches", ["patches", "--images", PATHS["images"], "--patches", PATHS["images"],
                 "--transform", "t.safetensors"], "output patches is the same file as input"),
    ("stage ingest", ["stage", "ingest", "--images", "user/notes.txt", "--images-manifest",
                      "m.json"], "exists and is not a saeflow dataset"),
    ("stage patches", ["stage", "patches", "--images", PATHS["images"], "--patches",
                       "user/folder", "--transform", "t.safetensors"], "is a folder"),
    ("stage train", ["stage", "train", "--patches", PATHS["patches"], "--model", "user",
                     "--train-metrics", "m.json", "--loss-csv", "l.csv", "--dynamics",
                     "d.parquet"],
     "exists and is not a saeflow model folder"),
    ("stage evaluate", ["stage", "evaluate", "--model", PATHS["model"], "--patches",
                        PATHS["patches"], "--dynamics", PATHS["dynamics"],
                        "--sparsity-metrics", "a.json", "--units",
                        "u.parquet", "--filters-png", "f.png", "--rho-hat-png", "f.png",
                        "--rho-hat-csv", "r.csv", "--loss-png", "l.png",
                        "--reconstructions-png", "rc.png", "--dynamics-png", "dy.png"],
     "output rho_hat_png is the same file as output filters_png"),
    ("stage score", ["stage", "score", "--model", PATHS["model"], "--labeled",
                     PATHS["labeled"], "--transform", PATHS["transform"], "--patches",
                     PATHS["patches"], "--score-metrics", "user/config.json"],
     "exists and is not saeflow score metrics"),
    ("exercise", ["exercise", "--out", "user/exercise", "--iterations", "2"],
     "exists and is not a saeflow model folder"),
    ("report", ["report", "--out", "README.md"], "not an HTML report written by saeflow"),
]


@pytest.mark.parametrize(("name", "argv", "expected"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_refuses_in_one_line(project, prefect_server, name, argv, expected):
    """Each command, run as a user runs it: exit 2, one line on stderr naming the problem,
    no traceback, and every file as it was."""
    from support import clean_env

    (project / "user").mkdir(exist_ok=True)
    (project / "user" / "notes.txt").write_text("my notes\n")
    (project / "user" / "folder").mkdir(exist_ok=True)
    (project / "user" / "folder" / "keep.txt").write_text("keep\n")
    (project / "user" / "config.json").write_text('{"name": "my settings"}\n')
    (project / "user" / "exercise" / "model").mkdir(parents=True, exist_ok=True)
    (project / "user" / "exercise" / "model" / "keep.txt").write_text("keep\n")
    (project / "README.md").write_text("# my project\n")
    env = clean_env(SAEFLOW_TRACKING="0", **prefect_server)
    before = tree(project)
    done = _cli(project, env, *argv)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("saeflow: error: "), done.stderr
    assert expected in lines[0], lines[0]
    assert tree(project) == before


@pytest.mark.parametrize("command", ["stage train", "exercise"])
def test_an_output_in_a_read_only_folder_is_refused_before_the_work(project, prefect_server,
                                                                    command):
    from support import clean_env

    locked = project / "locked"
    locked.mkdir(exist_ok=True)
    argv = {"stage train": ["stage", "train", "--patches", str(project / PATHS["patches"]),
                            "--model", str(locked / "m"), "--train-metrics", "m.json",
                            "--loss-csv", "l.csv", "--dynamics", "d.parquet"],
            "exercise": ["exercise", "--out", str(locked / "ex"), "--iterations", "2"]}[command]
    from support import BIN

    env = clean_env(SAEFLOW_TRACKING="0", **prefect_server)
    before = tree(project)
    try:
        done = subprocess.run(_read_only(locked, [str(BIN / "saeflow"), *argv]), cwd=project,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2, done.stderr
    why = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert done.stderr.strip().splitlines() == [
        f"saeflow: error: {locked / ('m' if command == 'stage train' else 'ex/model')}: cannot "
        f"write in {locked} ({why}); nothing was written"]
    assert "iteration" not in done.stderr  # refused before the fit
    assert tree(project) == before


def test_disk_full_names_the_output_and_leaves_nothing(project, prefect_server, tmp_path):
    """A write that fails (here: the file-size limit, as a full disk would) names the file,
    not a temporary one, and leaves neither a partial file nor a temporary one."""
    import resource
    import signal

    from support import clean_env

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    shutil.copy(project / "params.yaml", tmp_path / "params.yaml")
    env = clean_env(SAEFLOW_TRACKING="0", **prefect_server)
    done = _cli(tmp_path, env, "ingest", "--images", "out/images.parquet", "--images-manifest",
                "out/images.json", preexec_fn=limit)
    assert done.returncode == 2
    assert done.stderr.strip() == ("saeflow: error: out/images.parquet: cannot write (File too "
                                   "large); the previous version, if any, is unchanged")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_read_only_store_is_read_by_audit_and_report_and_refused_by_train(
        project, prefect_server, tmp_path, monkeypatch):
    """audit and report open the store read-only and take no lock; a stage, which must
    record its run, is refused before it writes anything."""
    from support import BIN, clean_env

    from flows.evaluate import evaluate
    from flows.train import train

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SAEFLOW_TRACKING", raising=False)
    out = tmp_path / "outputs"
    train(PATHS["patches"], str(out / "model"), str(out / "t.json"), str(out / "l.csv"),
          str(out / "d.parquet"))
    evaluate(str(out / "model"), PATHS["patches"], str(out / "d.parquet"), str(out / "s.json"),
             str(out / "u.parquet"), str(out / "f.png"), str(out / "h.png"), str(out / "r.csv"),
             str(out / "l.png"), str(out / "rc.png"), str(out / "dy.png"))
    (store / "mlflow.db.lock").unlink()
    env = clean_env(MLFLOW_TRACKING_URI=uri, **prefect_server)
    before = tree(store)

    def saeflow(*argv):
        return subprocess.run(_read_only(store, [str(BIN / "saeflow"), *argv]), cwd=project,
                              env=env, capture_output=True, text=True, timeout=300)

    try:
        audit = saeflow("audit", "--format", "csv")
        report = saeflow("report", "--out", str(tmp_path / "report.html"))
        stage = saeflow("stage", "train", "--patches", PATHS["patches"], "--model",
                        str(tmp_path / "m"), "--train-metrics", str(tmp_path / "t.json"),
                        "--loss-csv", str(tmp_path / "l.csv"), "--dynamics",
                        str(tmp_path / "d.parquet"))
    finally:
        store.chmod(0o755)
    assert audit.returncode == 0 and audit.stderr == "", audit.stderr
    assert len(audit.stdout.splitlines()) == 2  # the header and version 1
    assert report.returncode == 0, report.stderr
    assert report.stderr.strip() == (f"report: not logged to MLflow ({store / 'mlflow.db'} is "
                                     "read-only)")
    assert "saeflow" in (tmp_path / "report.html").read_text()
    assert stage.returncode == 2
    assert stage.stderr.strip() == (f"saeflow: error: MLflow store {uri}: {store / 'mlflow.db'} "
                                    "is read-only; the stages record their runs there "
                                    "(SAEFLOW_TRACKING=0 runs them without)")
    assert not (tmp_path / "m").exists() and not (tmp_path / "t.json").exists()
    assert tree(store) == before  # no lock file, no journal, not a byte changed


def test_ingest_never_writes_into_a_folder_it_reads(tmp_path, monkeypatch):
    """An image folder named in params.yaml is an input: an output inside it is refused
    (the next ingest would read it, and DVC would see its input change)."""
    from PIL import Image

    from flows.ingest import ingest
    from sae_core.outputs import OutputError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "imgs" / "a" / "x.png")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"ingest": {"sources": [{"type": "image_folder", "path": "imgs"}]}}))
    before = tree(tmp_path)
    with pytest.raises(OutputError) as info:
        ingest("imgs/images.parquet", "images.json")
    assert str(info.value) == ("imgs/images.parquet: output images is inside input "
                               "ingest.sources[0] (" + str(tmp_path / "imgs") + "); nothing "
                               "was written")
    assert tree(tmp_path) == before

"""What DVC knows about the pipeline: which stages are stale, recording the stages that ran
in dvc.lock, and getting a data file back by its md5 (from the cache or the remote).

The Prefect flows run the stages themselves, in one process; DVC decides what is stale (as
``dvc status`` does) and records what ran (as ``dvc commit STAGE`` does), through its Python
API, so a stage that did not run is neither checked twice nor re-recorded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _repo(root: str | os.PathLike):
    import logging

    from dvc.repo import Repo

    # DVC announces each dvc.lock update at INFO; the flow prints what it recorded
    logging.getLogger("dvc").setLevel(logging.WARNING)

    if not (Path(root) / ".dvc").is_dir():
        raise ValueError(f"{root}: not a DVC project (no .dvc folder; run `dvc init`)")
    return Repo(str(root))


def is_stale(root: str | os.PathLike, stage: str) -> bool:
    """Whether ``dvc status`` would list the stage: its command, params, dependencies or
    outputs differ from what dvc.lock records (or it has no dvc.lock entry)."""
    with _repo(root) as repo, repo.lock:
        (found,) = repo.stage.collect(stage)
        return bool(found.changed())


def commit_stages(root: str | os.PathLike, stages: list[str]) -> None:
    """``dvc commit --force STAGE...``: record these stages' dependencies and outputs in
    dvc.lock and their outputs in the cache; every other stage's entry is left as it is."""
    if not stages:
        return
    with _repo(root) as repo:
        for stage in stages:
            repo.commit(stage, force=True)


def fetch_object(root: str | os.PathLike, md5: str, dest: str | os.PathLike,
                 what: str, remote: str | None = None) -> Path:
    """Copy the file DVC stores under ``md5`` to ``dest``: from the project's cache, else
    from ``remote`` (a remote's name; None: the default remote). Not found anywhere is a
    one-line ValueError naming ``what`` (e.g. ``data/patches.arrow``) and the md5."""
    from dvc.config import NoRemoteError, RemoteNotFoundError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _repo(root) as repo:
        cached = Path(repo.cache.local.oid_to_path(md5))
        if cached.is_file():
            shutil.copyfile(cached, dest)
            return dest
        try:
            odb = repo.cloud.get_remote_odb(remote if remote not in (None, "none") else None)
        except (NoRemoteError, RemoteNotFoundError):
            raise ValueError(f"{what}: md5 {md5} is not in the DVC cache, and the project has "
                             f"no DVC remote {remote or ''} to fetch it from".replace("  ", " ")
                             ) from None
        path = odb.oid_to_path(md5)
        if not odb.fs.exists(path):
            raise ValueError(f"{what}: md5 {md5} is neither in the DVC cache nor on the remote "
                             f"{odb.fs.unstrip_protocol(odb.path)}")
        odb.fs.get_file(path, str(dest))
    return dest

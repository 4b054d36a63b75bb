"""What a teammate needs to get a model's exact data back: the DVC md5 of every data file
upstream of the model, and the DVC remote that holds them.

Each file is the object ``files/md5/<md5[:2]>/<md5[2:]>`` of the remote, whatever commit
the project is at (the dvc.lock that names them is committed after the run).
"""

from __future__ import annotations

import os
from pathlib import Path


def md5_file(path: str | os.PathLike) -> str:
    """The md5 DVC 3 records for a file (the md5 of its bytes)."""
    from sae_core.io import file_digest

    return file_digest(path, "md5")


def input_hashes(paths: list[str | os.PathLike]) -> dict[str, str]:
    """Tags ``dvc.md5:<path>`` for each input file (every file inside an input folder)."""
    tags: dict[str, str] = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            tags[f"dvc.md5:{f.as_posix()}"] = md5_file(f)
    return tags


def default_remote(root: str | os.PathLike) -> tuple[str, str] | None:
    """(name, url) of the project's default DVC remote (every config level merged, as DVC
    reads it), or None when there is none; an unreadable config is a ValueError."""
    dvc_dir = Path(root) / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config, ConfigError

    try:
        # unvalidated: DVC's schema takes 0.3 s to build, and `dvc` itself validates the
        # same files whenever it runs
        conf = Config(dvc_dir=str(dvc_dir), validate=False)
    except ConfigError as exc:
        raise ValueError(f"{dvc_dir / 'config'}: {' '.join(str(exc).split())}") from None
    name = conf["core"].get("remote")
    if not name:
        return None
    remote = conf["remote"].get(name)
    if remote is None:
        raise ValueError(f"{dvc_dir / 'config'}: the default remote {name!r} is not defined")
    if "url" not in remote:
        raise ValueError(f"{dvc_dir / 'config'}: the default remote {name!r} has no url")
    return name, str(remote["url"])


def lineage_tags(root: str | os.PathLike, inputs: list[str | os.PathLike]) -> dict[str, str]:
    """``dvc.md5:<path>`` of each input and ``dvc.remote`` / ``dvc.remote_url`` of the
    default remote (``none`` when the project has none: the data is then only in this
    machine's DVC cache)."""
    tags = input_hashes(inputs)
    remote = default_remote(root)
    tags["dvc.remote"] = remote[0] if remote else "none"
    if remote:
        tags["dvc.remote_url"] = remote[1]
    return tags

"""Safe extraction of .zip, .tar, .tar.gz/.tgz (and .tar.bz2/.tar.xz) archives.

Every member is checked before anything is written. Refused (``ValueError`` naming the
archive and the member): an absolute path (``/x``, ``C:x``, ``\\x``), a ``..`` component,
a backslash in the name (not a portable relative path), a symbolic or hard link, a
device, fifo or socket, and any other member that is neither a regular file nor a folder.
Files are written by copying their bytes: no owners, permissions or times are applied.

Size: an archive may declare at most :data:`MAX_ARCHIVE_BYTES` (32 GiB) in at most
:data:`MAX_ARCHIVE_MEMBERS` (1,000,000) members, and no more than the free space where it is
extracted; each member is copied up to its declared size and no further. So a small
archive that would expand to terabytes (a "zip bomb") is refused before anything is
written, from its own index.
Extraction goes into a temporary folder beside the target, renamed onto it only when
every member was written, so a refused or corrupt archive leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from sae_core.io import UMASK, one_line

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (".zip", *_TAR_SUFFIXES)
"""File name endings :func:`extract_archive` reads."""
MAX_ARCHIVE_BYTES = 32 * 2**30
"""The most an archive's members may add up to, as its index declares them."""
MAX_ARCHIVE_MEMBERS = 1_000_000
"""The most members an archive may hold."""


class _Refused(ValueError):
    """A member that fails the checks (kept apart from ValueErrors of a corrupt archive)."""



def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The member's relative path components ('.' dropped), or ValueError."""
    if "\\" in name or "\x00" in name:
        raise _Refused(f"{archive}: member {name!r} refused (not a portable relative path)")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        raise _Refused(f"{archive}: member {name!r} refused (absolute path)")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise _Refused(f"{archive}: member {name!r} refused ('..' in its path)")
    return parts


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[tuple[tuple[str, ...], object]]:
    members = []
    for m in tf.getmembers():
        parts = _safe_parts(archive, m.name)
        if m.issym() or m.islnk():
            kind = "symbolic link" if m.issym() else "hard link"
            raise _Refused(f"{archive}: member {m.name!r} refused ({kind} to {m.linkname!r})")
        if m.ischr() or m.isblk() or m.isfifo():
            raise _Refused(f"{archive}: member {m.name!r} refused (device or fifo)")
        if not (m.isfile() or m.isdir()):
            raise _Refused(f"{archive}: member {m.name!r} refused (not a file or folder)")
        members.append((parts, m))
    return members


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[tuple[tuple[str, ...], object]]:
    members = []
    for info in zf.infolist():
        parts = _safe_parts(archive, info.filename)
        mode = info.external_attr >> 16  # unix st_mode, 0 when written elsewhere
        if stat.S_ISLNK(mode):
            raise _Refused(f"{archive}: member {info.filename!r} refused (symbolic link)")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _Refused(f"{archive}: member {info.filename!r} refused (device or fifo)")
        members.append((parts, info))
    return members


def _check_sizes(archive: Path, sizes: list[int], target: Path) -> None:
    """The declared member sizes against the caps and the free disk space."""
    if len(sizes) > MAX_ARCHIVE_MEMBERS:
        raise _Refused(f"{archive}: {len(sizes)} members, over the limit of "
                       f"{MAX_ARCHIVE_MEMBERS}")
    total = sum(sizes)
    if total > MAX_ARCHIVE_BYTES:
        raise _Refused(f"{archive}: members declare {total:,} bytes, over the limit of "
                       f"{MAX_ARCHIVE_BYTES:,} bytes")
    folder = target
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if total > free:
        raise _Refused(f"{archive}: members declare {total:,} bytes, more than the {free:,} "
                       f"bytes free in {folder}")


def _write_members(archive: Path, dest: Path, members, is_dir, size, open_member) -> None:
    for parts, member in members:
        if not parts:  # the archive's root folder ("./")
            continue
        out = dest.joinpath(*parts)
        if is_dir(member):
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        declared, written = size(member), 0
        with open_member(member) as src, open(out, "wb") as dst:
            # never more than the index declared, whatever the stream would give
            while block := src.read(min(1 << 20, declared - written + 1)):
                written += len(block)
                if written > declared:
                    raise _Refused(f"{archive}: member {'/'.join(parts)!r} is longer than the "
                                   f"{declared} bytes its index declares")
                dst.write(block)


def extract_archive(path: str | os.PathLike, target_dir: str | os.PathLike) -> Path:
    """Extract the archive at ``path`` into the folder ``target_dir``; returns it.

    The type comes from the name: .zip, .tar, .tar.gz/.tgz (.tar.bz2, .tar.xz too).
    ``target_dir`` must not exist, or be an empty folder. Errors are one-line
    ``ValueError``: missing file, unknown type, corrupt archive (naming the file), a
    refused member (naming the archive and the member; see the module docstring).
    """
    archive = Path(path)
    target = Path(target_dir)
    if not archive.is_file():
        raise ValueError(f"{archive}: file not found")
    name = archive.name.lower()
    if name.endswith(".zip"):
        kind = "zip"
    elif name.endswith(_TAR_SUFFIXES):
        kind = "tar"
    else:
        raise ValueError(f"{archive}: not a supported archive (.zip, .tar, .tar.gz, .tgz)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target}: already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        try:
            if kind == "zip":
                with zipfile.ZipFile(archive) as zf:
                    members = _zip_members(archive, zf)
                    _check_sizes(archive, [i.file_size for _, i in members], target)
                    _write_members(archive, tmp, members, lambda i: i.is_dir(),
                                   lambda i: i.file_size, zf.open)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    members = _tar_members(archive, tf)
                    _check_sizes(archive, [m.size for _, m in members], target)
                    _write_members(archive, tmp, members, lambda m: m.isdir(),
                                   lambda m: m.size, tf.extractfile)
        except _Refused:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
                ValueError, RuntimeError, NotImplementedError) as exc:  # fmt: skip
            # RuntimeError: encrypted zip member; NotImplementedError: unknown compression.
            detail = one_line(exc)
            raise ValueError(f"{archive}: corrupt or unreadable archive ({detail})") from None
        if target.exists():
            target.rmdir()  # empty (checked above); os.replace needs it gone on every OS
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target

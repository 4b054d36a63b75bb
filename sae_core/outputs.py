"""What a writer may replace, and what a command checks before it writes anything.

Every file or folder saeflow writes has a kind (:class:`OutputKind`): a saeflow dataset, a
patch store, a model folder, a stage's metrics, a PNG that saeflow drew, ... A writer
replaces an existing path only when it holds that kind of output. Anything else (a user's
notes, photo, config or folder) is refused with a one-line :class:`OutputError` and left
untouched. Every write goes through :func:`sae_core.io.atomic_path`, which makes this
check, so no writer can skip it.

:func:`check_paths` is what a command runs first, before any work:

- every input exists and is readable;
- every output is absent or of its kind, and its folder can be written;
- no output is an input, another output, or inside a folder that is one (compared after
  resolving symbolic links, and by inode, which catches hard links and bind mounts).

A symbolic link at an output path is replaced by the new output. What it points to is never
written through: it may be a user's file, or an entry of DVC's cache.

Standard library only; recognisers import pyarrow, safetensors or Pillow when they run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PNG_SOFTWARE = "saeflow"
"""The PNG ``Software`` text that marks a picture saeflow drew (see :mod:`sae_core.plots`)."""
HTML_GENERATOR = '<meta name="generator" content="saeflow">'
"""The line that marks an HTML page saeflow wrote (see :mod:`sae_core.report`)."""


class OutputError(ValueError):
    """An output path that must not be written; the message names it and why."""


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: ``what`` it is, in words ("a saeflow dataset (Parquet)"), and
    ``test(path) -> bool``, true when an existing path holds that kind (reading as little
    as it can); ``folder`` for kinds that are folders."""

    what: str
    test: Callable[[Path], bool]
    folder: bool = False

    def recognises(self, path: Path) -> bool:
        try:
            return bool(self.test(path))
        except Exception:  # a file that cannot be parsed is simply not of this kind
            return False


def json_with_keys(what: str, *keys: str) -> OutputKind:
    """A JSON object holding every one of ``keys`` (a stage's metrics, a manifest)."""

    def test(p: Path) -> bool:
        obj = json.loads(p.read_text())
        return isinstance(obj, dict) and all(k in obj for k in keys)

    return OutputKind(what, test)


def csv_with_header(what: str, header: str) -> OutputKind:
    """A text file whose first line starts with ``header``."""

    def test(p: Path) -> bool:
        with open(p, "rb") as fh:
            return fh.readline(4096).decode("ascii").startswith(header)

    return OutputKind(what, test)


def parquet_with_metadata(what: str, key: bytes) -> OutputKind:
    """A Parquet file whose schema metadata has ``key`` (read from its footer only)."""

    def test(p: Path) -> bool:
        import pyarrow.parquet as pq

        return key in (pq.read_schema(p).metadata or {})

    return OutputKind(what, test)


def arrow_with_metadata(what: str, key: bytes) -> OutputKind:
    """An Arrow IPC file whose schema metadata has ``key`` (read from its footer only)."""

    def test(p: Path) -> bool:
        import pyarrow as pa

        with pa.memory_map(str(p)) as source:
            return key in (pa.ipc.open_file(source).schema.metadata or {})

    return OutputKind(what, test)


def safetensors_with(what: str, accepts: Callable[[dict], bool]) -> OutputKind:
    """A safetensors file whose saeflow JSON metadata (header only) ``accepts``."""

    def test(p: Path) -> bool:
        from safetensors import safe_open

        with safe_open(str(p), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})["saeflow"])
        return isinstance(meta, dict) and accepts(meta)

    return OutputKind(what, test)


def _png_drawn_by_saeflow(p: Path) -> bool:
    from PIL import Image

    with Image.open(p) as im:  # parses the chunks before the pixels only
        return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE


def _html_written_by_saeflow(p: Path) -> bool:
    with open(p, "rb") as fh:
        return HTML_GENERATOR.encode() in fh.read(4096)


PNG = OutputKind("a PNG picture drawn by saeflow", _png_drawn_by_saeflow)
HTML = OutputKind("an HTML report written by saeflow", _html_written_by_saeflow)


# --------------------------------------------------------------------------- checks
def _shown(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return ""
    if not names:
        return " (it is empty but not one)"
    return " (it holds " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") + ")"


def _writable_folder(path: Path) -> None:
    """The folder ``path`` goes into exists or can be made, and can be written."""
    folder = path.parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write ({folder} is a file, not a folder); nothing "
                          "was written")
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else \
            "permission denied"
        raise OutputError(f"{path}: cannot write in {folder} ({why}); nothing was written")


def check_target(path: str | os.PathLike, kind: OutputKind) -> None:
    """``path`` may receive a new output of ``kind``: absent, or already that kind, in a
    folder that can be written. :class:`OutputError` otherwise; nothing is touched."""
    p = Path(path)
    existing: Path | None = None
    if p.is_symlink():
        existing = p.resolve()
        if not existing.exists():
            raise OutputError(f"{p}: is a symbolic link to a missing path "
                              f"({os.readlink(p)}); nothing was written")
    elif p.exists():
        existing = p
    if existing is not None:
        if existing.is_dir() and not kind.folder:
            raise OutputError(f"{p}: is a folder, not {kind.what}; nothing was written")
        if kind.folder and not existing.is_dir():
            raise OutputError(f"{p}: exists and is a file, not {kind.what}; nothing was written")
        if not kind.recognises(existing):
            held = _shown(existing) if existing.is_dir() else ""
            raise OutputError(f"{p}: exists and is not {kind.what}{held}; nothing was written "
                              "(move it away, or choose another path)")
    _writable_folder(p)


def _identity(p: Path) -> tuple[str, tuple[int, int] | None]:
    """(the path with every symbolic link resolved, (device, inode) if it exists)."""
    real = os.path.realpath(p)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_paths(inputs: Mapping[str, str | os.PathLike | None],
                outputs: Mapping[str, tuple[str | os.PathLike | None, OutputKind]]) -> None:
    """Check a command's paths before it does any work (see the module docstring).

    ``inputs``: {name: path} of what it reads; ``outputs``: {name: (path, kind)} of what it
    writes (a None path is not used). The names appear in the messages. The first problem
    is an :class:`OutputError` (a ValueError) in one line; nothing is written.
    """
    ins = {name: Path(p) for name, p in inputs.items() if p is not None}
    outs = {name: (Path(p), kind) for name, (p, kind) in outputs.items() if p is not None}
    for name, p in ins.items():
        if not os.path.exists(p):
            raise OutputError(f"{p}: {name}: file not found; nothing was written")
        if not os.access(p, os.R_OK):
            raise OutputError(f"{p}: {name}: cannot read (permission denied); nothing was "
                              "written")
    seen: list[tuple[str, Path, str, tuple[int, int] | None, bool]] = [
        (name, p, *_identity(p), p.is_dir()) for name, p in ins.items()]
    for name, (p, kind) in outs.items():
        real, ident = _identity(p)
        for other, q, q_real, q_ident, q_dir in seen:
            role = "input" if other in ins else "output"
            if real == q_real or (ident is not None and ident == q_ident):
                raise OutputError(f"{p}: output {name} is the same file as {role} {other} "
                                  f"({q}); nothing was written")
            if (q_dir or role == "output") and _inside(real, q_real):
                raise OutputError(f"{p}: output {name} is inside {role} {other} ({q}); "
                                  "nothing was written")
            if kind.folder and _inside(q_real, real):
                raise OutputError(f"{p}: output {name} would hold {role} {other} ({q}); "
                                  "nothing was written")
        seen.append((name, p, real, ident, kind.folder))
    for p, kind in outs.values():
        check_target(p, kind)

"""Files: atomic writes, model files (safetensors + JSON config) and training checkpoints.

Nothing here unpickles: weights are safetensors, settings and counters are JSON. Every
write goes to a temporary file in the target's folder and is renamed into place, so a
crash never leaves a half-written file behind (that DVC would then cache); and every write
names the kind of output it makes, so an existing path of another kind (a user's file) is
refused, never replaced (:mod:`sae_core.outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.outputs import OutputKind, check_target

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
FORMAT_VERSION = 1


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process umask, read once at import (reading it means setting it)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


class FileFormatError(ValueError):
    """A file that is missing, corrupt or not what it claims to be; the message names it."""


class WriteError(OSError):
    """Writing an output failed (disk full, file too large, I/O error); the message names
    the output, not the temporary file beside it."""

    def __str__(self) -> str:
        return self.args[0]


@contextmanager
def atomic_path(path: str | os.PathLike, kind: OutputKind) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    ``path`` must be absent or hold ``kind`` already (:func:`sae_core.outputs.check_target`;
    an :class:`~sae_core.outputs.OutputError` otherwise, before anything is written). A
    failed write is a :class:`WriteError` naming ``path``; the old file is then kept.
    """
    target = Path(path)
    check_target(target, kind)
    tmp_path = None
    try:
        with _naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                       dir=target.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            yield tmp_path
            # mkstemp makes 0600 (and some writers replace the file): the usual mode
            os.chmod(tmp_path, 0o666 & ~UMASK)
            os.replace(tmp_path, target)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """An OSError while writing ``target`` becomes a :class:`WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(f"{target}: cannot write ({_reason(exc)}); the previous version, "
                         "if any, is unchanged") from None


def _reason(exc: BaseException) -> str:
    """An OSError's cause by its errno ("No space left on device"), without the temporary
    file's name or a library's wording around it; else the message."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return one_line(exc)


def write_json(path: str | os.PathLike, obj: Any, kind: OutputKind) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for DVC), atomically, at a
    path that is absent or holds ``kind``."""
    with atomic_path(path, kind) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file is a :class:`FileFormatError`."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{p}: not valid JSON ({exc})") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict,
                 kind: OutputKind) -> None:
    """Arrays to a safetensors file with ``meta`` as JSON in its header, atomically, at a
    path that is absent or holds ``kind``."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(path, kind) as tmp:
        save_file(arrays, str(tmp), metadata={"saeflow": json.dumps(meta, sort_keys=True)})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_tensors`: (arrays, meta). Never unpickles."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{p}: file not found")
    try:
        with safe_open(str(p), framework="numpy") as fh:
            raw_meta = (fh.metadata() or {}).get("saeflow")
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{p}: not a readable safetensors file ({exc})") from None
    if raw_meta is None:
        raise FileFormatError(f"{p}: safetensors file without saeflow metadata")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{p}: corrupt saeflow metadata ({exc})") from None
    return arrays, meta


def write_tagged_parquet(path: str | os.PathLike, table: Any, kind: OutputKind, *,
                         use_dictionary: bool, row_group_size: int | None = None) -> None:
    """Write a pyarrow table (its schema carrying saeflow's JSON metadata) as Parquet,
    atomically, with fixed settings and no timestamps: the bytes are a function of the
    table (for a given pyarrow version). Read back with :func:`read_tagged_parquet`."""
    import pyarrow.parquet as pq

    with atomic_path(path, kind) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=3,
                       use_dictionary=use_dictionary, write_statistics=False,
                       row_group_size=row_group_size, version="2.6", data_page_version="1.0",
                       store_schema=True)


def read_tagged_parquet(path: str | os.PathLike, meta_key: bytes, schema: Any,
                        format_version: int, what: str) -> tuple[Any, dict]:
    """Read a Parquet file that saeflow wrote with ``schema`` and JSON metadata under
    ``meta_key`` (holding ``format_version``): (pyarrow table, metadata). A missing file,
    another Parquet file or a corrupt one is a one-line ValueError naming the file and
    ``what`` it should have been."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file not found")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{p}: cannot read Parquet ({detail})") from None
    raw = (table.schema.metadata or {}).get(meta_key)
    if raw is None or not table.schema.remove_metadata().equals(schema):
        raise ValueError(f"{p}: not {what} (schema or metadata differs)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{p}: not {what} (corrupt metadata)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != format_version:
        raise ValueError(f"{p}: not {what} (format_version)")
    return table, meta


def _is_model_folder(d: Path) -> bool:
    """Empty, or nothing but the two model files with a config.json of this format."""
    names = {p.name for p in d.iterdir()}
    if not names:
        return True
    if not names <= {MODEL_WEIGHTS, MODEL_CONFIG}:
        return False
    config = json.loads((d / MODEL_CONFIG).read_text())
    return isinstance(config, dict) and config.get("format_version") == FORMAT_VERSION


MODEL = OutputKind("a saeflow model folder",
                   _is_model_folder, folder=True)
_WEIGHTS = OutputKind("model weights", lambda p: False)  # only ever written into a new folder
_CONFIG = OutputKind("a model config", lambda p: False)


def save_model(directory: str | os.PathLike, arrays: dict[str, np.ndarray], config: dict) -> None:
    """A model folder: ``model.safetensors`` (weights) and ``config.json`` (settings, shapes,
    and the sha256 of the weights file, so a mismatched pair is detected on load). An
    existing path is replaced only if it is a saeflow model folder (:data:`MODEL`)."""
    d = Path(directory)
    check_target(d, MODEL)
    with _naming(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        # both files go into a fresh folder that replaces the old one only when complete
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=d.parent))
    try:
        save_tensors(tmp / MODEL_WEIGHTS, arrays, {"format_version": FORMAT_VERSION}, _WEIGHTS)
        write_json(
            tmp / MODEL_CONFIG,
            {
                "format_version": FORMAT_VERSION,
                "weights_sha256": sha256_file(tmp / MODEL_WEIGHTS),
                "shapes": {k: list(np.shape(v)) for k, v in arrays.items()},
                **config,
            },
            _CONFIG,
        )
        with _naming(d):
            os.chmod(tmp, 0o777 & ~UMASK)
            old = None
            if os.path.lexists(d):
                old = d.parent / f".{d.name}.old-{os.getpid()}"
                os.replace(d, old)
            os.replace(tmp, d)
        if old is not None and old.is_symlink():
            old.unlink()  # a link is replaced; the folder it pointed to is left as it was
        elif old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_model(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a model folder written by :func:`save_model`: (arrays, config), all checked."""
    d = Path(directory)
    if not d.is_dir():
        raise FileFormatError(f"{d}: model folder not found")
    config = read_json(d / MODEL_CONFIG)
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(f"{d / MODEL_CONFIG}: not a saeflow model config (format_version)")
    weights = d / MODEL_WEIGHTS
    if not weights.is_file():
        raise FileFormatError(f"{weights}: file not found")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise FileFormatError(f"{weights}: sha256 differs from the one in {MODEL_CONFIG}")
    arrays, _ = load_tensors(weights)
    for name, shape in config.get("shapes", {}).items():
        if name not in arrays or list(arrays[name].shape) != shape:
            raise FileFormatError(f"{weights}: tensor {name!r} missing or not of shape {shape}")
        if not np.isfinite(arrays[name]).all():
            raise FileFormatError(f"{weights}: tensor {name!r} contains NaN or Inf")
    return arrays, config

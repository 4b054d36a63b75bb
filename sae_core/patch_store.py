"""The patch store: training and held-out patches in one Arrow IPC file, memory-mapped.

Layout (Arrow IPC *file* format, uncompressed, so it can be memory-mapped):

* one column ``patch`` of type ``fixed_size_list<float32>[d]`` (d = p*p or p*p*C);
* two record batches: the training rows, then the held-out rows (either may be empty), so
  each split is one contiguous run of float32 values in the file;
* schema metadata, key ``saeflow``: JSON (sorted keys) with ``format``,
  ``format_version``, ``config`` (the PatchConfig as a dict), ``n_train``, ``n_heldout``,
  ``n_features``, ``patch_shape``, ``source_sha256`` (given by the caller: the images the
  patches came from) and ``data_sha256`` (of the float32 bytes, train then held-out).

Writing is atomic (temporary file, then rename) and deterministic: the same arrays and
metadata give the same bytes. Reading maps the file (private copy-on-write mapping) and
returns numpy views of the mapped values: nothing is copied or read until used.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.io import FileFormatError, atomic_path
from sae_core.outputs import arrow_with_metadata

STORE_FORMAT = "saeflow-patch-store"
STORE_VERSION = 1
METADATA_KEY = b"saeflow"
PATCH_STORE = arrow_with_metadata("a saeflow patch store (Arrow IPC)", METADATA_KEY)
COLUMN = "patch"
SPLITS = ("train", "heldout")
_CHECK_ROWS = 1 << 16


def _as_float32_patches(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d); got shape {arr.shape}")
    if arr.dtype != np.float32:
        raise ValueError(f"{name} must be float32; got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    for a in range(0, arr.shape[0], _CHECK_ROWS):
        if not np.isfinite(arr[a : a + _CHECK_ROWS]).all():
            raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _patch_shape(config: dict, d: int) -> list[int]:
    p = config.get("patch_size")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"config_dict needs an integer patch_size >= 1; got {p!r}")
    if d % (p * p):
        raise ValueError(f"patches of {d} values are not {p}x{p} patches (of any channels)")
    channels = d // (p * p)
    return [p, p] if channels == 1 else [p, p, channels]


def _data_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        if arr.size:
            h.update(memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B"))
    return h.hexdigest()


def write_patch_store(
    path: str | os.PathLike,
    train: np.ndarray,
    heldout: np.ndarray,
    config_dict: dict,
    source_sha256: str,
    *,
    patch_shape: tuple[int, ...] | None = None,
) -> None:
    """Write train (n1, d) and held-out (n2, d) float32 patches to ``path``, atomically.

    ``config_dict``: the PatchConfig as a dict (JSON-able; must hold ``patch_size``);
    ``source_sha256``: 64 hex digits identifying the source images; ``patch_shape``
    defaults to (p, p) or (p, p, C) from ``patch_size`` and d.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    train = _as_float32_patches(train, "train")
    heldout = _as_float32_patches(heldout, "heldout")
    d = train.shape[1]
    if heldout.shape[1] != d:
        raise ValueError(f"train has {d} values per patch, heldout {heldout.shape[1]}")
    if d < 1:
        raise ValueError("patches must have at least one value")
    if not isinstance(config_dict, dict):
        raise ValueError(f"config_dict must be a dict; got {type(config_dict).__name__}")
    if not isinstance(source_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", source_sha256):
        raise ValueError(f"source_sha256 must be 64 lowercase hex digits; got {source_sha256!r}")
    if patch_shape is None:
        shape = _patch_shape(config_dict, d)
    else:
        shape = [int(s) for s in patch_shape]
        if int(np.prod(shape)) != d:
            raise ValueError(f"patch_shape {tuple(shape)} does not hold {d} values")
    meta = {
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "config": config_dict,
        "n_train": int(train.shape[0]),
        "n_heldout": int(heldout.shape[0]),
        "n_features": int(d),
        "patch_shape": shape,
        "source_sha256": source_sha256,
        "data_sha256": _data_sha256(train, heldout),
    }
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config_dict is not plain JSON ({exc})") from None
    schema = pa.schema(
        [pa.field(COLUMN, pa.list_(pa.float32(), d), nullable=False)],
        metadata={METADATA_KEY: meta_json.encode()},
    )
    options = ipc.IpcWriteOptions(compression=None)
    with atomic_path(path, PATCH_STORE) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema, options=options) as w:
            for arr in (train, heldout):
                column = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), d)
                w.write_batch(pa.record_batch([column], schema=schema))


@dataclass(frozen=True, eq=False)
class PatchStore:
    """A read patch store. ``train`` and ``heldout`` are read-only float32 (n, d) numpy
    views of the memory-mapped file (zero-copy); ``metadata`` is the file's JSON."""

    path: Path
    train: np.ndarray
    heldout: np.ndarray
    metadata: dict
    buffer: Any
    """The mapped file as a pyarrow Buffer (the arrays point into it)."""

    @property
    def config(self) -> dict:
        return self.metadata["config"]

    @property
    def n_train(self) -> int:
        return int(self.metadata["n_train"])

    @property
    def n_heldout(self) -> int:
        return int(self.metadata["n_heldout"])

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["patch_shape"])

    @property
    def source_sha256(self) -> str:
        return self.metadata["source_sha256"]

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return self.train if name == "train" else self.heldout

    def as_torch(self, split: str = "train"):
        """The split as a CPU torch tensor sharing the mapped memory (torch.from_numpy).

        The mapping is private (copy-on-write): writing into the tensor never changes the
        file, but it does change what this store's numpy array shows; clone() first to be
        safe."""
        import torch

        arr = self.split(split)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(arr)


def _fail(path: Path, why: str) -> FileFormatError:
    return FileFormatError(f"{path}: not a valid patch store ({why})")


def read_patch_store(path: str | os.PathLike, *, verify: bool = False) -> PatchStore:
    """Open a file written by :func:`write_patch_store` without copying its values.

    Checks the structure (Arrow file, schema, metadata, row counts); ``verify=True`` also
    recomputes the sha256 of the values (reads the whole file). Anything wrong is a
    ValueError (:class:`sae_core.io.FileFormatError`) naming the file.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{p}: file not found")
    try:
        with open(p, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = pa.py_buffer(mapped)
        reader = ipc.open_file(buf)
        schema = reader.schema
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise _fail(p, "no saeflow metadata")
        meta = json.loads(raw)
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("format_version")) != (
            STORE_FORMAT,
            STORE_VERSION,
        ):
            raise _fail(p, "format / format_version")
        d = meta["n_features"]
        n_train, n_heldout = meta["n_train"], meta["n_heldout"]
        if len(schema) != 1 or schema.field(0).name != COLUMN:
            raise _fail(p, f"need one column {COLUMN!r}; schema is {schema.names}")
        t = schema.field(0).type
        if not (
            pa.types.is_fixed_size_list(t) and t.value_type == pa.float32() and t.list_size == d
        ):
            raise _fail(p, f"column type {t}; need fixed_size_list<float32>[{d}]")
        if int(np.prod(meta["patch_shape"])) != d:
            raise _fail(p, f"patch_shape {meta['patch_shape']} does not hold {d} values")
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for b in batches:
            b.validate()
            if b.column(0).null_count:
                raise _fail(p, "null patches")
        total = sum(b.num_rows for b in batches)
        if total != n_train + n_heldout:
            raise _fail(p, f"{total} rows; metadata says {n_train} + {n_heldout}")
        train = _rows(batches, 0, n_train, d)
        heldout = _rows(batches, n_train, n_train + n_heldout, d)
    except FileFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(p, f"{type(exc).__name__}: {exc}") from None
    if verify and _data_sha256(train, heldout) != meta.get("data_sha256"):
        raise _fail(p, "the values' sha256 differs from the one in its metadata")
    return PatchStore(path=p, train=train, heldout=heldout, metadata=meta, buffer=buf)


def _rows(batches: list, start: int, stop: int, d: int) -> np.ndarray:
    """Rows [start, stop) of the column as an (n, d) float32 array: a zero-copy view when
    they lie in one record batch (always so for files written here), else a copy."""
    pieces = []
    offset = 0
    for b in batches:
        lo, hi = max(start, offset), min(stop, offset + b.num_rows)
        if lo < hi or (start == stop and offset <= start <= offset + b.num_rows):
            column = b.column(0).slice(lo - offset, hi - lo)
            values = column.flatten().to_numpy(zero_copy_only=True)
            pieces.append(values.reshape(hi - lo, d))
            if start == stop:
                break
        offset += b.num_rows
    if not pieces:
        return np.empty((0, d), dtype=np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

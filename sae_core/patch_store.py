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

import functools
import hashlib
import json
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sae_core.io import FileFormatError, atomic_path
from sae_core.outputs import arrow_with_metadata

if TYPE_CHECKING:
    from sae_core.rows import RowSource

STORE_FORMAT = "saeflow-patch-store"
STORE_VERSION = 1
METADATA_KEY = b"saeflow"
PATCH_STORE = arrow_with_metadata("a saeflow patch store (Arrow IPC)", METADATA_KEY)
COLUMN = "patch"
SPLITS = ("train", "heldout")
_CHECK_ROWS = 1 << 16


@dataclass(frozen=True)
class PatchRows:
    """``n_rows`` patches of ``n_features`` float32 values, produced in pieces.

    ``chunks()`` yields (k, d) float32 arrays whose rows add up to n_rows. The writer calls
    it twice (once to check and hash, once to write), so it must yield the same values each
    time; nothing but one piece at a time need be in memory."""

    n_rows: int
    n_features: int
    chunks: Callable[[], Iterable[np.ndarray]]

    @classmethod
    def of(cls, arr: Any, name: str) -> PatchRows:
        """An in-memory (n, d) float32 array as PatchRows, in pieces of 65,536 rows."""
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (n, d); got shape {arr.shape}")
        if arr.dtype != np.float32:
            raise ValueError(f"{name} must be float32; got {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        n = arr.shape[0]
        return cls(n, arr.shape[1],
                   lambda: (arr[a : a + _CHECK_ROWS] for a in range(0, max(n, 1), _CHECK_ROWS)))


def _checked_pieces(rows: PatchRows, name: str) -> Iterator[np.ndarray]:
    """rows.chunks(), each piece checked (float32, (k, d), finite) and C-contiguous; the
    row count checked at the end."""
    seen = 0
    for piece in rows.chunks():
        piece = np.asarray(piece)
        if piece.ndim != 2 or piece.shape[1] != rows.n_features or piece.dtype != np.float32:
            raise ValueError(f"{name}: a piece of shape {piece.shape} and dtype {piece.dtype}; "
                             f"need (k, {rows.n_features}) float32")
        if not np.isfinite(piece).all():
            raise ValueError(f"{name} contains NaN or Inf")
        seen += piece.shape[0]
        if seen > rows.n_rows:
            raise ValueError(f"{name}: more than the {rows.n_rows} rows announced")
        yield np.ascontiguousarray(piece)
    if seen != rows.n_rows:
        raise ValueError(f"{name}: {seen} rows; {rows.n_rows} announced")


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
    train: np.ndarray | PatchRows,
    heldout: np.ndarray | PatchRows,
    config_dict: dict,
    source_sha256: str,
    *,
    patch_shape: tuple[int, ...] | None = None,
) -> None:
    """Write train (n1, d) and held-out (n2, d) float32 patches to ``path``, atomically.

    Each split is an array or :class:`PatchRows` (patches made piece by piece, for stores
    larger than memory). ``config_dict``: the PatchConfig as a dict (JSON-able; must hold
    ``patch_size``); ``source_sha256``: 64 hex digits identifying the source images;
    ``patch_shape`` defaults to (p, p) or (p, p, C) from ``patch_size`` and d.

    Memory: one piece at a time. A first pass checks every value and hashes them (the
    hash goes into the schema, which comes first in the file). pyarrow then writes the
    file from placeholder value buffers (untouched anonymous mappings, never read): the
    file object it writes to recognises a placeholder by its address and writes the real
    values in its place, piece by piece, hashing them again; a source that yields other
    values the second time fails the write. The bytes equal those of pyarrow writing the
    two record batches from memory: pyarrow lays out every byte but the values.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    splits = [s if isinstance(s, PatchRows) else PatchRows.of(s, name)
              for s, name in ((train, "train"), (heldout, "heldout"))]
    d = splits[0].n_features
    if splits[1].n_features != d:
        raise ValueError(f"train has {d} values per patch, heldout {splits[1].n_features}")
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
    data_sha256 = _hash_splits(splits)
    meta = {
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "config": config_dict,
        "n_train": splits[0].n_rows,
        "n_heldout": splits[1].n_rows,
        "n_features": int(d),
        "patch_shape": shape,
        "source_sha256": source_sha256,
        "data_sha256": data_sha256,
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
    placeholders = [_placeholder(split.n_rows * d * 4) for split in splits]
    with atomic_path(path, PATCH_STORE) as tmp, open(tmp, "wb") as fh:
        sink = _ValueSink(fh, [(buf, _checked_pieces(split, name)) for buf, split, name
                               in zip(placeholders, splits, SPLITS, strict=True)])
        with pa.PythonFile(sink, mode="w") as out, ipc.new_file(out, schema,
                                                                options=options) as w:
            for split, buf in zip(splits, placeholders, strict=True):
                values = pa.Array.from_buffers(pa.float32(), split.n_rows * d, [None, buf])
                column = pa.FixedSizeListArray.from_arrays(values, d)
                w.write_batch(pa.record_batch([column], schema=schema))
        sink.finish(data_sha256)


def _hash_splits(splits: list[PatchRows]) -> str:
    h = hashlib.sha256()
    for split, name in zip(splits, SPLITS, strict=True):
        for piece in _checked_pieces(split, name):
            h.update(memoryview(piece.reshape(-1)).cast("B"))
    return h.hexdigest()


def _placeholder(nbytes: int):
    """A pyarrow Buffer of nbytes that commits no memory (an anonymous read-only mapping
    no one reads): it only gives pyarrow a length and an address to recognise."""
    import pyarrow as pa

    if nbytes == 0:
        return pa.py_buffer(b"")
    return pa.py_buffer(mmap.mmap(-1, nbytes, prot=mmap.PROT_READ))


@dataclass
class _SplitValues:
    """A split's placeholder buffer, its pieces, and how far the sink has written them."""

    placeholder: Any
    pieces: Iterator[np.ndarray]
    written: int = 0
    leftover: memoryview | None = None


class _ValueSink:
    """The binary file object pyarrow's IPC writer writes to: bytes pass through to
    ``fh``, except a write from a placeholder buffer, replaced by the next bytes of that
    split's values."""

    closed = False

    def __init__(self, fh, splits: list[tuple[Any, Iterator[np.ndarray]]]) -> None:
        self.fh = fh
        self.splits = [_SplitValues(buf, pieces) for buf, pieces in splits]
        self.position = 0
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        import pyarrow as pa

        n = data.size if isinstance(data, pa.Buffer) else memoryview(data).nbytes
        if isinstance(data, pa.Buffer) and n:
            for split in self.splits:
                buf = split.placeholder
                if buf.address <= data.address < buf.address + buf.size:
                    if data.address - buf.address != split.written:
                        raise ValueError("pyarrow wrote the patch values out of order")
                    self._values(split, n)
                    return n
        self.fh.write(data)
        self.position += n
        return n

    def _values(self, split: _SplitValues, n: int) -> None:
        while n:
            piece = split.leftover
            if piece is None or not piece.nbytes:
                piece = memoryview(next(split.pieces).reshape(-1)).cast("B")
            take = piece[:n]
            self.hash.update(take)
            self.fh.write(take)
            split.leftover = piece[len(take):]
            split.written += len(take)
            self.position += len(take)
            n -= len(take)

    def finish(self, data_sha256: str) -> None:
        """Check that every value was written, and that they hash as the first pass did."""
        for split in self.splits:
            if (split.written != split.placeholder.size
                    or (split.leftover is not None and split.leftover.nbytes)
                    or any(p.size for p in split.pieces)):
                raise ValueError("pyarrow did not write the patch values from the buffers "
                                 "given to it")
        if self.hash.hexdigest() != data_sha256:
            raise ValueError("the patches changed between the two passes over them")

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


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
    mapping: Any = None
    """The :class:`mmap.mmap` behind ``buffer`` (private, never written)."""
    inode: int | None = None
    """The mapped file's inode number."""

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

    def rows(self, split: str = "train") -> RowSource:
        """The split as a :class:`~sae_core.rows.RowSource` that can hand back the pages
        it read (streamed training of stores larger than memory)."""
        from sae_core.rows import RowSource

        arr = self.split(split)
        start = arr.__array_interface__["data"][0] - self.buffer.address if arr.size else 0
        return RowSource(arr, release=lambda: self._release(arr), name=f"{self.path} ({split})",
                         read=functools.partial(self._read_rows, start, arr.strides[0]))

    def _read_rows(self, offset: int, row_bytes: int, start: int, stop: int,
                   out: np.ndarray) -> None:
        """Rows [start, stop) of the split at byte ``offset`` into ``out`` (C-contiguous
        float32), by reading the file: the page cache serves it, nothing is mapped. The
        file is opened by path each time (a store replaced since is refused: its inode
        differs from the mapped one)."""
        view = memoryview(out).cast("B")
        with open(self.path, "rb", buffering=0) as fh:
            if os.fstat(fh.fileno()).st_ino != self.inode:
                raise FileFormatError(f"{self.path}: replaced while it was being read")
            pos = offset + start * row_bytes
            end = offset + stop * row_bytes
            while pos < end:
                got = os.preadv(fh.fileno(), [view[pos - offset - start * row_bytes :]], pos)
                if got == 0:
                    raise FileFormatError(f"{self.path}: ends before its rows do")
                pos += got

    def _release(self, arr: np.ndarray) -> None:
        """Unmap the resident pages of ``arr``'s part of the file. Safe only because the
        mapping is private and never written: the next read maps the pages again from
        the page cache (or the file), with the same bytes."""
        if self.mapping is None or arr.size == 0:
            return
        start = arr.__array_interface__["data"][0] - self.buffer.address
        first = start - start % mmap.PAGESIZE
        end = min(start + arr.nbytes, len(self.mapping))
        self.mapping.madvise(mmap.MADV_DONTNEED, first, end - first)

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
            inode = os.fstat(fh.fileno()).st_ino
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
    return PatchStore(path=p, train=train, heldout=heldout, metadata=meta, buffer=buf,
                      mapping=mapped, inode=inode)


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

"""Rows of a 2-D array that may be larger than memory, and how to hand their pages back.

A :class:`RowSource` wraps an (m, n) array, typically a view of a memory-mapped patch
store (:meth:`sae_core.patch_store.PatchStore.rows`), with the one operation that keeps a
pass over it from filling memory: :meth:`RowSource.release`, which unmaps the pages read
so far (the values stay; the next read maps them again from the page cache or the file).
Training streams from it (:mod:`sae_core.batches`); checks read it block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

RELEASE_BYTES = 256 << 20
"""Bytes a sequential pass (:meth:`RowSource.blocks`) reads between two releases."""


class RowSource:
    """Rows of a 2-D float array (m, n) that may be larger than memory: typically a view of
    a memory-mapped patch store (:meth:`sae_core.patch_store.PatchStore.rows`).

    ``release`` (optional) unmaps the pages of ``array`` read so far; the array's values
    are unchanged (only a private, never-written file mapping can promise that, so only
    the store supplies it). ``read`` (optional) copies rows [start, stop) into an array
    without mapping them (the store reads its file); a read through the mapping maps a
    whole page-cache folio (up to 2 MiB on recent kernels) around each page touched."""

    def __init__(self, array: np.ndarray, release: Callable[[], None] | None = None,
                 name: str = "X",
                 read: Callable[[int, int, np.ndarray], None] | None = None) -> None:
        if array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (m, n); got shape {array.shape}")
        self.array = array
        self.name = name
        self._release = release
        self._read = read

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def release(self) -> None:
        """Unmap the pages read so far (nothing, for rows without a release)."""
        if self._release is not None:
            self._release()

    def copy_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """out[: stop - start] = rows [start, stop): one contiguous read, which leaves
        nothing mapped when the source can ``read``."""
        if self._read is not None:
            self._read(start, stop, out[: stop - start])
        else:
            np.copyto(out[: stop - start], self.array[start:stop], casting="same_kind")

    def blocks(self, rows: int = 65_536) -> Iterator[np.ndarray]:
        """The rows in order, ``rows`` at a time (each block stays mapped while the caller
        holds it), releasing every :data:`RELEASE_BYTES` read and at the end."""
        every = max(1, RELEASE_BYTES // max(1, rows * self.array.strides[0]))
        for i, a in enumerate(range(0, self.array.shape[0], rows)):
            yield self.array[a : a + rows]
            if (i + 1) % every == 0:
                self.release()
        self.release()

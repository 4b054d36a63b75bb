"""Mini-batches for Adam: the seeded order of an epoch, and the batches in that order,
gathered from a tensor in memory or streamed from rows that need not fit in memory.

The order (:func:`epoch_order`). Data of at most :data:`WINDOW_BYTES` (as float32) is
visited in a uniform random permutation (``torch.randperm``). Larger data is cut into
blocks of :data:`BLOCK_BYTES` consecutive rows; the blocks are put in a random order, and
each run of ``WINDOW_BYTES / BLOCK_BYTES`` of them (a window) has its rows permuted
together. Every batch thus mixes rows from hundreds of places in the data, while a
stream reads whole blocks, a window at a time: the windowed shuffle of out-of-core
loaders (MosaicML Streaming's shuffle over shards, webdataset's shuffle buffer), made
exact here: the order is a permutation drawn from the seed alone.

Both sources give batch b of an epoch as ``X[order[b*B : (b+1)*B]]`` for the same
``order``, so a fit streamed from a memory-mapped patch store and a fit from memory end
with the same bytes (same seed, same data, same device).

Streaming (:class:`StreamedBatches`): a reader thread copies the next window's blocks out
of the mapped store (contiguous reads) and hands the mapped pages back, while the current
window's rows are gathered into batches and trained on. On a GPU the batches are pinned
and copied one ahead on a side stream. Resident memory: two windows (512 MB) and the
batches in flight, whatever the data's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from sae_core.rows import RowSource

BLOCK_BYTES = 1 << 20
"""Bytes (as float32 rows) of the blocks that the windowed order moves as units."""
WINDOW_BYTES = 256 << 20
"""Bytes (as float32 rows) of one window: data up to this size is shuffled uniformly."""
_RELEASE_BLOCKS = 32  # a window's reader hands the store's pages back every 32 MB


class EpochOrder(NamedTuple):
    """One epoch's order: ``order`` (m,) int64, a permutation of range(m); ``block_rows``
    b, and ``windows``: per window, its block numbers (block k holds rows [k b, (k+1) b))
    and ``bounds``, where window w's rows sit in ``order[bounds[w] : bounds[w + 1]]``."""

    order: torch.Tensor
    block_rows: int
    windows: list[np.ndarray]
    bounds: np.ndarray


def layout(m: int, n: int) -> tuple[int, int]:
    """(rows per block, blocks per window) for m rows of n float32 values; one window
    holds everything when the data fit in :data:`WINDOW_BYTES`."""
    row_bytes = 4 * n
    block_rows = max(1, BLOCK_BYTES // row_bytes)
    n_blocks = -(-m // block_rows)
    if m * row_bytes <= WINDOW_BYTES:
        return block_rows, n_blocks
    return block_rows, max(1, WINDOW_BYTES // (block_rows * row_bytes))


def epoch_order(rng_state: torch.Tensor, m: int, n: int) -> tuple[EpochOrder, torch.Tensor]:
    """(the seeded order of one epoch over m rows of n values, the generator state after
    drawing it); see the module docstring."""
    gen = torch.Generator()
    gen.set_state(rng_state)
    block_rows, per_window = layout(m, n)
    n_blocks = -(-m // block_rows)
    if per_window >= n_blocks:
        order = torch.randperm(m, generator=gen)
        windows = [np.arange(n_blocks)]
        return EpochOrder(order, block_rows, windows, np.array([0, m])), gen.get_state()
    blocks = torch.randperm(n_blocks, generator=gen)
    parts, windows, bounds = [], [], [0]
    for w in range(0, n_blocks, per_window):
        chosen = blocks[w : w + per_window]
        rows = (chosen[:, None] * block_rows + torch.arange(block_rows)).reshape(-1)
        rows = rows[rows < m]  # the last block may be short
        parts.append(rows[torch.randperm(rows.shape[0], generator=gen)])
        windows.append(chosen.numpy())
        bounds.append(bounds[-1] + rows.shape[0])
    order = torch.cat(parts)
    return EpochOrder(order, block_rows, windows, np.array(bounds)), gen.get_state()


class InMemoryBatches:
    """Batches of a tensor X (m, n) already on the training device."""

    def __init__(self, X: torch.Tensor) -> None:
        self.X = X
        self.shape = tuple(X.shape)

    def epoch(self, epoch: EpochOrder, batch_size: int) -> Iterator[torch.Tensor]:
        order = epoch.order.to(self.X.device)
        for start in range(0, self.X.shape[0], batch_size):
            yield self.X.index_select(0, order[start : start + batch_size])


class _Windows:
    """The windows of one epoch's order, read from a RowSource: window w as (its rows, in
    the order of its blocks in the file; block k's slot in them)."""

    def __init__(self, rows: RowSource, epoch: EpochOrder) -> None:
        self.rows, self.epoch = rows, epoch

    def read(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.epoch.block_rows
        blocks = np.sort(self.epoch.windows[w])  # file order: sequential reads
        m, n = self.rows.shape
        buf = np.empty((blocks.shape[0] * b, n), dtype=self.rows.array.dtype)
        slot = np.full(-(-m // b), -1, dtype=np.int64)
        for i, k in enumerate(blocks):
            self.rows.copy_rows(int(k) * b, min(m, (int(k) + 1) * b), buf[i * b :])
            slot[k] = i
            if i % _RELEASE_BLOCKS == _RELEASE_BLOCKS - 1:
                self.rows.release()  # what was copied is ours: hand the pages back
        self.rows.release()
        return buf, slot


class StreamedBatches:
    """Batches of a :class:`RowSource` read a window at a time: a reader thread copies
    window w+1 out of the store (contiguous reads of whole blocks, which release the GIL)
    while the batches of window w are gathered from memory and trained on. On a CUDA
    device each batch is pinned and copied one batch ahead on a side stream.

    (A loader *process*, as torch's DataLoader with workers, was measured first: on two
    cores its per-batch shared-memory hand-over and its competition for the cores held
    streaming to 47% of in-memory throughput; the thread holds it at 90% and more.)"""

    def __init__(self, rows: RowSource, device: torch.device, dtype: torch.dtype) -> None:
        self.rows = rows
        self.shape = rows.shape
        self.device = device
        self.dtype = dtype

    def _host_batches(self, epoch: EpochOrder, batch_size: int) -> Iterator[torch.Tensor]:
        order = epoch.order.numpy()
        m = order.shape[0]
        b = epoch.block_rows
        bounds = epoch.bounds
        n_windows = len(epoch.windows)
        reader = _Windows(self.rows, epoch)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeflow-window") as pool:
            pending = {0: pool.submit(reader.read, 0)}
            loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

            def window(w: int) -> tuple[np.ndarray, np.ndarray]:
                if w not in loaded:
                    loaded.clear()  # batches go forward: the earlier windows are done
                    loaded[w] = pending.pop(w).result()
                    if w + 1 < n_windows:
                        pending[w + 1] = pool.submit(reader.read, w + 1)
                return loaded[w]

            w = 0
            for lo in range(0, m, batch_size):
                hi = min(lo + batch_size, m)
                pieces = []
                while lo < hi:
                    while bounds[w + 1] <= lo:
                        w += 1
                    stop = min(hi, int(bounds[w + 1]))
                    buf, slot = window(w)
                    idx = order[lo:stop]
                    pieces.append(buf[slot[idx // b] * b + idx % b])
                    lo = stop
                out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                yield torch.from_numpy(out).to(self.dtype)

    def epoch(self, epoch: EpochOrder, batch_size: int) -> Iterator[torch.Tensor]:
        batches = self._host_batches(epoch, batch_size)
        if self.device.type != "cuda":
            yield from batches
            return
        # copy batch b+1 to the device on a side stream while batch b trains
        copy = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        ahead = None
        for host in batches:
            with torch.cuda.stream(copy):
                nxt = host.pin_memory().to(self.device, non_blocking=True)
            if ahead is not None:
                yield ahead
            main.wait_stream(copy)
            # allocated on the copy stream, used on the main one: keep the allocator from
            # reusing its memory before the main stream is done with it
            nxt.record_stream(main)
            ahead = nxt
        if ahead is not None:
            yield ahead

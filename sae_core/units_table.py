"""The per-unit table of a sparsity evaluation: one Parquet row per hidden unit.

Columns (:data:`PER_UNIT_COLUMNS`): unit (int64) and rho_hat, firing_rate, kl, kurtosis,
max_activation, lifetime_sparseness, active_fraction (float64), as defined in
:mod:`sae_core.stats`; s rows for s hidden units. Written atomically, same statistics
same bytes; read back as numpy arrays (s,).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sae_core.outputs import parquet_with_metadata
from sae_core.stats import SparsityStats

PER_UNIT_FORMAT_VERSION = 2  # 2: lifetime_sparseness and active_fraction
_PER_UNIT_META_KEY = b"saeflow"
UNITS = parquet_with_metadata("a saeflow per-unit table (Parquet)", _PER_UNIT_META_KEY)
PER_UNIT_COLUMNS = ("unit", "rho_hat", "firing_rate", "kl", "kurtosis", "max_activation",
                    "lifetime_sparseness", "active_fraction")
"""Columns of the per-unit Parquet table (:meth:`SparsityStats.per_unit`), in order."""


_FORMAT_1_COLUMNS = PER_UNIT_COLUMNS[:6]
"""The columns of a format-1 table (written before lifetime_sparseness, active_fraction)."""


def _per_unit_schema(columns: tuple[str, ...] = PER_UNIT_COLUMNS):
    import pyarrow as pa

    fields = [pa.field("unit", pa.int64(), nullable=False)]
    fields += [pa.field(name, pa.float64(), nullable=False) for name in columns[1:]]
    return pa.schema(fields)


def write_per_unit(path: str | os.PathLike, stats: SparsityStats) -> None:
    """Write ``stats.per_unit()`` as a Parquet table of s rows, atomically.

    Columns: unit (int64), rho_hat, firing_rate, kl (NaN without a target rho), kurtosis,
    max_activation, lifetime_sparseness, active_fraction (float64; NaN where undefined),
    one row per hidden unit j = 0..s-1. The schema metadata key
    ``saeflow`` holds JSON {format_version, rho, fire_threshold, n_examples} (rho null
    without a target). The table is built from numpy arrays (no pandas metadata) and
    written with fixed settings and no statistics, so the same statistics give the same
    bytes (for a given pyarrow version: its name is in the file footer).
    """
    import json

    import pyarrow as pa

    from sae_core.io import write_tagged_parquet

    if not isinstance(stats, SparsityStats):
        raise ValueError(f"stats must be a SparsityStats; got {type(stats).__name__}")
    columns = stats.per_unit()
    meta = {
        "format_version": PER_UNIT_FORMAT_VERSION,
        "rho": stats.rho,
        "fire_threshold": stats.fire_threshold,
        "n_examples": stats.n_examples,
    }
    schema = _per_unit_schema().with_metadata(
        {_PER_UNIT_META_KEY: json.dumps(meta, sort_keys=True)}
    )
    arrays = [
        pa.array(np.asarray(columns["unit"], dtype=np.int64)),
        *(pa.array(np.asarray(columns[c], dtype=np.float64)) for c in PER_UNIT_COLUMNS[1:]),
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    write_tagged_parquet(path, table, UNITS, use_dictionary=False)


def read_per_unit(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a table written by :func:`write_per_unit`: (columns, metadata).

    ``columns`` maps each name of :data:`PER_UNIT_COLUMNS` to a numpy array (s,);
    ``metadata`` is {format_version, rho, fire_threshold, n_examples}. A format-1 table
    (runs recorded before the lifetime sparseness and the active fraction existed) is
    read with those two columns NaN. A missing file, another Parquet file or a corrupt
    one is a one-line ValueError naming the file.
    """
    from sae_core.io import read_tagged_parquet

    what = "a saeflow per-unit table"
    try:
        table, meta = read_tagged_parquet(path, _PER_UNIT_META_KEY, _per_unit_schema(),
                                          PER_UNIT_FORMAT_VERSION, what)
    except ValueError as exc:
        try:
            table, meta = read_tagged_parquet(path, _PER_UNIT_META_KEY,
                                              _per_unit_schema(_FORMAT_1_COLUMNS), 1, what)
        except ValueError:
            raise exc from None
    nan = np.full(table.num_rows, np.nan)
    columns = {name: table.column(name).to_numpy() if name in table.column_names else nan.copy()
               for name in PER_UNIT_COLUMNS}
    return columns, meta

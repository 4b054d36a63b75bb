"""The per-unit Parquet table: round trip, identical bytes, format 1, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from activations import HAND_A, stats_of

from sae_core import units_table
from sae_core.units_table import PER_UNIT_COLUMNS, read_per_unit, write_per_unit


def test_per_unit_parquet_round_trip_and_identical_bytes(tmp_path):
    import pyarrow.parquet as pq

    s = stats_of(np.column_stack([HAND_A, np.zeros(3)]), rho=0.1)
    path = tmp_path / "metrics" / "per_unit.parquet"
    write_per_unit(path, s)
    first = path.read_bytes()
    write_per_unit(tmp_path / "again.parquet", s)
    assert (tmp_path / "again.parquet").read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["per_unit.parquet"]  # no temp left

    columns, meta = read_per_unit(path)
    assert list(columns) == list(PER_UNIT_COLUMNS)
    for name, expected in s.per_unit().items():
        np.testing.assert_array_equal(columns[name], expected)
    assert columns["unit"].dtype == np.int64 and columns["rho_hat"].dtype == np.float64
    assert meta == {"format_version": 2, "rho": 0.1, "fire_threshold": 1e-3, "n_examples": 3}
    schema_meta = pq.read_schema(path).metadata
    assert set(schema_meta) == {b"saeflow"}  # no pandas metadata


def test_per_unit_parquet_of_format_1_is_read_with_the_new_columns_nan(tmp_path):
    """Runs recorded before format 2 keep their tables: the report reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = stats_of(HAND_A, rho=0.1)
    old = {k: v for k, v in s.per_unit().items() if k in PER_UNIT_COLUMNS[:6]}
    meta = {"format_version": 1, "rho": 0.1, "fire_threshold": 1e-3, "n_examples": 3}
    table = pa.table(old).cast(units_table._per_unit_schema(PER_UNIT_COLUMNS[:6]))
    pq.write_table(table.replace_schema_metadata({b"saeflow": json.dumps(meta)}),
                   tmp_path / "v1.parquet")
    columns, read_meta = read_per_unit(tmp_path / "v1.parquet")
    assert read_meta["format_version"] == 1
    np.testing.assert_array_equal(columns["rho_hat"], s.rho_hat)
    assert np.isnan(columns["lifetime_sparseness"]).all()
    assert np.isnan(columns["active_fraction"]).all()


def test_per_unit_parquet_without_rho_and_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = stats_of(HAND_A)
    write_per_unit(tmp_path / "u.parquet", s)
    columns, meta = read_per_unit(tmp_path / "u.parquet")
    assert np.isnan(columns["kl"]).all() and meta["rho"] is None
    with pytest.raises(ValueError, match="stats must be a SparsityStats; got dict"):
        write_per_unit(tmp_path / "bad.parquet", s.per_unit())
    assert not (tmp_path / "bad.parquet").exists()
    with pytest.raises(ValueError, match=r"missing\.parquet: file not found"):
        read_per_unit(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"unit": [0, 1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other\.parquet: not a saeflow per-unit table"):
        read_per_unit(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: cannot read Parquet"):
        read_per_unit(tmp_path / "junk.parquet")

"""The patch store: Arrow IPC file, memory-mapped, zero-copy views."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from sae_core.io import FileFormatError
from sae_core.patch_store import METADATA_KEY, read_patch_store, write_patch_store
from sae_core.patches import PatchConfig

SHA = hashlib.sha256(b"images").hexdigest()


@pytest.fixture
def splits():
    rng = np.random.default_rng(0)
    return (
        rng.uniform(0.1, 0.9, size=(300, 64)).astype(np.float32),
        rng.uniform(0.1, 0.9, size=(40, 64)).astype(np.float32),
    )


@pytest.fixture
def store_path(tmp_path, splits):
    path = tmp_path / "patches.arrow"
    write_patch_store(path, *splits, PatchConfig(heldout_fraction=0.1).to_dict(), SHA)
    return path


def ends_in_pyarrow(arr):
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return type(base).__module__.startswith("pyarrow")


def test_round_trip_values_and_metadata(store_path, splits):
    store = read_patch_store(store_path, verify=True)
    assert store.train.dtype == np.float32 and store.train.shape == (300, 64)
    assert np.array_equal(store.train, splits[0])
    assert np.array_equal(store.heldout, splits[1])
    assert store.config == PatchConfig(heldout_fraction=0.1).to_dict()
    assert PatchConfig.from_dict(store.config) == PatchConfig(heldout_fraction=0.1)
    assert (store.n_train, store.n_heldout, store.patch_shape) == (300, 40, (8, 8))
    assert store.source_sha256 == SHA
    # the schema holds what the brief says: one fixed-size-list column, JSON metadata
    with pa.memory_map(str(store_path)) as src:
        reader = ipc.open_file(src)
        assert reader.schema.names == ["patch"]
        assert reader.schema.field(0).type == pa.list_(pa.float32(), 64)
        meta = json.loads(reader.schema.metadata[METADATA_KEY])
        assert meta["n_train"] == 300 and meta["n_heldout"] == 40
        table = reader.read_all()
        assert table.num_rows == 340
        first_heldout = np.asarray(table.column("patch")[300].values)
        assert np.array_equal(first_heldout, splits[1][0])


def test_arrays_are_zero_copy_views_of_the_map(store_path):
    store = read_patch_store(store_path)
    lo, hi = store.buffer.address, store.buffer.address + store.buffer.size
    for arr in (store.train, store.heldout):
        assert arr.flags.owndata is False
        assert not arr.flags.writeable
        assert ends_in_pyarrow(arr)
        start = arr.__array_interface__["data"][0]
        assert lo <= start and start + arr.nbytes <= hi  # inside the mapped file
    t = store.as_torch("train")
    assert t.dtype == torch.float32 and t.shape == (300, 64)
    assert t.data_ptr() == store.train.__array_interface__["data"][0]
    assert store.as_torch("heldout").shape == (40, 64)
    with pytest.raises(ValueError, match="split"):
        store.as_torch("test")


def test_writes_to_tensor_never_reach_the_file(store_path, splits):
    store = read_patch_store(store_path)
    store.as_torch("train")[0, 0] = 42.0  # private copy-on-write mapping
    assert np.array_equal(read_patch_store(store_path, verify=True).train, splits[0])


def test_deterministic_bytes_and_atomic(tmp_path, splits):
    cfg = PatchConfig().to_dict()
    write_patch_store(tmp_path / "a.arrow", *splits, cfg, SHA)
    write_patch_store(tmp_path / "b.arrow", *splits, cfg, SHA)
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arrow", "b.arrow"]  # no temps
    with pytest.raises(ValueError, match="JSON"):
        write_patch_store(tmp_path / "c.arrow", *splits, {**cfg, "x": object()}, SHA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arrow", "b.arrow"]


def test_empty_heldout_and_colour_shape(tmp_path):
    train = np.arange(5 * 75, dtype=np.float32).reshape(5, 75)
    path = tmp_path / "c.arrow"
    write_patch_store(path, train, train[:0], PatchConfig(patch_size=5).to_dict(), SHA)
    store = read_patch_store(path, verify=True)
    assert store.patch_shape == (5, 5, 3)
    assert store.heldout.shape == (0, 75) and np.array_equal(store.train, train)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "empty", "garbage", "flip_footer"],
)
def test_corrupt_files_are_value_errors_naming_the_file(store_path, damage):
    data = bytearray(store_path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(b"not an arrow file" * 100)
    else:
        data[-20:-10] = b"\xff" * 10
    store_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"patches\.arrow"):
        read_patch_store(store_path)


def test_flipped_values_caught_by_verify(store_path, splits):
    data = bytearray(store_path.read_bytes())
    i = data.find(splits[0][1, :4].tobytes())
    assert i > 0
    data[i] ^= 0xFF
    store_path.write_bytes(bytes(data))
    read_patch_store(store_path)  # structure intact
    with pytest.raises(FileFormatError, match=r"patches\.arrow.*sha256"):
        read_patch_store(store_path, verify=True)


def test_wrong_schema_is_a_value_error(tmp_path):
    values = pa.array(np.zeros(12, dtype=np.float64))
    path = tmp_path / "wrong.arrow"
    meta = {"format": "saeflow-patch-store", "format_version": 1, "n_features": 4,
            "n_train": 3, "n_heldout": 0, "patch_shape": [2, 2], "config": {}}
    for column, col_type_values in [("patch", values), ("pixels", values.cast(pa.float32()))]:
        arr = pa.FixedSizeListArray.from_arrays(col_type_values, 4)
        schema = pa.schema([pa.field(column, arr.type)],
                           metadata={METADATA_KEY: json.dumps(meta)})
        with ipc.new_file(str(path), schema) as w:
            w.write_batch(pa.record_batch([arr], schema=schema))
        with pytest.raises(ValueError, match=r"wrong\.arrow"):
            read_patch_store(path)
    schema = pa.schema([pa.field("patch", pa.list_(pa.float32(), 4))])  # no metadata
    with ipc.new_file(str(path), schema) as w:
        w.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(
            values.cast(pa.float32()), 4)], schema=schema))
    with pytest.raises(ValueError, match=r"wrong\.arrow.*metadata"):
        read_patch_store(path)
    with pytest.raises(ValueError, match="not found"):
        read_patch_store(tmp_path / "missing.arrow")


def test_several_record_batches_are_read(tmp_path):
    """A file written elsewhere with splits across batches still reads (as copies)."""
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    meta = {"format": "saeflow-patch-store", "format_version": 1, "n_features": 4,
            "n_train": 7, "n_heldout": 3, "patch_shape": [2, 2], "config": {},
            "source_sha256": SHA}
    schema = pa.schema([pa.field("patch", pa.list_(pa.float32(), 4))],
                       metadata={METADATA_KEY: json.dumps(meta)})
    path = tmp_path / "multi.arrow"
    with ipc.new_file(str(path), schema) as w:
        for a, b in [(0, 4), (4, 8), (8, 10)]:
            col = pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].ravel()), 4)
            w.write_batch(pa.record_batch([col], schema=schema))
    store = read_patch_store(path)
    assert np.array_equal(store.train, x[:7]) and np.array_equal(store.heldout, x[7:])


def test_write_validation(tmp_path, splits):
    cfg = PatchConfig().to_dict()
    with pytest.raises(ValueError, match="float32"):
        write_patch_store(tmp_path / "x.arrow", splits[0].astype(np.float64), splits[1], cfg, SHA)
    with pytest.raises(ValueError, match="values per patch"):
        write_patch_store(tmp_path / "x.arrow", splits[0], splits[1][:, :10], cfg, SHA)
    with pytest.raises(ValueError, match="source_sha256"):
        write_patch_store(tmp_path / "x.arrow", *splits, cfg, "abc")
    bad = splits[0].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_patch_store(tmp_path / "x.arrow", bad, splits[1], cfg, SHA)
    with pytest.raises(ValueError, match="patch_size"):
        write_patch_store(tmp_path / "x.arrow", *splits, {}, SHA)
    assert not (tmp_path / "x.arrow").exists()

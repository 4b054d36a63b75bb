"""ImageSet, concat, and the Parquet dataset + manifest (round trip, stable bytes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_core.dataset import ImageSet, concat, read_dataset, write_dataset
from sae_core.io import sha256_file

RNG = np.random.default_rng(0)


def images(n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    return [RNG.random(shape, dtype=np.float32) for _ in range(n)]


@pytest.fixture
def digits() -> ImageSet:
    return ImageSet(
        images(4, (8, 8)),
        labels=np.array([0, 2, 2, 1]),
        source="builtin:digits",
        class_names=["zero", "one", "two"],
        inputs={"sklearn:digits": "ab" * 32},
    )


@pytest.fixture
def photos() -> ImageSet:
    return ImageSet(
        images(2, (5, 7, 3)) + images(1, (6, 4)),
        source="folder:photos",
        skipped=["photos/readme.txt"],
        inputs={"photos/a.png": "cd" * 32},
    )


def assert_same(a: ImageSet, b: ImageSet) -> None:
    assert len(a) == len(b)
    for x, y in zip(a.images, b.images, strict=True):
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    if a.labels is None:
        assert b.labels is None
    else:
        assert b.labels.dtype == np.int64 and np.array_equal(a.labels, b.labels)
    for name in ("source", "class_names", "skipped", "inputs", "item_sources"):
        assert getattr(a, name) == getattr(b, name), name


def test_imageset_validation():
    with pytest.raises(ValueError, match=r"not a float32"):
        ImageSet([np.zeros((2, 2))], source="s")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ImageSet([np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match=r"labels for 2 images"):
        ImageSet(images(2, (2, 2)), labels=np.array([1]))
    with pytest.raises(ValueError, match=r"label 3 but only 2 class names"):
        ImageSet(images(1, (2, 2)), labels=np.array([3]), class_names=["a", "b"])
    s = ImageSet([np.zeros((2, 3, 1), np.float32)], labels=np.array([-1]))
    assert s.images[0].shape == (2, 3) and s.labels is None  # all unlabelled == no labels


def test_concat_labels_names_and_sources(digits, photos):
    other = ImageSet(images(2, (8, 8)), np.array([1, 0]), "folder:x", ["three", "zero"])
    s = concat([digits, photos, other])
    assert len(s) == 9
    assert s.class_names == ["zero", "one", "two", "three"]
    assert s.labels.tolist() == [0, 2, 2, 1, -1, -1, -1, 0, 3]  # "zero", "three"
    assert s.source == "builtin:digits+folder:photos+folder:x"
    assert s.image_sources() == ["builtin:digits"] * 4 + ["folder:photos"] * 3 + ["folder:x"] * 2
    assert s.skipped == ["photos/readme.txt"] and len(s.inputs) == 2
    assert concat([photos, photos]).labels is None
    unnamed = ImageSet(images(1, (8, 8)), np.array([5]), "idx:m")
    with pytest.raises(ValueError, match=r"with class names .builtin:digits. and without .idx:m"):
        concat([digits, unnamed])


def test_round_trip(tmp_path, digits, photos):
    for s in (digits, photos, concat([digits, photos])):
        write_dataset(tmp_path / "d.parquet", tmp_path / "d.json", s)
        back = read_dataset(tmp_path / "d.parquet")
        assert_same(s, back)
        back.images[0][0, 0] = 5.0  # writable


def test_parquet_columns(tmp_path, digits, photos):
    write_dataset(tmp_path / "d.parquet", tmp_path / "d.json", concat([digits, photos]))
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.schema.names == ["image", "height", "width", "channels", "label", "source"]
    assert table.schema.field("image").type == pa.large_list(pa.float32())
    assert table.column("channels").to_pylist() == [1] * 4 + [3, 3, 1]
    assert table.column("label").to_pylist() == [0, 2, 2, 1, None, None, None]
    row5 = np.array(table.column("image")[5].as_py(), np.float32)
    np.testing.assert_array_equal(row5.reshape(5, 7, 3), photos.images[1])


def test_same_input_same_bytes(tmp_path, digits, photos):
    s = concat([digits, photos])
    write_dataset(tmp_path / "a.parquet", tmp_path / "a.json", s)
    write_dataset(tmp_path / "b.parquet", tmp_path / "b.json", s)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    a, b = (
        json.loads((tmp_path / "a.json").read_text()),
        json.loads((tmp_path / "b.json").read_text()),
    )
    assert a.pop("parquet")["file"] == "a.parquet" and b.pop("parquet")["file"] == "b.parquet"
    assert a == b
    # atomic writes: nothing else in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "a.parquet",
        "b.json",
        "b.parquet",
    ]


def test_manifest(tmp_path, digits, photos):
    returned = write_dataset(tmp_path / "d.parquet", tmp_path / "m.json", concat([digits, photos]))
    m = json.loads((tmp_path / "m.json").read_text())
    assert m == returned
    assert m["n_images"] == 7
    assert m["shapes"] == {"8x8x1": 4, "5x7x3": 2, "6x4x1": 1}
    assert m["classes"] == {
        "0": {"count": 1, "name": "zero"},
        "1": {"count": 1, "name": "one"},
        "2": {"count": 2, "name": "two"},
    }
    assert m["n_unlabeled"] == 3 and m["class_names"] == ["zero", "one", "two"]
    assert m["sources"] == {"builtin:digits": 4, "folder:photos": 3}
    assert m["skipped"] == ["photos/readme.txt"]
    assert m["inputs"] == {"sklearn:digits": "ab" * 32, "photos/a.png": "cd" * 32}
    assert m["parquet"] == {"file": "d.parquet", "sha256": sha256_file(tmp_path / "d.parquet")}
    assert 0 <= m["pixel_min"] <= m["pixel_max"] <= 1


def test_read_dataset_refuses_other_files(tmp_path, digits):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other.parquet: not a saeflow dataset"):
        read_dataset(tmp_path / "other.parquet")
    write_dataset(tmp_path / "d.parquet", tmp_path / "d.json", digits)
    table = pq.read_table(tmp_path / "d.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "nometa.parquet")
    with pytest.raises(ValueError, match=r"nometa.parquet: not a saeflow dataset"):
        read_dataset(tmp_path / "nometa.parquet")
    height = pa.field("height", pa.int32(), nullable=False)
    bad = table.set_column(1, height, pa.array([9, 8, 8, 8], pa.int32()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: pixel counts do not match"):
        read_dataset(tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read Parquet") as info:
        read_dataset(tmp_path / "junk.parquet")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"nope.parquet: file not found"):
        read_dataset(tmp_path / "nope.parquet")

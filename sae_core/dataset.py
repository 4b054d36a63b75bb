"""ImageSet (images + labels + provenance) and its Parquet file with a JSON manifest.

Parquet layout (one row per image, rows in ImageSet order)::

    image     large_list<float32>  the pixels flattened row-major (H, W[, C]), not null
    height    int32                H
    width     int32                W
    channels  int32                C; 1 for a grayscale (H, W) image
    label     int64 (nullable)     class id; null for an unlabelled image
    source    string               id of the source the image came from

The pixels are a list of float32 rather than opaque bytes: the element type lives in
the schema (no byte order to document), and any Parquet reader (pandas, DuckDB, Spark)
sees numbers. Dictionary encoding keeps 8-bit sources near one byte per pixel.

The schema metadata key ``saeflow`` holds JSON: format_version, class_names, skipped
files and the inputs' sha256, so a dataset file is self-describing. Writes are atomic
and deterministic: the same ImageSet gives the same bytes (for a given pyarrow version).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae_core.io import sha256_file, write_json, write_tagged_parquet
from sae_core.outputs import json_with_keys, parquet_with_metadata

DATASET_FORMAT_VERSION = 1
_META_KEY = b"saeflow"
DATASET = parquet_with_metadata("a saeflow dataset (Parquet)", _META_KEY)
MANIFEST = json_with_keys("a saeflow dataset manifest", "format_version", "n_images", "parquet")
UNLABELED = -1
"""The label of an unlabelled image in a partly labelled ImageSet (as in scikit-learn)."""


@dataclass(eq=False)
class ImageSet:
    """Images with optional labels and where they came from.

    - ``images``: list of float32 arrays, each (H, W) grayscale or (H, W, C) with C >= 2;
      an (H, W, 1) image is stored as (H, W). Shapes may differ between images.
    - ``labels``: int64 array (N,) or None (no image labelled). In a partly labelled set
      an unlabelled image has label -1 (``UNLABELED``).
    - ``source``: id of the source, e.g. "idx:train-images-idx3-ubyte.gz".
    - ``class_names``: names of label ids 0, 1, ... when known, else None.
    - ``skipped``: files seen but not read (e.g. not an image), for the manifest.
    - ``inputs``: path (or built-in name) -> sha256 of every input read.
    - ``item_sources``: per-image source ids when the images come from several sources
      (after :func:`concat`); None means every image is from ``source``.
    """

    images: list[np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    item_sources: list[str] | None = None

    def __post_init__(self) -> None:
        where = self.source or "ImageSet"
        images = []
        for i, img in enumerate(self.images):
            if not isinstance(img, np.ndarray) or img.dtype != np.float32:
                raise ValueError(f"{where}: image {i} is not a float32 numpy array")
            if img.ndim == 3 and img.shape[2] == 1:
                img = img[:, :, 0]
            if img.ndim not in (2, 3) or 0 in img.shape:
                raise ValueError(f"{where}: image {i} has shape {img.shape}; need (H, W[, C])")
            images.append(img)
        self.images = images
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or labels.shape[0] != len(images):
                raise ValueError(
                    f"{where}: {labels.shape} labels for {len(images)} images; need one each"
                )
            if labels.size and (labels.dtype.kind not in "iu" or labels.min() < UNLABELED):
                raise ValueError(f"{where}: labels must be integers >= 0 (or -1: unlabelled)")
            # All unlabelled (or no images) is the same as no labels: one representation.
            self.labels = labels.astype(np.int64) if (labels >= 0).any() else None
        if self.class_names is not None:
            self.class_names = [str(n) for n in self.class_names]
            if self.labels is not None and self.labels.size:
                top = int(self.labels.max())
                if top >= len(self.class_names):
                    raise ValueError(
                        f"{where}: label {top} but only {len(self.class_names)} class names"
                    )
        if self.item_sources is not None:
            self.item_sources = [str(v) for v in self.item_sources]
            if len(self.item_sources) != len(images):
                raise ValueError(f"{where}: item_sources needs one entry per image")
            if all(v == self.source for v in self.item_sources):
                self.item_sources = None
        self.skipped = list(self.skipped)
        self.inputs = dict(self.inputs)

    def __len__(self) -> int:
        return len(self.images)

    def image_sources(self) -> list[str]:
        """The source id of each image."""
        return list(self.item_sources) if self.item_sources else [self.source] * len(self)


def concat(sets: list[ImageSet]) -> ImageSet:
    """One ImageSet of all images, in order.

    Labels: None if no set is labelled; otherwise images of unlabelled sets get -1.
    Class names: if the labelled sets all have names, their union in first-seen order
    (a later set's ids are remapped to it); if none has names, ids are kept as they are;
    a mix of named and unnamed labelled sets is a ValueError. ``skipped`` and ``inputs``
    are merged; ``source`` joins the distinct sources with "+".
    """
    sets = list(sets)
    if not sets:
        raise ValueError("concat: no image sets given")
    if len(sets) == 1:
        return sets[0]
    labelled = [s for s in sets if s.labels is not None]
    named = [s for s in labelled if s.class_names is not None]
    if named and len(named) != len(labelled):
        raise ValueError(
            "concat: cannot combine labelled sets with class names ("
            + ", ".join(s.source for s in named)
            + ") and without ("
            + ", ".join(s.source for s in labelled if s.class_names is None)
            + ")"
        )
    class_names: list[str] | None = None
    if named:
        class_names = []
        for s in named:
            class_names += [n for n in s.class_names if n not in class_names]
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    item_sources: list[str] = []
    skipped: list[str] = []
    inputs: dict[str, str] = {}
    for s in sets:
        images += s.images
        item_sources += s.image_sources()
        skipped += s.skipped
        inputs.update(s.inputs)
        if s.labels is None:
            labels.append(np.full(len(s), UNLABELED, dtype=np.int64))
        elif class_names is not None:
            index = {name: i for i, name in enumerate(class_names)}
            remap = np.array([index[n] for n in s.class_names], dtype=np.int64)
            labels.append(np.where(s.labels >= 0, remap[np.maximum(s.labels, 0)], UNLABELED))
        else:
            labels.append(s.labels)
    distinct = list(dict.fromkeys(item_sources))
    return ImageSet(
        images=images,
        labels=np.concatenate(labels) if labelled else None,
        source="+".join(distinct),
        class_names=class_names,
        skipped=skipped,
        inputs=inputs,
        item_sources=item_sources if len(distinct) > 1 else None,
    )


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("image", pa.large_list(pa.float32()), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("channels", pa.int32(), nullable=False),
            pa.field("label", pa.int64(), nullable=True),
            pa.field("source", pa.string(), nullable=False),
        ]
    )


def _shape3(img: np.ndarray) -> tuple[int, int, int]:
    return (img.shape[0], img.shape[1], img.shape[2] if img.ndim == 3 else 1)


def _to_table(imageset: ImageSet):
    import pyarrow as pa

    shapes = np.array([_shape3(img) for img in imageset.images], dtype=np.int32).reshape(-1, 3)
    sizes = shapes.astype(np.int64).prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    values = (
        np.concatenate([img.ravel() for img in imageset.images])
        if len(imageset)
        else np.zeros(0, np.float32)
    )
    image_col = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    if imageset.labels is None:
        label_col = pa.nulls(len(imageset), pa.int64())
    else:
        label_col = pa.array(imageset.labels, mask=imageset.labels < 0, type=pa.int64())
    meta = {
        "format_version": DATASET_FORMAT_VERSION,
        "source": imageset.source,
        "class_names": imageset.class_names,
        "skipped": imageset.skipped,
        "inputs": imageset.inputs,
    }
    schema = _schema().with_metadata({_META_KEY: json.dumps(meta, sort_keys=True)})
    columns = [
        image_col,
        pa.array(shapes[:, 0]),
        pa.array(shapes[:, 1]),
        pa.array(shapes[:, 2]),
        label_col,
        pa.array(imageset.image_sources(), type=pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def manifest(imageset: ImageSet) -> dict:
    """The manifest's content (without the Parquet file's name and sha256)."""
    shapes = Counter("x".join(map(str, _shape3(img))) for img in imageset.images)
    classes: dict[str, dict] = {}
    n_unlabeled = len(imageset)
    if imageset.labels is not None:
        counts = Counter(int(v) for v in imageset.labels if v >= 0)
        n_unlabeled = int((imageset.labels < 0).sum())
        for label, count in sorted(counts.items()):
            entry: dict = {"count": count}
            if imageset.class_names is not None:
                entry["name"] = imageset.class_names[label]
            classes[str(label)] = entry
    finite = [img for img in imageset.images if img.size]
    return {
        "format_version": DATASET_FORMAT_VERSION,
        "n_images": len(imageset),
        "shapes": dict(shapes),
        "classes": classes,
        "n_unlabeled": n_unlabeled,
        "class_names": imageset.class_names,
        "sources": dict(Counter(imageset.image_sources())),
        "skipped": imageset.skipped,
        "inputs": imageset.inputs,
        "pixel_min": float(min(img.min() for img in finite)) if finite else None,
        "pixel_max": float(max(img.max() for img in finite)) if finite else None,
    }


def write_dataset(
    parquet_path: str | os.PathLike, manifest_path: str | os.PathLike, imageset: ImageSet
) -> dict:
    """Write ``imageset`` as Parquet (layout in the module docstring) and its manifest.

    The manifest (JSON, sorted keys) holds n_images, the shapes histogram ("HxWxC":
    count), the classes (label -> {count, name}), n_unlabeled, class_names, sources
    (id -> count), skipped files, inputs (path -> sha256), pixel_min/pixel_max, and the
    Parquet file's name and sha256. Both writes are atomic. Returns the manifest.
    """
    table = _to_table(imageset)
    parquet_path = Path(parquet_path)
    write_tagged_parquet(parquet_path, table, DATASET, use_dictionary=True,
                         row_group_size=4096)
    content = manifest(imageset)
    content["parquet"] = {"file": parquet_path.name, "sha256": sha256_file(parquet_path)}
    write_json(manifest_path, content, MANIFEST)
    return content


def read_dataset(parquet_path: str | os.PathLike) -> ImageSet:
    """Read a file written by :func:`write_dataset` back into the same ImageSet.

    The schema and the ``saeflow`` metadata are checked: another Parquet file, a corrupt
    file, rows whose pixel count is not H*W*C, or NaN/Inf pixels are a one-line
    ValueError naming the file.
    """
    from sae_core.io import read_tagged_parquet

    p = Path(parquet_path)
    table, meta = read_tagged_parquet(p, _META_KEY, _schema(), DATASET_FORMAT_VERSION,
                                      "a saeflow dataset")

    n = table.num_rows
    image_col = table.column("image").combine_chunks()
    if image_col.null_count:
        raise ValueError(f"{p}: null image rows")
    offsets = image_col.offsets.to_numpy()  # index .values, the whole child array
    # One writable copy of all pixels; each image is a view into it.
    values = np.array(image_col.values.to_numpy(zero_copy_only=False), dtype=np.float32)
    h = table.column("height").to_numpy().astype(np.int64)
    w = table.column("width").to_numpy().astype(np.int64)
    c = table.column("channels").to_numpy().astype(np.int64)
    if (h < 1).any() or (w < 1).any() or (c < 1).any() or (np.diff(offsets) != h * w * c).any():
        raise ValueError(f"{p}: pixel counts do not match height x width x channels")
    if not np.isfinite(values).all():
        raise ValueError(f"{p}: NaN or Inf pixel values")
    images = [
        values[offsets[i] : offsets[i + 1]].reshape(
            (h[i], w[i]) if c[i] == 1 else (h[i], w[i], c[i])
        )
        for i in range(n)
    ]
    labels = table.column("label").fill_null(UNLABELED).to_numpy()
    sources = table.column("source").to_pylist()
    try:
        return ImageSet(
            images=images,
            labels=labels,
            source=meta.get("source", ""),
            class_names=meta.get("class_names"),
            skipped=meta.get("skipped", []),
            inputs=meta.get("inputs", {}),
            item_sources=sources,
        )
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None

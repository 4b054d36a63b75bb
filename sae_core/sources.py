"""Image sources named in params.yaml, and ingestion of several into one image set.

A source is a mapping with a ``type`` and the fields that type needs::

    {type: builtin_natural}                         photographs shipped with sklearn/skimage
    {type: builtin_digits}                          sklearn's 8x8 digits, labels 0-9
    {type: image_folder, path: DIR, labels: subfolders}   PNG/JPEG/TIFF (labels optional)
    {type: idx, path: IMAGES[.gz], labels_path: LABELS[.gz]}   MNIST-style IDX
    {type: cifar, paths: [BATCH, ...]}              CIFAR-10/100 python batches
    {type: mat, path: FILE.mat, key: IMAGES}        MATLAB, e.g. the exercise's IMAGES.mat
    {type: numpy, path: FILE.npy|.npz, key: NAME}   numpy arrays (never pickled objects)
    {type: parquet, path: FILE.parquet}             a dataset written by saeflow

Any file-based source may instead name ``url`` and ``sha256``: the file is downloaded
once into ``<data_dir>/downloads/<sha256[:16]>`` (and verified); an archive (.zip, .tar,
.tar.gz/.tgz, .tar.bz2, .tar.xz) is extracted safely beside it, and ``path``/``paths``
are then relative to the extracted folder (or omitted, for a plain file). Relative paths
are relative to the project root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_core.dataset import ImageSet, concat

SOURCE_TYPES = (
    "builtin_natural",
    "builtin_digits",
    "image_folder",
    "idx",
    "cifar",
    "mat",
    "numpy",
    "parquet",
)
_FILE_TYPES = {"idx", "mat", "numpy", "parquet"}


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``ingest.sources`` in params.yaml (see the module docstring)."""

    type: str
    path: str | None = None
    paths: tuple[str, ...] = ()
    labels_path: str | None = None
    labels: str | None = None
    key: str | None = None
    url: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        for name in ("path", "labels_path", "labels", "key", "url", "sha256"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"source field {name} must be a string; got {value!r}")
        if not all(isinstance(p, str) for p in self.paths):
            raise ValueError(f"source field paths must be a list of strings; got {self.paths!r}")
        if self.type not in SOURCE_TYPES:
            raise ValueError(
                f"source type must be one of {', '.join(SOURCE_TYPES)}; got {self.type!r}"
            )
        if self.url is not None:
            if not self.sha256 or len(self.sha256) != 64:
                raise ValueError(f"source {self.url}: a url needs its sha256 (64 hex digits)")
        elif self.type in _FILE_TYPES or self.type == "image_folder":
            if not self.path:
                raise ValueError(f"source type {self.type!r} needs a path (or url + sha256)")
        elif self.type == "cifar" and not self.paths:
            raise ValueError("source type 'cifar' needs paths: [batch files] (or url + sha256)")
        if self.labels not in (None, "subfolders"):
            raise ValueError(f"labels must be 'subfolders' or absent; got {self.labels!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SourceSpec:
        if not isinstance(values, dict) or "type" not in values:
            raise ValueError(f"each source needs a 'type'; got {values!r}")
        known = {"type", "path", "paths", "labels_path", "labels", "key", "url", "sha256"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"source {values.get('type')!r}: unknown field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        v = dict(values)
        if "paths" in v:
            paths = v["paths"]
            if isinstance(paths, str):
                paths = [paths]
            if not isinstance(paths, list):
                raise ValueError(f"source field paths must be a list of strings; got {paths!r}")
            v["paths"] = tuple(paths)
        return cls(**v)


def local_paths(sources: list[dict[str, Any]], root: Path | str = ".",
                section: str = "ingest.sources") -> dict[str, Path]:
    """The files and folders on disk that ``sources`` read, by a name for messages
    ("ingest.sources[0]", after ``section``); downloaded sources are left out (they live
    in the download folder). A malformed source is a ValueError."""
    found: dict[str, Path] = {}
    for i, values in enumerate(sources):
        spec = SourceSpec.from_dict(values)
        if spec.url is not None:
            continue
        named = [spec.path, spec.labels_path, *spec.paths]
        for j, rel in enumerate(p for p in named if p):
            found[f"{section}[{i}]" + (f" path {j + 1}" if j else "")] = Path(root) / rel
    return found


def _base_folder(spec: SourceSpec, root: Path, data_dir: Path) -> Path:
    """The folder the spec's relative paths start from: the project root, or, for a
    downloaded archive, the folder it was extracted into. A downloaded plain file with
    no ``path`` becomes the spec's path itself (see :func:`load_source`)."""
    if spec.url is None:
        return root
    from sae_core.archives import ARCHIVE_SUFFIXES, extract_archive
    from sae_core.download import fetch

    # one folder per content hash: a changed url/sha256 never reuses stale extractions,
    # and two sources whose files share a name never overwrite each other
    downloaded = fetch(spec.url, spec.sha256, data_dir / "downloads" / spec.sha256[:16])
    name = downloaded.name
    suffix = next((sfx for sfx in ARCHIVE_SUFFIXES if name.endswith(sfx)), None)
    if suffix is None:
        return downloaded
    target = downloaded.parent / name[: -len(suffix)]
    if not target.is_dir():
        extract_archive(downloaded, target)
    return target


def load_source(
    spec: SourceSpec, root: Path | str = ".", data_dir: Path | str = "data"
) -> ImageSet:
    """Read one source into an :class:`ImageSet` (float32 images in [0, 1] for 8-bit data)."""
    from sae_core import readers

    root, data_dir = Path(root), Path(data_dir)
    if spec.type == "builtin_natural":
        return readers.read_builtin_natural()
    if spec.type == "builtin_digits":
        return readers.read_builtin_digits()
    base = _base_folder(spec, root, data_dir)
    if base.is_file():  # a downloaded plain file
        path, folder = base, base.parent
    else:
        path, folder = (base / spec.path if spec.path else base), base
    if spec.type == "image_folder":
        return readers.read_image_folder(path, labels=spec.labels)
    if spec.type == "idx":
        labels = folder / spec.labels_path if spec.labels_path else None
        return readers.read_idx(path, labels)
    if spec.type == "cifar":
        return readers.read_cifar([folder / p for p in spec.paths] if spec.paths else [path])
    if spec.type == "mat":
        return readers.read_mat(path, key=spec.key)
    if spec.type == "numpy":
        return readers.read_numpy(path, key=spec.key)
    return readers.read_parquet(path)


def _relative_to(imageset: ImageSet, root: Path) -> ImageSet:
    """The same set with every recorded path relative to ``root`` (where it lies under
    it): the dataset and manifest then have the same bytes in every checkout of the
    project, including DVC's temporary copies for queued experiments."""
    prefix = str(root.resolve()) + "/"

    def rel(text: str) -> str:
        return text.replace(prefix, "")

    return ImageSet(
        images=imageset.images,
        labels=imageset.labels,
        source=rel(imageset.source),
        class_names=imageset.class_names,
        skipped=[rel(p) for p in imageset.skipped],
        inputs={rel(k): v for k, v in imageset.inputs.items()},
        item_sources=[rel(s) for s in imageset.item_sources] if imageset.item_sources else None,
    )


def ingest(
    sources: list[dict[str, Any]], root: Path | str = ".", data_dir: Path | str = "data"
) -> ImageSet:
    """Read every source of ``ingest.sources`` and concatenate them, in order."""
    if not sources:
        raise ValueError("ingest.sources is empty: name at least one source")
    specs = [SourceSpec.from_dict(s) for s in sources]
    root = Path(root)
    return concat([_relative_to(load_source(spec, root, data_dir), root) for spec in specs])

"""Readers of image data formats, each returning an :class:`~sae_core.dataset.ImageSet`.

Every reader returns float32 images, (H, W) grayscale or (H, W, C) colour, records the
sha256 of each file it read in ``ImageSet.inputs`` (keyed by the path as given), and
refuses NaN/Inf pixels. Errors are one-line ``ValueError`` naming the input:
"<path>: file not found", "<path>: cannot read (...)", or the format problem.

Pixel values: 8-bit data is divided by 255 and 16-bit data by 65535, so both land in
[0, 1]; floating-point arrays (.mat, .npy, float TIFF) keep their values (the exercise's
IMAGES.mat is whitened and has negative values); other integer arrays are converted as
they are.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from sae_core.dataset import ImageSet
from sae_core.io import one_line, sha256_file
from sae_core.limits import TooLargeError, check_declared_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
CIFAR_PIXELS = 32 * 32 * 3



def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: file not found")
    if not p.is_file():
        raise ValueError(f"{p}: cannot read (not a regular file)")
    return p


def _read_bytes(path: str | os.PathLike) -> tuple[Path, bytes]:
    p = _check_file(path)
    try:
        return p, p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror or one_line(exc)})") from None


def _sha(p: Path) -> str:
    try:
        return sha256_file(p)
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror or one_line(exc)})") from None


def _check_finite(array: np.ndarray, where: object) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{where}: NaN or Inf pixel values")


def _scaled(array: np.ndarray) -> np.ndarray:
    """uint8 / 255 and uint16 / 65535 as float32; other types converted as they are."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    return array.astype(np.float32)


def _numeric(array: np.ndarray, where: object) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: array of dtype {array.dtype} is not numeric pixel data")
    return array


# ------------------------------------------------------------------- bounded reading
IDX_MARGIN = 64 * 1024
"""Bytes read past an IDX payload's declared end, to report a longer payload's size."""


def _read_into(stream, buf: np.ndarray) -> int:
    """Fill ``buf`` from ``stream``; the number of bytes read (short only at the end)."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        n = stream.readinto(view[done:])
        if not n:
            break
        done += n
    return done


# ------------------------------------------------------------------------------ IDX
def _idx_array(path: str | os.PathLike, magic: int) -> tuple[Path, np.ndarray, str]:
    """An IDX file (raw or gzip, by magic bytes) with the given magic as uint8 array.

    The file is streamed: the header is read first, then exactly the payload it declares
    (into one array) and at most :data:`IDX_MARGIN` bytes more to detect a longer one, so
    peak memory is the declared size whatever the file decompresses to."""
    p = _check_file(path)
    sha = _sha(p)
    try:
        with open(p, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
            return p, _idx_payload(p, stream, magic), sha
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{p}: corrupt gzip data ({one_line(exc)})") from None
    except OSError as exc:
        raise ValueError(f"{p}: cannot read ({exc.strerror or one_line(exc)})") from None


def _idx_payload(p: Path, stream, magic: int) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise ValueError(f"{p}: too short for an IDX header ({len(head)} bytes)")
    found = int.from_bytes(head, "big")
    if found != magic:
        raise ValueError(f"{p}: IDX magic is 0x{found:08x}, expected 0x{magic:08x}")
    ndim = head[3]
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise ValueError(f"{p}: truncated IDX header ({4 + len(dims_raw)} of {4 + 4 * ndim} "
                         "bytes)")
    dims = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if 0 in dims:
        raise ValueError(f"{p}: IDX file with no data (dimensions {dims})")
    expected = math.prod(dims)
    check_declared_size(p, expected, f"IDX payload (dimensions {dims})")
    pixels = np.empty(expected, dtype=np.uint8)
    got = _read_into(stream, pixels)
    extra = len(stream.read(IDX_MARGIN)) if got == expected else 0
    if got < expected or extra:
        size = f"{got + extra} bytes" if extra < IDX_MARGIN else f"over {got + extra} bytes"
        raise ValueError(f"{p}: IDX payload is {size}, header {dims} says {expected} bytes")
    return pixels.reshape(dims)


def read_idx(
    images_path: str | os.PathLike, labels_path: str | os.PathLike | None = None
) -> ImageSet:
    """MNIST-style IDX files, raw or gzip-compressed (detected by the magic bytes).

    Images: magic 0x00000803 (uint8, 3-D: N, rows, cols) -> N float32 (rows, cols)
    images in [0, 1]. Labels (optional): magic 0x00000801 (uint8, 1-D: N), as many as
    images. The payload must have exactly the size the header gives.
    """
    p, pixels, sha = _idx_array(images_path, IDX_IMAGES_MAGIC)
    images = _scaled(pixels)
    inputs = {str(images_path): sha}
    labels = None
    if labels_path is not None:
        lp, raw_labels, lsha = _idx_array(labels_path, IDX_LABELS_MAGIC)
        if raw_labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{lp}: {raw_labels.shape[0]} labels for {images.shape[0]} images in {p}"
            )
        labels = raw_labels.astype(np.int64)
        inputs[str(labels_path)] = lsha
    return ImageSet(images=list(images), labels=labels, source=f"idx:{p.name}", inputs=inputs)


# ---------------------------------------------------------------------------- CIFAR
def read_cifar(paths: str | os.PathLike | list[str | os.PathLike]) -> ImageSet:
    """CIFAR-10/100 "python version" batch files, unpickled with the allow-list of
    :mod:`sae_core.safe_pickle` (no arbitrary code runs).

    Each batch: ``data`` uint8 (N, 3072), the red, green, blue 32x32 planes row-major ->
    N float32 (32, 32, 3) images in [0, 1]; labels from ``labels`` (CIFAR-10) or
    ``fine_labels`` (CIFAR-100). A meta file among ``paths`` (``batches.meta`` with
    ``label_names``, or ``meta`` with ``fine_label_names``) supplies class names.
    """
    from sae_core.safe_pickle import UnsafePickleError, load_restricted

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("read_cifar: no batch files given")
    blocks, label_blocks, inputs, names_by_key, batch_names = [], [], {}, {}, []
    label_key = None
    for path in paths:
        p, data = _read_bytes(path)
        inputs[str(path)] = hashlib.sha256(data).hexdigest()
        try:
            batch = load_restricted(io.BytesIO(data))
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{p}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
        if not isinstance(batch, dict):
            raise ValueError(f"{p}: not a CIFAR batch (a {type(batch).__name__}, not a dict)")
        if "data" not in batch:
            found = [k for k in ("label_names", "fine_label_names") if k in batch]
            if not found:
                raise ValueError(f"{p}: not a CIFAR batch or meta file (no 'data')")
            for k in found:
                names_by_key[k] = [
                    n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in batch[k]
                ]
            continue
        pixels = batch["data"]
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8):
            raise ValueError(f"{p}: 'data' is not a uint8 array")
        if pixels.ndim != 2 or pixels.shape[1] != CIFAR_PIXELS:
            raise ValueError(f"{p}: 'data' has shape {pixels.shape}; need (N, {CIFAR_PIXELS})")
        key = next((k for k in ("labels", "fine_labels") if k in batch), None)
        if key is None:
            raise ValueError(f"{p}: no 'labels' or 'fine_labels'")
        if label_key not in (None, key):
            raise ValueError(f"{p}: has '{key}' but an earlier batch has '{label_key}'")
        label_key = key
        try:
            labels = np.asarray(batch[key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{p}: '{key}' are not integers") from None
        if labels.shape != (pixels.shape[0],) or (labels < 0).any():
            raise ValueError(
                f"{p}: '{key}' has shape {labels.shape} for {pixels.shape[0]} images"
                " (or negative labels)"
            )
        blocks.append(pixels)
        label_blocks.append(labels)
        batch_names.append(p.name)
    if not blocks:
        raise ValueError(f"{paths[0]}: no CIFAR data batch among the files given")
    pixels = np.concatenate(blocks)
    images = _scaled(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    names = names_by_key.get("label_names" if label_key == "labels" else "fine_label_names")
    try:
        return ImageSet(
            images=list(np.ascontiguousarray(images)),
            labels=np.concatenate(label_blocks),
            source="cifar:" + ",".join(batch_names),
            class_names=names,
            inputs=inputs,
        )
    except ValueError as exc:
        raise ValueError(f"{paths[0]}: {exc}") from None


# -------------------------------------------------------------------- .mat and numpy
def _pick_key(p: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise ValueError(f"{p}: no variable {key!r}; variables: {', '.join(keys) or 'none'}")
        return key
    if len(keys) != 1:
        raise ValueError(
            f"{p}: {len(keys)} variables ({', '.join(keys) or 'none'}); name one with key="
        )
    return keys[0]


def _finish(p: Path, images: np.ndarray, source: str, inputs: dict) -> ImageSet:
    _check_finite(images, p)
    return ImageSet(images=list(images), source=source, inputs=inputs)


_MAT_ITEMSIZE = {"double": 8, "single": 4, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2,
                 "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "logical": 1, "char": 2}
"""Bytes per element of a MAT variable's class (``scipy.io.whosmat``); others count 8."""


def read_mat(path: str | os.PathLike, key: str | None = None) -> ImageSet:
    """A MATLAB (v4-v7.2) .mat file via ``scipy.io.loadmat``.

    The variable ``key`` (default: the only variable not starting with "__"): a 2-D array
    (H, W) is one grayscale image, a 3-D array (H, W, N) N grayscale images (as the
    exercise's IMAGES.mat), a 4-D array (H, W, C, N) N colour images.
    """
    import scipy.io

    p = _check_file(path)
    sha = _sha(p)
    try:
        # the declared sizes first (headers only): a compressed variable must not claim
        # more memory than there is
        declared = {name: math.prod(shape) * _MAT_ITEMSIZE.get(cls, 8)
                    for name, shape, cls in scipy.io.whosmat(p, appendmat=False)}
    except Exception as exc:  # as below: scipy's parser raises almost any type
        raise ValueError(f"{p}: cannot read MAT file ({one_line(exc)})") from None
    check_declared_size(p, sum(declared.values()), "MAT variables")
    try:
        variables = scipy.io.loadmat(p, appendmat=False)
    except Exception as exc:
        # scipy's parser reports a corrupt file as almost any type (MatReadError is a
        # ValueError, but IndexError, KeyError, zlib.error occur); v7.3 (HDF5) files
        # raise NotImplementedError.
        raise ValueError(f"{p}: cannot read MAT file ({one_line(exc)})") from None
    name = _pick_key(p, sorted(k for k in variables if not k.startswith("__")), key)
    array = variables[name]
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{p}: variable {name!r} is not an array")
    _numeric(array, f"{p}: variable {name!r}")
    if array.ndim == 2:
        stack = array[None]
    elif array.ndim == 3:
        stack = np.moveaxis(array, 2, 0)
    elif array.ndim == 4:
        stack = np.moveaxis(array, 3, 0)
    else:
        raise ValueError(f"{p}: variable {name!r} has shape {array.shape}; need 2-D to 4-D")
    if 0 in stack.shape:
        raise ValueError(f"{p}: variable {name!r} is empty (shape {array.shape})")
    images = np.ascontiguousarray(_scaled(stack))
    return _finish(p, images, f"mat:{p.name}:{name}", {str(path): sha})


def _check_npy_header(where: object, fh) -> None:
    """The .npy header of ``fh``: its declared array size must fit in memory (numpy then
    reads exactly that many bytes, whatever a compressed member would expand to)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        return  # np.load reads (and checks) the rarer versions itself
    check_declared_size(where, math.prod(shape) * dtype.itemsize, "array data")


def read_numpy(path: str | os.PathLike, key: str | None = None) -> ImageSet:
    """A .npy array or one array (``key``, default the only one) of a .npz archive.

    Shapes: (H, W) one image; (N, H, W) N grayscale images; (N, H, W, C) N images with C
    channels. Loaded with ``allow_pickle=False``: object arrays are refused.
    """
    import zipfile

    p = _check_file(path)
    sha = _sha(p)
    bad = (ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError, zlib.error)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                for info in zf.infolist():
                    with zf.open(info) as fh:
                        _check_npy_header(f"{p}: array {info.filename.removesuffix('.npy')!r}",
                                          fh)
        else:
            with open(p, "rb") as fh:
                _check_npy_header(p, fh)
    except TooLargeError:
        raise
    except bad as exc:
        raise ValueError(f"{p}: cannot read numpy file ({one_line(exc)})") from None
    try:
        loaded = np.load(p, allow_pickle=False)
    except bad as exc:  # object arrays (pickles) are a ValueError here
        raise ValueError(f"{p}: cannot read numpy file ({one_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        name, array = None, loaded
    else:
        with loaded:
            name = _pick_key(p, sorted(loaded.files), key)
            try:
                array = loaded[name]
            except bad as exc:
                detail = one_line(exc)
                raise ValueError(f"{p}: cannot read array {name!r} ({detail})") from None
    where = f"{p}" if name is None else f"{p}: array {name!r}"
    _numeric(array, where)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim not in (3, 4):
        raise ValueError(f"{where}: shape {array.shape}; need (H, W), (N, H, W) or (N, H, W, C)")
    if 0 in array.shape:
        raise ValueError(f"{where}: empty array (shape {array.shape})")
    source = f"numpy:{p.name}" if name is None else f"numpy:{p.name}:{name}"
    return _finish(p, _scaled(array), source, {str(path): sha})


# -------------------------------------------------------------------------- Parquet
def read_parquet(path: str | os.PathLike) -> ImageSet:
    """A dataset written by :func:`sae_core.dataset.write_dataset`. Images, labels,
    class names, sources and skipped files are as stored; ``inputs`` is this file and
    its sha256 (the file read now; the original inputs are in its manifest)."""
    from sae_core.dataset import read_dataset

    p = _check_file(path)
    imageset = read_dataset(p)
    imageset.inputs = {str(path): _sha(p)}
    return imageset


# --------------------------------------------------------------------- image folders
def _decode_image(p: Path, data: bytes) -> np.ndarray:
    """One image file's bytes -> float32 (H, W) or (H, W, 3); errors name ``p``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns (then refuses, at twice the size) past MAX_IMAGE_PIXELS: refuse
            # at once, in one line, before the pixels are decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"{p}: image over the limit of {Image.MAX_IMAGE_PIXELS} pixels "
                         "(Pillow's MAX_IMAGE_PIXELS); not decoded") from None
    except UnidentifiedImageError:
        raise ValueError(f"{p}: cannot decode image (not a PNG, JPEG or TIFF file)") from None
    except Exception as exc:
        raise ValueError(f"{p}: cannot decode image ({one_line(exc)})") from None
    try:
        with im:
            im.load()  # decode everything now: a truncated file fails here
            n_frames, fmt = getattr(im, "n_frames", 1), im.format
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                kind, array = "16-bit", np.asarray(im)
            elif mode == "F":
                kind, array = "float", np.asarray(im, dtype=np.float32)
            elif mode in ("P", "PA"):
                kind, array = "palette", np.asarray(im.convert("RGB"))
            elif mode in ("1", "L", "LA", "La"):
                kind, array = "8-bit", np.asarray(im.convert("L"))
            else:
                kind, array = "8-bit", np.asarray(im.convert("RGB"))
    except Exception as exc:
        # Pillow reports broken files as OSError (UnidentifiedImageError, "truncated"),
        # some plugins as SyntaxError or ValueError, and crafted files can raise
        # struct.error, KeyError, IndexError or TypeError: all mean "cannot decode".
        raise ValueError(f"{p}: cannot decode image ({one_line(exc)})") from None
    if n_frames > 1 and fmt != "MPO":  # MPO: a camera JPEG with extra views; take the first
        raise ValueError(f"{p}: {n_frames} frames; only single-frame images are read")
    if kind == "16-bit":
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(f"{p}: {mode} pixel values outside the 16-bit range")
        return array.astype(np.float32) / np.float32(65535)
    if kind == "float":
        return array
    if kind == "palette":
        # A palette of grays is a grayscale image, not a colour one.
        if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            return _scaled(np.ascontiguousarray(array[..., 0]))
    return _scaled(array)


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``root``, relative paths in sorted order.

    Hidden files and folders (name starts with '.') are left out; links to folders are
    not followed but listed among the other files. An unreadable folder is an OSError.
    """

    def fail(exc: OSError) -> None:
        raise exc

    images, others = [], []
    for folder, dirs, files in os.walk(root, onerror=fail):
        rel_folder = Path(folder).relative_to(root)
        visible = sorted(d for d in dirs if not d.startswith("."))
        others += [rel_folder / d for d in visible if (Path(folder) / d).is_symlink()]
        dirs[:] = [d for d in visible if not (Path(folder) / d).is_symlink()]
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = rel_folder / name
            (images if rel.suffix.lower() in IMAGE_EXTENSIONS else others).append(rel)
    return sorted(images, key=lambda r: r.parts), sorted(others, key=lambda r: r.parts)


def read_image_folder(root: str | os.PathLike, labels: str | None = "subfolders") -> ImageSet:
    """PNG, JPEG and TIFF files under ``root`` (recursively), in sorted path order.

    ``labels="subfolders"``: the label is the first-level subfolder of ``root`` the
    image lies in (``root/cat/x.png`` and ``root/cat/a/y.png`` are "cat"); class names
    sorted -> ids 0, 1, ...; an image directly in ``root`` is an error. ``labels=None``:
    no labels.

    Files other than images:
    - hidden files and folders (name starting with '.') are ignored;
    - a file whose extension is not an image extension (.png, .jpg, .jpeg, .tif, .tiff,
      any case) is not read: it is listed in ``skipped`` (and so in the manifest), never
      silently used or dropped; so is a link to a folder (not followed);
    - a file with an image extension that does not decode (corrupt, truncated, not an
      image, several frames) is an error naming it.

    Pixels: float32, 8-bit / 255, 16-bit / 65535 (16-bit colour PNGs are read by Pillow
    as 8-bit), float TIFF as stored. Grayscale images (L, 1, LA, 16-bit, gray palettes)
    are (H, W); colour ones (RGB, RGBA, CMYK, colour palettes, ...) are (H, W, 3),
    alpha dropped. A folder mixing grayscale and colour images, or without images, is
    an error naming it.
    """
    if labels not in ("subfolders", None):
        raise ValueError(f"labels must be 'subfolders' or None; got {labels!r}")
    base = Path(root)
    if not base.exists():
        raise ValueError(f"{base}: folder not found")
    if not base.is_dir():
        raise ValueError(f"{base}: cannot read (not a folder)")
    try:
        image_files, other_files = _walk(base)
    except OSError as exc:
        raise ValueError(f"{base}: cannot read ({exc.strerror or one_line(exc)})") from None
    if not image_files:
        raise ValueError(f"{base}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    images, inputs = [], {}
    first_of_kind: dict[bool, Path] = {}
    for rel in image_files:
        p, data = _read_bytes(base / rel)
        inputs[str(p)] = hashlib.sha256(data).hexdigest()
        img = _decode_image(p, data)
        _check_finite(img, p)
        first_of_kind.setdefault(img.ndim == 3, p)
        if len(first_of_kind) > 1:
            raise ValueError(
                f"{base}: mixed grayscale and colour images ({first_of_kind[False]} is "
                f"grayscale, {first_of_kind[True]} is colour)"
            )
        images.append(img)
    label_array, class_names = None, None
    if labels == "subfolders":
        loose = [rel for rel in image_files if len(rel.parts) < 2]
        if loose:
            raise ValueError(
                f"{base / loose[0]}: image directly in {base}; labels='subfolders' needs "
                "every image inside a class folder"
            )
        class_names = sorted({rel.parts[0] for rel in image_files})
        index = {name: i for i, name in enumerate(class_names)}
        label_array = np.array([index[rel.parts[0]] for rel in image_files], dtype=np.int64)
    return ImageSet(
        images=images,
        labels=label_array,
        source=f"folder:{base.name or base.resolve().name}",
        class_names=class_names,
        skipped=[str(base / rel) for rel in other_files],
        inputs=inputs,
    )


# ------------------------------------------------------------------------- built-ins
def _pixels_sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def read_builtin_natural() -> ImageSet:
    """The built-in photographs of :mod:`sae_core.data`, float32 grayscale in [0, 1].

    No files are named: ``inputs`` maps each image's name (e.g. "sklearn:china") to the
    sha256 of its float32 little-endian pixels, so a changed library shows up.
    """
    from sae_core.data import NATURAL_IMAGE_NAMES, load_natural_image

    images, inputs = [], {}
    for name in NATURAL_IMAGE_NAMES:
        img = load_natural_image(name).astype(np.float32)
        _check_finite(img, name)
        images.append(img)
        inputs[name] = _pixels_sha(img)
    return ImageSet(images=images, source="builtin:natural", inputs=inputs)


def read_builtin_digits() -> ImageSet:
    """scikit-learn's 1,797 8x8 digits: values 0-16 / 16 as float32, labels 0-9.

    ``inputs`` maps "sklearn:digits" to the sha256 of the float32 little-endian pixels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    _check_finite(images, "sklearn:digits")
    return ImageSet(
        images=list(images),
        labels=digits.target.astype(np.int64),
        source="builtin:digits",
        class_names=[str(d) for d in range(10)],
        inputs={"sklearn:digits": _pixels_sha(images)},
    )

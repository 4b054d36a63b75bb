"""Format readers, each on small files the test writes itself, and their one-line errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sae_core import limits, readers
from sae_core.dataset import ImageSet, write_dataset
from sae_core.io import sha256_file
from sae_core.safe_pickle import UnsafePickleError

RNG = np.random.default_rng(0)


def one_line_error(exc_info, *fragments: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def check_set(s: ImageSet, n: int, shape: tuple[int, ...]) -> None:
    assert len(s) == n
    for img in s.images:
        assert img.dtype == np.float32 and img.shape == shape
        assert np.isfinite(img).all()


# ------------------------------------------------------------------------------ IDX
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist(tmp_path):
    images = RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_raw_and_gzip(tmp_path, mnist, compress):
    images, labels = mnist
    wrap = gzip.compress if compress else (lambda b: b)
    ext = ".gz" if compress else ""
    ip = tmp_path / f"train-images-idx3-ubyte{ext}"
    lp = tmp_path / f"train-labels-idx1-ubyte{ext}"
    ip.write_bytes(wrap(idx_bytes(images)))
    lp.write_bytes(wrap(idx_bytes(labels)))
    s = readers.read_idx(ip, lp)
    check_set(s, 5, (28, 28))
    np.testing.assert_array_equal(np.stack(s.images), images.astype(np.float32) / 255)
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [5, 0, 4, 1, 9]
    assert s.source == f"idx:{ip.name}"
    assert s.inputs == {str(ip): sha256_file(ip), str(lp): sha256_file(lp)}
    assert readers.read_idx(ip).labels is None


def test_idx_wrong_magic(tmp_path, mnist):
    images, labels = mnist
    p = tmp_path / "images.idx"
    p.write_bytes(idx_bytes(images, magic=0x00000D03))  # float data: not MNIST pixels
    with pytest.raises(ValueError) as info:
        readers.read_idx(p)
    one_line_error(info, str(p), "magic is 0x00000d03, expected 0x00000803")
    p.write_bytes(idx_bytes(labels))  # a labels file given as images
    with pytest.raises(ValueError, match=r"expected 0x00000803"):
        readers.read_idx(p)


@pytest.mark.parametrize("delta", [-1, 7])
def test_idx_payload_must_match_the_header(tmp_path, mnist, delta):
    raw = idx_bytes(mnist[0])
    raw = raw[:delta] if delta < 0 else raw + bytes(delta)
    p = tmp_path / "images.gz"
    p.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError) as info:
        readers.read_idx(p)
    one_line_error(info, str(p), f"payload is {5 * 784 + delta} bytes", f"says {5 * 784} bytes")


def test_idx_label_count_must_match(tmp_path, mnist):
    images, labels = mnist
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l").write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(ValueError) as info:
        readers.read_idx(tmp_path / "i", tmp_path / "l")
    one_line_error(info, str(tmp_path / "l"), "4 labels for 5 images")


def test_idx_corrupt_gzip(tmp_path, mnist):
    data = gzip.compress(idx_bytes(mnist[0]))
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        readers.read_idx(tmp_path / "cut.gz")
    one_line_error(info, "cut.gz", "corrupt gzip")


# ---------------------------------------------------------------------------- CIFAR
def cifar_batch(n: int, key: str = "labels") -> tuple[dict, np.ndarray]:
    images = RNG.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
    batch = {b"batch_label": b"batch", key.encode(): list(range(n)), b"data": data}
    return batch, images


def test_cifar_batches_and_meta(tmp_path):
    b1, im1 = cifar_batch(3)
    b2, im2 = cifar_batch(2)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(b1, protocol=4))
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(b2, protocol=4))
    names = [b"airplane", b"automobile", b"bird", b"cat"]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    paths = [tmp_path / "data_batch_1", tmp_path / "data_batch_2", tmp_path / "batches.meta"]
    s = readers.read_cifar(paths)
    check_set(s, 5, (32, 32, 3))
    expected = np.concatenate([im1, im2]).astype(np.float32) / 255
    np.testing.assert_array_equal(np.stack(s.images), expected)
    assert s.labels.tolist() == [0, 1, 2, 0, 1]
    assert s.class_names == ["airplane", "automobile", "bird", "cat"]
    assert s.source == "cifar:data_batch_1,data_batch_2" and len(s.inputs) == 3


def test_cifar100_fine_labels_single_path(tmp_path):
    b, _ = cifar_batch(2, key="fine_labels")
    (tmp_path / "train").write_bytes(pickle.dumps(b))
    s = readers.read_cifar(tmp_path / "train")
    assert s.labels.tolist() == [0, 1] and s.class_names is None


class MarkerOnUnpickle:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_cifar_batch_is_refused(tmp_path):
    marker = tmp_path / "marker"
    b, _ = cifar_batch(2)
    b[b"labels"] = MarkerOnUnpickle(marker)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(b))
    with pytest.raises(UnsafePickleError) as info:
        readers.read_cifar([p])
    one_line_error(info, str(p), "refused global", "system")
    assert not marker.exists()


def test_cifar_bad_batches(tmp_path):
    b, _ = cifar_batch(2)
    b[b"data"] = b[b"data"][:, :100]
    (tmp_path / "b").write_bytes(pickle.dumps(b))
    with pytest.raises(ValueError) as info:
        readers.read_cifar([tmp_path / "b"])
    one_line_error(info, "(2, 100)", "need (N, 3072)")
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"not a CIFAR batch"):
        readers.read_cifar([tmp_path / "list"])
    (tmp_path / "cut").write_bytes(pickle.dumps(cifar_batch(2)[0])[:50])
    with pytest.raises(ValueError) as info:
        readers.read_cifar([tmp_path / "cut"])
    one_line_error(info, str(tmp_path / "cut"), "not a valid pickle")


# ------------------------------------------------------------------------------ .mat
def test_mat_3d_like_images_mat(tmp_path):
    images = RNG.standard_normal((16, 12, 4))  # whitened: negative values stay
    scipy.io.savemat(tmp_path / "IMAGES.mat", {"IMAGES": images})
    s = readers.read_mat(tmp_path / "IMAGES.mat")
    check_set(s, 4, (16, 12))
    np.testing.assert_allclose(s.images[2], images[:, :, 2].astype(np.float32))
    assert s.source == "mat:IMAGES.mat:IMAGES"


def test_mat_2d_4d_and_keys(tmp_path):
    colour = RNG.integers(0, 256, size=(8, 9, 3, 2), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "m.mat", {"one": np.ones((5, 6)), "colour": colour})
    with pytest.raises(ValueError) as info:
        readers.read_mat(tmp_path / "m.mat")
    one_line_error(info, "m.mat", "2 variables (colour, one)")
    check_set(readers.read_mat(tmp_path / "m.mat", key="one"), 1, (5, 6))
    s = readers.read_mat(tmp_path / "m.mat", key="colour")
    check_set(s, 2, (8, 9, 3))
    np.testing.assert_array_equal(s.images[1], colour[..., 1].astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"no variable 'nope'; variables: colour, one"):
        readers.read_mat(tmp_path / "m.mat", key="nope")


def test_mat_corrupt(tmp_path):
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    with pytest.raises(ValueError) as info:
        readers.read_mat(tmp_path / "bad.mat")
    one_line_error(info, "bad.mat", "cannot read MAT file")


# ---------------------------------------------------------------------------- numpy
@pytest.mark.parametrize(
    "shape,n,image_shape",
    [((4, 5), 1, (4, 5)), ((3, 4, 5), 3, (4, 5)), ((2, 4, 5, 3), 2, (4, 5, 3))],
)
def test_npy_shapes(tmp_path, shape, n, image_shape):
    array = RNG.random(shape)
    np.save(tmp_path / "a.npy", array)
    s = readers.read_numpy(tmp_path / "a.npy")
    check_set(s, n, image_shape)
    np.testing.assert_array_equal(
        np.stack(s.images), array.astype(np.float32).reshape(n, *image_shape)
    )


def test_npz_keys_and_uint8(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.full((2, 3, 3), 255, np.uint8), y=np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"2 variables .x, y."):
        readers.read_numpy(tmp_path / "a.npz")
    s = readers.read_numpy(tmp_path / "a.npz", key="x")
    check_set(s, 2, (3, 3))
    assert s.images[0].max() == 1.0 and s.source == "numpy:a.npz:x"


def test_npy_nan_and_pickled_objects_refused(tmp_path):
    array = np.zeros((2, 3, 3))
    array[1, 2, 0] = np.nan
    np.save(tmp_path / "nan.npy", array)
    with pytest.raises(ValueError) as info:
        readers.read_numpy(tmp_path / "nan.npy")
    one_line_error(info, "nan.npy", "NaN or Inf")
    np.save(tmp_path / "inf.npy", np.full((2, 2), np.inf))
    with pytest.raises(ValueError, match=r"inf.npy: NaN or Inf"):
        readers.read_numpy(tmp_path / "inf.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as info:
        readers.read_numpy(tmp_path / "obj.npy")
    one_line_error(info, "obj.npy", "cannot read numpy file")


# -------------------------------------------------------------------------- Parquet
def test_read_parquet(tmp_path):
    s = ImageSet([np.ones((2, 3), np.float32)], np.array([1]), "x", ["a", "b"])
    write_dataset(tmp_path / "d.parquet", tmp_path / "d.json", s)
    back = readers.read_parquet(tmp_path / "d.parquet")
    assert back.labels.tolist() == [1] and back.class_names == ["a", "b"]
    assert back.inputs == {str(tmp_path / "d.parquet"): sha256_file(tmp_path / "d.parquet")}
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 junk")
    with pytest.raises(ValueError) as info:
        readers.read_parquet(tmp_path / "junk.parquet")
    one_line_error(info, "junk.parquet", "cannot read Parquet")


# --------------------------------------------------------------------- image folders
def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, **kw)
    return path


@pytest.fixture
def colour_folder(tmp_path):
    root = tmp_path / "pets"
    # Smooth, so that JPEG stays close; every value distinct enough to catch a transpose.
    yy, xx = np.mgrid[0:6, 0:5]
    rgb = np.stack([yy * 40 + 10, xx * 50 + 5, 200 - yy * 10 - xx * 10], axis=2).astype(np.uint8)
    save(root / "dog" / "b.png", rgb)
    save(root / "dog" / "a.tiff", rgb)
    save(root / "cat" / "x.jpg", rgb, quality=95)
    save(root / "cat" / "deep" / "y.png", rgb, "RGBA")
    save(root / "cat" / "p.png", rgb, "P")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored, never decoded")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    return root, rgb


def test_image_folder_with_subfolder_labels(colour_folder):
    root, rgb = colour_folder
    s = readers.read_image_folder(root)
    check_set(s, 5, (6, 5, 3))
    assert s.class_names == ["cat", "dog"]
    # sorted by path: cat/deep/y.png, cat/p.png, cat/x.jpg, dog/a.tiff, dog/b.png
    assert s.labels.tolist() == [0, 0, 0, 1, 1]
    expected = rgb.astype(np.float32) / 255
    for i in (0, 3, 4):  # lossless: RGBA (alpha dropped), TIFF, PNG
        np.testing.assert_array_equal(s.images[i], expected)
    assert np.abs(s.images[2] - expected).mean() < 0.05  # JPEG
    assert s.skipped == [str(root / "cat" / "notes.txt")]
    assert sorted(s.inputs) == sorted(
        str(root / r)
        for r in ("cat/deep/y.png", "cat/p.png", "cat/x.jpg", "dog/a.tiff", "dog/b.png")
    )
    assert s.source == "folder:pets"
    unlabelled = readers.read_image_folder(root, labels=None)
    assert unlabelled.labels is None and unlabelled.class_names is None


def test_image_folder_grayscale_modes(tmp_path):
    gray = RNG.integers(0, 256, size=(4, 7), dtype=np.uint8)
    save(tmp_path / "g" / "l.png", gray)
    save(tmp_path / "g" / "la.png", gray, "LA")
    save(tmp_path / "g" / "gp.png", gray, "P")  # palette of grays -> grayscale
    save(tmp_path / "g" / "w16.png", gray.astype(np.uint16) * 257)  # 16-bit
    save(tmp_path / "g" / "t.tif", gray)
    s = readers.read_image_folder(tmp_path / "g", labels=None)
    check_set(s, 5, (4, 7))
    for img in s.images:
        np.testing.assert_allclose(img, gray / 255.0, atol=1e-6)


def test_image_folder_image_directly_in_root_needs_no_labels(tmp_path):
    save(tmp_path / "r" / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "r")
    one_line_error(info, str(tmp_path / "r" / "a.png"), "class folder")
    assert len(readers.read_image_folder(tmp_path / "r", labels=None)) == 1


def test_image_folder_mixed_grayscale_and_colour(tmp_path):
    save(tmp_path / "m" / "a" / "g.png", np.zeros((3, 3), np.uint8))
    save(tmp_path / "m" / "b" / "c.png", np.full((3, 3, 3), [255, 0, 0], np.uint8))
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "m")
    one_line_error(info, "mixed grayscale and colour", "a/g.png is grayscale", "b/c.png is colour")


def test_image_folder_empty(tmp_path):
    (tmp_path / "e" / "sub").mkdir(parents=True)
    (tmp_path / "e" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "e")
    one_line_error(info, str(tmp_path / "e"), "no images")


def test_image_folder_corrupt_and_truncated_png(tmp_path):
    good = save(tmp_path / "src.png", RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "c" / "k").mkdir(parents=True)
    (tmp_path / "c" / "k" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "c")
    one_line_error(info, str(tmp_path / "c" / "k" / "bad.png"), "cannot decode image")
    (tmp_path / "c" / "k" / "bad.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "c")
    one_line_error(info, str(tmp_path / "c" / "k" / "bad.png"), "cannot decode image")
    (tmp_path / "c" / "k" / "bad.png").write_text("a text file named .png")
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "c")
    assert str(info.value) == (f"{tmp_path / 'c' / 'k' / 'bad.png'}: cannot decode image (not "
                               "a PNG, JPEG or TIFF file)")  # no <_io.BytesIO object at 0x...>


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """Pillow's decompression-bomb limit refuses at once, in one line (not a warning)."""
    import warnings

    from PIL import Image

    save(tmp_path / "c" / "big.png", np.zeros((40, 40), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: a warning by default
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")
        readers.read_image_folder(tmp_path, labels=None)
    one_line_error(info, "big.png", "over the limit of 1000 pixels")


# ------------------------------------------------------------------- bounded reading
def test_a_gzip_idx_bomb_is_read_no_further_than_its_header_declares(tmp_path):
    """64 MiB of zeros behind a header declaring 7,840 bytes: refused after reading the
    declared payload and a small margin, never the whole stream (peak well under 1 MiB
    beyond the payload, measured by tracemalloc, which sees numpy's and zlib's buffers)."""
    import tracemalloc

    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as fh:
        fh.write(idx_bytes(np.zeros((10, 28, 28), np.uint8)))
        zeros = bytes(1 << 20)
        for _ in range(64):
            fh.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            readers.read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line_error(info, str(bomb), "payload is over", "says 7840 bytes")
    assert peak < 2 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_an_idx_header_declaring_more_than_memory_is_refused_before_reading(tmp_path):
    header = (0x803).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in (60000, 65535, 65535))
    (tmp_path / "huge.gz").write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(limits.TooLargeError) as info:
        readers.read_idx(tmp_path / "huge.gz")
    one_line_error(info, "huge.gz", "declares", "GiB of memory available")


def test_an_npz_member_declaring_more_than_memory_is_refused(tmp_path):
    """A crafted .npz whose array header claims 10 TB (a few bytes on disk)."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**13,)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", header.getvalue() + bytes(1000))
    with pytest.raises(limits.TooLargeError) as info:
        readers.read_numpy(tmp_path / "bomb.npz")
    one_line_error(info, "bomb.npz", "array 'images'", "declares 9313.2 GiB")


@pytest.mark.parametrize("kind", ["mat", "npy"])
def test_declared_sizes_are_checked_from_the_headers(tmp_path, monkeypatch, kind):
    """.mat variables and .npy arrays are measured from their headers against the memory
    available (here made 1 KiB) before any data is read."""
    import scipy.io

    array = np.zeros((4, 32, 32), np.float32)
    if kind == "mat":
        scipy.io.savemat(tmp_path / "x.mat", {"IMAGES": array}, do_compression=True)
        call = lambda: readers.read_mat(tmp_path / "x.mat")  # noqa: E731
    else:
        np.save(tmp_path / "x.npy", array)
        call = lambda: readers.read_numpy(tmp_path / "x.npy")  # noqa: E731
    call()  # fits
    monkeypatch.setattr(limits, "available_memory", lambda: 1024)
    with pytest.raises(limits.TooLargeError) as info:
        call()
    one_line_error(info, f"x.{kind}", "declares", "more than the 0.0 GiB of memory available")


def test_float_tiff_nan_refused(tmp_path):
    array = np.zeros((3, 3), np.float32)
    array[1, 1] = np.nan
    save(tmp_path / "f" / "a" / "nan.tif", array)
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "f")
    one_line_error(info, "nan.tif", "NaN or Inf")


# ------------------------------------------------------------- missing / unreadable
@pytest.mark.parametrize(
    "call",
    [
        lambda p: readers.read_idx(p),
        lambda p: readers.read_cifar([p]),
        lambda p: readers.read_mat(p),
        lambda p: readers.read_numpy(p),
        lambda p: readers.read_parquet(p),
    ],
)
def test_missing_and_unreadable_paths(tmp_path, call):
    missing = tmp_path / "missing.bin"
    with pytest.raises(ValueError) as info:
        call(missing)
    assert str(info.value) == f"{missing}: file not found"
    with pytest.raises(ValueError) as info:
        call(tmp_path)  # a folder where a file is expected
    assert str(info.value).startswith(f"{tmp_path}: cannot read")


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError) as info:
        readers.read_image_folder(tmp_path / "nope")
    one_line_error(info, str(tmp_path / "nope"), "not found")


# ------------------------------------------------------------------------- built-ins
def test_builtin_digits():
    s = readers.read_builtin_digits()
    check_set(s, 1797, (8, 8))
    assert s.labels.min() == 0 and s.labels.max() == 9 and len(s.class_names) == 10
    assert max(img.max() for img in s.images) == 1.0
    assert set(s.inputs) == {"sklearn:digits"}


def test_builtin_natural():
    s = readers.read_builtin_natural()
    assert len(s) == 10 and s.labels is None
    for img in s.images:
        assert img.dtype == np.float32 and img.ndim == 2 and 0 <= img.min() <= img.max() <= 1
    assert len(s.inputs) == 10 and s.source == "builtin:natural"


def test_image_folder_links_to_folders_are_reported_not_followed(tmp_path):
    save(tmp_path / "r" / "a" / "x.png", np.zeros((2, 2), np.uint8))
    save(tmp_path / "elsewhere" / "y.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "r" / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    s = readers.read_image_folder(tmp_path / "r")
    assert len(s) == 1 and s.skipped == [str(tmp_path / "r" / "b")]

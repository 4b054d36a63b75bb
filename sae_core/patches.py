"""Whitening, patch sampling and normalisation (the data side of the UFLDL exercise).

The pieces, in the order :func:`make_patches` applies them:

1. per-image whitening: ``'none'`` or ``'1f'`` (:func:`whiten_1f`, per channel for colour);
2. sampling: ``'random'`` (:func:`sample_random_patches`, the exercise's scheme, fast) or
   ``'dense'`` (:func:`extract_dense`, every patch on a strided grid);
3. a seeded train / held-out split (:func:`split_heldout`);
4. normalisation (+ optional ZCA) fitted on the training patches only
   (:class:`sae_core.transform.PatchTransform`) and applied to both sets.

Patches are flattened row-major; colour patches (p, p, C) channels-last, so a patch's
dimension is ``p*p`` (grayscale) or ``p*p*C``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sae_core.config import invalid_setting, is_int, is_real
from sae_core.transform import (
    CONTRAST_EPS_DEFAULT,
    NORMALISATIONS,
    Blocks,
    PatchTransform,
    array_blocks,
    row_chunks,
)

_invalid = functools.partial(invalid_setting, owner="PatchConfig")
"""A PatchConfig setting out of range (:func:`sae_core.config.invalid_setting`)."""


def one_over_f_filter(h: int, w: int, f0: float = 0.4) -> np.ndarray:
    """The Olshausen & Field whitening filter on the ``rfft2`` grid of an (h, w) image:
    R(f) = |f| exp(-(|f| / f0)^4), |f| in cycles/pixel, shape (h, w // 2 + 1)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    return radius * np.exp(-((radius / f0) ** 4))


def whiten_1f(image: np.ndarray, f0: float = 0.4) -> np.ndarray:
    """Olshausen & Field whitening of one grayscale image (H, W) -> (H, W) float64.

    The image's 2-D spectrum (mean removed) is multiplied by the zero-phase filter
    R(f) = |f| exp(-(|f| / f0)^4), |f| in cycles/pixel: the |f| ramp flattens the 1/f
    amplitude spectrum of natural scenes, the exp(-(|f|/f0)^4) roll-off keeps the noise
    and aliasing of the highest frequencies out. The result is scaled to unit variance.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"whiten_1f needs a 2-D grayscale image; got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("whiten_1f: image contains NaN or Inf")
    h, w = img.shape
    out = np.fft.irfft2(np.fft.rfft2(img - img.mean()) * one_over_f_filter(h, w, f0), s=(h, w))
    std = out.std()
    return out / std if std > 0 else out


def sample_patches(
    images: list[np.ndarray], n_patches: int, patch_size: int, seed: int
) -> np.ndarray:
    """Random patches as in the exercise: for each patch a random image, then a random
    top-left corner. Returns (n_patches, patch_size**2) float64, each patch flattened
    row-major. Same seed, same images -> same patches, byte for byte. (The float64 form
    of :func:`sample_random_patches`, which does the work.)
    """
    return sample_random_patches(images, n_patches, patch_size, seed, dtype=np.float64)


def normalize_ufldl(patches: np.ndarray) -> np.ndarray:
    """The exercise's normalisation of patches (m, d) -> (m, d) in [0.1, 0.9].

    Each patch minus its own mean; values clipped to +/- 3 standard deviations (one std
    over all values); then mapped linearly from [-3 std, 3 std] to [0.1, 0.9], which
    suits the sigmoid output units.
    """
    x = patches - patches.mean(axis=1, keepdims=True)
    pstd = 3.0 * x.std()
    if pstd == 0:
        return np.full_like(x, 0.5)
    x = np.clip(x, -pstd, pstd) / pstd
    return (x + 1.0) * 0.4 + 0.1


def natural_patches(n_patches: int = 10_000, patch_size: int = 8, seed: int = 0) -> np.ndarray:
    """The exercise's training set from the built-in photographs: 1/f-whitened images,
    random patches, UFLDL normalisation. Returns (n_patches, patch_size**2) float64."""
    from sae_core.data import load_natural_images

    images = [whiten_1f(img) for img in load_natural_images()]
    return normalize_ufldl(sample_patches(images, n_patches, patch_size, seed))


# =============================================================================== images
WHITENINGS = ("none", "1f")
SAMPLINGS = ("random", "dense")



def check_images(images: Sequence[np.ndarray], patch_size: int | None = None) -> list[np.ndarray]:
    """Validate a list of images: each (H, W) grayscale or (H, W, C) colour, all of one kind
    (and one C), finite, and (if ``patch_size`` is given) at least patch_size x patch_size.

    Returns the images as numpy arrays (no copies). Raises ValueError naming the image.
    """
    if isinstance(images, np.ndarray):
        raise ValueError(
            "images must be a sequence (list) of arrays, one per image; wrap a single "
            f"image in a list (got one array of shape {images.shape})"
        )
    arrays = [np.asarray(img) for img in images]
    if not arrays:
        raise ValueError("images is empty: need at least one image")
    first_kind = None
    for i, img in enumerate(arrays):
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] < 1):
            raise ValueError(
                f"image {i} has shape {img.shape}; need (H, W) grayscale or (H, W, C) colour"
            )
        if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
            raise ValueError(f"image {i} has dtype {img.dtype}; need a real-valued image")
        kind = None if img.ndim == 2 else img.shape[2]
        if i == 0:
            first_kind = kind
        elif kind != first_kind:
            raise ValueError(
                f"images mix grayscale and colour (or channel counts): image 0 has shape "
                f"{arrays[0].shape}, image {i} has shape {img.shape}"
            )
        if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
            raise ValueError(f"image {i} of shape {img.shape} contains NaN or Inf pixels")
        if patch_size is not None and min(img.shape[:2]) < patch_size:
            raise ValueError(
                f"image {i} of shape {img.shape} is smaller than the "
                f"{patch_size}x{patch_size} patch"
            )
    return arrays


def whiten_images(
    images: Sequence[np.ndarray], whitening: str = "1f", f0: float = 0.4
) -> list[np.ndarray]:
    """Per-image whitening: ``'none'`` (images returned as they are) or ``'1f'``
    (:func:`whiten_1f`, float64, each colour channel whitened on its own)."""
    if whitening not in WHITENINGS:
        raise ValueError(f"whitening must be one of {WHITENINGS}; got {whitening!r}")
    arrays = check_images(images)
    if whitening == "none":
        return arrays
    out = []
    for img in arrays:
        if img.ndim == 2:
            out.append(whiten_1f(img, f0))
        else:
            out.append(np.stack([whiten_1f(img[..., c], f0) for c in range(img.shape[2])], -1))
    return out


def _n_channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


# ============================================================================== sampling
def extract_dense(
    image: np.ndarray, patch_size: int, stride: int = 1, *, dtype: Any = np.float32
) -> np.ndarray:
    """Every patch_size x patch_size patch whose top-left corner lies on the grid
    (0, stride, 2 stride, ...) in both directions, in row-major grid order.

    Returns (n_rows * n_cols, p*p) for a grayscale (H, W) image, (n, p*p*C) for a colour
    (H, W, C) one (each patch (p, p, C) flattened row-major, channels last), where
    n_rows = (H - p) // stride + 1 and n_cols = (W - p) // stride + 1.
    """
    if not is_int(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1; got {patch_size!r}")
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1; got {stride!r}")
    (img,) = check_images([image], patch_size)
    p = int(patch_size)
    c = _n_channels(img)
    img3 = img.reshape(img.shape[0], img.shape[1], c)
    win = sliding_window_view(img3, (p, p), axis=(0, 1))[::stride, ::stride]  # (nh, nw, C, p, p)
    nh, nw = win.shape[:2]
    out = np.empty((nh * nw, p * p * c), dtype=dtype)
    np.copyto(out.reshape(nh, nw, p, p, c), win.transpose(0, 1, 3, 4, 2), casting="unsafe")
    return out


_GATHER_BYTES = 4 << 20  # bytes of patches gathered per chunk (a temporary of this size)


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _run_chunks(fn: Callable[[int, int], None], total: int, chunk: int, n_threads: int) -> None:
    """Call fn(a, b) on [0, total) in chunks; with threads when there is more than one chunk.
    Each call writes its own rows of the output, so the result does not depend on threads."""
    bounds = [(a, min(total, a + chunk)) for a in range(0, total, chunk)]
    if n_threads <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            fn(a, b)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(n_threads, len(bounds))) as pool:
        for _ in pool.map(lambda ab: fn(*ab), bounds):
            pass


def sample_random_patches(
    images: Sequence[np.ndarray],
    n_patches: int,
    patch_size: int,
    seed: int,
    *,
    dtype: Any = np.float32,
    n_threads: int | None = None,
) -> np.ndarray:
    """Random patches as in the exercise, fast: for each patch a random image, then a random
    top-left corner, with exactly the random draws of :func:`sample_patches` (so for float64
    output and grayscale images the result equals ``sample_patches`` byte for byte; float32
    output holds the same pixels rounded to float32). Grayscale (H, W) or colour (H, W, C)
    images; returns (n_patches, p*p*C) of ``dtype``, row-major, channels last.

    How: an image that gives at least as many patch bytes as p times its own size is copied
    once into a "column table" T[c, r] = img[r, c:c+p] (p times the image), in which every
    patch is one contiguous run of p*p*C values, so one indexed copy moves a whole patch.
    When every image qualifies and all tables together are no larger than the output, one
    table holds them all and the output is filled in order, 4 MB of patches at a time
    (``n_threads`` threads share the chunks; default: up to 4, as many as the process may
    use). Otherwise images are taken one at a time, from a reused table or (few patches)
    row by row straight from the image, and the patches are scattered to their rows with
    ``np.put``. Extra memory: the tables (never more than the output), a few int64 arrays of
    n_patches, 4 MB temporaries per thread. The result does not depend on ``n_threads``.
    """
    if not is_int(n_patches) or n_patches < 1:
        raise ValueError(f"n_patches must be an integer >= 1; got {n_patches!r}")
    if not is_int(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1; got {patch_size!r}")
    imgs = check_images(images, patch_size)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point type; got {dtype}")
    n_threads = _default_threads() if n_threads is None else max(1, int(n_threads))
    n, p = int(n_patches), int(patch_size)
    c = _n_channels(imgs[0])
    d = p * p * c
    isz = dtype.itemsize
    row_t = np.dtype((np.void, p * c * isz))  # one patch row: p*C values
    patch_t = np.dtype((np.void, d * isz))  # one whole patch

    # the draws of sample_patches: image per patch; per image (in image order) rows then cols
    rng = np.random.default_rng(seed)
    which = rng.integers(len(imgs), size=n)
    counts = np.bincount(which, minlength=len(imgs))
    key = which.astype(np.uint8 if len(imgs) <= 256 else np.uint16) if len(imgs) <= 65536 else which
    order = np.argsort(key, kind="stable")  # slots grouped by image, ascending within each
    del which, key
    bounds = np.concatenate([[0], np.cumsum(counts)])

    out = np.empty((n, d), dtype=dtype)
    out_p = out.view(patch_t).reshape(n)
    chunk = max(1, _GATHER_BYTES // (d * isz))
    shapes = [img.shape[:2] for img in imgs]
    table_rows = [(w - p + 1) * h for h, w in shapes]  # rows of p*C values per image table
    table_bytes = [t * p * c * isz for t in table_rows]
    tabled = [tb <= k * d * isz for tb, k in zip(table_bytes, counts, strict=True)]

    if all(tabled) and sum(table_bytes) <= out.nbytes:
        # one table for all images; output filled in order
        tbase = np.concatenate([[0], np.cumsum(table_rows)])
        table = np.empty((int(tbase[-1]), p * c), dtype=dtype)
        base = np.empty(n, dtype=np.int64)
        for i, (h, w) in enumerate(shapes):
            slots = order[bounds[i] : bounds[i + 1]]
            if slots.size == 0:  # as sample_patches: no draws for an image without patches
                continue
            rows = rng.integers(h - p + 1, size=slots.size)
            cols = rng.integers(w - p + 1, size=slots.size)
            cols *= h
            cols += rows
            cols += tbase[i]
            base[slots] = cols
        del order

        def build(i: int, _b: int) -> None:
            _fill_table(table[tbase[i] : tbase[i + 1]], imgs[i], p)

        _run_chunks(build, len(imgs), 1, n_threads)
        src = np.ndarray(
            shape=(table.shape[0] - p + 1,), dtype=patch_t, buffer=table, strides=(p * c * isz,)
        )

        def gather(a: int, b: int) -> None:
            out_p[a:b] = src[base[a:b]]

        _run_chunks(gather, n, chunk, n_threads)
        return out

    # image by image: gather (from a table or straight from the image) and scatter
    big = max((tb for tb, t in zip(table_bytes, tabled, strict=True) if t), default=0) // isz
    table_buf = np.empty(big, dtype=dtype) if big else None
    for i, ((h, w), img) in enumerate(zip(shapes, imgs, strict=True)):
        slots = order[bounds[i] : bounds[i + 1]]
        if slots.size == 0:
            continue
        rows = rng.integers(h - p + 1, size=slots.size)
        cols = rng.integers(w - p + 1, size=slots.size)
        if tabled[i]:
            table = table_buf[: table_rows[i] * p * c].reshape(table_rows[i], p * c)
            _fill_table(table, img, p)
            src = np.ndarray(
                shape=(table_rows[i] - p + 1,), dtype=patch_t, buffer=table,
                strides=(p * c * isz,),
            )
            cols *= h
        else:
            flat = np.ascontiguousarray(img, dtype=dtype)
            src = np.ndarray(
                shape=((h - p) * w + (w - p) + 1, p), dtype=row_t, buffer=flat,
                strides=(c * isz, w * c * isz),
            )
            rows *= w
        cols += rows  # flat start index of every patch of image i
        del rows

        def scatter(a: int, b: int, src=src, slots=slots, starts=cols) -> None:
            np.put(out_p, slots[a:b], src[starts[a:b]].view(patch_t).reshape(b - a), mode="clip")

        _run_chunks(scatter, slots.size, chunk, n_threads)
    return out


def _fill_table(table: np.ndarray, img: np.ndarray, p: int) -> None:
    """table (rows, p*C) <- T[c, r] = img[r, c:c+p] (all channels), for c in [0, W-p]."""
    h, w = img.shape[:2]
    c = _n_channels(img)
    win = sliding_window_view(img.reshape(h, w, c), p, axis=1)  # (H, W-p+1, C, p)
    np.copyto(table.reshape(w - p + 1, h, p, c), win.transpose(1, 0, 3, 2), casting="unsafe")


def split_heldout(
    n: int, heldout_fraction: float, seed: int, chunk: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split of n rows: round(n * heldout_fraction) held-out rows
    chosen at random (stream ``default_rng([seed, 1])``, independent of the sampling's;
    ``[seed, 1, chunk]`` for the later chunks of :func:`raw_patch_chunks`).
    Returns (train_rows, heldout_rows), each sorted ascending (int64)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1); got {heldout_fraction!r}")
    n_held = round(n * heldout_fraction)
    if n_held == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    if n_held >= n:
        raise ValueError(
            f"heldout_fraction {heldout_fraction} of {n} patches leaves no training patches"
        )
    rng = np.random.default_rng([seed, 1] if chunk == 0 else [seed, 1, chunk])
    held = np.sort(rng.choice(n, size=n_held, replace=False)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


# ================================================================================ config



@dataclass(frozen=True)
class PatchConfig:
    """How :func:`make_patches` turns images into training and held-out patches.

    The defaults reproduce the UFLDL exercise: 10,000 random 8x8 patches of 1/f-whitened
    images, UFLDL normalisation (per-patch mean removed, +/-3 std clip, [0.1, 0.9]).
    """

    patch_size: int = 8
    """Side p of the square patches, in pixels (>= 1)."""
    n_patches: int = 10_000
    """Number of patches sampled, training and held-out together (>= 1; 'random' only:
    'dense' takes every patch on its grid)."""
    whitening: str = "1f"
    """Per-image whitening before sampling: 'none' or '1f' (Olshausen & Field, f0 0.4)."""
    zca: bool = False
    """Fit ZCA whitening on the (stage-1 normalised) training patches and apply it."""
    zca_epsilon: float = 0.1
    """Added to the covariance eigenvalues in ZCA (> 0; Coates et al. use 0.1)."""
    normalisation: str = "ufldl"
    """'ufldl', 'contrast' (Coates et al. 2011), 'minmax' ([0, 1] from the training
    patches' range) or 'none'; see :class:`PatchTransform`."""
    contrast_eps: float = CONTRAST_EPS_DEFAULT
    """Added to each patch's variance in 'contrast' (> 0), in squared pixel units: the
    paper's 10 for 0-255 pixels is 10/255^2 for [0, 1] pixels (the default)."""
    sampling: str = "random"
    """'random' (a random image, then a random location, per patch) or 'dense' (every
    patch on a grid of step ``stride``)."""
    stride: int = 1
    """Grid step of 'dense' sampling, in pixels (>= 1)."""
    heldout_fraction: float = 0.0
    """Fraction of the sampled patches held out (in [0, 1)); the exercise used none."""
    seed: int = 0
    """Seed of the sampling and of the split (>= 0)."""

    def __post_init__(self) -> None:
        if not is_int(self.patch_size) or self.patch_size < 1:
            _invalid("patch_size", "an integer >= 1", self.patch_size)
        if not is_int(self.n_patches) or self.n_patches < 1:
            _invalid("n_patches", "an integer >= 1", self.n_patches)
        if self.whitening not in WHITENINGS:
            _invalid("whitening", f"one of {WHITENINGS}", self.whitening)
        if not isinstance(self.zca, (bool, np.bool_)):
            _invalid("zca", "a bool (True or False)", self.zca)
        if not is_real(self.zca_epsilon) or self.zca_epsilon <= 0:
            _invalid("zca_epsilon", "a finite number > 0", self.zca_epsilon)
        if self.normalisation not in NORMALISATIONS:
            _invalid("normalisation", f"one of {NORMALISATIONS}", self.normalisation)
        if not is_real(self.contrast_eps) or self.contrast_eps <= 0:
            _invalid("contrast_eps", "a finite number > 0", self.contrast_eps)
        if self.sampling not in SAMPLINGS:
            _invalid("sampling", f"one of {SAMPLINGS}", self.sampling)
        if not is_int(self.stride) or self.stride < 1:
            _invalid("stride", "an integer >= 1", self.stride)
        if not is_real(self.heldout_fraction) or not 0 <= self.heldout_fraction < 1:
            _invalid("heldout_fraction", "a number in [0, 1)", self.heldout_fraction)
        if not is_int(self.seed) or self.seed < 0:
            _invalid("seed", "an integer >= 0", self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        d = dataclasses.asdict(self)
        d["zca"] = bool(d["zca"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PatchConfig field(s): {', '.join(unknown)}")
        return cls(**d)


# ================================================================================ recipe
CHUNK_PATCHES = 1 << 18
"""Random sampling draws, splits and writes patches this many at a time (chunk j > 0
from its own streams, ``[seed, 2, j]`` and ``[seed, 1, j]``), so memory does not grow
with ``n_patches``; up to this many, the patches are those of one draw from ``seed``."""


def raw_patch_chunks(
    images: Sequence[np.ndarray], config: PatchConfig
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Raw (un-normalised) float32 patches of already whitened images, as (train rows,
    held-out rows) per chunk of :data:`CHUNK_PATCHES` draws ('random'), or one chunk
    holding every patch of the grid ('dense')."""
    p = config.patch_size
    if config.sampling == "dense":
        parts = [extract_dense(img, p, config.stride, dtype=np.float32) for img in images]
        chunks = [parts[0] if len(parts) == 1 else np.concatenate(parts)]
        del parts
        bounds = [(0, chunks[0].shape[0])]
    else:
        n = config.n_patches
        bounds = [(a, min(n, a + CHUNK_PATCHES)) for a in range(0, n, CHUNK_PATCHES)]
    for j, (a, b) in enumerate(bounds):
        if config.sampling == "dense":
            raw = chunks.pop()
        else:
            seed = config.seed if j == 0 else [config.seed, 2, j]
            raw = sample_random_patches(images, b - a, p, seed, dtype=np.float32)
        train_rows, held_rows = split_heldout(raw.shape[0], config.heldout_fraction,
                                              config.seed, chunk=j)
        heldout = raw[held_rows]
        if held_rows.size:
            # move the training rows forward in place (train_rows[k] >= k, ascending)
            for lo, hi in row_chunks(train_rows.size):
                raw[lo:hi] = raw[train_rows[lo:hi]]
        yield raw[: train_rows.size], heldout
        del raw, heldout


def _prepared(images: Sequence[np.ndarray], config: PatchConfig | None) -> tuple[
        PatchConfig, list[np.ndarray]]:
    cfg = PatchConfig() if config is None else config
    if not isinstance(cfg, PatchConfig):
        raise TypeError(f"config must be a PatchConfig; got {type(cfg).__name__}")
    imgs = check_images(images, cfg.patch_size)
    return cfg, whiten_images(imgs, cfg.whitening)


def _fit_transform(blocks, m: int, d: int, cfg: PatchConfig) -> PatchTransform:
    return PatchTransform.fit_blocks(blocks, m, d, cfg.normalisation, zca=cfg.zca,
                                     zca_epsilon=cfg.zca_epsilon, contrast_eps=cfg.contrast_eps)


def make_patches(
    images: Sequence[np.ndarray], config: PatchConfig | None = None
) -> tuple[np.ndarray, np.ndarray, PatchTransform]:
    """Images -> (train (m1, d) float32, heldout (m2, d) float32, fitted PatchTransform),
    in memory.

    Per-image whitening -> sampling -> seeded split -> normalisation (+ ZCA) fitted on the
    training patches -> applied to both. With the default config the training set is the
    exercise's (:func:`natural_patches` on the same images, to float32 rounding).
    :func:`write_patches` makes the same patches straight into a patch store, with
    memory bounded whatever their number.
    """
    cfg, imgs = _prepared(images, config)
    chunks = list(raw_patch_chunks(imgs, cfg))
    del imgs
    if len(chunks) == 1:
        train, heldout = chunks[0]
    else:
        train = np.concatenate([c[0] for c in chunks])
        heldout = np.concatenate([c[1] for c in chunks])
    del chunks
    transform = _fit_transform(array_blocks(train), train.shape[0], train.shape[1], cfg)
    transform.apply(train, out=train)
    transform.apply(heldout, out=heldout)
    return train, heldout, transform


def write_patches(
    images: Sequence[np.ndarray], config: PatchConfig, path: str | os.PathLike,
    source_sha256: str,
) -> tuple[int, int, PatchTransform]:
    """The patches of :func:`make_patches`, byte for byte, written to the patch store
    ``path`` (:func:`sae_core.patch_store.write_patch_store`) with memory bounded by one
    chunk of :data:`CHUNK_PATCHES` ('random'; 'dense' holds its grid in memory) and
    independent of ``n_patches``. Returns (n_train, n_heldout, the fitted transform).

    The raw patches go to two temporary files beside ``path`` (read back with plain reads,
    which leave nothing resident), the transform is fitted on the training file, and the
    store is written from both files, transformed block by block."""
    from sae_core.patch_store import PatchRows, write_patch_store

    cfg, imgs = _prepared(images, config)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        files = [Path(tmp) / "train.f32", Path(tmp) / "heldout.f32"]
        counts, d = [0, 0], None
        with open(files[0], "wb") as tr, open(files[1], "wb") as he:
            for train, heldout in raw_patch_chunks(imgs, cfg):
                d = train.shape[1]
                for fh, part, i in ((tr, train, 0), (he, heldout, 1)):
                    part.tofile(fh)
                    counts[i] += part.shape[0]
        del imgs
        blocks = [_file_blocks(f, n, d) for f, n in zip(files, counts, strict=True)]
        transform = _fit_transform(blocks[0], counts[0], d, cfg)

        def transformed(raw: Blocks) -> Blocks:
            return lambda: (transform.apply(block) for block in raw())

        write_patch_store(target, *(PatchRows(n, d, transformed(b))
                                    for n, b in zip(counts, blocks, strict=True)),
                          cfg.to_dict(), source_sha256)
    return counts[0], counts[1], transform


def _file_blocks(path: Path, m: int, d: int) -> Blocks:
    """The (m, d) float32 rows of a raw file as blocks of :func:`row_chunks`."""
    def blocks() -> Iterator[np.ndarray]:
        with open(path, "rb") as fh:
            for a, b in row_chunks(m):
                yield np.fromfile(fh, dtype=np.float32, count=(b - a) * d).reshape(b - a, d)
    return blocks

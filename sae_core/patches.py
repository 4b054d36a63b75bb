"""Whitening, patch sampling and normalisation (the data side of the UFLDL exercise)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    filt = radius * np.exp(-((radius / f0) ** 4))
    out = np.fft.irfft2(np.fft.rfft2(img - img.mean()) * filt, s=(h, w))
    std = out.std()
    return out / std if std > 0 else out


def sample_patches(
    images: list[np.ndarray], n_patches: int, patch_size: int, seed: int
) -> np.ndarray:
    """Random patches as in the exercise: for each patch a random image, then a random
    top-left corner. Returns (n_patches, patch_size**2) float64, each patch flattened
    row-major. Same seed, same images -> same patches, byte for byte.
    """
    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1; got {n_patches}")
    for i, img in enumerate(images):
        if img.ndim != 2 or min(img.shape) < patch_size:
            raise ValueError(
                f"image {i} of shape {img.shape} is smaller than the "
                f"{patch_size}x{patch_size} patch"
            )
    rng = np.random.default_rng(seed)
    which = rng.integers(len(images), size=n_patches)
    out = np.empty((n_patches, patch_size * patch_size), dtype=np.float64)
    for i, img in enumerate(images):
        slots = np.flatnonzero(which == i)
        if slots.size == 0:
            continue
        rows = rng.integers(img.shape[0] - patch_size + 1, size=slots.size)
        cols = rng.integers(img.shape[1] - patch_size + 1, size=slots.size)
        windows = sliding_window_view(img, (patch_size, patch_size))
        out[slots] = windows[rows, cols].reshape(slots.size, -1)
    return out


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

"""The data side: whitening, patch sampling and the exercise's normalisation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sae_core.data import NATURAL_IMAGE_NAMES, load_natural_image
from sae_core.patches import normalize_ufldl, sample_patches, whiten_1f


def radial_power(image, edges):
    """Mean power |F(f)|^2 of the image in rings edges[i] <= |f| < edges[i+1] (cycles/px)."""
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.hypot(fx, fy)
    return np.array([power[(radius >= a) & (radius < b)].mean()
                     for a, b in itertools.pairwise(edges)])


MID_BAND = np.linspace(0.05, 0.3, 11)


@pytest.fixture(scope="module")
def china():
    return load_natural_image("sklearn:china")


def test_whiten_unit_variance_zero_mean(whitened_images):
    assert len(whitened_images) == len(NATURAL_IMAGE_NAMES)
    for img in whitened_images:
        assert img.dtype == np.float64
        assert img.std() == pytest.approx(1.0, rel=1e-12)
        assert abs(img.mean()) < 1e-10


def test_whiten_keeps_shape(china):
    assert whiten_1f(china).shape == china.shape
    odd = china[:101, :77]
    assert whiten_1f(odd).shape == (101, 77)


def test_whitened_spectrum_flat_over_mid_frequencies(china):
    raw = radial_power(china, MID_BAND)
    white = radial_power(whiten_1f(china), MID_BAND)
    # natural images: power falls steeply with frequency ...
    assert raw.max() / raw.min() > 5.0
    # ... whitening flattens it to within a factor of 3 between 0.05 and 0.3 cycles/px
    assert white.max() / white.min() < 3.0


def test_whitening_flattens_synthetic_one_over_f_noise():
    """An image with amplitude spectrum 1/|f| comes out with power following the filter's
    roll-off exp(-2 (|f|/f0)^4) only."""
    rng = np.random.default_rng(0)
    n = 256
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    radius = np.hypot(fx, fy)
    amplitude = np.where(radius > 0, 1.0 / np.maximum(radius, 1e-12), 0.0)
    spectrum = amplitude * np.exp(2j * np.pi * rng.uniform(size=(n, n)))
    image = np.real(np.fft.ifft2(spectrum))
    white = radial_power(whiten_1f(image, f0=0.4), MID_BAND)
    centres = 0.5 * (MID_BAND[:-1] + MID_BAND[1:])
    expected = np.exp(-2 * (centres / 0.4) ** 4)
    ratio = (white / white[0]) / (expected / expected[0])
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_whiten_rejects_bad_images():
    with pytest.raises(ValueError, match="2-D"):
        whiten_1f(np.zeros((4, 4, 3)))
    img = np.ones((8, 8))
    img[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        whiten_1f(img)


def test_whiten_constant_image_is_zero():
    assert np.array_equal(whiten_1f(np.full((16, 16), 0.3)), np.zeros((16, 16)))


# ----------------------------------------------------------------- sampling
@pytest.fixture
def toy_images():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(20, 30)), rng.normal(size=(15, 12))]


def test_sample_patches_shape_and_deterministic(toy_images):
    a = sample_patches(toy_images, 100, 5, seed=7)
    b = sample_patches(toy_images, 100, 5, seed=7)
    c = sample_patches(toy_images, 100, 5, seed=8)
    assert a.shape == (100, 25) and a.dtype == np.float64
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_sampled_patches_are_real_windows(toy_images):
    patches = sample_patches(toy_images, 50, 4, seed=0)
    for p in patches:
        window = p.reshape(4, 4)
        found = False
        for img in toy_images:
            views = np.lib.stride_tricks.sliding_window_view(img, (4, 4))
            if np.any(np.all(views == window, axis=(2, 3))):
                found = True
                break
        assert found


def test_sample_patches_uses_every_image(toy_images):
    marked = [np.zeros((10, 10)), np.ones((10, 10))]
    patches = sample_patches(marked, 200, 3, seed=0)
    means = patches.mean(axis=1)
    assert set(np.unique(means)) == {0.0, 1.0}


def test_patch_larger_than_image_raises(toy_images):
    with pytest.raises(ValueError, match=r"image 1 of shape \(15, 12\) is smaller than"):
        sample_patches(toy_images, 10, 13, seed=0)


def test_patch_equal_to_image_side_ok():
    img = np.arange(36.0).reshape(6, 6)
    patches = sample_patches([img], 3, 6, seed=0)
    assert np.array_equal(patches, np.tile(img.ravel(), (3, 1)))


def test_sample_patches_needs_one_patch(toy_images):
    with pytest.raises(ValueError, match="n_patches"):
        sample_patches(toy_images, 0, 3, seed=0)


# ----------------------------------------------------------------- normalisation
def test_normalize_ufldl_range_and_mean():
    rng = np.random.default_rng(0)
    raw = rng.standard_t(df=3, size=(2000, 64)) * 5 + 3  # heavy tails, offset
    out = normalize_ufldl(raw)
    assert out.shape == raw.shape
    assert out.min() >= 0.1 and out.max() <= 0.9
    assert out.min() == pytest.approx(0.1) and out.max() == pytest.approx(0.9)  # clipped
    assert abs(out.mean() - 0.5) < 0.01
    # each patch's own mean removed: unclipped patches average exactly 0.5
    x = raw - raw.mean(axis=1, keepdims=True)
    unclipped = np.all(np.abs(x) < 3 * x.std(), axis=1)
    assert unclipped.any()
    np.testing.assert_allclose(out[unclipped].mean(axis=1), 0.5, atol=1e-12)


def test_normalize_ufldl_is_affine_before_clipping():
    x = np.array([[-1.0, 0.0, 1.0], [0.5, -0.5, 0.0]])
    pstd = 3.0 * x.std()  # x already has zero row means
    expected = (np.clip(x, -pstd, pstd) / pstd + 1.0) * 0.4 + 0.1
    np.testing.assert_allclose(normalize_ufldl(x), expected, rtol=1e-15)


def test_normalize_ufldl_constant_patches():
    assert np.array_equal(normalize_ufldl(np.full((3, 4), 7.0)), np.full((3, 4), 0.5))


def test_natural_patches_fixture(natural_X, whitened_images):
    assert natural_X.shape == (10_000, 64)
    assert natural_X.min() >= 0.1 and natural_X.max() <= 0.9
    assert abs(natural_X.mean() - 0.5) < 0.01
    # the same pipeline spelled out: whitened images -> patches -> normalisation
    again = normalize_ufldl(sample_patches(whitened_images, 10_000, 8, seed=0))
    assert np.array_equal(natural_X, again)

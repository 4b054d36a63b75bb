"""The data side: whitening, patch sampling and the exercise's normalisation."""

from __future__ import annotations

import dataclasses
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


# =========================================================== patch extraction (make_patches)
import tracemalloc  # noqa: E402

from sae_core.io import FileFormatError  # noqa: E402
from sae_core.patches import (  # noqa: E402
    PatchConfig,
    check_images,
    extract_dense,
    make_patches,
    sample_random_patches,
    split_heldout,
    whiten_images,
)
from sae_core.transform import (  # noqa: E402
    CONTRAST_EPS_DEFAULT,
    PatchTransform,
    fit_zca,
    normalize_contrast,
)


def reference_random_patches(images, n, p, seed):
    """The exercise's draws, one patch at a time (grayscale or colour, channels last)."""
    rng = np.random.default_rng(seed)
    which = rng.integers(len(images), size=n)
    c = 1 if images[0].ndim == 2 else images[0].shape[2]
    out = np.empty((n, p * p * c))
    for i, img in enumerate(images):
        slots = np.flatnonzero(which == i)
        rows = rng.integers(img.shape[0] - p + 1, size=slots.size)
        cols = rng.integers(img.shape[1] - p + 1, size=slots.size)
        for s, r, q in zip(slots, rows, cols, strict=True):
            out[s] = img[r : r + p, q : q + p].ravel()
    return out


def reference_dense(img, p, stride):
    out = []
    for r in range(0, img.shape[0] - p + 1, stride):
        for q in range(0, img.shape[1] - p + 1, stride):
            out.append(img[r : r + p, q : q + p].ravel())
    return np.array(out)


@pytest.fixture
def colour_images():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(23, 31, 3)), rng.normal(size=(12, 17, 3))]


# ----------------------------------------------------------------- whitening of images
def test_whiten_images_colour_per_channel_flat_spectrum():
    """China (colour), each channel: power falls 16-19x between 0.05 and 0.25 cycles/px;
    whitened, it stays within a factor 2 (observed 1.5-1.8)."""
    from sklearn.datasets import load_sample_image

    from sae_core.data import load_natural_image

    rgb = load_sample_image("china.jpg").astype(np.float64) / 255.0
    (white,) = whiten_images([rgb], "1f")
    assert white.shape == rgb.shape
    band = np.linspace(0.05, 0.25, 9)
    for c in range(3):
        np.testing.assert_array_equal(white[..., c], whiten_1f(rgb[..., c]))
        raw = radial_power(rgb[..., c], band)
        flat = radial_power(white[..., c], band)
        assert raw.max() / raw.min() > 10.0
        assert flat.max() / flat.min() < 2.0
    gray = load_natural_image("skimage:camera")
    assert whiten_images([gray], "none")[0] is gray


# ----------------------------------------------------------------- dense extraction
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_extract_dense_matches_slow_reference(toy_images, colour_images, stride):
    for img in [toy_images[0], colour_images[0]]:
        got = extract_dense(img, 5, stride)
        ref = reference_dense(img, 5, stride)
        nh = (img.shape[0] - 5) // stride + 1
        nw = (img.shape[1] - 5) // stride + 1
        assert got.shape == (nh * nw, 25 * (1 if img.ndim == 2 else 3))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.astype(np.float32))
    np.testing.assert_array_equal(
        extract_dense(toy_images[1], 4, stride, dtype=np.float64),
        reference_dense(toy_images[1], 4, stride),
    )


def test_extract_dense_bad_arguments(toy_images):
    with pytest.raises(ValueError, match=r"image 0 of shape \(15, 12\) is smaller"):
        extract_dense(toy_images[1], 13)
    with pytest.raises(ValueError, match="stride"):
        extract_dense(toy_images[0], 3, 0)


# ----------------------------------------------------------------- fast random sampling
def test_fast_sampler_equals_sample_patches_every_path():
    rng = np.random.default_rng(3)
    small = [rng.normal(size=(20, 30)), rng.normal(size=(15, 12))]
    mixed = [rng.normal(size=(200, 200)), rng.normal(size=(10, 10))]
    three = [*small, rng.normal(size=(9, 9))]
    for images, n in [(small, 5000), (small, 7), (mixed, 2000), (three, 1), (three, 2)]:
        ref = sample_patches(images, n, 4, seed=5)
        got64 = sample_random_patches(images, n, 4, 5, dtype=np.float64, n_threads=1)
        assert got64.tobytes() == ref.tobytes()
        got32 = sample_random_patches(images, n, 4, 5, n_threads=3)
        assert got32.dtype == np.float32
        assert got32.tobytes() == ref.astype(np.float32).tobytes()


def test_fast_sampler_colour_matches_reference(colour_images):
    for n in [3000, 20]:  # the one-table path and the image-by-image path
        got = sample_random_patches(colour_images, n, 6, 2, dtype=np.float64)
        assert got.shape == (n, 6 * 6 * 3)
        np.testing.assert_array_equal(got, reference_random_patches(colour_images, n, 6, 2))


def test_fast_sampler_seeds(toy_images):
    a = sample_random_patches(toy_images, 500, 5, 7)
    assert a.tobytes() == sample_random_patches(toy_images, 500, 5, 7).tobytes()
    assert a.tobytes() != sample_random_patches(toy_images, 500, 5, 8).tobytes()


def test_fast_sampler_memory_within_twice_output(whitened_images):
    n = 400_000
    images = [img.astype(np.float32) for img in whitened_images]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = sample_random_patches(images, n, 8, 0, n_threads=2)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out.shape == (n, 64)
    assert peak <= 2 * out.nbytes, peak / out.nbytes


def test_image_errors(toy_images, colour_images):
    with pytest.raises(ValueError, match=r"image 1 of shape \(15, 12\) is smaller than"):
        sample_random_patches(toy_images, 10, 13, 0)
    bad = [toy_images[0], toy_images[1].copy()]
    bad[1][3, 4] = np.nan
    with pytest.raises(ValueError, match=r"image 1 of shape \(15, 12\) contains NaN"):
        make_patches(bad, PatchConfig(patch_size=4, n_patches=10))
    with pytest.raises(ValueError, match=r"mix grayscale and colour.*image 1 has shape \(23, 31"):
        check_images([toy_images[0], colour_images[0]])
    with pytest.raises(ValueError, match="sequence"):
        make_patches(np.zeros((3, 20, 20)), PatchConfig(patch_size=4))
    with pytest.raises(ValueError, match="empty"):
        check_images([])


# ----------------------------------------------------------------- split
def test_split_heldout():
    train, held = split_heldout(1000, 0.25, seed=3)
    assert held.size == 250 and train.size == 750
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    again = split_heldout(1000, 0.25, seed=3)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(split_heldout(1000, 0.25, seed=4)[1], held)
    assert split_heldout(10, 0.0, 0)[1].size == 0
    with pytest.raises(ValueError, match="no training patches"):
        split_heldout(1, 0.9, 0)


# ----------------------------------------------------------------- ZCA and normalisation
def correlated(m=20_000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.1, 3.0, d)
    return rng.normal(size=(m, d)) @ mix + rng.normal(size=d) * 5


def test_zca_whitens_to_identity():
    x = correlated()
    assert np.abs(np.cov(x.T) - np.diag(np.diag(np.cov(x.T)))).max() > 0.5  # correlated
    z = fit_zca(x, epsilon=1e-9)
    y = z.apply(x)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.T @ y / len(y), np.eye(12), atol=1e-5)  # S / (S + eps)
    np.testing.assert_array_equal(z.matrix, z.matrix.T)
    # a large epsilon shrinks every direction: covariance eigenvalues S / (S + eps) < 1
    big = fit_zca(x, epsilon=10.0).apply(x)
    assert np.linalg.eigvalsh(big.T @ big / len(big)).max() < 1.0


def test_ufldl_transform_range_and_mean():
    rng = np.random.default_rng(0)
    raw = (rng.standard_t(df=3, size=(3000, 64)) * 5 + 3).astype(np.float32)
    t = PatchTransform.fit(raw, "ufldl")
    out = t.apply(raw)
    assert out.dtype == np.float32
    assert out.min() >= 0.1 and out.max() <= 0.9
    assert abs(out.mean() - 0.5) < 0.01
    # without ZCA it is the exercise's normalize_ufldl (std from these patches)
    np.testing.assert_allclose(t.apply(raw, dtype=np.float64), normalize_ufldl(raw.astype(float)),
                               rtol=0, atol=1e-12)
    other = t.apply(raw[:100] * 3)  # held-out patches use the training clip value
    assert other.min() >= 0.1 and other.max() <= 0.9
    zt = PatchTransform.fit(raw, "ufldl", zca=True, zca_epsilon=0.1)
    zout = zt.apply(raw)
    assert zout.min() >= 0.1 and zout.max() <= 0.9 and abs(zout.mean() - 0.5) < 0.01


def test_contrast_normalisation_mean_and_variance():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 255, size=(500, 36)) * rng.uniform(0, 0.2, size=(500, 1))
    var = raw.var(axis=1)
    out = normalize_contrast(raw, contrast_eps=10.0)
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1), var / (var + 10.0), rtol=1e-10)
    t = PatchTransform.fit(raw, "contrast", contrast_eps=10.0)
    np.testing.assert_allclose(t.apply(raw, dtype=np.float64), out, rtol=0, atol=1e-14)
    assert CONTRAST_EPS_DEFAULT == pytest.approx(10.0 / 255**2)


def test_minmax_on_train_and_clipped_elsewhere():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 16)) * 7 - 2
    t = PatchTransform.fit(train, "minmax")
    out = t.apply(train, dtype=np.float64)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out, (train - train.min()) / (train.max() - train.min()))
    held = t.apply(train * 3)
    assert held.min() == 0.0 and held.max() == 1.0
    assert np.array_equal(PatchTransform.fit(train, "none").apply(train), train.astype(np.float32))


@pytest.mark.parametrize("normalisation", ["ufldl", "contrast", "minmax", "none"])
@pytest.mark.parametrize("zca", [False, True])
def test_patch_transform_save_load_round_trip(tmp_path, normalisation, zca):
    x = correlated(m=2000, d=16).astype(np.float32)
    t = PatchTransform.fit(x[:1500], normalisation, zca=zca, zca_epsilon=0.05, contrast_eps=0.3)
    t.save(tmp_path / "t.safetensors")
    back = PatchTransform.load(tmp_path / "t.safetensors")
    assert back.to_dict() == t.to_dict()
    assert t.apply(x[1500:]).tobytes() == back.apply(x[1500:]).tobytes()
    if zca:
        assert back.zca.matrix.tobytes() == t.zca.matrix.tobytes()


def test_patch_transform_load_errors(tmp_path):
    from sae_core.io import save_tensors
    from sae_core.transform import TRANSFORM

    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, {}, {"format": "something else"}, TRANSFORM)
    with pytest.raises(FileFormatError, match=r"bad\.safetensors"):
        PatchTransform.load(bad)
    bad = tmp_path / "bad2.safetensors"
    save_tensors(bad, {}, {**PatchTransform.fit(np.ones((3, 4)), "none").to_dict(),
                           "zca_epsilon": 0.1}, TRANSFORM)
    with pytest.raises(FileFormatError, match=r"bad2\.safetensors"):
        PatchTransform.load(bad)
    with pytest.raises(ValueError, match="fitted on 4"):
        PatchTransform.fit(np.ones((3, 4)), "none").apply(np.ones((3, 5)))


# ----------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("patch_size", 0, ">= 1"),
        ("patch_size", 2.5, ">= 1"),
        ("n_patches", 0, ">= 1"),
        ("whitening", "zca", "one of"),
        ("zca", 1, "bool"),
        ("zca_epsilon", 0.0, "> 0"),
        ("zca_epsilon", float("nan"), "> 0"),
        ("normalisation", "l2", "one of"),
        ("contrast_eps", -1.0, "> 0"),
        ("sampling", "grid", "one of"),
        ("stride", 0, ">= 1"),
        ("heldout_fraction", 1.0, r"\[0, 1\)"),
        ("heldout_fraction", -0.1, r"\[0, 1\)"),
        ("seed", -1, ">= 0"),
        ("seed", True, ">= 0"),
    ],
)
def test_patch_config_validation_names_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"PatchConfig\.{field} must be .*{allowed}"):
        PatchConfig(**{field: value})


def test_patch_config_dict_round_trip():
    cfg = PatchConfig(patch_size=6, zca=True, normalisation="contrast", heldout_fraction=0.1)
    assert PatchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        PatchConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    d = PatchConfig()
    assert (d.patch_size, d.n_patches, d.whitening, d.normalisation, d.sampling) == (
        8, 10_000, "1f", "ufldl", "random")


# ----------------------------------------------------------------- make_patches
def test_make_patches_default_is_the_exercise(natural_X, whitened_images):
    train, held, t = make_patches(whitened_images, PatchConfig(whitening="none"))
    assert train.shape == (10_000, 64) and train.dtype == np.float32
    assert held.shape == (0, 64) and held.dtype == np.float32
    np.testing.assert_allclose(train, natural_X, rtol=0, atol=2e-6)
    assert t.normalisation == "ufldl" and t.zca is None


def test_make_patches_whitens_images(china):
    cfg = PatchConfig(n_patches=300)
    train, _, _ = make_patches([china], cfg)
    again, _, _ = make_patches([whiten_1f(china)], PatchConfig(n_patches=300, whitening="none"))
    np.testing.assert_array_equal(train, again)


def test_make_patches_split_seeds_and_reuse(toy_images):
    cfg = PatchConfig(patch_size=4, n_patches=1000, whitening="none", normalisation="none",
                      heldout_fraction=0.2, seed=3)
    train, held, _ = make_patches(toy_images, cfg)
    assert train.shape == (800, 16) and held.shape == (200, 16)
    raw = sample_random_patches(toy_images, 1000, 4, 3)
    tr_rows, he_rows = split_heldout(1000, 0.2, 3)
    assert np.array_equal(train, raw[tr_rows]) and np.array_equal(held, raw[he_rows])
    a = make_patches(toy_images, dataclasses.replace(cfg, normalisation="ufldl"))
    b = make_patches(toy_images, dataclasses.replace(cfg, normalisation="ufldl"))
    c = make_patches(toy_images, dataclasses.replace(cfg, normalisation="ufldl", seed=4))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    # the fitted transform re-applied to the raw held-out patches gives the held-out set
    assert a[2].apply(raw[he_rows]).tobytes() == a[1].tobytes()
    assert a[2].clip == PatchTransform.fit(raw[tr_rows], "ufldl").clip


def test_make_patches_dense_colour_zca_contrast(colour_images):
    cfg = PatchConfig(patch_size=5, sampling="dense", stride=2, whitening="none", zca=True,
                      zca_epsilon=0.01, normalisation="contrast", contrast_eps=0.1)
    train, held, t = make_patches(colour_images, cfg)
    n = sum(((h - 5) // 2 + 1) * ((w - 5) // 2 + 1) for h, w, _ in
            (img.shape for img in colour_images))
    assert train.shape == (n, 75) and held.shape == (0, 75)
    assert t.zca is not None and np.isfinite(train).all()
    raw = np.concatenate([extract_dense(img, 5, 2) for img in colour_images])
    np.testing.assert_array_equal(train, t.apply(raw))


@pytest.mark.parametrize("normalisation", ["ufldl", "minmax", "none", "contrast"])
def test_range_map_is_the_third_stage_of_apply(normalisation):
    """The numbers ConvEncoder folds into the encoder give what apply() computes."""
    rng = np.random.default_rng(4)
    train, other = rng.normal(size=(200, 9)), rng.normal(scale=2.0, size=(50, 9))
    t = PatchTransform.fit(train, normalisation)
    clip, alpha, beta = t.range_map()
    y = other - other.mean(axis=1, keepdims=True) if normalisation in ("ufldl", "contrast") \
        else other.copy()
    if normalisation == "contrast":
        y /= np.sqrt((y * y).mean(axis=1, keepdims=True) + t.contrast_eps)
    if clip is not None:
        y = np.clip(y, *clip)
    np.testing.assert_allclose(alpha * y + beta, t.apply(other, dtype=np.float64), atol=1e-12)

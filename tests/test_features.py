"""Convolutional SAE features: batched tensor code against an explicit loop, pooling,
TopK per position, whitening and resizing of image stacks, one-line errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sae_core import SparseAutoencoder
from sae_core.features import (
    ConvEncoder,
    as_image_stack,
    conv_features,
    output_grid,
    pool_maps,
    region_bounds,
    upscale_images,
    whiten_1f_stack,
)
from sae_core.patches import extract_dense, whiten_1f
from sae_core.transform import PatchTransform


def conv_features_loop(
    estimator,
    images,
    *,
    transform=None,
    stride: int = 1,
    pool_grid=(2, 2),
    pool: str = "sum",
    pad: int = 0,
) -> np.ndarray:
    """The slow reference of :func:`conv_features` (no whitening): for each image and each
    position, cut the channels-last patch, ``transform.apply`` it (float64) and
    ``estimator.transform`` it, then pool region by region: the oracle the batched
    tensor code is checked against."""
    x = as_image_stack(images)
    width = ((0, 0), (pad, pad), (pad, pad)) + (((0, 0),) if x.ndim == 4 else ())
    x = np.pad(x, width)
    gh, gw = pool_grid
    d = estimator.components_.shape[1]
    channels = 1 if x.ndim == 3 else x.shape[3]
    p = math.isqrt(d // channels)
    nh, nw = output_grid(x.shape[1], x.shape[2], p, stride)
    s = estimator.components_.shape[0]
    reducer = {"sum": np.sum, "mean": np.mean, "max": np.max}[pool]
    out = np.zeros((x.shape[0], gh * gw * s))
    for n in range(x.shape[0]):
        maps = np.zeros((nh, nw, s))
        for i in range(nh):
            for j in range(nw):
                patch = x[n, i * stride : i * stride + p, j * stride : j * stride + p]
                v = patch.reshape(1, -1).astype(np.float64)
                if transform is not None:
                    v = transform.apply(v, dtype=np.float64)
                maps[i, j] = estimator.transform(v)[0]
        r = 0
        for r0, r1 in region_bounds(nh, gh):
            for c0, c1 in region_bounds(nw, gw):
                out[n, r * s : (r + 1) * s] = reducer(maps[r0:r1, c0:c1], axis=(0, 1))
                r += 1
    return out


def images(n=4, h=7, w=8, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape)


def fitted(imgs, p, penalty, normalisation, zca=False, n_components=6, **kw):
    """A tiny SAE (a few L-BFGS steps) on the dense patches of ``imgs``, and its transform."""
    patches = np.concatenate([extract_dense(img, p, 1, dtype=np.float64) for img in imgs])
    transform = PatchTransform.fit(patches, normalisation, zca=zca, zca_epsilon=0.1,
                                   contrast_eps=0.05)
    X = transform.apply(patches, dtype=np.float64)
    sae = SparseAutoencoder(n_components, penalty=penalty, max_iter=4, device="cpu",
                            dtype="float64", **kw).fit(X)
    return sae, transform


CASES = [  # (penalty, normalisation, zca, channels): the kl model needs inputs in [0, 1]
    ("kl", "ufldl", False, None),
    ("kl", "minmax", True, None),
    ("l1", "contrast", True, None),
    ("topk", "contrast", False, 3),
    ("kl", "ufldl", True, 2),
    ("l1", "none", False, None),
]


@pytest.mark.parametrize("penalty,normalisation,zca,channels", CASES)
@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_batched_equals_explicit_loop(penalty, normalisation, zca, channels, pool):
    imgs = images(c=channels)
    sae, transform = fitted(imgs, 3, penalty, normalisation, zca, k=2)
    kw = dict(transform=transform, stride=2, pool_grid=(2, 3), pool=pool, pad=1)
    fast = conv_features(sae, imgs, dtype=torch.float64, chunk_bytes=1, **kw)
    slow = conv_features_loop(sae, imgs, **kw)
    # padded 9x10 -> 4x4 positions at stride 2, 2x3 regions, 6 units
    assert fast.shape == slow.shape == (4, 6 * 6)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-9)


def test_float32_close_and_chunking_does_not_matter():
    imgs = images(n=5)
    sae, transform = fitted(imgs, 3, "kl", "ufldl")
    one = conv_features(sae, imgs, transform=transform, chunk_bytes=1)
    all_at_once = conv_features(sae, imgs, transform=transform, chunk_bytes=1 << 30)
    assert one.dtype == np.float32
    np.testing.assert_allclose(one, all_at_once, rtol=1e-5, atol=1e-5)
    slow = conv_features_loop(sae, imgs, transform=transform)
    np.testing.assert_allclose(one, slow, rtol=1e-4, atol=1e-4)
    again = conv_features(sae, imgs, transform=transform, chunk_bytes=1)
    assert one.tobytes() == again.tobytes()  # deterministic on the CPU


def test_without_transform_patches_are_encoded_as_they_are():
    imgs = images(n=2)
    sae, _ = fitted(imgs, 2, "l1", "none")
    np.testing.assert_allclose(
        conv_features(sae, imgs, dtype=torch.float64, pool="max"),
        conv_features_loop(sae, imgs, pool="max"), rtol=1e-9, atol=1e-12,
    )


def test_topk_keeps_k_per_position():
    imgs = images(n=3, h=9, w=9)
    sae, transform = fitted(imgs, 3, "topk", "contrast", n_components=8, k=3)
    sae.intercept_hidden_ = sae.intercept_hidden_ + 50.0  # every pre-activation > 0
    enc = ConvEncoder.from_estimator(sae, transform, dtype=torch.float64)
    x = torch.from_numpy(imgs).unsqueeze(1)
    maps = enc.maps(x, stride=1)
    assert maps.shape == (3, 8, 7, 7)
    active = (maps > 0).sum(dim=1)
    assert torch.equal(active, torch.full((3, 7, 7), 3))
    # ... and they are the k largest of the dense (ReLU) code at that position
    enc_dense = ConvEncoder.from_estimator(sae, transform, dtype=torch.float64)
    object.__setattr__(enc_dense, "penalty", "l1")
    dense = enc_dense.maps(x, stride=1)
    kth = dense.topk(3, dim=1).values[:, -1:]
    assert torch.equal(maps > 0, dense >= kth)
    assert torch.allclose(maps[maps > 0], dense[maps > 0], rtol=1e-12, atol=1e-12)


def test_pooling_by_hand():
    maps = torch.arange(2 * 1 * 5 * 4, dtype=torch.float64).reshape(2, 1, 5, 4)
    m = maps[0, 0]
    # rows split [0, 2) [2, 5), cols [0, 2) [2, 4); region-major, one unit
    quads = [m[:2, :2], m[:2, 2:], m[2:, :2], m[2:, 2:]]
    out = pool_maps(maps, (2, 2), "sum")
    assert out.shape == (2, 4)
    assert out[0].tolist() == [float(q.sum()) for q in quads]
    assert pool_maps(maps, (2, 2), "max")[0].tolist() == [float(q.max()) for q in quads]
    assert pool_maps(maps, (2, 2), "mean")[0].tolist() == [float(q.mean()) for q in quads]
    assert pool_maps(maps, 1, "sum")[:, 0].tolist() == maps.sum(dim=(1, 2, 3)).tolist()


def test_pooling_is_region_major_over_units():
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, 1, 0] = 7.0  # unit 1, region (1, 0) = region 2 of a 2x2 grid
    out = pool_maps(maps, (2, 2), "sum")[0]
    assert out.nonzero().flatten().tolist() == [2 * 3 + 1]


def test_region_bounds_partition():
    for n in range(1, 12):
        for parts in range(1, n + 1):
            b = region_bounds(n, parts)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(a1 == b0 for (_, a1), (b0, _) in itertools.pairwise(b))
            assert all(hi > lo for lo, hi in b)


def test_whiten_stack_equals_per_image():
    gray = images(n=3, h=12, w=10)
    out = whiten_1f_stack(gray)
    for i in range(3):
        np.testing.assert_allclose(out[i], whiten_1f(gray[i]), atol=1e-12)
    colour = images(n=2, h=9, w=11, c=3)
    out = whiten_1f_stack(colour)
    for c in range(3):
        np.testing.assert_allclose(out[1, :, :, c], whiten_1f(colour[1, :, :, c]), atol=1e-12)


def test_conv_features_whitening_is_the_stack_whitening():
    imgs = images(n=2, h=8, w=8)
    sae, transform = fitted(list(whiten_1f_stack(imgs)), 4, "l1", "ufldl")
    np.testing.assert_allclose(
        conv_features(sae, imgs, transform=transform, whitening="1f", dtype=torch.float64),
        conv_features_loop(sae, whiten_1f_stack(imgs), transform=transform),
        rtol=1e-9, atol=1e-9,
    )


def test_upscale_images():
    x = images(n=2, h=3, w=4)
    near = upscale_images(x, 2, "nearest")
    assert near.shape == (2, 6, 8) and near.dtype == np.float32
    np.testing.assert_array_equal(near, np.repeat(np.repeat(x, 2, 1), 2, 2).astype(np.float32))
    assert upscale_images(images(n=1, h=4, w=4, c=3), 1.5).shape == (1, 6, 6, 3)
    np.testing.assert_array_equal(upscale_images(x, 1), x.astype(np.float32))
    lin = upscale_images(np.ones((1, 4, 4)), 2)
    np.testing.assert_allclose(lin, 1.0, atol=1e-6)


def one_line_error(fn, *args, match, **kw):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


def test_errors_are_one_line_and_name_the_input():
    imgs = images(n=2)
    sae, _ = fitted(imgs, 3, "l1", "ufldl")
    one_line_error(conv_features, sae, imgs[0], match=r"images must have shape \(N, H, W\)")
    one_line_error(conv_features, sae, np.zeros((2, 0, 5)), match="images must have shape")
    one_line_error(conv_features, sae, imgs.astype(object),
                   match="images must be a real-valued array")
    bad = imgs.copy()
    bad[0, 0, 0] = np.nan
    one_line_error(conv_features, sae, bad, match="images contains NaN")
    one_line_error(conv_features, sae, images(h=2, w=8), match="smaller than the 3x3 patch")
    one_line_error(conv_features, sae, imgs, pool_grid=(6, 1), match="cannot split 5 positions")
    one_line_error(conv_features, sae, imgs, pool="median", match="pool must be one of")
    one_line_error(conv_features, sae, imgs, pool_grid=(0, 2), match="pool_grid must hold")
    one_line_error(conv_features, sae, imgs, stride=0, match="stride must be")
    one_line_error(conv_features, sae, imgs, pad=-1, match="pad must be")
    one_line_error(conv_features, sae, imgs, whitening="zca", match="whitening must be")
    one_line_error(conv_features, sae, images(c=2), match=r"not p\*p\*2")
    one_line_error(conv_features, SparseAutoencoder(3), imgs, match="estimator is not fitted")
    other = PatchTransform.fit(np.random.default_rng(0).uniform(size=(20, 4)), "ufldl")
    one_line_error(conv_features, sae, imgs, transform=other, match="fitted on 4 values")
    one_line_error(upscale_images, imgs, 0, match="scale must be")
    one_line_error(upscale_images, imgs, 2, "area", match="interpolation must be")


def test_flop_count():
    imgs = images(n=3, h=6, w=6)
    sae, transform = fitted(imgs, 3, "kl", "ufldl", n_components=5)
    feats, stats = conv_features(sae, imgs, transform=transform, stride=1, pool_grid=2,
                                 return_stats=True)
    assert feats.shape == (3, 20)
    assert stats.grid == (4, 4)
    assert stats.flops == 2 * 3 * 16 * 9 * 5
    assert stats.flops_per_second > 0


def test_conv_features_transformer_is_a_pipeline_step_that_cross_validates():
    """ConvFeatures is conv_features as a scikit-learn transformer: the same numbers on
    resized images, and a Pipeline of it cross-validates on images (each fold a clone;
    the frozen SAE stays fitted)."""
    from sklearn.base import clone
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import Pipeline

    from sae_core.features import ConvFeatures

    imgs = images(n=24, h=6, w=6, seed=3)
    labels = np.arange(24) % 2
    sae, transform = fitted(list(imgs), 3, "kl", "ufldl")
    step = ConvFeatures(FrozenEstimator(sae), transform, image_scale=1.5, pool_grid=(2, 2))
    got = step.fit_transform(imgs)
    want = conv_features(sae, upscale_images(imgs, 1.5), transform=transform,
                         pool_grid=(2, 2))
    np.testing.assert_array_equal(got, want)
    assert step.stats_.grid == (7, 7) and step.seconds_ > 0
    assert clone(step).get_params()["image_scale"] == 1.5
    pipe = Pipeline([("features", step), ("classify", LogisticRegression(max_iter=200))])
    scores = cross_validate(pipe, imgs, labels, cv=3)["test_score"]
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="needs a fitted SAE"):
        ConvFeatures(SparseAutoencoder(n_components=3), transform).fit(imgs)

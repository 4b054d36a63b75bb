"""Convolutional feature extraction with learned filters (Coates, Lee & Ng 2011).

A sparse autoencoder fitted on p x p patches (d = p*p*C values) is applied at every
position of a larger image, on a grid of step ``stride``; the activations are pooled
over a grid of regions (Coates et al. sum-pool the four quadrants)::

    image (H, W[, C])
      -> patch x_ij (d,) at top-left corner (i*stride, j*stride)    nh x nw positions
      -> y_ij = preprocess(x_ij)       exactly as the SAE's training patches
      -> a_ij = encode(y_ij)           the model's own activation, (s,)
      -> f_r  = pool_{ij in region r} a_ij                           (s,) per region
      -> features = [f_0 | f_1 | ... | f_{R-1}]                      (s * R,)

    nh = (H - p) // stride + 1,   nw = (W - p) // stride + 1,   R = gh * gw

Preprocessing (:class:`sae_core.transform.PatchTransform`, without its float64 round trip):

1. per patch: 'ufldl' y = x - mean(x);  'contrast' y = (x - mean(x)) / sqrt(var(x) + eps);
   'minmax' / 'none': y = x;
2. ZCA, if fitted: y <- (y - mu) Z;
3. global range: 'ufldl' y <- 0.4 clip(y, -c, c) / c + 0.5 (in [0.1, 0.9]);
   'minmax' y <- clip((y - lo) / (hi - lo), 0, 1).

Encoding (:mod:`sae_core.model`), W1 (s, d), b1 (s,), b2 (d,):
'kl' a = sigmoid(W1 y + b1); 'l1' a = relu(W1 (y - b2) + b1); 'topk' the same with all
but the k largest pre-activations of *each position* set to zero.

Step 3 is an affine map of a clipped value, so it folds into the encoder:
W1 (alpha clip(y) + beta 1) + b1 = (alpha W1) clip(y) + (b1 + beta W1 1).

Everything runs as batched tensor ops on one device: ``F.unfold`` turns a chunk of B
images into (B, d, L) patches, L = nh * nw, and one matrix product encodes them all. The
unfolded patches are in channel-first order (C, p, p) while the SAE's patches are
channels-last (p, p, C), so W1, b2 and the ZCA parameters are permuted once to match.
The only Python loops are over chunks of images and over the (few) pooling regions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from sae_core.config import is_int, is_real

if TYPE_CHECKING:
    import torch

    from sae_core.transform import PatchTransform

POOL_OPS = ("sum", "mean", "max")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_CHUNK_BYTES = 2 << 20  # unfolded patches per chunk: small enough to stay in cache (measured best)


# ================================================================================ checks
def as_image_stack(images: Any, name: str = "images") -> np.ndarray:
    """Validate a stack of images: (N, H, W) grayscale or (N, H, W, C) with C >= 1, real,
    finite, N >= 1. Returns it as a numpy array (no copy when possible)."""
    x = np.asarray(images)
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real-valued array; got dtype {x.dtype}")
    if x.ndim not in (3, 4) or 0 in x.shape:
        raise ValueError(
            f"{name} must have shape (N, H, W) or (N, H, W, C) with no empty axis; "
            f"got shape {x.shape}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def output_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(nh, nw) positions of a p x p window on an H x W image with step ``stride``."""
    if patch_size > height or patch_size > width:
        raise ValueError(
            f"images of {height}x{width} pixels are smaller than the "
            f"{patch_size}x{patch_size} patch"
        )
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def region_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split n positions into ``parts`` contiguous, disjoint, near-equal ranges:
    range r is [floor(r n / parts), floor((r + 1) n / parts)). Needs 1 <= parts <= n."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} positions into {parts} pooling regions")
    return [((r * n) // parts, ((r + 1) * n) // parts) for r in range(parts)]


def _check_grid(pool_grid: Any) -> tuple[int, int]:
    if is_int(pool_grid):
        pool_grid = (pool_grid, pool_grid)
    try:
        gh, gw = pool_grid
    except (TypeError, ValueError):
        raise ValueError(
            f"pool_grid must be an integer >= 1 or a pair (rows, cols); got {pool_grid!r}"
        ) from None
    if not (is_int(gh) and is_int(gw) and gh >= 1 and gw >= 1):
        raise ValueError(f"pool_grid must hold integers >= 1; got {pool_grid!r}")
    return int(gh), int(gw)


# ========================================================================= image prep
def whiten_1f_stack(images: np.ndarray, f0: float = 0.4) -> np.ndarray:
    """:func:`sae_core.patches.whiten_1f` on every image (and channel) of a stack at once.

    images (N, H, W) or (N, H, W, C) -> the same shape, float64: per image and channel,
    mean removed, spectrum times R(f) = |f| exp(-(|f|/f0)^4), then scaled to unit variance
    (a constant image stays 0). One batched FFT, no loop over images.
    """
    from sae_core.patches import one_over_f_filter

    x = as_image_stack(images).astype(np.float64)
    axes = (1, 2)
    h, w = x.shape[1:3]
    filt = one_over_f_filter(h, w, f0)
    if x.ndim == 4:
        filt = filt[:, :, None]
    x = x - x.mean(axis=axes, keepdims=True)
    out = np.fft.irfft2(np.fft.rfft2(x, axes=axes) * filt, s=(h, w), axes=axes)
    std = out.std(axis=axes, keepdims=True)
    np.divide(out, std, out=out, where=std > 0)
    return out


def upscale_images(images: np.ndarray, scale: float, interpolation: str = "bilinear") -> np.ndarray:
    """Resize a stack (N, H, W[, C]) by ``scale`` to (N, round(H s), round(W s)[, C]) float32
    with ``torch.nn.functional.interpolate`` (bilinear/bicubic: align_corners=False, values
    of bicubic may overshoot the input range). scale 1 returns the images as float32."""
    import torch
    import torch.nn.functional as F

    x = as_image_stack(images)
    if not (is_real(scale) and scale > 0):
        raise ValueError(f"scale must be a number > 0; got {scale!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}")
    if scale == 1:
        return x.astype(np.float32, copy=False)
    size = (max(1, round(x.shape[1] * scale)), max(1, round(x.shape[2] * scale)))
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.unsqueeze(1) if x.ndim == 3 else t.permute(0, 3, 1, 2)
    kw = {} if interpolation == "nearest" else {"align_corners": False}
    out = F.interpolate(t, size=size, mode=interpolation, **kw)
    out = out[:, 0] if x.ndim == 3 else out.permute(0, 2, 3, 1)
    return out.contiguous().numpy()


# ========================================================================== the encoder
@dataclass(frozen=True, eq=False)
class ConvEncoder:
    """A fitted SAE and its patch transform as tensors on one device, ready to encode
    every p x p patch of image batches. Build with :meth:`from_estimator`.

    Shapes: W (s, d) encoder with the global affine map of step 3 folded in, columns in
    unfold (channel-first) order; b (s,); zca_mean (d,), zca_matrix (d, d) (permuted) or
    None; d = p * p * channels.
    """

    W: torch.Tensor
    b: torch.Tensor
    patch_size: int
    channels: int
    penalty: str
    k: int
    per_patch: str
    """'center' (ufldl), 'contrast', or 'none'."""
    contrast_eps: float
    zca_mean: torch.Tensor | None
    zca_matrix: torch.Tensor | None
    clip: tuple[float, float] | None
    """(lo, hi) to clip the stage 1-2 values to, or None."""

    @property
    def n_components(self) -> int:
        return int(self.W.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.W.shape[1])

    @classmethod
    def from_estimator(
        cls,
        estimator: Any,
        transform: PatchTransform | None = None,
        *,
        channels: int = 1,
        device: Any = "cpu",
        dtype: Any = None,
    ) -> ConvEncoder:
        """From a fitted :class:`sae_core.SparseAutoencoder` (components_ (s, d)) and the
        :class:`PatchTransform` its training patches went through (None: patches are
        encoded as they are). d must be p * p * channels for an integer p."""
        import torch

        from sae_core.device import resolve_device

        W1 = getattr(estimator, "components_", None)
        if W1 is None:
            raise ValueError("estimator is not fitted (no components_); fit it first")
        W1 = np.asarray(W1, dtype=np.float64)
        d = W1.shape[1]
        if not is_int(channels) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1; got {channels!r}")
        p = math.isqrt(d // channels)
        if p * p * channels != d:
            raise ValueError(
                f"estimator has {d} inputs: not p*p*{channels} for a square patch of "
                f"{channels} channel(s)"
            )
        if transform is not None and transform.n_features != d:
            raise ValueError(
                f"transform was fitted on {transform.n_features} values per patch; the "
                f"estimator has {d} inputs"
            )
        penalty = getattr(estimator, "penalty", "kl")
        k = int(estimator._config().effective_k) if penalty == "topk" else 0
        b1 = np.asarray(estimator.intercept_hidden_, dtype=np.float64)
        b2 = np.asarray(estimator.intercept_visible_, dtype=np.float64)

        # unfold order u[c p^2 + i p + j] = channels-last v[(i p + j) C + c]
        c_, i_, j_ = np.meshgrid(np.arange(channels), np.arange(p), np.arange(p), indexing="ij")
        perm = ((i_ * p + j_) * channels + c_).ravel()
        W1, b2 = W1[:, perm], b2[perm]

        norm = "none" if transform is None else transform.normalisation
        clip, alpha, beta = (None, 1.0, 0.0) if transform is None else transform.range_map()
        # pre = W1 (alpha clip(y) + beta - [b2]) + b1
        shift = beta - (b2 if penalty != "kl" else 0.0)
        b = b1 + W1 @ (np.zeros(d) + shift)
        W = alpha * W1
        zmean = zmat = None
        if transform is not None and transform.zca is not None:
            zmean = transform.zca.mean[perm]
            zmat = transform.zca.matrix[np.ix_(perm, perm)]

        dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        dt = torch.float32 if dtype is None else dtype
        if isinstance(dt, str):
            from sae_core.device import resolve_dtype

            dt = resolve_dtype(dt)

        def t(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.as_tensor(a, dtype=dt, device=dev)

        return cls(
            W=t(W), b=t(b), patch_size=p, channels=int(channels), penalty=penalty, k=k,
            per_patch={"ufldl": "center", "contrast": "contrast"}.get(norm, "none"),
            contrast_eps=float(transform.contrast_eps) if transform is not None else 0.0,
            zca_mean=t(zmean), zca_matrix=t(zmat), clip=clip,
        )

    def encode_patches(self, u: torch.Tensor) -> torch.Tensor:
        """Patches u (m, d) in unfold order -> activations (m, s)."""
        import torch

        from sae_core import model as M

        if self.per_patch != "none":
            u = u - u.mean(dim=1, keepdim=True)
            if self.per_patch == "contrast":
                u = u * torch.rsqrt(u.pow(2).mean(dim=1, keepdim=True) + self.contrast_eps)
        if self.zca_matrix is not None:
            u = (u - self.zca_mean) @ self.zca_matrix
        if self.clip is not None:
            u = u.clamp(self.clip[0], self.clip[1])
        z = torch.addmm(self.b, u, self.W.t())
        return M.activation(z, self.penalty, self.k)

    def maps(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """Images x (B, C, H, W) -> activation maps (B, s, nh, nw)."""
        import torch.nn.functional as F

        bsz, _, h, w = x.shape
        nh, nw = output_grid(h, w, self.patch_size, stride)
        u = F.unfold(x, self.patch_size, stride=stride)  # (B, d, L)
        u = u.transpose(1, 2).reshape(bsz * nh * nw, self.n_features)
        a = self.encode_patches(u)  # (B L, s)
        return a.view(bsz, nh * nw, -1).transpose(1, 2).reshape(bsz, -1, nh, nw)


def pool_maps(maps: Any, pool_grid: Any = (2, 2), pool: str = "sum") -> Any:
    """Pool activation maps (B, s, nh, nw) over a gh x gw grid of disjoint regions
    (:func:`region_bounds` per axis) -> (B, gh * gw * s), region-major:
    out[:, r * s + j] = op over region r = (row ri, col ci), r = ri * gw + ci, of unit j.
    ``pool``: 'sum', 'mean' or 'max'. Works on torch tensors (returned as such)."""
    import torch

    if pool not in POOL_OPS:
        raise ValueError(f"pool must be one of {POOL_OPS}; got {pool!r}")
    gh, gw = _check_grid(pool_grid)
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, s, nh, nw); got {tuple(maps.shape)}")
    rows = region_bounds(maps.shape[2], gh)
    cols = region_bounds(maps.shape[3], gw)
    out = []
    for r0, r1 in rows:
        for c0, c1 in cols:
            block = maps[:, :, r0:r1, c0:c1]
            if pool == "max":
                out.append(block.amax(dim=(2, 3)))
            elif pool == "mean":
                out.append(block.mean(dim=(2, 3)))
            else:
                out.append(block.sum(dim=(2, 3)))
    return torch.cat(out, dim=1)


# ========================================================================= entry point
@dataclass
class FeatureStats:
    """What one :func:`conv_features` call did: positions, FLOPs of the encoding matrix
    products (2 m d s for m patches) and seconds of the whole extraction."""

    n_images: int
    grid: tuple[int, int]
    flops: float
    seconds: float

    @property
    def flops_per_second(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else float("nan")


def conv_features(
    estimator: Any,
    images: Any,
    *,
    transform: PatchTransform | None = None,
    stride: int = 1,
    pool_grid: Any = (2, 2),
    pool: str = "sum",
    pad: int = 0,
    whitening: str = "none",
    f0: float = 0.4,
    device: Any = "cpu",
    dtype: Any = None,
    chunk_bytes: int = _CHUNK_BYTES,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, FeatureStats]:
    """Coates-style features of a stack of images: (N, H, W[, C]) -> (N, s * gh * gw).

    Parameters
    ----------
    estimator : fitted SparseAutoencoder on p x p (x C) patches (components_ (s, p*p*C)).
    images : array (N, H, W) or (N, H, W, C), H, W >= p; values on the scale of the images
        the SAE's patches were cut from (the transform's fitted clip/range assume it).
    transform : the fitted :class:`PatchTransform` of the SAE's training patches, or None
        (patches encoded as they are).
    stride : step of the positions, >= 1.
    pool_grid : (gh, gw) regions (or one int for both); default the four quadrants.
    pool : 'sum' (Coates et al.), 'mean' or 'max'.
    pad : zeros added on every side of each image (after whitening), >= 0: positions
        then also cover the border (an 8x8 digit, pad 1, p 4: 7x7 positions, not 5x5).
    whitening : 'none' or '1f' (:func:`whiten_1f_stack` first, as the SAE's images were
        when its PatchConfig had whitening='1f'); f0 its roll-off.
    device, dtype : where and in which precision (default float32) to compute.
    chunk_bytes : about how many bytes of unfolded patches one chunk of images holds.
    return_stats : also return a :class:`FeatureStats`.

    Returns features (N, gh * gw * s) float32 (float64 for dtype float64), region-major as
    in :func:`pool_maps`; deterministic on the CPU for a given chunking.
    """
    import torch

    start = time.perf_counter()
    x = as_image_stack(images)
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1; got {stride!r}")
    if pool not in POOL_OPS:
        raise ValueError(f"pool must be one of {POOL_OPS}; got {pool!r}")
    gh, gw = _check_grid(pool_grid)
    if whitening not in ("none", "1f"):
        raise ValueError(f"whitening must be 'none' or '1f'; got {whitening!r}")
    if not is_int(pad) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0; got {pad!r}")
    if not is_int(chunk_bytes) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be an integer >= 1; got {chunk_bytes!r}")
    channels = 1 if x.ndim == 3 else x.shape[3]
    enc = ConvEncoder.from_estimator(
        estimator, transform, channels=channels, device=device, dtype=dtype
    )
    n, h, w = x.shape[:3]
    h, w = h + 2 * pad, w + 2 * pad
    p = enc.patch_size
    if p > h or p > w:
        raise ValueError(f"images of {h}x{w} pixels are smaller than the {p}x{p} patch")
    nh, nw = output_grid(h, w, p, stride)
    region_bounds(nh, gh)  # errors before any work
    region_bounds(nw, gw)
    if whitening == "1f":
        x = whiten_1f_stack(x, f0)
    dt = enc.W.dtype
    itemsize = torch.finfo(dt).bits // 8
    per_image = nh * nw * enc.n_features * itemsize * 2  # unfolded + preprocessed copy
    batch = max(1, min(n, chunk_bytes // max(per_image, 1)))
    out = []
    with torch.no_grad():
        for a in range(0, n, batch):
            t = torch.from_numpy(np.ascontiguousarray(x[a : a + batch]))
            t = t.to(device=enc.W.device, dtype=dt)
            t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
            if pad:
                t = torch.nn.functional.pad(t, (pad, pad, pad, pad))
            out.append(pool_maps(enc.maps(t, stride), (gh, gw), pool).cpu())
    feats = torch.cat(out).numpy()  # .cpu() above waited for the device
    seconds = time.perf_counter() - start
    if not return_stats:
        return feats
    flops = 2.0 * n * nh * nw * enc.n_features * enc.n_components
    return feats, FeatureStats(n, (nh, nw), flops, seconds)


# ============================================================ the scikit-learn transformer
class ConvFeatures(TransformerMixin, BaseEstimator):
    """Images (N, H, W[, C]) -> :func:`conv_features` (N, s * gh * gw), as a scikit-learn
    transformer, so that a classifier on SAE features is one ``Pipeline`` and
    ``cross_validate`` works on images::

        Pipeline([("features", ConvFeatures(FrozenEstimator(sae), patch_transform, ...)),
                  *make_classifier(config).steps])

    ``fit`` learns nothing: the SAE and its :class:`~sae_core.transform.PatchTransform` are
    fitted beforehand, on the feature-learning images. Where the pipeline is cloned (as
    ``cross_validate`` does), pass the SAE wrapped in ``sklearn.frozen.FrozenEstimator``: a
    clone of a bare estimator is unfitted. ``transform`` resizes the images by
    ``image_scale`` (:func:`upscale_images`), then extracts the features with the other
    settings on ``device`` (the CPU gives the same bytes run to run). ``stats_`` is the
    :class:`FeatureStats` of the last call, ``seconds_`` the time of every call so far.
    """

    def __init__(self, estimator: Any = None, patch_transform: PatchTransform | None = None,
                 *, image_scale: float = 1.0, interpolation: str = "bilinear", stride: int = 1,
                 pool_grid: Any = (2, 2), pool: str = "sum", pad: int = 0,
                 whitening: str = "none", device: Any = "cpu") -> None:
        self.estimator = estimator
        self.patch_transform = patch_transform
        self.image_scale = image_scale
        self.interpolation = interpolation
        self.stride = stride
        self.pool_grid = pool_grid
        self.pool = pool
        self.pad = pad
        self.whitening = whitening
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False  # nothing is learned by fit
        return tags

    def fit(self, X: Any, y: Any = None) -> ConvFeatures:
        """Check that the SAE is fitted and ``X`` a stack of images; nothing is learned."""
        as_image_stack(X)
        if getattr(self.estimator, "components_", None) is None:
            raise ValueError("ConvFeatures needs a fitted SAE (no components_): fit it on the "
                             "feature-learning images first")
        self.seconds_ = 0.0
        return self

    def transform(self, X: Any) -> np.ndarray:
        big = upscale_images(X, self.image_scale, self.interpolation)
        feats, stats = conv_features(
            self.estimator, big, transform=self.patch_transform, stride=self.stride,
            pool_grid=self.pool_grid, pool=self.pool, pad=self.pad, whitening=self.whitening,
            device=self.device, return_stats=True)
        self.stats_ = stats
        self.seconds_ = getattr(self, "seconds_", 0.0) + stats.seconds
        return feats

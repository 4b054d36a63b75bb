"""The fitted patch transform: per-patch normalisation, optional ZCA whitening and a global
range, fitted on the training patches and applied unchanged to every later patch (held-out
patches, and the patches the score stage cuts from labeled images).

The stages of :meth:`PatchTransform.apply`, on patches x (m, d):

1. per patch, nothing fitted: 'ufldl' and 'contrast' remove each patch's mean; 'contrast'
   also divides by sqrt(var + contrast_eps) (:func:`normalize_contrast`);
2. ZCA, if fitted: (x - mean) @ matrix (:class:`ZCA`);
3. a global range fitted on the training patches: 'ufldl' clips at 3 standard deviations
   and maps to [0.1, 0.9]; 'minmax' maps [min, max] to [0, 1].

Saved as one safetensors file (:data:`TRANSFORM`), never pickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.config import is_real
from sae_core.outputs import safetensors_with

NORMALISATIONS = ("ufldl", "contrast", "minmax", "none")
CONTRAST_EPS_DEFAULT = 10.0 / 255.0**2
"""Coates et al. (2011) add 10 to each patch's variance, for pixels on a 0-255 scale; the
same regularisation for pixels in [0, 1] (the scale of :mod:`sae_core.data`) is 10/255^2."""

_ROWS = 8192  # rows per chunk in the float64 transform passes


def row_chunks(m: int) -> Iterator[tuple[int, int]]:
    for a in range(0, m, _ROWS):
        yield a, min(m, a + _ROWS)


def _as_patches(patches: np.ndarray, name: str = "patches") -> np.ndarray:
    x = np.asarray(patches)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (m, d); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must be real-valued; got dtype {x.dtype}")
    return x


def normalize_contrast(
    patches: np.ndarray, contrast_eps: float = CONTRAST_EPS_DEFAULT
) -> np.ndarray:
    """Coates, Lee & Ng (2011) per-patch contrast normalisation, (m, d) -> (m, d) float64:
    ``(x - mean(x)) / sqrt(var(x) + contrast_eps)``, mean and variance (ddof=0) over each
    patch's own d values. Each output patch has mean 0 and variance var / (var + eps).

    ``contrast_eps`` is in squared pixel units: the paper's 10 is for pixels in 0-255;
    the default 10/255^2 is the same for pixels in [0, 1]. After '1f' whitening (unit
    variance per image) choose it relative to 1. (The paper's MATLAB code uses var with
    d - 1 in the denominator; here it is d.)
    """
    x = _as_patches(patches).astype(np.float64)
    return _per_patch(x, "contrast", contrast_eps)


def _per_patch(x: np.ndarray, normalisation: str, contrast_eps: float) -> np.ndarray:
    """Stage 1 (per patch, nothing fitted), in place on a float64 array."""
    if normalisation in ("ufldl", "contrast"):
        x -= x.mean(axis=1, keepdims=True)
    if normalisation == "contrast":
        var = np.mean(x * x, axis=1, keepdims=True)
        var += contrast_eps
        x /= np.sqrt(var)
    return x


@dataclass(frozen=True, eq=False)
class ZCA:
    """ZCA whitening fitted on patches: ``apply(x) = (x - mean) @ matrix``, with
    ``matrix = U diag(1 / sqrt(S + epsilon)) U^T`` from the eigen-decomposition
    ``U diag(S) U^T`` of the covariance (divided by m) of the mean-removed patches."""

    mean: np.ndarray
    """Mean patch, (d,) float64."""
    matrix: np.ndarray
    """Symmetric whitening matrix W, (d, d) float64."""
    epsilon: float
    """Regulariser added to the eigenvalues (> 0)."""

    def apply(self, patches: np.ndarray) -> np.ndarray:
        """(m, d) -> (m, d) float64 whitened patches."""
        x = _as_patches(patches)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"patches have {x.shape[1]} values; this ZCA expects {self.mean.shape[0]}"
            )
        return (x.astype(np.float64) - self.mean) @ self.matrix


def fit_zca(patches: np.ndarray, epsilon: float = 0.1) -> ZCA:
    """Fit :class:`ZCA` whitening on patches (m, d); float64 arithmetic, chunked."""
    x = _as_patches(patches)
    return _fit_zca(array_blocks(x), x.shape[0], lambda chunk: chunk, epsilon)


Blocks = Callable[[], Iterable[np.ndarray]]
"""Patches in row blocks, in order: each call starts again from the first block."""


def array_blocks(x: np.ndarray) -> Blocks:
    """An (m, d) array as :data:`Blocks` of :func:`row_chunks`."""
    return lambda: (x[a:b] for a, b in row_chunks(x.shape[0]))


def _fit_zca(blocks: Blocks, m: int, stage: Callable[[np.ndarray], np.ndarray],
             epsilon: float) -> ZCA:
    if not (is_real(epsilon) and epsilon > 0):
        raise ValueError(f"zca epsilon must be a number > 0; got {epsilon!r}")
    if m < 2:
        raise ValueError(f"ZCA needs at least 2 patches; got {m}")
    total = None
    for block in blocks():
        part = stage(block.astype(np.float64)).sum(axis=0)
        total = part if total is None else total + part
    mean = total / m
    cov = None
    for block in blocks():
        xc = stage(block.astype(np.float64))
        xc -= mean
        cov = xc.T @ xc if cov is None else cov + xc.T @ xc
    cov /= m
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0.0, None)
    w = (u / np.sqrt(s + epsilon)) @ u.T
    w = 0.5 * (w + w.T)
    return ZCA(mean=mean, matrix=w, epsilon=float(epsilon))


TRANSFORM_FORMAT = "saeflow-patch-transform"
TRANSFORM = safetensors_with("a saeflow patch transform (safetensors)",
                             lambda meta: meta.get("format") == TRANSFORM_FORMAT)
TRANSFORM_VERSION = 1


@dataclass(frozen=True, eq=False)
class PatchTransform:
    """Normalisation (and optional ZCA) fitted on training patches, re-applied identically
    to any patches (held-out, scoring). Three stages:

    1. per patch (nothing fitted): 'ufldl' removes the patch's mean; 'contrast' computes
       ``(x - mean) / sqrt(var + contrast_eps)`` (:func:`normalize_contrast`);
    2. ZCA (if fitted): ``(x - zca.mean) @ zca.matrix``;
    3. global range (fitted): 'ufldl' clips to +/- ``clip`` (3 std of all training values)
       and maps [-clip, clip] linearly to [0.1, 0.9]; 'minmax' maps [minimum, maximum] of
       the training values to [0, 1] and clips other patches into [0, 1].

    Without ZCA, 'ufldl' is :func:`normalize_ufldl` with the std taken from the training
    patches. Saved as safetensors (ZCA arrays) + JSON (the rest); nothing is pickled.
    """

    normalisation: str
    """'ufldl', 'contrast', 'minmax' or 'none'."""
    n_features: int
    """Values per patch d."""
    contrast_eps: float = CONTRAST_EPS_DEFAULT
    """Added to each patch's variance ('contrast' only); squared pixel units."""
    clip: float | None = None
    """'ufldl': 3 x the std of all (stage 1-2) training values."""
    minimum: float | None = None
    """'minmax': smallest (stage 1-2) training value."""
    maximum: float | None = None
    """'minmax': largest (stage 1-2) training value."""
    zca: ZCA | None = None
    """ZCA whitening fitted after stage 1, or None."""

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {NORMALISATIONS}; got {self.normalisation!r}"
            )
        if self.normalisation == "ufldl" and self.clip is None:
            raise ValueError("a 'ufldl' PatchTransform needs its fitted clip value")
        if self.normalisation == "minmax" and (self.minimum is None or self.maximum is None):
            raise ValueError("a 'minmax' PatchTransform needs its fitted minimum and maximum")

    @classmethod
    def fit(
        cls,
        patches: np.ndarray,
        normalisation: str = "ufldl",
        *,
        zca: bool = False,
        zca_epsilon: float = 0.1,
        contrast_eps: float = CONTRAST_EPS_DEFAULT,
    ) -> PatchTransform:
        """Fit on training patches (m, d) (any float dtype; float64 arithmetic, chunked)."""
        x = _as_patches(patches)
        return cls.fit_blocks(array_blocks(x), x.shape[0], x.shape[1], normalisation, zca=zca,
                              zca_epsilon=zca_epsilon, contrast_eps=contrast_eps)

    @classmethod
    def fit_blocks(
        cls,
        blocks: Blocks,
        m: int,
        d: int,
        normalisation: str = "ufldl",
        *,
        zca: bool = False,
        zca_epsilon: float = 0.1,
        contrast_eps: float = CONTRAST_EPS_DEFAULT,
    ) -> PatchTransform:
        """:meth:`fit` on m training patches of d values given block by block (patches
        larger than memory); the same blocks as :func:`row_chunks` give the same bytes."""
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {NORMALISATIONS}; got {normalisation!r}"
            )
        if not (is_real(contrast_eps) and contrast_eps > 0):
            raise ValueError(f"contrast_eps must be a number > 0; got {contrast_eps!r}")
        if m < 1:
            raise ValueError("cannot fit a PatchTransform on 0 patches")
        eps = float(contrast_eps)

        def stage1(chunk: np.ndarray) -> np.ndarray:
            return _per_patch(chunk, normalisation, eps)

        z = _fit_zca(blocks, m, stage1, zca_epsilon) if zca else None
        fields: dict[str, Any] = {}
        if normalisation in ("ufldl", "minmax"):
            count, mean, m2 = 0, 0.0, 0.0
            lo, hi = math.inf, -math.inf
            for block in blocks():
                y = stage1(block.astype(np.float64))
                if z is not None:
                    y = (y - z.mean) @ z.matrix
                if normalisation == "minmax":
                    lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
                    continue
                k = y.size  # Chan et al.: merge count, mean and sum of squared deviations
                cm = float(y.mean())
                cm2 = float(np.sum((y - cm) ** 2))
                delta = cm - mean
                tot = count + k
                mean += delta * k / tot
                m2 += cm2 + delta * delta * count * k / tot
                count = tot
            if normalisation == "ufldl":
                fields["clip"] = 3.0 * math.sqrt(m2 / count)
            else:
                fields["minimum"], fields["maximum"] = lo, hi
        return cls(normalisation=normalisation, n_features=d, contrast_eps=eps, zca=z, **fields)

    def apply(
        self, patches: np.ndarray, *, out: np.ndarray | None = None, dtype: Any = np.float32
    ) -> np.ndarray:
        """Transform patches (m, d) -> (m, d) of ``dtype`` (float64 arithmetic, chunked).
        ``out`` may be given (shape (m, d)), also ``patches`` itself for in-place use."""
        x = _as_patches(patches)
        if x.shape[1] != self.n_features:
            raise ValueError(
                f"patches have {x.shape[1]} values each; this transform was fitted on "
                f"{self.n_features}"
            )
        if out is None:
            out = np.empty(x.shape, dtype=dtype)
        elif out.shape != x.shape:
            raise ValueError(f"out has shape {out.shape}; need {x.shape}")
        for a, b in row_chunks(x.shape[0]):
            out[a:b] = self._apply64(x[a:b].astype(np.float64))
        return out

    def range_map(self) -> tuple[tuple[float, float] | None, float, float]:
        """Stage 3 as numbers, ``(clip, alpha, beta)``: y -> alpha * clip(y) + beta, where
        ``clip`` is (lo, hi) or None. 'ufldl': ((-c, c), 0.4 / c, 0.5), a constant 0.5 when
        c is 0; 'minmax': ((min, max), 1 / span, -min / span), a constant 0 when the span
        is 0; otherwise (None, 1, 0). :class:`sae_core.features.ConvEncoder` folds this map
        into the encoder; :meth:`apply` computes the same in float64, step by step."""
        if self.normalisation == "ufldl":
            c = float(self.clip)
            return (None, 0.0, 0.5) if c == 0 else ((-c, c), 0.4 / c, 0.5)
        if self.normalisation == "minmax":
            lo, hi = float(self.minimum), float(self.maximum)
            span = hi - lo
            return (None, 0.0, 0.0) if span <= 0 else ((lo, hi), 1 / span, -lo / span)
        return None, 1.0, 0.0

    def _apply64(self, y: np.ndarray) -> np.ndarray:
        y = _per_patch(y, self.normalisation, self.contrast_eps)
        if self.zca is not None:
            y = (y - self.zca.mean) @ self.zca.matrix
        if self.normalisation == "ufldl":
            c = self.clip
            if c == 0:
                y.fill(0.5)
                return y
            np.clip(y, -c, c, out=y)
            y /= c
            y += 1.0
            y *= 0.4
            y += 0.1
        elif self.normalisation == "minmax":
            span = self.maximum - self.minimum
            y -= self.minimum
            if span > 0:
                y /= span
            else:
                y.fill(0.0)
            np.clip(y, 0.0, 1.0, out=y)
        return y

    def to_dict(self) -> dict[str, Any]:
        """The JSON part (everything but the ZCA arrays)."""
        return {
            "format": TRANSFORM_FORMAT,
            "format_version": TRANSFORM_VERSION,
            "normalisation": self.normalisation,
            "n_features": self.n_features,
            "contrast_eps": self.contrast_eps,
            "clip": self.clip,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "zca_epsilon": None if self.zca is None else self.zca.epsilon,
        }

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (ZCA mean and matrix, if any) with the settings and fitted
        numbers as JSON in its header; written atomically."""
        from sae_core.io import save_tensors

        tensors = {}
        if self.zca is not None:
            tensors = {"zca_mean": self.zca.mean, "zca_matrix": self.zca.matrix}
        save_tensors(path, tensors, self.to_dict(), TRANSFORM)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchTransform:
        """Read a file written by :meth:`save`; anything inconsistent is a ValueError
        (:class:`sae_core.io.FileFormatError`) naming the file."""
        from sae_core.io import FileFormatError, load_tensors

        p = Path(path)
        arrays, meta = load_tensors(p)
        if (meta.get("format"), meta.get("format_version")) != (
            TRANSFORM_FORMAT,
            TRANSFORM_VERSION,
        ):
            raise FileFormatError(f"{p}: not a saeflow patch transform (format/format_version)")
        try:
            d = int(meta["n_features"])
            z = None
            if meta["zca_epsilon"] is not None:
                mean, w = arrays["zca_mean"], arrays["zca_matrix"]
                if mean.shape != (d,) or w.shape != (d, d):
                    raise ValueError(f"ZCA arrays of shapes {mean.shape}, {w.shape}; need d={d}")
                z = ZCA(mean=mean.astype(np.float64), matrix=w.astype(np.float64),
                        epsilon=float(meta["zca_epsilon"]))
            return cls(
                normalisation=meta["normalisation"], n_features=d,
                contrast_eps=float(meta["contrast_eps"]), clip=meta["clip"],
                minimum=meta["minimum"], maximum=meta["maximum"], zca=z,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{p}: inconsistent patch transform ({exc!r})") from None

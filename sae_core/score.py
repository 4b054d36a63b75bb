"""Downstream scoring: a linear classifier on learned features against one on raw pixels.

The protocol of :func:`score`, for labeled images (N, H, W[, C]) and labels (N,)::

    images --nudge (optional, 5x)--> --scale to [0, 1]--> X
    classification set  L: standard    images with a label >= 0 (in labeled_classes, if set)
                           self_taught images of labeled_classes only (default:
                                       every class not in unlabeled_classes)
    feature-learning set U: standard    the training part of L
                            self_taught images of unlabeled_classes (and label -1)
    L --train_test_split(test_size, random_state)--> train, test    (one split for both)
    raw      = X flattened (N, H*W*C)                                at the original size
    features = conv_features(upscale(X, image_scale))                (N, s * gh * gw)
    classifier (standardised, logistic or linear SVM) fit on train, scored on test

The SAE and its patch transform never see a test image: a fitted estimator is used as
it is (e.g. trained on natural images); an unfitted one is fitted here on patches
(``patch_config``) of U only, and so is a missing patch transform. In the self-taught
protocol the classifier never sees an image of the unlabeled classes (Raina et al. 2007;
the UFLDL self-taught exercise).

Nudging and scaling, as in scikit-learn's RBM example, come before the split: a test
digit's shifted copies may be training digits. That is the published protocol; set
``nudge: false`` (the default) to avoid it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae_core.config import invalid_setting, is_int, is_real
from sae_core.features import INTERPOLATIONS, POOL_OPS, as_image_stack
from sae_core.outputs import json_with_keys
from sae_core.patches import WHITENINGS as PATCH_WHITENINGS

_invalid = functools.partial(invalid_setting, owner="ScoreConfig")
"""A ScoreConfig setting out of range (:func:`sae_core.config.invalid_setting`)."""

PROTOCOLS = ("standard", "self_taught")
CLASSIFIERS = ("logistic", "linear_svm")
SOLVERS = ("newton-cg", "lbfgs")
SCALINGS = ("minmax", "per_pixel", "none")
WHITENINGS = ("auto", *PATCH_WHITENINGS)
"""'auto': as the SAE's own patches were whitened."""



def _classes(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        _invalid(name, "a list of distinct integer class ids >= 0, or null", value)
    items = list(value)
    if not items or not all(is_int(v) and v >= 0 for v in items) or len(set(items)) != len(items):
        _invalid(name, "a non-empty list of distinct integer class ids >= 0, or null", value)
    return tuple(int(v) for v in items)


SCORE_METRICS = json_with_keys("saeflow score metrics (JSON)", "accuracy", "raw_accuracy")
"""The kind of file :meth:`ScoreResult.metrics` is written to."""


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of :func:`score` (the ``score`` section of params.yaml).

    The defaults make the default natural-image SAE (the exercise: 64-25-64 KL on 8x8
    patches of 1/f-whitened photographs) beat raw pixels on scikit-learn's digits: the
    8x8 digits are upsampled 2x to 16x16 and 1/f-whitened as the photographs were, the
    filters applied at all 9x9 positions, max-pooled over a 3x3 grid (225 features),
    standardised, logistic regression with C=1. Measured (benchmarks/digits_protocol.py):
    accuracy 0.986 vs 0.961 for raw pixels (C=100) on split 0; 0.986 +/- 0.006 vs
    0.961 +/- 0.011 over split seeds 0-4, features ahead on every split (and ahead of raw
    pixels at C in 0.1-100, standardised or not, on every split).
    """

    protocol: str = "standard"
    """'standard' (one labeled set; the SAE, if fitted here, learns from its training
    part) or 'self_taught' (the SAE learns from ``unlabeled_classes``; the classifier is
    trained and tested on ``labeled_classes`` only)."""
    labeled_classes: tuple[int, ...] | None = None
    """Classes the classifier sees; null: all classes (self_taught: all but the unlabeled)."""
    unlabeled_classes: tuple[int, ...] | None = None
    """self_taught only: classes whose images are used for feature learning alone."""
    classifier: str = "logistic"
    """'logistic' (multinomial logistic regression, lbfgs) or 'linear_svm' (LinearSVC)."""
    solver: str = "newton-cg"
    """Solver of the logistic regression: 'newton-cg' (the RBM example's: about 10
    iterations on unstandardised pixels, where lbfgs needs hundreds) or 'lbfgs'."""
    C: float = 1.0
    """Inverse regularisation strength of the classifier on the SAE features (> 0)."""
    raw_C: float = 100.0
    """Inverse regularisation strength on raw pixels (> 0; the RBM example uses 100)."""
    standardize: bool = True
    """Standardise the SAE features (mean 0, variance 1, fitted on the training part)."""
    raw_standardize: bool = False
    """Standardise the raw pixels too (the RBM example does not)."""
    max_iter: int = 1000
    """Iterations of the classifier's solver (>= 1); the tolerance is scikit-learn's
    default (the RBM example's tol=1 stops at once and predicts one class)."""
    test_size: float = 0.2
    """Fraction of the classification set held out for testing, in (0, 1)."""
    random_state: int = 0
    """Seed of the split (and of the CV folds), >= 0."""
    stratify: bool = False
    """Stratify the split by class (the RBM example does not)."""
    nudge: bool = False
    """Add the 1-pixel shifts up, left, right, down of every image (5x the data), before
    scaling and splitting, as in scikit-learn's RBM example."""
    scaling: str = "minmax"
    """How images become [0, 1]: 'minmax' (global min and max of the set), 'per_pixel'
    (each pixel position on its own: the RBM example's ``minmax_scale``) or 'none'."""
    cv: int = 0
    """0: off; k >= 2: also k-fold stratified cross-validated accuracy on the training part."""
    image_scale: float = 2.0
    """Resize factor of the images before feature extraction (> 0; raw pixels stay at
    the original size). 2 turns 8x8 digits into 16x16, 9x9 positions of an 8x8 filter."""
    interpolation: str = "bilinear"
    """'nearest', 'bilinear' or 'bicubic' (torch interpolate, align_corners=False)."""
    whitening: str = "auto"
    """Image whitening before feature extraction: 'auto' (as the SAE's patches were: the
    patch config's whitening), 'none' or '1f'."""
    pad: int = 0
    """Zero pixels added on every side of the resized images before feature extraction
    (>= 0), so that filters also sit on the border."""
    stride: int = 1
    """Step between filter positions, in pixels of the resized image (>= 1)."""
    pool_grid: tuple[int, int] = (3, 3)
    """Pooling regions (rows, cols); an integer g means (g, g). Coates et al.: (2, 2)."""
    pool: str = "max"
    """'sum' (Coates et al.), 'mean' or 'max' over each region."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            _invalid("protocol", f"one of {', '.join(PROTOCOLS)}", self.protocol)
        lab = _classes("labeled_classes", self.labeled_classes)
        unl = _classes("unlabeled_classes", self.unlabeled_classes)
        if self.protocol == "self_taught" and unl is None:
            _invalid("unlabeled_classes", "a non-empty list for protocol 'self_taught'", unl)
        if self.protocol == "standard" and unl is not None:
            _invalid("unlabeled_classes", "null for protocol 'standard' (use 'self_taught')", unl)
        if lab is not None and unl is not None and set(lab) & set(unl):
            _invalid("labeled_classes", f"disjoint from unlabeled_classes {list(unl)}", lab)
        object.__setattr__(self, "labeled_classes", lab)
        object.__setattr__(self, "unlabeled_classes", unl)
        if self.classifier not in CLASSIFIERS:
            _invalid("classifier", f"one of {', '.join(CLASSIFIERS)}", self.classifier)
        if self.solver not in SOLVERS:
            _invalid("solver", f"one of {', '.join(SOLVERS)}", self.solver)
        for name in ("C", "raw_C", "image_scale"):
            value = getattr(self, name)
            if not is_real(value) or value <= 0:
                _invalid(name, "a finite number > 0", value)
        for name in ("standardize", "raw_standardize", "stratify", "nudge"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _invalid(name, "true or false", getattr(self, name))
        if not is_int(self.pad) or self.pad < 0:
            _invalid("pad", "an integer >= 0", self.pad)
        for name in ("max_iter", "stride"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                _invalid(name, "an integer >= 1", value)
        if not is_real(self.test_size) or not 0 < self.test_size < 1:
            _invalid("test_size", "a number in the open interval (0, 1)", self.test_size)
        if not is_int(self.random_state) or self.random_state < 0:
            _invalid("random_state", "an integer >= 0", self.random_state)
        if self.scaling not in SCALINGS:
            _invalid("scaling", f"one of {', '.join(SCALINGS)}", self.scaling)
        if not is_int(self.cv) or self.cv < 0 or self.cv == 1:
            _invalid("cv", "0 (off) or an integer >= 2", self.cv)
        if self.interpolation not in INTERPOLATIONS:
            _invalid("interpolation", f"one of {', '.join(INTERPOLATIONS)}", self.interpolation)
        if self.whitening not in WHITENINGS:
            _invalid("whitening", f"one of {', '.join(WHITENINGS)}", self.whitening)
        grid = self.pool_grid
        if is_int(grid):
            grid = (grid, grid)
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
            _invalid("pool_grid", "an integer >= 1 or a pair [rows, cols] of them", self.pool_grid)
        grid = tuple(grid)
        if len(grid) != 2 or not all(is_int(g) and g >= 1 for g in grid):
            _invalid("pool_grid", "an integer >= 1 or a pair [rows, cols] of them", self.pool_grid)
        object.__setattr__(self, "pool_grid", (int(grid[0]), int(grid[1])))
        if self.pool not in POOL_OPS:
            _invalid("pool", f"one of {', '.join(POOL_OPS)}", self.pool)
        # plain Python scalars, so that to_dict() is JSON-ready
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))
            elif is_int(value):
                object.__setattr__(self, f.name, int(value))
            elif is_real(value):
                object.__setattr__(self, f.name, float(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict of every setting (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScoreConfig:
        """Build from a params.yaml section; unknown keys are a one-line ValueError."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"score settings must be a mapping; got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(
                f"unknown ScoreConfig key(s) {', '.join(map(str, unknown))}; "
                f"known: {', '.join(known)}"
            )
        return cls(**d)


# ================================================================================ data
def nudge_images(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's RBM example's ``nudge_dataset`` on image stacks: the images, then
    each shifted by one pixel up, left, right and down (zeros move in), in that order.

    images (N, H, W[, C]), labels (N,) -> (5N, H, W[, C]), (5N,): block b of N rows is
    shift b; ``up[i, j] = x[i + 1, j]``, ``left[i, j] = x[i, j + 1]``,
    ``right[i, j] = x[i, j - 1]``, ``down[i, j] = x[i - 1, j]``.
    """
    x = as_image_stack(images, "images")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},); got {y.shape}")
    up, left, right, down = (np.zeros_like(x) for _ in range(4))
    up[:, :-1] = x[:, 1:]
    left[:, :, :-1] = x[:, :, 1:]
    right[:, :, 1:] = x[:, :, :-1]
    down[:, 1:] = x[:, :-1]
    return np.concatenate([x, up, left, right, down]), np.tile(y, 5)


def scale_images(images: np.ndarray, scaling: str) -> np.ndarray:
    """(N, H, W[, C]) -> float32 of the same shape in [0, 1]: 'minmax' maps the set's
    global [min, max] to [0, 1]; 'per_pixel' does so for each pixel position (and
    channel) across the N images (constant positions become 0); 'none' only casts."""
    x = np.asarray(images, dtype=np.float64)
    if scaling == "none":
        return x.astype(np.float32)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}; got {scaling!r}")
    axis = None if scaling == "minmax" else 0
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    out = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    return out.astype(np.float32)


def _check_labels(labels: Any, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), one per image; got {y.shape}")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError("labels must be integer class ids (-1: unlabeled)")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu" or (y.size and y.min() < -1):
        raise ValueError("labels must be integer class ids >= 0 (-1: unlabeled)")
    return y.astype(np.int64)


@dataclass(frozen=True)
class Split:
    """Row indices (into the nudged image stack) of the three roles, each sorted."""

    train: np.ndarray
    test: np.ndarray
    feature_learning: np.ndarray
    """Images an SAE fitted inside :func:`score` learns from (never a test image)."""
    classes: tuple[int, ...]


def make_split(labels: np.ndarray, config: ScoreConfig) -> Split:
    """The classification split and the feature-learning set of :func:`score`, from the
    (nudged) labels (M,). Raises a one-line ValueError when a role would be empty."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    present = sorted(int(c) for c in np.unique(y[y >= 0]))
    unl = set(config.unlabeled_classes or ())
    if config.labeled_classes is not None:
        classes = list(config.labeled_classes)
        missing = sorted(set(classes) - set(present))
        if missing:
            raise ValueError(f"labeled_classes {missing} have no images (labels present: "
                             f"{present})")
    else:
        classes = [c for c in present if c not in unl]
    if len(classes) < 2:
        raise ValueError(f"need at least 2 labeled classes to classify; got {classes}")
    lab = np.flatnonzero(np.isin(y, classes))
    stratify = y[lab] if config.stratify else None
    try:
        train, test = train_test_split(
            lab, test_size=config.test_size, random_state=config.random_state,
            stratify=stratify,
        )
    except ValueError as exc:
        raise ValueError(f"cannot split {lab.size} labeled images: {exc}") from None
    if np.unique(y[train]).size < 2:
        raise ValueError("the training part holds fewer than 2 classes: more images needed")
    if config.protocol == "self_taught":
        fl = np.flatnonzero(np.isin(y, sorted(unl)) | (y < 0))
        if fl.size == 0:
            raise ValueError(f"unlabeled_classes {sorted(unl)} have no images")
    else:
        fl = np.sort(train)
    return Split(np.sort(train), np.sort(test), fl, tuple(classes))


# ============================================================================== result
@dataclass
class ScoreResult:
    """What :func:`score` measured. ``metrics()`` is the JSON of metrics/score.json."""

    accuracy: float
    macro_f1: float
    raw_accuracy: float
    raw_macro_f1: float
    n_train: int
    n_test: int
    n_features: int
    n_raw_features: int
    feature_seconds: float
    fit_seconds: float
    """Fitting the feature pipeline: the training rows' features and the classifier."""
    raw_fit_seconds: float
    sae_fit_seconds: float
    protocol: str
    classes: tuple[int, ...]
    n_feature_learning: int
    feature_grid: tuple[int, int]
    feature_flops_per_second: float
    split: Split
    y_test: np.ndarray
    y_pred: np.ndarray
    raw_pred: np.ndarray
    estimator: Any = None
    """The SAE used (fitted here if it was not)."""
    transform: Any = None
    """The PatchTransform applied to every patch."""
    classifier: Any = None
    """The fitted pipeline: images -> ConvFeatures -> [StandardScaler] -> classifier."""
    raw_classifier: Any = None
    """The fitted scikit-learn pipeline on raw pixels."""
    cv: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the contract keys (accuracy, macro_f1, raw_accuracy,
        raw_macro_f1, n_train, n_test) and extras (feature counts, timings, CV)."""
        out = {
            "accuracy": float(self.accuracy),
            "macro_f1": float(self.macro_f1),
            "raw_accuracy": float(self.raw_accuracy),
            "raw_macro_f1": float(self.raw_macro_f1),
            "n_train": int(self.n_train),
            "n_test": int(self.n_test),
            "accuracy_gain": float(self.accuracy - self.raw_accuracy),
            "n_features": int(self.n_features),
            "n_raw_features": int(self.n_raw_features),
            "n_feature_learning": int(self.n_feature_learning),
            "n_classes": len(self.classes),
            "protocol": self.protocol,
            "feature_grid": list(self.feature_grid),
            "feature_seconds": float(self.feature_seconds),
            "feature_flops_per_second": float(self.feature_flops_per_second),
            "fit_seconds": float(self.fit_seconds),
            "raw_fit_seconds": float(self.raw_fit_seconds),
            "sae_fit_seconds": float(self.sae_fit_seconds),
        }
        out.update({k: float(v) for k, v in self.cv.items()})
        return out


# ============================================================================ classify
def make_classifier(config: ScoreConfig, *, raw: bool = False) -> Any:
    """The scikit-learn pipeline of the protocol: [StandardScaler] + LogisticRegression
    (multinomial, ``config.solver``, default tolerance) or LinearSVC, with C or raw_C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    c = config.raw_C if raw else config.C
    if config.classifier == "logistic":
        model = LogisticRegression(C=c, solver=config.solver, max_iter=config.max_iter)
    else:
        model = LinearSVC(C=c, max_iter=config.max_iter, random_state=config.random_state)
    steps = [StandardScaler()] if (config.raw_standardize if raw else config.standardize) else []
    return make_pipeline(*steps, model)


def _fit_predict(model: Any, x: np.ndarray, y: np.ndarray,
                 split: Split) -> tuple[np.ndarray, float]:
    """Fit on the training rows, predict the test rows: (predictions, fit seconds)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x[split.train], y[split.train])
    seconds = time.perf_counter() - start
    return model.predict(x[split.test]), seconds


def _cross_validate(config: ScoreConfig, model: Any, x: np.ndarray, y: np.ndarray) -> dict:
    """``config.cv``-fold accuracy of ``model`` (a pipeline, cloned per fold) on (x, y):
    {"cv_accuracy_mean", "cv_accuracy_std"}."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_validate

    folds = StratifiedKFold(config.cv, shuffle=True, random_state=config.random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_validate(model, x, y, cv=folds, scoring="accuracy")["test_score"]
    return {"cv_accuracy_mean": float(scores.mean()), "cv_accuracy_std": float(scores.std())}


def _learn_features(estimator: Any, transform: Any, x: np.ndarray, split: Split,
                    cfg: ScoreConfig, pcfg: Any) -> tuple[Any, Any, float]:
    """The SAE and its patch transform: as given when both are fitted; else fitted here on
    patches (``pcfg``) of the feature-learning images, resized as the features will be.
    Returns (estimator, transform, seconds spent fitting the SAE)."""
    from sae_core.features import upscale_images
    from sae_core.patches import make_patches
    from sae_core.transform import PatchTransform

    fitted = getattr(estimator, "components_", None) is not None
    if not fitted and transform is not None:
        raise ValueError("transform was given for an unfitted estimator: pass a fitted "
                         "estimator with it, or neither (both are then fitted here)")
    p = pcfg.patch_size
    channels = 1 if x.ndim == 3 else x.shape[3]
    if fitted and np.shape(estimator.components_)[1] != p * p * channels:
        raise ValueError(
            f"estimator has {np.shape(estimator.components_)[1]} inputs; "
            f"patch_config.patch_size={p} with {channels} channel(s) needs {p * p * channels}"
        )
    h, w = (max(1, round(n * cfg.image_scale)) for n in x.shape[1:3])
    if min(h, w) + 2 * cfg.pad < p:
        raise ValueError(f"images resized by image_scale={cfg.image_scale} are {h}x{w}, "
                         f"smaller than the {p}x{p} patch")
    seconds = 0.0
    if not fitted or transform is None:
        images = list(upscale_images(x[split.feature_learning], cfg.image_scale,
                                     cfg.interpolation))
        start = time.perf_counter()
        train_patches, _, transform = make_patches(images, pcfg)
        if not fitted:
            estimator.fit(train_patches)
            seconds = time.perf_counter() - start
    if not isinstance(transform, PatchTransform):
        raise ValueError(f"transform must be a PatchTransform; got {type(transform).__name__}")
    return estimator, transform, seconds


# ============================================================================= score
def score(
    estimator: Any,
    images: Any,
    labels: Any,
    config: ScoreConfig | None = None,
    transform: Any = None,
    patch_config: Any = None,
    device: str = "cpu",
) -> ScoreResult:
    """Classify ``images`` with SAE features and with raw pixels, on one split.

    Parameters
    ----------
    estimator : SparseAutoencoder on p x p (x C) patches. Fitted: used as it is. Not
        fitted: fitted here on patches (``patch_config``) of the feature-learning images
        (standard: the training part; self_taught: the unlabeled classes), after resizing.
    images : (N, H, W) or (N, H, W, C), any real range (``config.scaling`` maps it).
    labels : (N,) integer class ids; -1 = unlabeled (never classified; feature learning
        only in the self-taught protocol).
    config : :class:`ScoreConfig` (default settings if None).
    transform : the fitted :class:`sae_core.transform.PatchTransform` of the estimator's
        training patches. None: fitted here on patches of the feature-learning images with
        ``patch_config``'s normalisation (as :func:`sae_core.patches.make_patches` does).
    patch_config : the :class:`sae_core.patches.PatchConfig` of the SAE's patches (default
        PatchConfig()): its whitening (``whitening: auto``) and, when fitting here, its
        sampling and normalisation. Its patch_size must match a fitted estimator.
    device : torch device of the feature extraction ('cpu' gives reproducible bytes).

    Returns a :class:`ScoreResult`; both classifiers use the same train and test rows.
    """
    from sklearn.frozen import FrozenEstimator
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import Pipeline

    from sae_core.features import ConvFeatures
    from sae_core.patches import PatchConfig

    cfg = ScoreConfig() if config is None else config
    if not isinstance(cfg, ScoreConfig):
        raise ValueError(f"config must be a ScoreConfig; got {type(cfg).__name__}")
    pcfg = PatchConfig() if patch_config is None else patch_config
    if not isinstance(pcfg, PatchConfig):
        raise ValueError(f"patch_config must be a PatchConfig; got {type(pcfg).__name__}")
    x = as_image_stack(images, "images")
    y = _check_labels(labels, x.shape[0])
    if cfg.nudge:
        x, y = nudge_images(x, y)
    x = scale_images(x, cfg.scaling)
    split = make_split(y, cfg)

    # raw pixels: the classifier on the flattened images
    raw = x.reshape(x.shape[0], -1)
    raw_model = make_classifier(cfg, raw=True)
    raw_pred, raw_seconds = _fit_predict(raw_model, raw, y, split)

    # SAE features: one pipeline, images -> features -> classifier
    estimator, transform, sae_seconds = _learn_features(estimator, transform, x, split, cfg,
                                                        pcfg)
    features = ConvFeatures(
        FrozenEstimator(estimator), transform, image_scale=cfg.image_scale,
        interpolation=cfg.interpolation, stride=cfg.stride, pool_grid=cfg.pool_grid,
        pool=cfg.pool, pad=cfg.pad, device=device,
        whitening=pcfg.whitening if cfg.whitening == "auto" else cfg.whitening)
    model = Pipeline([("features", features), *make_classifier(cfg).steps])
    pred, fit_seconds = _fit_predict(model, x, y, split)  # fit: with the training features

    y_test = y[split.test]
    cv: dict[str, float] = {}
    if cfg.cv:
        cv.update(_cross_validate(cfg, model, x[split.train], y[split.train]))
        cv.update({f"raw_{k}": v for k, v in _cross_validate(
            cfg, make_classifier(cfg, raw=True), raw[split.train], y[split.train]).items()})
    return ScoreResult(
        accuracy=float(accuracy_score(y_test, pred)),
        macro_f1=float(f1_score(y_test, pred, average="macro")),
        raw_accuracy=float(accuracy_score(y_test, raw_pred)),
        raw_macro_f1=float(f1_score(y_test, raw_pred, average="macro")),
        n_train=int(split.train.size),
        n_test=int(split.test.size),
        n_features=int(model[1].n_features_in_),  # what the step after the features saw
        n_raw_features=int(raw.shape[1]),
        feature_seconds=features.seconds_,
        fit_seconds=fit_seconds,
        raw_fit_seconds=raw_seconds,
        sae_fit_seconds=sae_seconds,
        protocol=cfg.protocol,
        classes=split.classes,
        n_feature_learning=int(split.feature_learning.size),
        feature_grid=features.stats_.grid,
        feature_flops_per_second=features.stats_.flops_per_second,
        split=split,
        y_test=y_test,
        y_pred=np.asarray(pred),
        raw_pred=np.asarray(raw_pred),
        estimator=estimator,
        transform=transform,
        classifier=model,
        raw_classifier=raw_model,
        cv=cv,
    )

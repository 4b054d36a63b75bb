"""The scikit-learn estimator: parameters, validation, pipelines, partial_fit, pickling."""

from __future__ import annotations

import inspect
import math
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from sae_core import SparseAutoencoder


def fit(X, **kw):
    kw.setdefault("device", "cpu")
    return SparseAutoencoder(**kw).fit(X)


# ----------------------------------------------------------------- parameters
def test_get_params_lists_every_init_argument():
    names = set(inspect.signature(SparseAutoencoder.__init__).parameters) - {"self"}
    assert set(SparseAutoencoder().get_params()) == names


def test_clone_round_trip():
    sae = SparseAutoencoder(7, penalty="topk", k=3, solver="adam", learning_rate=0.01,
                            max_iter=3, device="cpu", random_state=5)
    twin = clone(sae)
    assert twin is not sae
    assert twin.get_params() == sae.get_params()
    assert SparseAutoencoder(**sae.get_params()).get_params() == sae.get_params()


def test_clone_of_fitted_is_unfitted(small_X):
    sae = fit(small_X, n_components=3, max_iter=2)
    twin = clone(sae)
    assert not hasattr(twin, "components_")
    assert twin.get_params() == sae.get_params()


def test_set_params(small_X):
    sae = SparseAutoencoder(4, device="cpu")
    assert sae.set_params(rho=0.2, max_iter=3) is sae
    assert sae.get_params()["rho"] == 0.2
    assert sae.rho == 0.2
    sae.fit(small_X)
    assert sae.n_iter_ <= 3
    with pytest.raises(ValueError):
        sae.set_params(not_a_param=1)


def test_init_does_not_validate(small_X):
    sae = SparseAutoencoder(rho=5, n_components=-1, penalty="nope")
    assert sae.rho == 5 and sae.n_components == -1 and sae.penalty == "nope"
    with pytest.raises(ValueError, match="n_components"):
        sae.fit(small_X)


# ----------------------------------------------------------------- validation
BAD_FIT_SETTINGS = [
    ({"rho": 0}, "rho", "(0, 1)"),
    ({"rho": 1}, "rho", "(0, 1)"),
    ({"rho": -0.1}, "rho", "(0, 1)"),
    ({"rho": 1.5}, "rho", "(0, 1)"),
    ({"beta": -0.5}, "beta", ">= 0"),
    ({"weight_decay": -1.0}, "weight_decay", ">= 0"),
    ({"n_components": 0}, "n_components", ">= 1"),
    ({"penalty": "l2"}, "penalty", "kl, l1, topk"),
    ({"solver": "sgd"}, "solver", "lbfgs, adam"),
    ({"penalty": "topk", "n_components": 4, "k": 5}, "k", "[1, n_components=4]"),
    ({"dtype": "float16"}, "dtype", "float32, float64"),
    ({"device": "tpu"}, "device", "'cuda:N'"),
    ({"learning_rate": 0.0}, "learning_rate", "> 0"),
    ({"learning_rate": -1.0}, "learning_rate", "> 0"),
    ({"max_iter": 0}, "max_iter", ">= 1"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
]


@pytest.mark.parametrize(("kw", "name", "allowed"), BAD_FIT_SETTINGS)
def test_bad_setting_raises_at_fit(small_X, kw, name, allowed):
    import re

    sae = SparseAutoencoder(**{"n_components": 4, "device": "cpu", **kw})
    with pytest.raises(ValueError, match=rf"{name} must be .*{re.escape(allowed)}"):
        sae.fit(small_X)
    assert not hasattr(sae, "components_")


def test_missing_cuda_device_raises_naming_device(small_X):
    # cuda:99 exists on no machine: the error names the device setting either way
    with pytest.raises(ValueError, match=r"device='cuda:99'"):
        SparseAutoencoder(4, device="cuda:99", max_iter=1).fit(small_X)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_X_raises(small_X, bad):
    X = small_X.copy()
    X[3, 2] = bad
    with pytest.raises(ValueError, match=r"X contains (NaN|infinity)"):
        fit(X, n_components=4, max_iter=2)


def test_nan_at_transform_raises(small_X):
    sae = fit(small_X, n_components=4, max_iter=2)
    X = small_X.copy()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        sae.transform(X)


@pytest.mark.parametrize(("lo", "hi"), [(-0.1, 0.5), (0.2, 1.3)])
def test_kl_needs_X_in_unit_interval(small_X, lo, hi):
    X = small_X.copy()
    X[0, 0], X[1, 1] = lo, hi
    with pytest.raises(ValueError, match=r"X must lie in \[0, 1\] for penalty='kl'"):
        fit(X, n_components=4, max_iter=2)


@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_l1_topk_accept_X_outside_unit_interval(small_X, penalty):
    X = (small_X - 0.5) * 10.0  # in [-4, 4]
    sae = fit(X, n_components=4, max_iter=3, penalty=penalty, k=2)
    assert sae.transform(X).shape == (200, 4)


def test_kl_boundary_values_accepted(small_X):
    X = small_X.copy()
    X[0, 0], X[1, 1] = 0.0, 1.0
    assert fit(X, n_components=3, max_iter=2).n_features_in_ == 16


def test_wrong_number_of_features_at_transform(small_X):
    sae = fit(small_X, n_components=4, max_iter=2)
    with pytest.raises(ValueError, match=r"X has 8 features.*expecting 16 features"):
        sae.transform(small_X[:, :8])
    with pytest.raises(ValueError, match=r"X has 8 features.*expecting 16 features"):
        sae.reconstruct(small_X[:, :8])


def test_transform_before_fit_raises(small_X):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        SparseAutoencoder(4).transform(small_X)


# ----------------------------------------------------------------- outputs
def test_transform_and_reconstruct_shapes_and_ranges(small_X):
    sae = fit(small_X, n_components=5, max_iter=10)
    A = sae.transform(small_X)
    X_hat = sae.reconstruct(small_X)
    assert A.shape == (200, 5) and X_hat.shape == (200, 16)
    assert A.dtype == small_X.dtype
    assert ((A > 0) & (A < 1)).all()  # sigmoid units
    assert ((X_hat > 0) & (X_hat < 1)).all()
    assert np.array_equal(sae.fit_transform(small_X), A)
    assert sae.components_.shape == (5, 16)
    assert sae.decoder_.shape == (16, 5)
    assert sae.intercept_hidden_.shape == (5,)
    assert sae.intercept_visible_.shape == (16,)


def test_transform_float32_input(small_X):
    sae = fit(small_X, n_components=4, max_iter=5)
    A32 = sae.transform(small_X.astype(np.float32))
    assert A32.dtype == np.float32
    np.testing.assert_allclose(A32, sae.transform(small_X), rtol=1e-5, atol=1e-6)


def test_get_feature_names_out(small_X):
    sae = fit(small_X, n_components=3, max_iter=2)
    names = sae.get_feature_names_out()
    assert list(names) == ["sparseautoencoder0", "sparseautoencoder1", "sparseautoencoder2"]


# ----------------------------------------------------------------- pipelines
def test_pipeline_with_logistic_regression_beats_chance():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    X = digits.data / 16.0
    y = digits.target
    pipe = make_pipeline(
        SparseAutoencoder(32, rho=0.1, max_iter=50, device="cpu"),
        LogisticRegression(max_iter=500),
    )
    pipe.fit(X[:400], y[:400])
    pred = pipe.predict(X[400:800])
    assert pred.shape == (400,)
    accuracy = float(np.mean(pred == y[400:800]))
    assert accuracy > 0.5  # ten classes: chance is 0.1
    assert pipe[0].n_features_in_ == 64


# ----------------------------------------------------------------- partial_fit
def test_partial_fit_adam_one_epoch_per_call(small_X):
    sae = SparseAutoencoder(4, solver="adam", batch_size=50, device="cpu")
    for expected in (1, 2, 3):
        sae.partial_fit(small_X)
        assert sae.n_iter_ == expected
        assert len(sae.history_) == expected
    before = sae.components_.copy()
    sae.partial_fit(small_X[:100])
    assert sae.n_iter_ == 4
    assert not np.array_equal(before, sae.components_)


def test_partial_fit_equals_fit_epochs(small_X):
    kw = dict(n_components=4, solver="adam", batch_size=50, device="cpu")
    full = SparseAutoencoder(max_iter=3, **kw).fit(small_X)
    part = SparseAutoencoder(**kw)
    for _ in range(3):
        part.partial_fit(small_X)
    assert np.array_equal(full.components_, part.components_)
    assert full.history_ == part.history_


def test_partial_fit_checks_feature_count(small_X):
    sae = SparseAutoencoder(4, solver="adam", device="cpu").partial_fit(small_X)
    with pytest.raises(ValueError, match="features"):
        sae.partial_fit(small_X[:, :5])


def test_partial_fit_lbfgs_raises(small_X):
    with pytest.raises(ValueError, match="partial_fit needs solver='adam'"):
        SparseAutoencoder(4, solver="lbfgs", device="cpu").partial_fit(small_X)


# ----------------------------------------------------------------- pickling
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_pickle_fitted_estimator_without_training_data(solver):
    X = np.random.default_rng(3).uniform(0.1, 0.9, size=(80_000, 16))
    sae = fit(X, n_components=4, max_iter=3, solver=solver, batch_size=4096)
    blob = pickle.dumps(sae)
    assert len(blob) < X.nbytes / 10
    back = pickle.loads(blob)
    assert np.array_equal(back.transform(X[:100]), sae.transform(X[:100]))
    assert back.history_ == sae.history_
    assert back.get_params() == sae.get_params()


def test_pickled_adam_model_continues_like_original(small_X):
    sae = SparseAutoencoder(4, solver="adam", batch_size=50, device="cpu")
    sae.partial_fit(small_X)
    twin = pickle.loads(pickle.dumps(sae))
    sae.partial_fit(small_X)
    twin.partial_fit(small_X)
    assert np.array_equal(sae.components_, twin.components_)


def test_history_loss_is_sum_of_terms(small_X):
    sae = fit(small_X, n_components=4, max_iter=5, penalty="l1")
    for r in sae.history_:
        assert math.isclose(
            r["loss"],
            math.fsum([r["reconstruction"], r["weight_decay"], r["sparsity"], r["auxiliary"]]),
            rel_tol=1e-12,
        )


def test_numpy_scalar_settings_save_and_checkpoint(tmp_path):
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(60, 9))
    sae = SparseAutoencoder(np.int64(4), beta=np.float32(2.0), max_iter=np.int64(6),
                            checkpoint_path=str(tmp_path / "ck"), checkpoint_every=2)
    sae.fit(X)
    sae.save(tmp_path / "model")
    loaded = SparseAutoencoder.load(tmp_path / "model")
    assert loaded.n_components == 4 and loaded.beta == 2.0
    # saving over an existing model replaces it whole and leaves no temporary folder
    sae.save(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "model"]


def test_partial_fit_continues_from_a_loaded_model(tmp_path):
    X = np.random.default_rng(1).uniform(0.1, 0.9, size=(200, 9))
    sae = SparseAutoencoder(4, solver="adam", batch_size=32, learning_rate=1e-2)
    for _ in range(5):
        sae.partial_fit(X)
    sae.save(tmp_path / "m")
    loaded = SparseAutoencoder.load(tmp_path / "m")
    fresh = SparseAutoencoder(4, solver="adam", batch_size=32, learning_rate=1e-2)
    loaded.partial_fit(X)
    fresh.partial_fit(X)
    # the loaded model keeps training from its weights, not from a new random start
    assert loaded.history_[-1]["loss"] < fresh.history_[-1]["loss"]


def test_read_only_input_is_used_without_torch_warnings(python, subprocess_env, repo_root):
    """Patch stores are memory-mapped read-only; torch warns (once per process, so this
    runs in a fresh one) when it wraps such an array. transform and the statistics copy."""
    import subprocess

    code = """
import warnings
import numpy as np
from sae_core import SparseAutoencoder
from sae_core.stats import sparsity_stats
X = np.random.default_rng(0).uniform(0.1, 0.9, (60, 16))
sae = SparseAutoencoder(4, max_iter=5).fit(X)
X.setflags(write=False)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    A = sae.transform(X)
    sparsity_stats(sae, X)
    sae.reconstruct(X)
print(A.shape)
"""
    proc = subprocess.run([python, "-c", code], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(60, 4)"

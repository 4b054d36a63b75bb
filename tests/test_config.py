"""SAEConfig: the one place where settings are validated."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from sae_core.config import SAEConfig

BAD_SETTINGS = [
    # (setting, value, text of the allowed range that the message must contain)
    ("rho", 0.0, "(0, 1)"),
    ("rho", 1.0, "(0, 1)"),
    ("rho", -0.1, "(0, 1)"),
    ("rho", 1.5, "(0, 1)"),
    ("rho", math.nan, "(0, 1)"),
    ("beta", -1.0, ">= 0"),
    ("beta", math.inf, ">= 0"),
    ("weight_decay", -1e-4, ">= 0"),
    ("l1_coefficient", -1.0, ">= 0"),
    ("aux_coefficient", -1.0, ">= 0"),
    ("tol", -1.0, ">= 0"),
    ("n_components", 0, ">= 1"),
    ("n_components", -3, ">= 1"),
    ("n_components", 2.5, ">= 1"),
    ("n_components", True, ">= 1"),
    ("penalty", "l2", "kl, l1, topk"),
    ("solver", "sgd", "lbfgs, adam"),
    ("k", 0, "[1, n_components=25]"),
    ("k", 26, "[1, n_components=25]"),
    ("aux_k", 26, "[1, n_components=25]"),
    ("aux_k", 2, "None unless solver='adam'"),
    ("max_iter", 0, ">= 1"),
    ("dead_window", 0, ">= 1"),
    ("init", "xavier", "auto, uniform, tied"),
    ("init", "tied", "'auto' or 'uniform' for penalty='kl'"),
    ("pre_bias", "median", "auto, zero, mean"),
    ("pre_bias", "mean", "'auto' or 'zero' for penalty='kl'"),
    ("lbfgs_history", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", -1e-3, "> 0"),
    ("dtype", "float16", "float32, float64"),
    ("dtype", "double", "float32, float64"),
    ("device", "gpu", "'cuda:N'"),
    ("device", "cuda:x", "'cuda:N'"),
    ("random_state", -1, ">= 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_SETTINGS)
def test_bad_setting_raises_naming_parameter_and_range(name, value, allowed):
    with pytest.raises(ValueError, match=rf"^{name} must be .*{re.escape(allowed)}") as info:
        SAEConfig(**{name: value})
    assert repr(value) in str(info.value)  # the value received is named too


def test_defaults_are_the_exercise_settings():
    cfg = SAEConfig()
    assert (cfg.n_components, cfg.penalty, cfg.rho, cfg.beta, cfg.weight_decay) == (
        25, "kl", 0.01, 3.0, 1e-4
    )
    assert cfg.solver == "lbfgs"
    assert cfg.max_iter == 400


@pytest.mark.parametrize("value", [1e-6, 0.5, 1 - 1e-6])
def test_rho_inside_open_interval_accepted(value):
    assert SAEConfig(rho=value).rho == value


def test_k_bounds_inclusive():
    assert SAEConfig(n_components=7, penalty="topk", k=7).effective_k == 7
    assert SAEConfig(n_components=7, penalty="topk", k=1).effective_k == 1


@pytest.mark.parametrize(("s", "expected"), [(25, 5), (10, 2), (4, 1), (1, 1)])
def test_effective_k_default(s, expected):
    assert SAEConfig(n_components=s, penalty="topk").effective_k == expected


def test_sigmoid_output_only_for_kl():
    assert SAEConfig(penalty="kl").sigmoid_output
    assert not SAEConfig(penalty="l1").sigmoid_output
    assert not SAEConfig(penalty="topk").sigmoid_output


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_strings_accepted(device):
    # only the spelling is checked here; existence is checked when training starts
    assert SAEConfig(device=device).device == device


def test_dict_round_trip():
    cfg = SAEConfig(n_components=7, penalty="topk", k=3, aux_k=2, solver="adam",
                    learning_rate=0.01, dtype="float64", random_state=None)
    d = cfg.to_dict()
    assert d["k"] == 3 and d["solver"] == "adam"
    assert SAEConfig.from_dict(d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(SAEConfig)}


def test_from_dict_unknown_key_named():
    with pytest.raises(ValueError, match=r"unknown setting.*hidden_units"):
        SAEConfig.from_dict({"n_components": 3, "hidden_units": 4})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="rho must be"):
        SAEConfig.from_dict({"rho": 2.0})


def test_frozen():
    cfg = SAEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rho = 0.5  # type: ignore[misc]


def test_numpy_scalars_accepted():
    """Values from numpy (np.arange / np.linspace grids in a GridSearchCV) are valid
    settings, as they are for scikit-learn's own estimators."""
    cfg = SAEConfig(rho=np.float64(0.05), beta=np.float64(2.0))
    assert cfg.rho == 0.05
    cfg = SAEConfig(n_components=np.int64(8), max_iter=np.int64(10), k=np.int64(2))
    assert cfg.n_components == 8


def test_init_and_pre_bias_defaults_depend_on_the_penalty():
    # KL keeps the exercise's start; L1/TopK start as Gao et al. (2024)
    kl = SAEConfig()
    assert (kl.effective_init, kl.effective_pre_bias) == ("uniform", "zero")
    for penalty in ("l1", "topk"):
        cfg = SAEConfig(penalty=penalty)
        assert (cfg.effective_init, cfg.effective_pre_bias) == ("tied", "mean")
        old = SAEConfig(penalty=penalty, init="uniform", pre_bias="zero")
        assert (old.effective_init, old.effective_pre_bias) == ("uniform", "zero")

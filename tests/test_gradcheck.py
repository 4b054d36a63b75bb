"""Central-difference gradient checks, the exercise's criterion: below 1e-9 in float64."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.gradcheck import check_gradient, numerical_gradient, relative_difference
from sae_core.model import init_theta
from sae_core.objective import AutogradObjective

LIMIT = 1e-9


@pytest.fixture(scope="module")
def natural100(natural_X):
    return natural_X[:100]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_kl_gradient_natural_patches_64_25(natural100, fused):
    cfg = SAEConfig(n_components=25, rho=0.01, beta=3.0, weight_decay=1e-4, dtype="float64")
    diff = check_gradient(cfg, natural100, eps=1e-4, fused=fused)
    assert diff < LIMIT


def _small_config(penalty):
    return SAEConfig(n_components=6, penalty=penalty, dtype="float64", l1_coefficient=1e-2, k=2)


@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_l1_topk_gradient_16_6(patches4, penalty):
    assert patches4.shape == (50, 16)
    assert check_gradient(_small_config(penalty), patches4, eps=1e-4) < LIMIT


def test_kl_gradient_16_6_both_paths(patches4):
    cfg = SAEConfig(n_components=6, rho=0.05, beta=3.0, dtype="float64")
    assert check_gradient(cfg, patches4, fused=True) < LIMIT
    assert check_gradient(cfg, patches4, fused=False) < LIMIT


def test_l1_difference_is_truncation_error_scaling_as_eps_squared(patches4):
    """The remaining L1 difference is the O(eps^2) truncation of central differences
    (curvature of the decoder normalisation), not a gradient error: halving eps quarters
    it, and eps = 1e-5 gives at least 10x less than 1e-4."""
    cfg = _small_config("l1")
    e2, e1, e0 = (check_gradient(cfg, patches4, eps=eps) for eps in (2e-4, 1e-4, 1e-5))
    assert e0 * 10 < e1
    assert 3.0 < e2 / e1 < 5.0


def test_wrong_gradient_is_detected(patches4):
    cfg = SAEConfig(n_components=6, rho=0.05, dtype="float64")
    X = torch.as_tensor(patches4)
    theta = init_theta(16, 6, seed=0, dtype=torch.float64)
    objective = AutogradObjective(cfg)
    analytic = objective(theta, X).grad
    numeric = numerical_gradient(lambda th: float(objective(th, X).loss), theta, 1e-4)
    assert relative_difference(numeric, analytic) < LIMIT
    assert relative_difference(numeric, 1.01 * analytic) > 1e-3
    wrong = analytic.clone()
    wrong[-1] += 1e-3 * analytic.norm()  # one wrong bias component
    assert relative_difference(numeric, wrong) > 1e-5


def test_numerical_gradient_known_function():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g = numerical_gradient(lambda t: float((t**3).sum()), x, eps=1e-4)
    # central differences of x^3: 3x^2 + eps^2 exactly
    assert torch.allclose(g, 3 * x**2 + 1e-8, rtol=0, atol=1e-9)
    assert torch.equal(x, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))  # untouched


def test_relative_difference_hand_case():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert relative_difference(a, b) == pytest.approx(1.0)
    assert relative_difference(a, a) == 0.0
    assert relative_difference(a, 3 * a) == pytest.approx(0.5)

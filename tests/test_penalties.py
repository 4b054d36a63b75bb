"""The loss terms on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core import penalties as P


def test_kl_divergence_hand_value():
    got = P.kl_divergence(0.1, torch.tensor([0.2], dtype=torch.float64))
    expected = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
    assert float(got[0]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 0.9])
def test_kl_divergence_zero_at_target_and_positive_elsewhere(rho):
    q = torch.tensor([rho, rho / 2, min(0.99, 2 * rho), 0.3, 0.7], dtype=torch.float64)
    kl = P.kl_divergence(rho, q)
    assert abs(float(kl[0])) < 1e-15
    others = kl[1:][q[1:] != rho]
    assert bool((others > 0).all())


def test_kl_divergence_elementwise_shape():
    q = torch.full((3, 4), 0.25, dtype=torch.float64)
    assert P.kl_divergence(0.1, q).shape == (3, 4)


def test_kl_sparsity_is_beta_times_sum_over_units():
    A = torch.tensor([[0.1, 0.5, 0.02], [0.3, 0.1, 0.04]], dtype=torch.float64)
    rho, beta = 0.05, 3.0
    rho_hat = [0.2, 0.3, 0.03]  # column means
    expected = beta * sum(
        rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q)) for q in rho_hat
    )
    got = P.kl_sparsity(A, rho, beta)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(P.kl_sparsity(A, rho, 0.0)) == 0.0


def test_reconstruction_error_hand_case():
    X_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    X = torch.tensor([[0.0, 0.0], [3.0, 2.0]])
    # (1/m) sum_i 0.5 ||x_hat_i - x_i||^2 = 0.5 * (1 + 4 + 0 + 4) / 2
    got = P.reconstruction_error(X_hat, X)
    assert got.dtype == torch.float64
    assert float(got) == 2.25


def test_reconstruction_error_zero_for_perfect_reconstruction():
    X = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    assert float(P.reconstruction_error(X.clone(), X)) == 0.0


def test_weight_decay_term_hand_case():
    W1 = torch.tensor([[1.0, 2.0]])
    W2 = torch.tensor([[3.0], [4.0]])
    # (lambda/2)(||W1||^2 + ||W2||^2) = 0.05 * (1 + 4 + 9 + 16)
    got = P.weight_decay_term(0.1, W1, W2)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(1.5, rel=1e-12)
    assert float(P.weight_decay_term(0.0, W1, W2)) == 0.0


def test_l1_sparsity_hand_case():
    A = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    # coefficient * (1/m) sum_i ||a_i||_1 = 0.1 * 6 / 2
    got = P.l1_sparsity(A, 0.1)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(0.3, rel=1e-12)


def test_auxk_loss_zero_without_dead_units():
    Z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    residual = torch.ones(4, 2)
    D = torch.ones(2, 3)
    dead = torch.zeros(3, dtype=torch.bool)
    assert float(P.auxk_loss(residual, Z, D, dead, aux_k=2)) == 0.0


def test_auxk_loss_hand_case_uses_only_dead_units():
    residual = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # unit 1 has the larger pre-activation but is alive: only dead unit 0 may be used
    Z = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    D = torch.eye(2, dtype=torch.float64)
    dead = torch.tensor([True, False])
    # e_hat = [0.5, 0]; ||e - e_hat||^2 / ||e||^2 = 0.25
    assert float(P.auxk_loss(residual, Z, D, dead, aux_k=1)) == pytest.approx(0.25)
    # a negative pre-activation of a dead unit is ReLU'd to 0: e_hat = 0, loss 1
    Zneg = torch.tensor([[-0.5, 2.0]], dtype=torch.float64)
    assert float(P.auxk_loss(residual, Zneg, D, dead, aux_k=1)) == pytest.approx(1.0)


def test_auxk_loss_treats_residual_as_constant():
    residual = torch.tensor([[1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    Z = torch.tensor([[0.5, 0.3]], dtype=torch.float64, requires_grad=True)
    D = torch.eye(2, dtype=torch.float64)
    P.auxk_loss(residual, Z, D, torch.tensor([True, True]), aux_k=2).backward()
    assert residual.grad is None
    assert Z.grad is not None and bool((Z.grad != 0).any())


def test_loss_terms_named_tuple_order():
    assert P.LossTerms._fields == (
        "total", "reconstruction", "weight_decay", "sparsity", "auxiliary"
    )

"""The model's starting points: the exercise's uniform draw (KL, unchanged) and the tied
start of L1/TopK (encoder = decoder transpose, unit-norm columns), b2 set from data."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core import model as M


def exercise_theta(n: int, s: int, seed: int) -> torch.Tensor:
    """The exercise's initialisation written out independently: the bytes KL runs use."""
    r = math.sqrt(6.0 / (n + s + 1))
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(2 * s * n + s + n, dtype=torch.float64)
    theta[: 2 * s * n] = torch.rand(2 * s * n, generator=gen, dtype=torch.float64) * (2 * r) - r
    return theta


def test_uniform_init_is_the_exercise_bit_for_bit():
    for n, s, seed in ((64, 25, 0), (16, 7, 3)):
        expected = exercise_theta(n, s, seed)
        assert torch.equal(M.init_theta(n, s, seed=seed, dtype=torch.float64), expected)
        assert torch.equal(M.init_theta(n, s, seed=seed, dtype=torch.float64, init="uniform"),
                           expected)
        assert torch.equal(M.init_theta(n, s, seed=seed), expected.float())


def test_tied_init_encoder_is_decoder_transpose_with_unit_norm_columns():
    n, s = 16, 40
    theta = M.init_theta(n, s, seed=0, dtype=torch.float64, init="tied")
    p = M.unpack(theta, n, s)
    assert torch.equal(p.W1, p.W2.t())
    torch.testing.assert_close(p.W2.norm(dim=0), torch.ones(s, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    assert torch.equal(p.b1, torch.zeros(s, dtype=torch.float64))
    assert torch.equal(p.b2, torch.zeros(n, dtype=torch.float64))
    # the directions are spread, not one repeated column
    cos = p.W2.t() @ p.W2 - torch.eye(s, dtype=torch.float64)
    assert float(cos.abs().max()) < 0.95


def test_tied_init_is_seeded_and_the_same_in_every_dtype():
    a = M.init_theta(16, 8, seed=5, dtype=torch.float64, init="tied")
    assert torch.equal(a, M.init_theta(16, 8, seed=5, dtype=torch.float64, init="tied"))
    assert not torch.equal(a, M.init_theta(16, 8, seed=6, dtype=torch.float64, init="tied"))
    assert torch.equal(M.init_theta(16, 8, seed=5, init="tied"), a.float())


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of uniform, tied"):
        M.init_theta(4, 2, seed=0, init="xavier")


def test_set_pre_bias_writes_b2_only():
    n, s = 6, 3
    theta = M.init_theta(n, s, seed=0, dtype=torch.float64, init="tied")
    before = theta.clone()
    mean = torch.linspace(0.1, 0.9, n, dtype=torch.float64)
    M.set_pre_bias(theta, n, s, mean)
    p = M.unpack(theta, n, s)
    assert torch.equal(p.b2, mean)
    assert torch.equal(theta[: -n], before[: -n])

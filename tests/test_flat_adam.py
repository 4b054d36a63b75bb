"""FlatAdam: fused Adam on the flat parameter vector, weight decay on the weights only."""

from __future__ import annotations

import pickle

import pytest
import torch

from sae_core import model as M
from sae_core.config import SAEConfig
from sae_core.flat_adam import FlatAdam
from sae_core.objective import make_objective

N, S, LAM, LR = 10, 4, 0.02, 0.01
K = 2 * N * S  # the weights: W1 and W2, ahead of the biases


@pytest.fixture
def theta() -> torch.Tensor:
    t = M.init_theta(N, S, seed=0, dtype=torch.float64)
    t[K:] = 0.1 * torch.randn(S + N, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    return t


@pytest.fixture
def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(32, N, generator=gen, dtype=torch.float64) * 0.8 + 0.1
            for _ in range(6)]


def test_steps_match_torch_adam_on_the_full_gradient(theta, batches):
    """The decay in the fused update (objective without lambda W) takes the steps of
    torch's reference Adam on J's full gradient."""
    cfg = SAEConfig(n_components=S, weight_decay=LAM, dtype="float64")
    ours = FlatAdam(theta, K, lr=LR, weight_decay=LAM)
    partial = make_objective(cfg, decay_in_optimizer=True)
    ref = theta.clone().requires_grad_(True)
    reference = torch.optim.Adam([ref], lr=LR, foreach=False)
    full = make_objective(cfg)
    for X in batches:
        ours.step(partial(ours.param, X).grad)
        ref.grad = full(ref.detach(), X).grad
        reference.step()
    assert not torch.equal(ours.param, theta)
    assert torch.allclose(ours.param, ref.detach(), rtol=1e-12, atol=1e-15)


def test_weights_decay_and_biases_do_not(theta):
    """With a zero gradient only lambda W drives the step: every weight moves towards 0
    by the learning rate (Adam's first step is lr * sign of the gradient), no bias
    moves."""
    adam = FlatAdam(theta, K, lr=LR, weight_decay=0.5)
    adam.step(torch.zeros_like(theta))
    step = theta[:K] - adam.param[:K]
    assert bool((theta[:K] != 0).all())
    # (eps = 1e-8 against |g| = 0.5 |w| shortens the smallest weights' steps by ~1e-5)
    assert torch.allclose(step, LR * theta[:K].sign(), rtol=1e-4, atol=0)
    assert torch.equal(adam.param[K:], theta[K:])


def test_trains_its_own_copy(theta):
    before = theta.clone()
    adam = FlatAdam(theta, K, lr=LR, weight_decay=LAM)
    adam.step(torch.ones_like(theta))
    assert torch.equal(theta, before) and not torch.equal(adam.param, before)


@pytest.mark.parametrize("how", ["state", "pickle"])
def test_restored_optimiser_continues_like_the_original(theta, batches, how):
    """state()/load_state() (checkpoints) and pickle both carry the moments and the
    step count, and the restored leaves write into the restored flat vector."""
    cfg = SAEConfig(n_components=S, weight_decay=LAM, dtype="float64")
    objective = make_objective(cfg, decay_in_optimizer=True)
    adam = FlatAdam(theta, K, lr=LR, weight_decay=LAM)
    assert adam.state() == ({}, None)
    for X in batches[:3]:
        adam.step(objective(adam.param, X).grad)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(adam))
    else:
        twin = FlatAdam(adam.param, K, lr=LR, weight_decay=LAM)
        twin.load_state(*adam.state())
    assert twin.state()[1] == 3.0
    for X in batches[3:]:
        before = twin.param.clone()
        adam.step(objective(adam.param, X).grad)
        twin.step(objective(twin.param, X).grad)
        assert not torch.equal(twin.param, before)
    assert torch.equal(twin.param, adam.param)

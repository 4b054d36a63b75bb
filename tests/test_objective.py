"""The objective J(theta; X): fused KL gradient vs autograd, term bookkeeping, caching."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core import model as M
from sae_core.config import SAEConfig
from sae_core.gradcheck import relative_difference
from sae_core.objective import (
    TERM_NAMES,
    AutogradObjective,
    FusedKLObjective,
    loss_terms,
    make_objective,
)


def _theta(n, s, seed=0, dtype=torch.float64):
    """The exercise's initial point with non-zero biases (bias gradients non-trivial)."""
    theta = M.init_theta(n, s, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    theta[2 * n * s :] = 0.1 * torch.randn(s + n, generator=gen, dtype=torch.float64)
    return theta.to(dtype)


@pytest.fixture
def X64(small_X):
    return torch.as_tensor(small_X, dtype=torch.float64)


@pytest.mark.parametrize(("rho", "beta", "lam"), [(0.01, 3.0, 1e-4), (0.2, 0.5, 3e-3),
                                                   (0.05, 0.0, 0.0)])
def test_fused_kl_equals_autograd_float64(X64, rho, beta, lam):
    cfg = SAEConfig(n_components=7, rho=rho, beta=beta, weight_decay=lam, dtype="float64")
    theta = _theta(X64.shape[1], 7)
    fused = FusedKLObjective(cfg)(theta, X64)
    auto = AutogradObjective(cfg)(theta, X64)
    assert relative_difference(fused.grad, auto.grad) < 1e-12
    assert float(fused.loss) == pytest.approx(float(auto.loss), rel=1e-13)
    assert torch.allclose(fused.terms, auto.terms, rtol=1e-13, atol=0)


def test_fused_kl_equals_autograd_on_natural_patches(natural_X):
    X = torch.as_tensor(natural_X[:100])
    cfg = SAEConfig(n_components=25, dtype="float64")
    theta = _theta(64, 25)
    a = FusedKLObjective(cfg)(theta, X)
    b = AutogradObjective(cfg)(theta, X)
    assert relative_difference(a.grad, b.grad) < 1e-12


def test_fused_kl_float32_close_to_autograd(X64):
    X = X64.float()
    cfg = SAEConfig(n_components=5)
    theta = _theta(X.shape[1], 5, dtype=torch.float32)
    a = FusedKLObjective(cfg)(theta, X)
    b = AutogradObjective(cfg)(theta, X)
    assert a.grad.dtype == torch.float32
    assert relative_difference(a.grad, b.grad) < 1e-5
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-5)


def test_fused_does_not_modify_theta_or_X(X64):
    cfg = SAEConfig(n_components=4, dtype="float64")
    theta = _theta(X64.shape[1], 4)
    theta0, X0 = theta.clone(), X64.clone()
    FusedKLObjective(cfg)(theta, X64)
    assert torch.equal(theta, theta0)
    assert torch.equal(X64, X0)


def test_fused_cache_follows_new_and_modified_data(X64, other_X):
    """The fused objective caches a transposed copy of X: a different tensor, an in-place
    change of X, or another batch size must not reuse stale data."""
    cfg = SAEConfig(n_components=4, dtype="float64")
    theta = _theta(X64.shape[1], 4)
    obj = FusedKLObjective(cfg)
    obj(theta, X64)
    X2 = torch.as_tensor(other_X, dtype=torch.float64)
    assert torch.equal(obj(theta, X2).grad, FusedKLObjective(cfg)(theta, X2).grad)
    X3 = X64.clone()
    obj(theta, X3)
    X3[:10] = 0.5  # in place: same tensor object, new version
    assert torch.equal(obj(theta, X3).grad, FusedKLObjective(cfg)(theta, X3).grad)
    X4 = X64[:37].clone()  # another batch size
    assert torch.equal(obj(theta, X4).grad, FusedKLObjective(cfg)(theta, X4).grad)
    assert float(obj(theta, X64).loss) == float(FusedKLObjective(cfg)(theta, X64).loss)


def test_fused_rejects_other_penalties():
    with pytest.raises(ValueError, match="penalty='kl'"):
        FusedKLObjective(SAEConfig(penalty="l1"))


def test_make_objective_choice():
    assert isinstance(make_objective(SAEConfig(penalty="kl")), FusedKLObjective)
    assert isinstance(make_objective(SAEConfig(penalty="l1")), AutogradObjective)
    assert isinstance(make_objective(SAEConfig(penalty="topk")), AutogradObjective)


@pytest.mark.parametrize("penalty", ["kl", "l1", "topk"])
def test_loss_is_sum_of_terms(X64, penalty):
    cfg = SAEConfig(n_components=6, penalty=penalty, k=2, aux_k=3, l1_coefficient=1e-2,
                    dtype="float64", solver="adam")
    theta = _theta(X64.shape[1], 6)
    ev = make_objective(cfg)(theta, X64)
    assert ev.terms.shape == (len(TERM_NAMES),)
    assert float(ev.loss) == pytest.approx(math.fsum(ev.terms.tolist()), rel=1e-14)
    assert bool((ev.terms >= 0).all())
    assert ev.grad.shape == theta.shape


def test_terms_match_pure_functions(X64):
    cfg = SAEConfig(n_components=6, rho=0.1, beta=2.0, weight_decay=1e-3, dtype="float64")
    n = X64.shape[1]
    theta = _theta(n, 6)
    p = M.unpack(theta, n, 6)
    A = torch.sigmoid(X64 @ p.W1.t() + p.b1)
    X_hat = torch.sigmoid(A @ p.W2.t() + p.b2)
    recon = 0.5 * ((X_hat - X64) ** 2).sum() / X64.shape[0]
    decay = 0.5e-3 * ((p.W1**2).sum() + (p.W2**2).sum())
    q = A.mean(0)
    kl = 2.0 * (0.1 * torch.log(0.1 / q) + 0.9 * torch.log(0.9 / (1 - q))).sum()
    ev = FusedKLObjective(cfg)(theta, X64)
    expected = torch.stack([recon, decay, kl, torch.zeros((), dtype=torch.float64)])
    assert torch.allclose(ev.terms, expected, rtol=1e-12, atol=1e-300)


def test_l1_decoder_columns_normalised_in_objective(X64):
    """Scaling a decoder column does not change the L1 objective (re-parameterisation)."""
    cfg = SAEConfig(n_components=6, penalty="l1", weight_decay=0.0, dtype="float64")
    n = X64.shape[1]
    theta = _theta(n, 6)
    scaled = theta.clone()
    M.unpack(scaled, n, 6).W2[:, 2] *= 7.0
    a = AutogradObjective(cfg)(theta, X64)
    b = AutogradObjective(cfg)(scaled, X64)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-12)


def test_autograd_objective_does_not_touch_theta(X64):
    cfg = SAEConfig(n_components=6, penalty="l1", dtype="float64")
    theta = _theta(X64.shape[1], 6)
    ev = AutogradObjective(cfg)(theta, X64)
    assert not theta.requires_grad and theta.grad is None
    assert not ev.loss.requires_grad


def test_topk_auxk_fired_mask_and_dead_units():
    # 3 examples, many latents, k = 1: most latents never fire on this batch
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(3, 8, generator=gen, dtype=torch.float64)
    cfg = SAEConfig(n_components=16, penalty="topk", k=1, aux_k=4, dtype="float64",
                    solver="adam")
    theta = _theta(8, 16)
    ev = AutogradObjective(cfg)(theta, X)
    assert ev.fired is not None and ev.fired.dtype == torch.bool
    assert int(ev.fired.sum()) <= 3
    assert float(ev.terms[3]) > 0  # dead latents exist, so AuxK is active
    # with every latent declared alive the auxiliary term vanishes
    alive = torch.zeros(16, dtype=torch.bool)
    ev2 = AutogradObjective(cfg)(theta, X, dead=alive)
    assert float(ev2.terms[3]) == 0.0
    # and without aux_k nothing is tracked
    cfg_plain = SAEConfig(n_components=16, penalty="topk", k=1, dtype="float64")
    assert AutogradObjective(cfg_plain)(theta, X).fired is None


def test_loss_terms_returns_activations(X64):
    cfg = SAEConfig(n_components=5, penalty="topk", k=2, dtype="float64")
    theta = _theta(X64.shape[1], 5)
    terms, A = loss_terms(theta, X64, cfg)
    assert A.shape == (X64.shape[0], 5)
    assert int((A != 0).sum(dim=1).max()) <= 2
    assert float(terms.sparsity) == 0.0  # TopK has no sparsity penalty term


def test_fused_blocks_give_the_same_bytes_for_any_thread_count():
    # 10,000 examples = 2 fixed column blocks; 1, 2 or 3 worker threads must agree bitwise
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(10_000, 16, generator=gen) * 0.8 + 0.1
    cfg = SAEConfig(n_components=7)
    theta = M.init_theta(16, 7, seed=0)
    evs = []
    for workers in (1, 2, 3):
        obj = FusedKLObjective(cfg, workers=workers)
        evs.append(obj(theta, X))
        obj.close()
    assert len({float(e.loss) for e in evs}) == 1
    for e in evs[1:]:
        assert torch.equal(e.grad, evs[0].grad)
    # and the blocked evaluation is the same objective as the unblocked autograd one
    ref = AutogradObjective(cfg)(theta, X)
    assert float(evs[0].loss) == pytest.approx(float(ref.loss), rel=1e-6)


def test_fused_worker_threads_hand_back_errors_and_stop_on_close():
    from sae_core.objective import _Worker

    worker = _Worker()
    worker.submit(lambda: 41 + 1)
    assert worker.result() == 42
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.result()
    worker.submit(lambda: "still alive")
    assert worker.result() == "still alive"
    worker.close()
    assert not worker._thread.is_alive()

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(10_000, 8, generator=gen) * 0.8 + 0.1
    obj = FusedKLObjective(SAEConfig(n_components=3), workers=2)
    obj(M.init_theta(8, 3, seed=0), X)
    threads = [w._thread for w in obj._pool]
    assert len(threads) == 1 and threads[0].is_alive()
    obj.close()
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize(("m", "blocks"), [(300, 1), (10_000, 2)])
def test_row_and_column_evaluations_equal_autograd_float64(m, blocks):
    """Mini-batches take the one-block evaluation (examples as rows, addmm), full batches
    of 1.5 blocks or more the blocked column one: both are the same objective."""
    gen = torch.Generator().manual_seed(3)
    X = torch.rand(m, 12, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    cfg = SAEConfig(n_components=6, weight_decay=3e-3, dtype="float64")
    theta = _theta(12, 6)
    obj = FusedKLObjective(cfg)
    assert obj._blocks(X) == blocks
    fused, auto = obj(theta, X), AutogradObjective(cfg)(theta, X)
    assert relative_difference(fused.grad, auto.grad) < 1e-12
    assert torch.allclose(fused.terms, auto.terms, rtol=1e-12, atol=0)


def test_reused_gradient_is_one_tensor_with_fresh_values(X64, other_X):
    """reuse_grad (Adam's objective) hands back the same tensor every call, holding the
    gradient of that call; the default hands back a new one."""
    cfg = SAEConfig(n_components=7, dtype="float64")
    theta = _theta(X64.shape[1], 7)
    other = torch.as_tensor(other_X, dtype=torch.float64)
    reused = FusedKLObjective(cfg, reuse_grad=True)
    g1 = reused(theta, X64).grad
    g2 = reused(theta, other).grad
    assert g1 is g2
    assert torch.equal(g2, FusedKLObjective(cfg)(theta, other).grad)
    fresh = FusedKLObjective(cfg)
    assert fresh(theta, X64).grad is not fresh(theta, X64).grad


@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_l1_and_topk_carry_no_weight_decay(X64, penalty):
    """Ng's weight decay is the KL model's alone: for L1/TopK lambda changes neither the
    loss nor the gradient (an encoder decay would walk unselected latents to 0 under
    Adam)."""
    theta = _theta(X64.shape[1], 7)
    evs = [AutogradObjective(SAEConfig(n_components=7, penalty=penalty, weight_decay=lam,
                                       dtype="float64"))(theta, X64) for lam in (0.0, 0.1)]
    assert float(evs[1].terms[TERM_NAMES.index("weight_decay")]) == 0.0
    assert float(evs[0].loss) == float(evs[1].loss)
    assert torch.equal(evs[0].grad, evs[1].grad)


@pytest.mark.parametrize("kind", ["block", "blocked host", "autograd"])
def test_decay_in_optimizer_leaves_only_lambda_w_out_of_the_gradient(kind):
    """decay_in_optimizer (Adam's objective, whose optimizer adds lambda W): the weight
    gradients lose exactly lambda W, the bias gradients, the loss and its terms are
    those of J; for the one-block and blocked fused evaluations and autograd."""
    lam, n, s = 3e-3, 12, 6
    m = 10_000 if kind == "blocked host" else 300
    X = torch.rand(m, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X = X * 0.8 + 0.1
    cfg = SAEConfig(n_components=s, weight_decay=lam, dtype="float64")
    theta = _theta(n, s)
    cls = AutogradObjective if kind == "autograd" else FusedKLObjective
    full, part = cls(cfg)(theta, X), cls(cfg, decay_in_optimizer=True)(theta, X)
    if cls is FusedKLObjective:
        assert FusedKLObjective(cfg)._blocks(X) == (2 if kind == "blocked host" else 1)
    k = 2 * n * s
    expected = full.grad[:k] - lam * theta[:k]
    assert relative_difference(part.grad[:k], expected) < 1e-12
    assert not torch.allclose(part.grad[:k], full.grad[:k], rtol=1e-6, atol=0)
    assert torch.equal(part.grad[k:], full.grad[k:])
    assert float(part.loss) == float(full.loss)
    assert torch.equal(part.terms, full.terms)

"""The L-BFGS solver on convex quadratics: convergence, the compact-form direction against
the classic two-loop recursion, and state save/restore."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sae_core.lbfgs import LBFGS, LBFGSState


def _quadratic(n, cond, seed=0):
    """f(x) = 0.5 x'Ax with A SPD of condition number ``cond``; minimiser x* = 0."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    A = Q @ torch.diag(eig) @ Q.t()
    A = 0.5 * (A + A.t())
    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    calls = []

    def evaluate(x):
        calls.append(1)
        g = A @ x
        return float(0.5 * torch.dot(x, g)), g, float(torch.dot(x, x))

    return evaluate, x0, calls


def _run(solver, state, n):
    for _ in range(n):
        go_on, _ = solver.step(state)
        if not go_on:
            break


def test_converges_to_minimiser_of_quadratic():
    evaluate, x0, _ = _quadratic(20, 10.0)
    solver = LBFGS(evaluate, history=10, tol=0.0)
    state, extra = solver.start(x0)
    assert extra == pytest.approx(float(x0 @ x0))
    for _ in range(40):
        go_on, _ = solver.step(state)
        if not go_on:
            break
    assert float(state.x.norm()) < 1e-6 * float(x0.norm())
    assert state.f < 1e-12
    assert state.n_iter <= 40


def test_loss_decreases_every_iteration():
    evaluate, x0, _ = _quadratic(30, 100.0)
    solver = LBFGS(evaluate, history=5, tol=0.0)
    state, _ = solver.start(x0)
    losses = [state.f]
    for _ in range(25):
        go_on, _ = solver.step(state)
        losses.append(state.f)
        if not go_on:
            break
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_stops_on_tolerance_with_reason():
    evaluate, x0, _ = _quadratic(10, 10.0)
    solver = LBFGS(evaluate, history=10, tol=1e-3)
    state, _ = solver.start(x0)
    _run(solver, state, 100)
    assert state.stop_reason is not None and "tol" in state.stop_reason
    assert state.n_iter < 100


def test_non_finite_start_raises():
    def evaluate(x):
        return math.nan, torch.zeros_like(x), None

    with pytest.raises(FloatingPointError, match="initial point"):
        LBFGS(evaluate).start(torch.zeros(3, dtype=torch.float64))


def _two_loop(state, history):
    """Nocedal & Wright Alg. 7.4 on the stored pairs (oldest first), H0 = gamma I with
    gamma = s_k'y_k / y_k'y_k of the newest pair; returns d = -H g."""
    k = state.n_pairs
    slots = [(state.head - k + i) % history for i in range(k)]
    S = [state.pairs[j] for j in slots]
    Y = [state.pairs[history + j] for j in slots]
    q = state.g.clone()
    alphas = []
    for s, y in zip(reversed(S), reversed(Y), strict=True):
        rho = 1.0 / torch.dot(y, s)
        a = rho * torch.dot(s, q)
        q = q - a * y
        alphas.append(a)
    gamma = torch.dot(S[-1], Y[-1]) / torch.dot(Y[-1], Y[-1])
    r = gamma * q
    for s, y, a in zip(S, Y, reversed(alphas), strict=True):
        rho = 1.0 / torch.dot(y, s)
        b = rho * torch.dot(y, r)
        r = r + s * (a - b)
    return -r


def test_compact_direction_equals_two_loop_including_ring_wrap():
    history = 5
    evaluate, x0, _ = _quadratic(50, 1000.0)
    solver = LBFGS(evaluate, history=history, tol=0.0)
    state, _ = solver.start(x0)
    checked = 0
    heads = set()
    for _ in range(12):
        go_on, _ = solver.step(state)
        assert go_on
        heads.add(state.head)
        d = solver._direction(state)
        ref = _two_loop(state, history)
        assert float((d - ref).norm() / ref.norm()) < 1e-12
        assert state.gamma == pytest.approx(float(
            torch.dot(state.pairs[(state.head - 1) % history],
                      state.pairs[history + (state.head - 1) % history])
            / state.pairs[history + (state.head - 1) % history].norm() ** 2), rel=1e-12)
        checked += 1
    assert checked == 12
    assert state.n_iter == 12
    assert state.n_pairs == history  # the ring buffer is full ...
    assert heads == set(range(history))  # ... and has wrapped around


def test_first_direction_is_steepest_descent():
    evaluate, x0, _ = _quadratic(8, 10.0)
    solver = LBFGS(evaluate, history=3)
    state, _ = solver.start(x0)
    assert torch.equal(solver._direction(state), -state.g)


def _snapshot(state):
    tensors = {k: v.clone() for k, v in state.tensors().items()}
    return tensors, dict(state.scalars())


def test_state_restore_continues_identically():
    evaluate, x0, _ = _quadratic(40, 1000.0)
    solver = LBFGS(evaluate, history=4, tol=0.0)
    state, _ = solver.start(x0)
    _run(solver, state, 7)
    tensors, scalars = _snapshot(state)
    # through numpy, as a checkpoint file would store them
    tensors = {k: torch.from_numpy(np.array(v.numpy())) for k, v in tensors.items()}
    restored = LBFGSState.restore(tensors, scalars)
    assert restored.scalars() == state.scalars()
    _run(solver, state, 6)
    _run(solver, restored, 6)
    assert restored.n_iter == state.n_iter == 13
    assert torch.equal(restored.x, state.x)
    assert torch.equal(restored.g, state.g)
    assert torch.equal(restored.pairs, state.pairs)
    assert restored.f == state.f
    assert restored.n_evals == state.n_evals


def test_scalars_are_json_types():
    import json

    evaluate, x0, _ = _quadratic(6, 10.0)
    solver = LBFGS(evaluate, history=3)
    state, _ = solver.start(x0)
    _run(solver, state, 3)
    assert json.loads(json.dumps(state.scalars())) == state.scalars()

"""The dynamics recorder (sae_core.dynamics), its Parquet table and its pictures."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_core import model as M
from sae_core.config import SAEConfig
from sae_core.dynamics import (
    COLUMNS,
    TERM_COLUMNS,
    Dynamics,
    DynamicsRecorder,
    probe_rows,
    read_dynamics,
    sparsity_delta,
    write_dynamics,
)
from sae_core.objective import FusedKLObjective
from sae_core.train import Trainer

N, S = 12, 5


def _np_global_state() -> np.ndarray:
    """numpy's legacy global RNG state: what a careless sampler would advance."""
    return np.random.get_state()[1].copy()  # noqa: NPY002 - the legacy state is the point


def _data(m: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 0.9, size=(m, N))


def _fit(X, every=5, **settings):
    cfg = SAEConfig(**{"n_components": S, "device": "cpu", "dtype": "float64", "max_iter": 23,
                       "tol": 0.0, "batch_size": 64, **settings})
    rec = DynamicsRecorder(X, every=every)
    trainer = Trainer(cfg, N, [rec])
    trainer.fit(X)
    return trainer, rec.result()


def test_recorded_delta_is_the_fused_gradients_hidden_term():
    """The sparsity term's share of the fused gradient, derived from CS294A's back-prop:

        grad_b1_j = (1/m) sum_i delta2_ij,
        delta2_ij = ((W2^T delta3_i)_j + delta_j) * a_ij (1 - a_ij),
        delta_j   = beta * (-rho/rho_hat_j + (1 - rho)/(1 - rho_hat_j)).

    At fixed theta the forward pass (a, x_hat, delta3) does not depend on beta, so

        grad_b1(beta) - grad_b1(beta = 0) = delta_j * (1/m) sum_i a_ij (1 - a_ij),

    checked to 1e-10 in float64 with delta_j as the recorder stored it, at the first
    sample (the initial theta) and at the last (the fitted theta)."""
    X = _data()
    trainer, dyn = _fit(X, rho=0.05, beta=3.0, weight_decay=1e-3)
    Xt = torch.as_tensor(X)
    start = M.init_theta(N, S, seed=0, dtype=torch.float64)
    for theta, t in ((start, 0), (trainer.theta, -1)):
        p = M.unpack(theta, N, S)
        np.testing.assert_array_equal(dyn.b1[t], p.b1.numpy())
        grads = {}
        for beta in (3.0, 0.0):
            cfg = SAEConfig(n_components=S, rho=0.05, beta=beta, weight_decay=1e-3,
                            dtype="float64")
            ev = FusedKLObjective(cfg)(theta, Xt)
            grads[beta] = M.unpack(ev.grad, N, S).b1.numpy()
        a = torch.sigmoid(Xt @ p.W1.T + p.b1).numpy()
        slope = (a * (1 - a)).mean(axis=0)
        np.testing.assert_allclose(grads[3.0] - grads[0.0], dyn.delta[t] * slope,
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(dyn.rho_hat[t], a.mean(axis=0), rtol=0, atol=1e-14)
    # the sign rule the pictures show: delta_j > 0 exactly while rho_hat_j > rho
    assert ((dyn.delta > 0) == (dyn.rho_hat > 0.05)).all()
    assert dyn.delta[0].min() > 0 and dyn.rho_hat[-1].mean() < dyn.rho_hat[0].mean()


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_the_callback_does_not_change_the_trained_bytes(solver):
    X = _data()
    cfg = SAEConfig(n_components=S, device="cpu", solver=solver, max_iter=12, batch_size=64)
    plain = Trainer(cfg, N)
    plain.fit(X)
    rng_after_plain = torch.get_rng_state()
    np_after_plain = _np_global_state()
    rec = DynamicsRecorder(X, every=3)
    observed = Trainer(cfg, N, [rec])
    observed.fit(X)
    assert plain.theta.numpy().tobytes() == observed.theta.numpy().tobytes()
    assert plain.history == observed.history
    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    assert np.array_equal(_np_global_state(), np_after_plain)
    assert rec.result().iteration[-1] == observed.iteration


def test_samples_the_first_iterations_every_nth_and_the_last():
    trainer, dyn = _fit(_data(), every=5)
    last = trainer.iteration
    expected = sorted(set(range(min(5, last + 1))) | set(range(0, last + 1, 5)) | {last})
    assert dyn.iteration.tolist() == expected
    assert dyn.rho_hat.shape == dyn.b1.shape == dyn.delta.shape == (len(expected), S)
    history = {r["iteration"]: r for r in trainer.history}
    for k in TERM_COLUMNS:
        assert dyn.terms[k].tolist() == [history[i][k] for i in expected]
    # the recorded KL term is beta * sum_j KL(rho || rho_hat_j) of the recorded rho_hat
    rho, q = 0.01, dyn.rho_hat
    kl = 3.0 * (rho * np.log(rho / q) + (1 - rho) * np.log((1 - rho) / (1 - q))).sum(axis=1)
    np.testing.assert_allclose(dyn.terms["sparsity"], kl, rtol=1e-12, atol=1e-14)


def test_adam_has_no_terms_before_its_first_epoch():
    _, dyn = _fit(_data(), every=2, solver="adam", max_iter=4)
    assert dyn.iteration.tolist() == [0, 1, 2, 4]
    assert np.isnan(dyn.terms["loss"][0]) and np.isfinite(dyn.terms["loss"][1:]).all()


def test_large_data_use_a_seeded_subset_without_touching_global_rngs():
    X = _data(m=50)
    torch_state, np_state = torch.get_rng_state(), _np_global_state()
    a, b = probe_rows(X, max_rows=20, seed=3), probe_rows(X, max_rows=20, seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(_np_global_state(), np_state)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, N)
    rows = [int(np.flatnonzero((X == r).all(axis=1))[0]) for r in a]
    assert rows == sorted(set(rows))  # distinct rows, in their order in X
    assert not np.array_equal(probe_rows(X, max_rows=20, seed=4), a)
    np.testing.assert_array_equal(probe_rows(X, max_rows=50), X)
    rec = DynamicsRecorder(X, max_rows=20, seed=3)
    Trainer(SAEConfig(n_components=S, device="cpu", dtype="float64", max_iter=2), N,
            [rec]).fit(X)
    dyn = rec.result()
    assert (dyn.n_rows, dyn.n_examples, dyn.exact) == (20, 50, False)


def test_other_penalties_record_the_firing_rate_and_no_delta(tmp_path):
    X = _data()
    trainer, dyn = _fit(X, penalty="l1", l1_coefficient=1e-2, dtype="float64")
    p = M.unpack(trainer.theta, N, S)
    a = M.encode(p, torch.as_tensor(X), "l1", S)
    np.testing.assert_array_equal(dyn.rho_hat[-1], (a > 1e-3).double().mean(dim=0).numpy())
    assert np.isnan(dyn.delta).all()
    write_dynamics(tmp_path / "d.parquet", dyn)
    assert pq.read_table(tmp_path / "d.parquet").column("delta").null_count == dyn.delta.size


def test_parquet_table_is_long_tidy_and_deterministic(tmp_path):
    _, dyn = _fit(_data(), every=10)
    path = tmp_path / "dynamics.parquet"
    write_dynamics(path, dyn)
    table = pq.read_table(path)
    assert table.schema.names == list(COLUMNS)
    assert table.schema.field("iteration").type == pa.int64()
    assert table.schema.field("unit").type == pa.int64()
    assert all(table.schema.field(c).type == pa.float64() for c in COLUMNS[2:])
    T = dyn.iteration.size
    assert table.num_rows == T * S  # one row per (sample, unit)
    cols = table.to_pydict()
    assert list(zip(cols["iteration"], cols["unit"], strict=True)) == [
        (int(i), j) for i in dyn.iteration for j in range(S)]
    for k in TERM_COLUMNS:  # a sample's terms, the same on each of its units' rows
        per_sample = np.array(cols[k]).reshape(T, S)
        assert (per_sample == per_sample[:, :1]).all()
        np.testing.assert_array_equal(per_sample[:, 0], dyn.terms[k])
    back = read_dynamics(path)
    for name in ("iteration", "rho_hat", "b1", "delta"):
        np.testing.assert_array_equal(getattr(back, name), getattr(dyn, name))
    assert (back.rho, back.beta, back.every, back.rows_sha256) == (0.01, 3.0, 10, dyn.rows_sha256)
    first = path.read_bytes()
    write_dynamics(path, dyn)
    assert path.read_bytes() == first


@pytest.mark.parametrize("every", [0, -3, 2.5, True, "10"])
def test_a_bad_interval_is_a_one_line_error(every):
    from flows.train import train_settings

    with pytest.raises(ValueError, match=r"^dynamics_every must be an integer >= 1") as e:
        DynamicsRecorder(_data(m=10), every=every)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^params.yaml: train.dynamics_every must be an "
                                         r"integer >= 1 .*; got ") as e:
        train_settings({"beta": 3.0, "dynamics_every": every}, "params.yaml")
    assert "\n" not in str(e.value)


def test_the_stage_settings_split_off_the_interval():
    from flows.train import train_settings

    assert train_settings({"beta": 1.0, "dynamics_every": 7}, "p") == ({"beta": 1.0}, 7)
    assert train_settings({"beta": 1.0}, "p") == ({"beta": 1.0}, 10)


def test_reading_another_file_is_a_one_line_error(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"iteration": [0]}), other)
    with pytest.raises(ValueError, match=r"not a saeflow dynamics table") as e:
        read_dynamics(other)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="file not found"):
        read_dynamics(tmp_path / "missing.parquet")


def test_writer_refuses_to_replace_a_users_file(tmp_path):
    from sae_core.outputs import OutputError

    _, dyn = _fit(_data(), max_iter=3)
    notes = tmp_path / "notes.parquet"
    notes.write_text("mine")
    with pytest.raises(OutputError, match="not a saeflow dynamics table"):
        write_dynamics(notes, dyn)
    assert notes.read_text() == "mine"


def test_sparsity_delta_formula():
    q = np.array([0.5, 0.01, 0.001])
    np.testing.assert_allclose(sparsity_delta(q, 0.01, 2.0),
                               2.0 * (-0.01 / q + 0.99 / (1 - q)))
    assert sparsity_delta(np.array([0.01]), 0.01, 5.0)[0] == pytest.approx(0.0, abs=1e-12)


def test_dynamics_checks_its_shapes():
    with pytest.raises(ValueError, match="rho_hat must be"):
        Dynamics(np.arange(3), np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)),
                 {k: np.zeros(3) for k in TERM_COLUMNS})
    with pytest.raises(ValueError, match="strictly increasing"):
        Dynamics(np.array([0, 0]), np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)),
                 {k: np.zeros(2) for k in TERM_COLUMNS})


def test_pictures_are_pngs_with_the_same_bytes_for_the_same_input():
    from sae_core import dynamics_plots as DP
    from sae_core.plots import figure_png

    _, kl = _fit(_data(), max_iter=8)
    _, dense = _fit(_data(), max_iter=8, beta=0.0)
    one = figure_png(DP.dynamics_figure(kl))
    assert one.startswith(b"\x89PNG") and one == figure_png(DP.dynamics_figure(kl))
    both = figure_png(DP.dynamics_comparison_figure([kl, dense], ["beta 3", "beta 0"]))
    assert both.startswith(b"\x89PNG")
    hist = DP.rho_hat_histograms_figure([kl.rho_hat[-1], dense.rho_hat[-1]], ["a", "b"], 0.01)
    assert len(hist.axes) == 2
    with pytest.raises(ValueError, match="labels must name each"):
        DP.dynamics_comparison_figure([kl, dense], ["only one"])
    with pytest.raises(ValueError, match=r"must be a sae_core\.dynamics\.Dynamics"):
        DP.dynamics_figure(kl.rho_hat)

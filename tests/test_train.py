"""Training: loss decrease, the exercise's sparsity, reproducibility, interrupt/resume,
divergence detection, callbacks and the loss decomposition."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from sae_core import SparseAutoencoder
from sae_core import train as T
from sae_core.config import SAEConfig
from sae_core.io import FileFormatError
from sae_core.objective import TERM_NAMES, Evaluation
from sae_core.train import Callback, CheckpointCallback, Trainer, TrainingDivergedError


def fit(X, **kw):
    kw.setdefault("device", "cpu")
    return SparseAutoencoder(**kw).fit(X)


PENALTY_KW = {
    "kl": {"penalty": "kl", "rho": 0.1},
    "l1": {"penalty": "l1", "l1_coefficient": 1e-2},
    "topk": {"penalty": "topk", "k": 2},
}


# ----------------------------------------------------------------- the exercise
@pytest.fixture(scope="module")
def exercise(natural_X):
    sae = SparseAutoencoder(25, rho=0.01, beta=3, weight_decay=1e-4, max_iter=400, device="cpu")
    return sae.fit(natural_X)


def test_exercise_every_unit_near_target_sparsity(exercise, natural_X):
    rho = 0.01
    rho_hat = exercise.transform(natural_X).mean(axis=0)
    assert rho_hat.shape == (25,)
    assert np.all(rho_hat >= rho / 2), rho_hat
    assert np.all(rho_hat <= 2 * rho), rho_hat


def test_exercise_loss_decomposition(exercise):
    h = exercise.history_
    assert h[0]["iteration"] == 0
    assert [r["iteration"] for r in h] == list(range(len(h)))
    assert len(h) == exercise.n_iter_ + 1
    for r in h:
        assert math.isclose(r["loss"], math.fsum(r[name] for name in TERM_NAMES),
                            rel_tol=1e-12, abs_tol=1e-15)
    # the optimiser lowers the sum; the sparsity term ends far below its start
    assert h[-1]["loss"] < 0.1 * h[0]["loss"]
    assert h[-1]["sparsity"] < h[0]["sparsity"]
    assert h[-1]["auxiliary"] == 0.0


def test_exercise_lbfgs_loss_non_increasing(exercise):
    losses = [r["loss"] for r in exercise.history_]
    for before, after in itertools.pairwise(losses):
        assert after <= before + 1e-12 * abs(before)


# ----------------------------------------------------------------- loss decrease
@pytest.mark.parametrize("penalty", ["kl", "l1"])
def test_lbfgs_loss_non_increasing(small_X, penalty):
    sae = fit(small_X, n_components=8, max_iter=60, **PENALTY_KW[penalty])
    losses = [r["loss"] for r in sae.history_]
    assert len(losses) > 10
    for before, after in itertools.pairwise(losses):
        assert after <= before + 1e-12 * abs(before)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("penalty", ["kl", "l1", "topk"])
def test_adam_epoch_loss_decreases(small_X, penalty):
    sae = fit(small_X, n_components=8, solver="adam", max_iter=15, batch_size=32,
              learning_rate=1e-2, **PENALTY_KW[penalty])
    losses = [r["loss"] for r in sae.history_]
    assert len(losses) == 15
    assert losses[-1] < losses[0]
    assert all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
@pytest.mark.parametrize("penalty", ["kl", "topk"])
def test_same_seed_same_weights_other_seed_other_weights(small_X, solver, penalty):
    kw = dict(n_components=6, solver=solver, max_iter=12, batch_size=32, **PENALTY_KW[penalty])
    a = fit(small_X, random_state=3, **kw)
    b = fit(small_X, random_state=3, **kw)
    c = fit(small_X, random_state=4, **kw)
    assert np.array_equal(a.components_, b.components_)
    assert np.array_equal(a.decoder_, b.decoder_)
    assert np.array_equal(a.intercept_hidden_, b.intercept_hidden_)
    assert a.history_ == b.history_
    assert not np.array_equal(a.components_, c.components_)


def test_initial_weights_depend_on_seed_only(small_X):
    """Two Adam runs with one seed but different batch sizes (so different batch orders and
    step counts) start from the same point: with a negligible step they end there."""
    a = fit(small_X, n_components=4, solver="adam", max_iter=1, batch_size=200,
            learning_rate=1e-12)
    b = fit(small_X, n_components=4, solver="adam", max_iter=1, batch_size=16,
            learning_rate=1e-12)
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-9)


# ----------------------------------------------------------------- interrupt / resume
class InterruptAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_iteration_end(self, trainer):
        if trainer.iteration == self.iteration:
            raise KeyboardInterrupt


class Recorder(Callback):
    def __init__(self):
        self.starts = 0
        self.ends = 0
        self.iterations = []

    def on_fit_start(self, trainer):
        self.starts += 1

    def on_iteration_end(self, trainer):
        self.iterations.append(trainer.iteration)
        assert trainer.history[-1]["iteration"] == trainer.iteration

    def on_fit_end(self, trainer):
        self.ends += 1


RESUME_CASES = [
    ("lbfgs", "kl"),
    ("adam", "kl"),
    ("lbfgs", "l1"),
    ("adam", "topk"),
]


@pytest.mark.parametrize(("solver", "penalty"), RESUME_CASES)
def test_interrupted_fit_resumes_bitwise(tmp_path, small_X, solver, penalty):
    kw = dict(n_components=6, solver=solver, max_iter=25, tol=0.0, batch_size=32,
              **PENALTY_KW[penalty])
    if penalty == "topk":
        kw.update(aux_k=2, dead_window=64)
    reference = fit(small_X, **kw)
    assert reference.n_iter_ > 13

    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(small_X, checkpoint_path=str(ckpt), checkpoint_every=5,
            callbacks=[InterruptAt(13)], **kw)
    assert ckpt.is_file()
    assert list(tmp_path.iterdir()) == [ckpt]  # no temporary file left behind

    rec = Recorder()
    resumed = fit(small_X, checkpoint_path=str(ckpt), checkpoint_every=5, callbacks=[rec], **kw)
    # it really continued from the checkpoint of iteration 10, not from scratch
    assert rec.iterations[0] == 11
    assert rec.iterations[-1] == reference.n_iter_
    assert resumed.n_iter_ == reference.n_iter_
    assert np.array_equal(resumed.components_, reference.components_)
    assert np.array_equal(resumed.decoder_, reference.decoder_)
    assert np.array_equal(resumed.intercept_hidden_, reference.intercept_hidden_)
    assert np.array_equal(resumed.intercept_visible_, reference.intercept_visible_)
    assert resumed.history_ == reference.history_


def test_resume_with_other_settings_raises_naming_checkpoint(tmp_path, small_X):
    ckpt = tmp_path / "fit.ckpt"
    fit(small_X, n_components=4, max_iter=5, checkpoint_path=str(ckpt))
    with pytest.raises(ValueError, match=r"fit\.ckpt.*other settings.*beta"):
        fit(small_X, n_components=4, max_iter=5, beta=1.0, checkpoint_path=str(ckpt))
    with pytest.raises(ValueError, match=r"fit\.ckpt.*other settings"):
        fit(small_X[:, :8], n_components=4, max_iter=5, checkpoint_path=str(ckpt))


def test_resume_with_other_data_raises(tmp_path, small_X, other_X):
    ckpt = tmp_path / "fit.ckpt"
    fit(small_X, n_components=4, max_iter=5, checkpoint_path=str(ckpt))
    with pytest.raises(ValueError, match=r"fit\.ckpt.*other training data"):
        fit(other_X, n_components=4, max_iter=5, checkpoint_path=str(ckpt))


def test_resume_with_larger_max_iter_continues(tmp_path, small_X):
    ckpt = tmp_path / "fit.ckpt"
    kw = dict(n_components=4, tol=0.0)
    fit(small_X, max_iter=8, checkpoint_path=str(ckpt), **kw)
    longer = fit(small_X, max_iter=15, checkpoint_path=str(ckpt), **kw)
    reference = fit(small_X, max_iter=15, **kw)
    assert longer.n_iter_ == 15
    assert np.array_equal(longer.components_, reference.components_)
    assert longer.history_ == reference.history_


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all" * 10,
                                     b"\xff" * 8 + b"{}"])
def test_corrupt_checkpoint_raises_file_format_error(tmp_path, small_X, content):
    ckpt = tmp_path / "fit.ckpt"
    ckpt.write_bytes(content)
    with pytest.raises(FileFormatError, match=r"fit\.ckpt") as info:
        fit(small_X, n_components=4, max_iter=5, checkpoint_path=str(ckpt))
    assert isinstance(info.value, ValueError)
    assert ckpt.read_bytes() == content  # left as it was


def test_checkpoint_callback_rejects_bad_every(tmp_path):
    with pytest.raises(ValueError, match="every"):
        CheckpointCallback(tmp_path / "x", every=0)


def test_checkpoint_written_every_n_iterations(tmp_path, small_X):
    from sae_core.io import load_tensors

    ckpt = tmp_path / "fit.ckpt"
    seen = {}

    class Watch(Callback):
        def on_iteration_end(self, trainer):
            seen[trainer.iteration] = (
                load_tensors(ckpt)[1]["iteration"] if ckpt.exists() else None
            )

    fit(small_X, n_components=4, max_iter=7, tol=0.0, checkpoint_path=str(ckpt),
        checkpoint_every=3, callbacks=[Watch()])
    assert seen[1] is None and seen[2] is None
    assert seen[4] == seen[5] == 3
    assert seen[7] == 6
    assert load_tensors(ckpt)[1]["iteration"] == 7  # written again at the end


# ----------------------------------------------------------------- divergence
def test_adam_absurd_learning_rate_diverges_with_clear_error(small_X):
    """One clean error, and no numpy RuntimeWarning printed before it (an error here)."""
    import warnings

    with pytest.raises(TrainingDivergedError, match="loss became") as info, \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(small_X, n_components=8, solver="adam", learning_rate=1e6, max_iter=20)
    assert isinstance(info.value, FloatingPointError)
    assert "learning_rate" in str(info.value)


class _Poisoned:
    """Wraps a real objective; from call ``bad_call`` on, its loss and terms are ``value``."""

    def __init__(self, inner, bad_call, value):
        self.inner, self.bad_call, self.value, self.calls = inner, bad_call, value, 0

    def __call__(self, theta, X, dead=None):
        self.calls += 1
        ev = self.inner(theta, X, dead)
        if self.calls >= self.bad_call:
            loss = torch.full_like(ev.loss, self.value)
            return Evaluation(loss, ev.grad, ev.terms * self.value, ev.fired)
        return ev

    def __getattr__(self, name):  # anything else the trainer asks of an objective
        return getattr(self.inner, name)


def _poisoned_make_objective(real_make_objective, bad_call, value):
    def make(config, *args, **kwargs):
        return _Poisoned(real_make_objective(config, *args, **kwargs), bad_call, value)

    return make


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_adam_non_finite_loss_on_third_batch_stops(monkeypatch, small_X, value):
    monkeypatch.setattr(T, "make_objective",
                        _poisoned_make_objective(T.make_objective, 3, value))
    rec = Recorder()
    cfg = SAEConfig(n_components=4, penalty="l1", solver="adam", batch_size=50, max_iter=5,
                    device="cpu")
    trainer = Trainer(cfg, small_X.shape[1], [rec])
    # reported at the end of the epoch (the loop never waits for the device), naming
    # the first bad batch: the third, examples 100-149
    with pytest.raises(TrainingDivergedError,
                       match=f"loss became {value} in epoch 1 at example 100;"):
        trainer.fit(small_X)
    assert rec.iterations == []  # it stopped in the first epoch
    assert trainer.history == []


def test_lbfgs_non_finite_initial_loss_stops(monkeypatch, small_X):
    monkeypatch.setattr(T, "make_objective",
                        _poisoned_make_objective(T.make_objective, 1, math.nan))
    cfg = SAEConfig(n_components=4, penalty="l1", max_iter=5, device="cpu")
    with pytest.raises(TrainingDivergedError, match="initial point"):
        Trainer(cfg, small_X.shape[1]).fit(small_X)


# ----------------------------------------------------------------- callbacks & history
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_callbacks_called_right_number_of_times(small_X, solver):
    rec = Recorder()
    sae = fit(small_X, n_components=4, solver=solver, max_iter=9, tol=0.0, batch_size=50,
              callbacks=[rec])
    assert sae.n_iter_ == 9
    assert rec.starts == 1
    assert rec.ends == 1
    assert rec.iterations == list(range(1, 10))


def test_lbfgs_history_starts_at_initial_point(small_X):
    cfg = SAEConfig(n_components=4, max_iter=6, tol=0.0, device="cpu", dtype="float64")
    trainer = Trainer(cfg, small_X.shape[1])
    theta0 = trainer.theta.clone()
    trainer.fit(small_X)
    h = trainer.history
    assert [r["iteration"] for r in h] == list(range(7))
    ev = T.make_objective(cfg)(theta0, trainer.as_data(small_X))
    assert h[0]["loss"] == pytest.approx(float(ev.loss), rel=1e-12)
    for r in h:
        assert set(r) == {"iteration", "loss", *TERM_NAMES}
        assert math.isclose(r["loss"], math.fsum(r[k] for k in TERM_NAMES), rel_tol=1e-12)


def test_adam_history_is_epoch_mean_of_batches(small_X):
    sae = fit(small_X, n_components=4, solver="adam", max_iter=3, batch_size=64)
    for i, r in enumerate(sae.history_):
        assert r["iteration"] == i + 1
        assert math.isclose(r["loss"], math.fsum(r[k] for k in TERM_NAMES), rel_tol=1e-12)


def test_history_final_reconstruction_matches_model(small_X):
    """The last L-BFGS record is the loss of the published parameters."""
    for penalty in ("kl", "l1"):
        sae = fit(small_X, n_components=5, max_iter=20, dtype="float64", **PENALTY_KW[penalty])
        X_hat = sae.reconstruct(small_X)
        recon = 0.5 * np.sum((X_hat - small_X) ** 2) / small_X.shape[0]
        assert sae.history_[-1]["reconstruction"] == pytest.approx(recon, rel=1e-10)


def test_trainer_pickle_holds_no_training_data(small_X):
    X = np.random.default_rng(5).uniform(0.1, 0.9, size=(20_000, 16))
    trainer = Trainer(SAEConfig(n_components=3, max_iter=2, lbfgs_history=2, device="cpu"), 16)
    trainer.fit(X)
    blob = pickle.dumps(trainer)
    assert len(blob) < X.nbytes / 20
    clone = pickle.loads(blob)
    assert torch.equal(clone.theta, trainer.theta)


# ----------------------------------------------------------------- TopK / L1 / AuxK
def test_topk_transform_at_most_k_active(small_X):
    for k in (1, 3):
        sae = fit(small_X, n_components=8, penalty="topk", k=k, max_iter=15)
        A = sae.transform(small_X)
        assert A.shape == (200, 8)
        assert int((A != 0).sum(axis=1).max()) <= k
        assert (A >= 0).all()
        assert (A != 0).sum() > 0


@pytest.mark.parametrize("penalty", ["l1", "topk"])
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_decoder_columns_unit_norm(small_X, penalty, solver):
    sae = fit(small_X, n_components=6, solver=solver, max_iter=10, batch_size=50,
              **PENALTY_KW[penalty])
    np.testing.assert_allclose(np.linalg.norm(sae.decoder_, axis=0), 1.0, rtol=1e-5)


def test_l1_relu_codes(small_X):
    sae = fit(small_X, n_components=6, penalty="l1", max_iter=10)
    A = sae.transform(small_X)
    assert (A >= 0).all()


def test_auxk_runs_and_auxiliary_term_is_finite_non_negative():
    # 20 examples, 32 latents, k = 1: most latents never fire, so AuxK is active
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(20, 16))
    sae = fit(X, n_components=32, penalty="topk", k=1, aux_k=4, solver="adam", max_iter=10,
              batch_size=8, dead_window=16)
    aux = [r["auxiliary"] for r in sae.history_]
    assert all(math.isfinite(v) and v >= 0 for v in aux)
    assert max(aux) > 0  # the AuxK term actually contributed
    assert sae.n_iter_ >= 1


def test_auxk_with_lbfgs_is_refused_at_fit(small_X):
    sae = SparseAutoencoder(8, penalty="topk", k=1, aux_k=2, solver="lbfgs")
    with pytest.raises(ValueError, match="aux_k must be None unless solver='adam'"):
        sae.fit(small_X)


def test_auxk_off_gives_zero_auxiliary(small_X):
    sae = fit(small_X, n_components=8, penalty="topk", k=1, max_iter=5)
    assert all(r["auxiliary"] == 0.0 for r in sae.history_)


def test_lbfgs_fit_bytes_do_not_depend_on_torch_thread_count():
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(10_000, 16))
    before = torch.get_num_threads()
    try:
        fits = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fits.append(SparseAutoencoder(6, max_iter=15, device="cpu").fit(X))
            assert torch.get_num_threads() == threads  # the fit restores the setting
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(fits[0].components_, fits[1].components_)
    assert fits[0].history_ == fits[1].history_


# ----------------------------------------------------------------- L1/TopK start from data
class StartCapture(Callback):
    """theta as the first iteration will see it (on_fit_start comes after the data init)."""

    def __init__(self):
        self.thetas = []

    def on_fit_start(self, trainer):
        self.thetas.append(trainer.theta.detach().clone())


def start_params(trainer_or_capture, n, s):
    from sae_core import model as M

    return M.unpack(trainer_or_capture.thetas[0], n, s)


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_l1_topk_start_tied_with_b2_at_the_data_mean(small_X, penalty, solver):
    cap = StartCapture()
    cfg = SAEConfig(n_components=6, solver=solver, max_iter=1, batch_size=50, device="cpu",
                    dtype="float64", **PENALTY_KW[penalty])
    Trainer(cfg, 16, [cap]).fit(small_X)
    p = start_params(cap, 16, 6)
    np.testing.assert_allclose(p.b2.numpy(), small_X.mean(axis=0), rtol=0, atol=1e-15)
    assert torch.equal(p.W1, p.W2.t())
    np.testing.assert_allclose(p.W2.norm(dim=0).numpy(), 1.0, rtol=0, atol=1e-14)


def test_the_old_start_stays_selectable(small_X):
    cap = StartCapture()
    cfg = SAEConfig(n_components=6, penalty="topk", k=2, init="uniform", pre_bias="zero",
                    max_iter=1, device="cpu")
    Trainer(cfg, 16, [cap]).fit(small_X)
    from sae_core.model import init_theta

    assert torch.equal(cap.thetas[0], init_theta(16, 6, seed=0))


def test_kl_start_is_the_exercise_untouched_by_the_data(small_X):
    from sae_core.model import init_theta

    cap = StartCapture()
    for solver in ("lbfgs", "adam"):
        Trainer(SAEConfig(n_components=6, solver=solver, max_iter=1, device="cpu"), 16,
                [cap]).fit(small_X)
    for theta in cap.thetas:
        assert torch.equal(theta, init_theta(16, 6, seed=0))


def test_the_data_start_is_deterministic(small_X):
    fits = [fit(small_X, n_components=6, penalty="topk", k=2, solver="adam", max_iter=3,
                batch_size=32) for _ in range(2)]
    assert np.array_equal(fits[0].components_, fits[1].components_)
    assert np.array_equal(fits[0].intercept_visible_, fits[1].intercept_visible_)
    assert fits[0].history_ == fits[1].history_


def test_column_mean_is_the_same_bytes_streamed_or_in_memory():
    import warnings

    from sae_core.rows import RowSource

    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(1003, 7)).astype(np.float32)
    X.flags.writeable = False  # as a memory-mapped store: read without torch's warning
    dev = torch.device("cpu")
    for rows in (10, 64, 65_536):  # blocks that split X unevenly, and one block
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            streamed = T.column_mean(RowSource(X), dev, torch.float32, rows=rows)
        in_memory = T.column_mean(torch.from_numpy(X), dev, torch.float32, rows=rows)
        assert streamed.dtype == torch.float64
        assert torch.equal(streamed, in_memory)
        np.testing.assert_allclose(streamed.numpy(), X.astype(np.float64).mean(axis=0),
                                   rtol=1e-13)


def test_resume_keeps_its_own_b2_and_does_not_start_again(small_X, other_X):
    cfg = SAEConfig(n_components=6, penalty="topk", k=2, solver="adam", max_iter=4,
                    batch_size=50, device="cpu")
    first = Trainer(cfg, 16)
    first.fit_adam(first.as_data(small_X), epochs=2)
    arrays, meta = first.state_dict()

    cap = StartCapture()
    resumed = Trainer(cfg, 16, [cap])
    assert resumed.needs_data_init
    resumed.load_state_dict(arrays, meta)
    assert not resumed.needs_data_init
    # data with another mean: a fresh start would move b2 there; the resume must not
    resumed.fit_adam(resumed.as_data(other_X + 0.05), epochs=1)
    assert torch.equal(cap.thetas[0], first.theta)


def test_partial_fit_of_a_loaded_model_keeps_its_b2(tmp_path, small_X):
    sae = fit(small_X, n_components=6, penalty="topk", k=2, solver="adam", max_iter=2,
              batch_size=50)
    sae.save(tmp_path / "m")
    loaded = SparseAutoencoder.load(tmp_path / "m")
    cap = StartCapture()
    loaded.set_params(callbacks=[cap], device="cpu")
    loaded.partial_fit(small_X + 0.05)
    from sae_core import model as M

    assert np.array_equal(M.unpack(cap.thetas[0], 16, 6).b2.numpy(), sae.intercept_visible_)


@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_weight_decay_does_not_apply_to_l1_topk(small_X, penalty):
    # under Adam, a decayed encoder row of an unselected latent goes to 0 in full-size steps
    fits = [fit(small_X, n_components=6, solver="adam", max_iter=3, batch_size=32,
                weight_decay=wd, **PENALTY_KW[penalty]) for wd in (0.0, 0.5)]
    assert np.array_equal(fits[0].components_, fits[1].components_)
    assert all(r["weight_decay"] == 0.0 for r in fits[1].history_)


def test_topk_keeps_its_latents_where_the_old_start_kills_them():
    """Uncentred data (mean 0.5, as the exercise's patches): with b2 = 0 and an untied
    encoder the same units win every TopK selection; the tied start at the data mean
    keeps every latent alive."""
    from sae_core.patches import normalize_ufldl
    from sae_core.stats import sparsity_stats

    rng = np.random.default_rng(0)
    X = normalize_ufldl(rng.laplace(size=(2000, 16)) @ rng.normal(size=(16, 16)))
    kw = dict(n_components=32, penalty="topk", k=3, solver="adam", max_iter=10,
              batch_size=100)
    old = fit(X, init="uniform", pre_bias="zero", **kw)
    new = fit(X, **kw)
    old_stats, new_stats = sparsity_stats(old, X), sparsity_stats(new, X)
    assert old_stats.dead_units >= 8
    assert new_stats.dead_units == 0
    assert new_stats.fvu < 0.5 * old_stats.fvu

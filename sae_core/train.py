"""Training: full-batch L-BFGS and mini-batch Adam over one flat parameter vector.

The :class:`Trainer` owns the parameters, the solver state and the per-iteration
history; it knows nothing of tracking tools. Callbacks observe it after every
iteration (an L-BFGS iteration, or an Adam epoch) to log, plot or checkpoint, in the
manner of minGPT's trainer. :meth:`Trainer.state_dict` captures everything needed to
continue (parameters, optimiser state, iteration, RNG state, history), so a fit
resumed from a checkpoint ends with the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sae_core import io
from sae_core.batches import InMemoryBatches, StreamedBatches, epoch_order
from sae_core.config import SAEConfig
from sae_core.device import check_precision, matmul_precision, resolve_device, resolve_dtype
from sae_core.flat_adam import FlatAdam
from sae_core.lbfgs import LBFGS, LBFGSState
from sae_core.model import init_theta, set_pre_bias
from sae_core.objective import TERM_NAMES, Evaluation, make_objective
from sae_core.outputs import safetensors_with
from sae_core.rows import RowSource

CHECKPOINT = safetensors_with("a saeflow training checkpoint",
                              lambda meta: "fingerprint" in meta and "iteration" in meta)


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or Inf; the message says where."""


class Callback:
    """Hooks called by :class:`Trainer`; override what you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first iteration of a ``fit`` call (also on resume)."""

    def on_iteration_end(self, trainer: Trainer) -> None:
        """After each iteration; ``trainer.history[-1]`` is its record."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last iteration of a ``fit`` call."""


class CheckpointCallback(Callback):
    """Write ``trainer.state_dict()`` to ``path`` every ``every`` iterations and at the end."""

    def __init__(self, path: str | os.PathLike, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1; got {every}")
        self.path = path
        self.every = every

    def on_iteration_end(self, trainer: Trainer) -> None:
        if trainer.iteration % self.every == 0:
            trainer.save_checkpoint(self.path)

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path)


def data_fingerprint(X: torch.Tensor | RowSource, dtype: torch.dtype | None = None) -> str:
    """sha256 of the training data's shape, dtype and bytes (checks that a resume uses
    the data the checkpoint was written for). A RowSource is read block by block, as
    ``dtype``: the same data give the same fingerprint streamed or in memory."""
    if isinstance(X, RowSource):
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        h = hashlib.sha256(f"{X.shape}{np_dtype}".encode())
        for block in X.blocks():
            h.update(np.ascontiguousarray(block, dtype=np_dtype).tobytes())
        return h.hexdigest()
    arr = X.detach().cpu().contiguous().numpy()
    h = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def column_mean(X: torch.Tensor | RowSource, device: torch.device, dtype: torch.dtype,
                rows: int = 65_536) -> torch.Tensor:
    """Per-feature mean of X (m, n), float64 (n,) on ``device``: each block of ``rows``
    rows taken as ``dtype`` (the values training sees) and summed in float64 on the
    device, the block sums added in order. A RowSource is read block by block; the same
    data give the same bytes streamed or in memory."""
    if isinstance(X, RowSource):
        blocks = (torch.as_tensor(b).to(device=device, dtype=dtype) for b in X.blocks(rows))
    else:
        blocks = (X[a : a + rows] for a in range(0, X.shape[0], rows))
    total = torch.zeros(X.shape[1], dtype=torch.float64, device=device)
    with warnings.catch_warnings():  # a memory-mapped store is read-only; never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for block in blocks:
            total += block.sum(dim=0, dtype=torch.float64)
    return total / X.shape[0]


class Trainer:
    """Fit one sparse autoencoder.

    Parameters
    ----------
    config : SAEConfig
        Model and solver settings.
    n_features : int
        Input dimension n.
    callbacks : iterable of Callback
        Called in order after every iteration.
    fingerprint_data : bool
        Hash the training data, so that a checkpoint records which data it was
        written for (see :meth:`resume_from`).

    Attributes
    ----------
    theta : torch.Tensor, shape (2 s n + s + n,)
        Current parameters (layout in :mod:`sae_core.model`).
    history : list of dict
        One record per iteration: ``iteration``, ``loss``, ``reconstruction``,
        ``weight_decay``, ``sparsity``, ``auxiliary``. L-BFGS starts with iteration 0, the
        starting point; Adam records each epoch from 1 on, as the mean over its
        mini-batches (the loss a mini-batch method sees).
    iteration : int
        Completed iterations (L-BFGS) or epochs (Adam).
    stop_reason : str or None
        Why L-BFGS stopped before ``max_iter``, if it did.
    """

    def __init__(
        self,
        config: SAEConfig,
        n_features: int,
        callbacks: Iterable[Callback] = (),
        *,
        fingerprint_data: bool = False,
    ) -> None:
        self.config = config
        # hashing the data costs ~1 s per GB: only done when checkpoints need it
        self.fingerprint_data = fingerprint_data
        self.n_features = n_features
        self.callbacks = list(callbacks)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        check_precision(config.precision, self.device)
        seed = config.random_state
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.seed = seed
        self.theta = init_theta(
            n_features, config.n_components, seed=seed, dtype=self.dtype, device=self.device,
            init=config.effective_init,
        )
        # b2 = the data mean (pre_bias 'mean'), set by the first fit on data; False once
        # set, after a resume, or for weights given from outside (partial_fit on a model)
        self.needs_data_init = config.effective_pre_bias == "mean"
        self.history: list[dict[str, float]] = []
        self.iteration = 0
        self.stop_reason: str | None = None
        self.fingerprint: str | None = None
        self._fingerprint_memo: tuple[tuple[int, int], str] | None = None
        self._objective = self._adam_objective()
        self._lbfgs: LBFGSState | None = None
        self._adam: FlatAdam | None = None
        # batch-order RNG as a state tensor (a torch.Generator cannot be pickled)
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        # examples since each latent last fired (AuxK dead-latent bookkeeping)
        self._since_fired = torch.zeros(config.n_components, dtype=torch.int64)

    def __getstate__(self) -> dict:
        # the objective caches a copy of the training data; never pickle that
        state = self.__dict__.copy()
        state["_objective"] = self._adam_objective()
        state["_fingerprint_memo"] = None
        return state

    # ------------------------------------------------------------------ helpers
    def as_data(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        """X (m, n) as a contiguous tensor of the trainer's dtype on its device.

        A read-only array (a memory-mapped patch store) is used without a copy: training
        never writes into its data tensor, so torch's warning about that is silenced."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.as_tensor(X).to(device=self.device, dtype=self.dtype).contiguous()

    def _record(self, terms: torch.Tensor) -> None:
        values = [float(v) for v in terms.tolist()]
        loss = math.fsum(values)
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss} at iteration {self.iteration} ("
                + ", ".join(f"{k}={v:.6g}" for k, v in zip(TERM_NAMES, values, strict=True))
                + "); lower learning_rate, or check the input for extreme values"
            )
        record = {"iteration": self.iteration, "loss": loss}
        record.update(zip(TERM_NAMES, values, strict=True))
        self.history.append(record)

    def fingerprint_of(self, X: torch.Tensor) -> str:
        """:func:`data_fingerprint` of X, remembered for the last tensor seen, so a resume
        check and the fit that follows hash the data once."""
        key = (id(X), getattr(X, "_version", 0))
        if self._fingerprint_memo is None or self._fingerprint_memo[0] != key:
            self._fingerprint_memo = (key, data_fingerprint(X, self.dtype))
        return self._fingerprint_memo[1]

    def init_from_data(self, X: torch.Tensor | RowSource) -> None:
        """The data-dependent start, once: b2 = the mean of X (``config.pre_bias``)."""
        if self.needs_data_init:
            mean = column_mean(X, self.device, self.dtype)
            set_pre_bias(self.theta, self.n_features, self.config.n_components, mean)
            self.needs_data_init = False

    def _check_data(self, X: torch.Tensor) -> None:
        if not self.fingerprint_data:
            return
        fp = self.fingerprint_of(X)
        if self.fingerprint is not None and self.fingerprint != fp and self._lbfgs is not None:
            raise ValueError(
                "the data differ from the data this L-BFGS fit started on; full-batch "
                "training continues only on the same data (use solver='adam' for streams)"
            )
        self.fingerprint = fp

    # ------------------------------------------------------------------ L-BFGS
    def fit_lbfgs(self, X: torch.Tensor) -> None:
        """Full-batch L-BFGS on X (m, n) until ``config.max_iter`` iterations or convergence."""
        cfg = self.config
        self._check_data(X)
        self.init_from_data(X)
        threads = torch.get_num_threads()
        # On the CPU the fused KL objective spreads fixed column blocks over the threads,
        # each block with single-threaded BLAS: faster than one multi-threaded call on
        # these skinny products, and the same bytes whatever the thread count. The
        # thread setting is restored afterwards.
        blocked = self.device.type == "cpu" and cfg.penalty == "kl"
        objective = make_objective(cfg, workers=threads if blocked else 1)

        def evaluate(theta: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
            ev: Evaluation = objective(theta, X)
            return float(ev.loss), ev.grad, ev.terms

        if blocked:
            torch.set_num_threads(1)
        # The solver's k x k algebra and the objective's scalar terms run in numpy
        # without calling a multi-threaded BLAS routine (see sae_core.lbfgs), so
        # OpenBLAS's spinning workers never wake to fight torch's for the cores; no
        # threadpoolctl limit is needed, whose library scan costs 20-40 ms per fit.
        try:
            with matmul_precision(cfg.precision, self.device):
                self._run_lbfgs(evaluate)
        finally:
            if blocked:
                torch.set_num_threads(threads)
            objective.close()

    def _run_lbfgs(self, evaluate) -> None:
        cfg = self.config

        solver = LBFGS(evaluate, history=cfg.lbfgs_history, tol=cfg.tol)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self._lbfgs is None:
            try:
                self._lbfgs, terms = solver.start(self.theta)
            except FloatingPointError as exc:
                raise TrainingDivergedError(f"{exc}; check the input for extreme values") from None
            self._record(terms)
        state = self._lbfgs
        while self.iteration < cfg.max_iter and self.stop_reason is None:
            go_on, terms = solver.step(state)
            if terms is None:  # the line search found nothing lower: converged
                self.stop_reason = state.stop_reason
                break
            self.iteration += 1
            self.theta = state.x
            self._record(terms)
            if not go_on:
                self.stop_reason = state.stop_reason
            for cb in self.callbacks:
                cb.on_iteration_end(self)
        for cb in self.callbacks:
            cb.on_fit_end(self)

    # ------------------------------------------------------------------ Adam
    def _adam_objective(self):
        # each gradient is consumed by the step before the next call, and FlatAdam
        # adds the weight decay's lambda W itself
        return make_objective(self.config, reuse_grad=True, decay_in_optimizer=True)

    def _ensure_adam(self) -> FlatAdam:
        if self._adam is None:
            cfg = self.config
            self._adam = FlatAdam(self.theta, 2 * cfg.n_components * self.n_features,
                                  lr=cfg.learning_rate, weight_decay=cfg.effective_weight_decay)
        return self._adam

    def fit_adam(self, X: torch.Tensor | RowSource, epochs: int | None = None) -> None:
        """Mini-batch Adam on X (m, n): ``epochs`` more epochs, or up to ``config.max_iter``.

        X is a tensor on the device (:meth:`as_data`) or a :class:`RowSource` whose batches
        are streamed (:class:`sae_core.batches.StreamedBatches`); the same seed gives the
        same model from either. Each epoch visits the examples in a fresh seeded random
        order (:func:`sae_core.batches.epoch_order`: a uniform permutation up to 256 MB
        of data, a windowed one beyond). The KL term uses each mini-batch's own rho_hat.
        AuxK (TopK) counts a latent dead once it has not fired on ``config.dead_window``
        consecutive training examples.

        Nothing in the loop over batches waits for the device: the loss sums, the first
        non-finite batch and the AuxK firing counts stay on the device, and are read once
        per epoch (a divergence is reported at the end of the epoch it happened in).
        """
        cfg = self.config
        if isinstance(X, RowSource):
            batches = StreamedBatches(X, self.device, self.dtype)
        else:
            batches = InMemoryBatches(X)
        if self.fingerprint_data:
            self.fingerprint = self.fingerprint_of(X)
        self.init_from_data(X)
        adam = self._ensure_adam()
        param = adam.param
        m = batches.shape[0]
        target = self.iteration + epochs if epochs is not None else cfg.max_iter
        use_dead = cfg.penalty == "topk" and cfg.aux_k is not None
        since_fired = self._since_fired.to(self.device)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        with matmul_precision(cfg.precision, self.device):
            while self.iteration < target:
                order, self._rng_state = epoch_order(self._rng_state, m, batches.shape[1])
                sums = torch.zeros(len(TERM_NAMES), dtype=torch.float64, device=self.device)
                first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
                bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                start = 0
                for batch in batches.epoch(order, cfg.batch_size):
                    dead = (since_fired >= cfg.dead_window) if use_dead else None
                    ev = self._objective(param, batch, dead)
                    bad = ~torch.isfinite(ev.loss) & (first_bad < 0)
                    first_bad = torch.where(bad, start, first_bad)
                    bad_loss = torch.where(bad, ev.loss.double(), bad_loss)
                    adam.step(ev.grad)
                    sums += ev.terms.double() * batch.shape[0]
                    if use_dead and ev.fired is not None:
                        since_fired = torch.where(ev.fired, 0, since_fired + batch.shape[0])
                    start += batch.shape[0]
                bad_at = int(first_bad)
                if bad_at >= 0:
                    raise TrainingDivergedError(
                        f"loss became {float(bad_loss)} in epoch {self.iteration + 1} at "
                        f"example {bad_at}; lower learning_rate (now {cfg.learning_rate:g})"
                    )
                self.iteration += 1
                self.theta = param.clone()
                self._since_fired = since_fired.cpu()
                self._record(sums / m)
                for cb in self.callbacks:
                    cb.on_iteration_end(self)
        for cb in self.callbacks:
            cb.on_fit_end(self)

    def data_for(self, X: np.ndarray | torch.Tensor | RowSource) -> torch.Tensor | RowSource:
        """X as the fit takes it: a RowSource to stream from, or a tensor on the device.

        ``config.loader`` 'stream' streams, 'memory' loads; 'auto' streams (Adam only) when
        X at the training dtype would exceed ``config.memory_budget``."""
        cfg = self.config
        rows = X if isinstance(X, RowSource) else None
        if rows is None and isinstance(X, np.ndarray) and cfg.loader == "stream":
            rows = RowSource(X)
        if rows is None:
            return self.as_data(X)
        m, n = rows.shape
        size = m * n * self.dtype.itemsize
        over = cfg.loader == "auto" and size > cfg.memory_budget_bytes
        if cfg.loader == "stream" or (over and cfg.solver == "adam"):
            return rows
        if over:  # L-BFGS
            warnings.warn(f"{rows.name}: {size / 2**30:.2f} GiB exceed memory_budget "
                          f"{cfg.memory_budget}, but L-BFGS needs every example in memory "
                          "(solver='adam' can stream)", stacklevel=2)
        return self.as_data(rows.array)

    def fit(self, X: np.ndarray | torch.Tensor | RowSource) -> Trainer:
        """Train with the configured solver; returns self."""
        data = self.data_for(X)
        if self.config.solver == "lbfgs":
            self.fit_lbfgs(data)
        else:
            self.fit_adam(data)
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta): everything needed to continue this fit, as numpy + JSON."""
        arrays: dict[str, np.ndarray] = {
            "theta": self.theta.detach().cpu().numpy(),
            "rng_state": self._rng_state.numpy(),
            "since_fired": self._since_fired.numpy(),
        }
        meta: dict[str, Any] = {
            "config": self.config.to_dict(),
            "n_features": self.n_features,
            "seed": self.seed,
            "iteration": self.iteration,
            "stop_reason": self.stop_reason,
            "fingerprint": self.fingerprint,
            "history": self.history,
            "solver_state": None,
        }
        if self._lbfgs is not None:
            for k, v in self._lbfgs.tensors().items():
                arrays[f"lbfgs.{k}"] = v.detach().cpu().numpy()
            meta["solver_state"] = {"lbfgs": self._lbfgs.scalars()}
        if self._adam is not None:
            moments, step = self._adam.state()
            if step is not None:
                for key, value in moments.items():
                    arrays[f"adam.{key}"] = value.cpu().numpy()
                meta["solver_state"] = {"adam": {"step": step}}
            arrays["adam.param"] = self._adam.param.cpu().numpy()
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output of a trainer with the same settings."""
        dev = self.device

        def tensor(name: str) -> torch.Tensor:
            t = torch.from_numpy(np.array(arrays[name]))
            return t.to(dev) if t.is_floating_point() else t

        self.theta = tensor("theta").to(self.dtype)
        self.needs_data_init = False  # the checkpoint's b2 is its own start, kept
        self._rng_state = torch.from_numpy(np.array(arrays["rng_state"]))
        self._since_fired = torch.from_numpy(np.array(arrays["since_fired"]))
        self.iteration = int(meta["iteration"])
        self.stop_reason = meta["stop_reason"]
        self.fingerprint = meta["fingerprint"]
        self.history = [dict(r) for r in meta["history"]]
        self.seed = int(meta["seed"])
        solver_state = meta.get("solver_state") or {}
        if "lbfgs" in solver_state:
            tensors = {
                k.split(".", 1)[1]: tensor(k) for k in arrays if k.startswith("lbfgs.")
            }
            self._lbfgs = LBFGSState.restore(tensors, solver_state["lbfgs"])
        if "adam.param" in arrays:
            adam = self._ensure_adam()
            adam.param.copy_(tensor("adam.param"))
            if "adam" in solver_state:
                adam.load_state({key: tensor(f"adam.{key}") for key in ("exp_avg", "exp_avg_sq")},
                                solver_state["adam"]["step"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to one safetensors file, atomically."""
        arrays, meta = self.state_dict()
        io.save_tensors(path, arrays, meta, CHECKPOINT)

    def resume_from(self, path: str | os.PathLike, fingerprint: str | None = None) -> None:
        """Load a checkpoint written for the same settings (``max_iter`` may differ) and,
        when ``fingerprint`` is given, the same data; anything else is a ValueError."""
        arrays, meta = io.load_tensors(path)
        theirs = dict(meta.get("config", {}))
        ours = self.config.to_dict()
        for d in (theirs, ours):
            for key in ("max_iter", "loader", "memory_budget"):  # not the result
                d.pop(key, None)
        if theirs != ours or meta.get("n_features") != self.n_features:
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            what = ", ".join(diff) or "n_features"
            raise ValueError(
                f"checkpoint {path} was written for other settings ({what}); "
                "delete it or choose another checkpoint_path"
            )
        if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise ValueError(
                f"checkpoint {path} was written for other training data; delete it or choose "
                "another checkpoint_path"
            )
        self.load_state_dict(arrays, meta)

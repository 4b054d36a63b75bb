"""scikit-learn estimator wrapping :class:`sae_core.train.Trainer`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from sae_core import io
from sae_core import model as M
from sae_core.config import SAEConfig
from sae_core.device import resolve_device, resolve_dtype, to_tensor
from sae_core.rows import RowSource
from sae_core.train import CheckpointCallback, Trainer

_TRANSFORM_BATCH = 65_536


class SparseAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse autoencoder (Ng, CS294A) with KL, L1 or TopK sparsity, as a transformer.

    For ``penalty="kl"`` it minimises, over X (m, n) with values in [0, 1]::

        J = (1/m) sum_i 0.5 ||x_hat_i - x_i||^2 + (weight_decay/2)(||W1||^2 + ||W2||^2)
            + beta sum_j KL(rho || rho_hat_j),
        a = sigmoid(W1 x + b1),  x_hat = sigmoid(W2 a + b2),  rho_hat_j = mean_i a_j(x_i)

    ``penalty="l1"``: ReLU code, linear unit-norm decoder, ``l1_coefficient * mean ||a||_1``.
    ``penalty="topk"``: ReLU on the ``k`` largest pre-activations, optional AuxK.

    Parameters
    ----------
    n_components : int, default=25
        Hidden units s.
    penalty : {"kl", "l1", "topk"}, default="kl"
    rho : float in (0, 1), default=0.01
        Target mean activation (KL).
    beta : float >= 0, default=3.0
        Weight of the KL term.
    weight_decay : float >= 0, default=1e-4
        lambda of (lambda/2)(||W1||^2 + ||W2||^2), KL only (L1/TopK carry no weight decay:
        their decoder is unit-norm, and under Adam a decayed encoder kills latents).
    l1_coefficient : float >= 0, default=1e-3
    k : int or None, default=None
        Active units per example for TopK (None: n_components // 5).
    aux_k : int or None, default=None
        Dead latents used by the AuxK loss (TopK); None disables it.
    aux_coefficient : float, default=1/32
    dead_window : int, default=100_000
        Examples without firing after which a latent counts as dead (AuxK, Adam).
    init : {"auto", "uniform", "tied"}, default="auto"
        Starting weights: the exercise's uniform draw (KL's default) or Gao et al.'s
        encoder = decoder transpose with unit-norm columns (L1/TopK's default).
    pre_bias : {"auto", "zero", "mean"}, default="auto"
        Starting decoder bias b2, subtracted before encoding by L1/TopK: the training
        data's mean (L1/TopK's default) or 0 (KL's, whose b2 is the output bias).
    solver : {"lbfgs", "adam"}, default="lbfgs"
        Full-batch L-BFGS as in the exercise, or mini-batch Adam.
    max_iter : int, default=400
        L-BFGS iterations, or Adam epochs.
    tol : float, default=1e-9
        L-BFGS stops when the loss changes by less than tol * max(|loss|, 1).
    lbfgs_history : int, default=100
        Correction pairs kept by L-BFGS (minFunc's default, as in the exercise); memory
        2 * lbfgs_history * n_parameters numbers.
    batch_size : int, default=256
    learning_rate : float, default=1e-3
        Adam step size.
    dtype : {"float32", "float64"}, default="float32"
    device : str, default="auto"
        "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N".
    random_state : int or None, default=0
    precision : {"full", "tf32", "bf16"}, default="full"
        Matrix-product precision (TF32 and bf16: GPU; bf16 with Adam only).
    loader : {"auto", "memory", "stream"}, default="auto"
        Adam's data path: X on the device, or batches streamed from where X lies (a
        memory-mapped patch store, :meth:`sae_core.patch_store.PatchStore.rows`);
        "auto" streams when X exceeds ``memory_budget``. Same model either way.
    memory_budget : int or str, default="4GiB"
    checkpoint_path : str or None, default=None
        If set, the fit state is written there every ``checkpoint_every`` iterations, and
        a later ``fit`` with the same settings and data resumes from it.
    checkpoint_every : int, default=50
    callbacks : list of sae_core.train.Callback or None, default=None
        Observers of each iteration (logging, plotting, early stopping by raising).

    Attributes
    ----------
    components_ : ndarray (n_components, n_features)
        Encoder weights W1 (the learned filters).
    intercept_hidden_ : ndarray (n_components,)
        b1.
    decoder_ : ndarray (n_features, n_components)
        Effective decoder (W2; unit-norm columns for L1/TopK).
    intercept_visible_ : ndarray (n_features,)
        b2.
    history_ : list of dict
        Per iteration: loss, reconstruction, weight_decay, sparsity, auxiliary.
    n_iter_ : int
    stop_reason_ : str or None
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from sae_core import SparseAutoencoder
    >>> X = np.random.default_rng(0).uniform(0.1, 0.9, size=(200, 16))
    >>> sae = SparseAutoencoder(n_components=4, max_iter=20).fit(X)
    >>> sae.transform(X).shape
    (200, 4)
    """

    def __init__(
        self,
        n_components: int = 25,
        *,
        penalty: str = "kl",
        rho: float = 0.01,
        beta: float = 3.0,
        weight_decay: float = 1e-4,
        l1_coefficient: float = 1e-3,
        k: int | None = None,
        aux_k: int | None = None,
        aux_coefficient: float = 1.0 / 32.0,
        dead_window: int = 100_000,
        init: str = "auto",
        pre_bias: str = "auto",
        solver: str = "lbfgs",
        max_iter: int = 400,
        tol: float = 1e-9,
        lbfgs_history: int = 100,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        dtype: str = "float32",
        device: str = "auto",
        random_state: int | None = 0,
        precision: str = "full",
        loader: str = "auto",
        memory_budget: int | str = "4GiB",
        checkpoint_path: str | None = None,
        checkpoint_every: int = 50,
        callbacks: list | None = None,
    ) -> None:
        self.n_components = n_components
        self.penalty = penalty
        self.rho = rho
        self.beta = beta
        self.weight_decay = weight_decay
        self.l1_coefficient = l1_coefficient
        self.k = k
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient
        self.dead_window = dead_window
        self.init = init
        self.pre_bias = pre_bias
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.lbfgs_history = lbfgs_history
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.precision = precision
        self.loader = loader
        self.memory_budget = memory_budget
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.callbacks = callbacks

    # ------------------------------------------------------------------ helpers
    def _config(self) -> SAEConfig:
        names = SAEConfig.__dataclass_fields__.keys()
        return SAEConfig(**{name: getattr(self, name) for name in names})

    def _validated(self, X, *, reset: bool, config: SAEConfig) -> np.ndarray:
        X = validate_data(
            self, X, reset=reset, dtype=[np.float64, np.float32], ensure_min_samples=1
        )
        if config.sigmoid_output:
            lo, hi = float(X.min()), float(X.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"X must lie in [0, 1] for penalty='kl' (sigmoid output units); "
                    f"got values in [{lo:.6g}, {hi:.6g}]: rescale it first"
                )
        return X

    def _make_trainer(self, config: SAEConfig, n_features: int) -> Trainer:
        callbacks = list(self.callbacks or [])
        if self.checkpoint_path is not None:
            callbacks.append(CheckpointCallback(self.checkpoint_path, self.checkpoint_every))
        return Trainer(
            config, n_features, callbacks, fingerprint_data=self.checkpoint_path is not None
        )

    def _publish(self, trainer: Trainer) -> None:
        theta = trainer.theta.detach()
        p = M.unpack(theta, trainer.n_features, trainer.config.n_components)
        self.components_ = p.W1.cpu().numpy().copy()
        self.intercept_hidden_ = p.b1.cpu().numpy().copy()
        self.decoder_ = M.decoder_matrix(p, trainer.config.penalty).cpu().numpy().copy()
        self.intercept_visible_ = p.b2.cpu().numpy().copy()
        self.history_ = [dict(r) for r in trainer.history]
        self.n_iter_ = trainer.iteration
        self.stop_reason_ = trainer.stop_reason
        self._trainer = trainer

    # ------------------------------------------------------------------ fitting
    def _validated_rows(self, rows: RowSource, config: SAEConfig) -> RowSource:
        """The checks of :meth:`_validated` on a RowSource, block by block (its pages
        released as it goes), so that data larger than memory is checked too."""
        if rows.array.dtype not in (np.float32, np.float64):
            raise ValueError(f"{rows.name} must be float32 or float64; got {rows.array.dtype}")
        if rows.shape[0] < 1:
            raise ValueError(f"{rows.name} has no rows")
        lo, hi = np.inf, -np.inf
        for block in rows.blocks():
            if not np.isfinite(block).all():
                raise ValueError(f"{rows.name} contains NaN or Inf")
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        if config.sigmoid_output and (lo < 0.0 or hi > 1.0):
            raise ValueError(f"{rows.name} must lie in [0, 1] for penalty='kl' (sigmoid output "
                             f"units); got values in [{lo:.6g}, {hi:.6g}]: rescale it first")
        self.n_features_in_ = rows.shape[1]
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        return rows

    def fit(self, X, y=None) -> SparseAutoencoder:
        """Fit on X (n_samples, n_features); ``y`` is ignored. Returns self.

        X may be a :class:`~sae_core.rows.RowSource` (a memory-mapped patch store's
        ``rows()``): Adam then streams it when ``loader`` says so."""
        config = self._config()
        if isinstance(X, RowSource):
            X = self._validated_rows(X, config)
        else:
            X = self._validated(X, reset=True, config=config)
        trainer = self._make_trainer(config, X.shape[1])
        data = trainer.data_for(X)
        if self.checkpoint_path is not None and Path(self.checkpoint_path).exists():
            trainer.resume_from(self.checkpoint_path, fingerprint=trainer.fingerprint_of(data))
        if config.solver == "lbfgs":
            trainer.fit_lbfgs(data)
        else:
            trainer.fit_adam(data)
        self._publish(trainer)
        return self

    def partial_fit(self, X, y=None) -> SparseAutoencoder:
        """One Adam epoch over X, continuing the optimiser state of earlier calls."""
        config = self._config()
        if config.solver != "adam":
            raise ValueError(f"partial_fit needs solver='adam'; got solver={config.solver!r}")
        fitted = hasattr(self, "components_")
        X = self._validated(X, reset=not fitted, config=config)
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            trainer = self._make_trainer(config, X.shape[1])
            if fitted:  # e.g. a model read with load(): continue from its weights
                trainer.theta = self._theta_on(trainer.device, trainer.dtype)
                trainer.needs_data_init = False
        trainer.fit_adam(trainer.as_data(X), epochs=1)
        self._publish(trainer)
        return self

    # ------------------------------------------------------------------ inference
    def _theta_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fitted parameters as a flat theta (layout of sae_core.model); W2 is the
        effective decoder, its normalisation already applied."""
        theta = np.concatenate([
            self.components_.ravel(), self.decoder_.ravel(),
            self.intercept_hidden_, self.intercept_visible_,
        ])
        return torch.from_numpy(theta).to(device=device, dtype=dtype)

    def _params_on(self, device: torch.device, dtype: torch.dtype) -> M.Params:
        return M.unpack(self._theta_on(device, dtype), self.n_features_in_, self.n_components)

    def _apply(self, X, fn) -> np.ndarray:
        check_is_fitted(self)
        config = self._config()
        X = self._validated(X, reset=False, config=config)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        p = self._params_on(device, dtype)
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], _TRANSFORM_BATCH):
                batch = to_tensor(X[start : start + _TRANSFORM_BATCH], device, dtype)
                out.append(fn(p, batch, config).cpu().numpy())
        return np.concatenate(out).astype(X.dtype, copy=False)

    def transform(self, X) -> np.ndarray:
        """Hidden activations a(X), shape (n_samples, n_components)."""
        return self._apply(
            X, lambda p, b, c: M.encode(p, b, c.penalty, c.effective_k)
        )

    def reconstruct(self, X) -> np.ndarray:
        """x_hat = decode(encode(X)), shape (n_samples, n_features)."""

        def run(p, b, c):
            # p.W2 is decoder_, already normalised: apply it as is
            a = M.encode(p, b, c.penalty, c.effective_k)
            out = torch.addmm(p.b2, a, p.W2.t())
            return torch.sigmoid(out) if c.penalty == "kl" else out

        return self._apply(X, run)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> None:
        """Write the fitted model: ``model.safetensors`` and ``config.json``."""
        check_is_fitted(self)
        arrays = {
            "W1": self.components_,
            "b1": self.intercept_hidden_,
            "W2": self.decoder_,
            "b2": self.intercept_visible_,
        }
        params = {
            k: (v.item() if isinstance(v, np.generic) else v)
            for k, v in self.get_params().items()
            if k != "callbacks"
        }
        io.save_model(
            directory,
            arrays,
            {
                "params": params,
                "n_features_in": int(self.n_features_in_),
                "n_iter": int(self.n_iter_),
                "stop_reason": self.stop_reason_,
                "history": self.history_,
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SparseAutoencoder:
        """Read a model written by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        arrays, config = io.load_model(directory)
        try:
            est = cls(**config["params"])
            est._config()
        except (TypeError, ValueError, KeyError) as exc:
            raise io.FileFormatError(f"{directory}/config.json: invalid params ({exc})") from None
        est.components_ = arrays["W1"]
        est.intercept_hidden_ = arrays["b1"]
        est.decoder_ = arrays["W2"]
        est.intercept_visible_ = arrays["b2"]
        est.n_features_in_ = int(config["n_features_in"])
        est.n_iter_ = int(config["n_iter"])
        est.stop_reason_ = config.get("stop_reason")
        est.history_ = config.get("history", [])
        expected = (est.n_components, est.n_features_in_)
        if est.components_.shape != expected:
            raise io.FileFormatError(
                f"{directory}: W1 has shape {est.components_.shape}, config says {expected}"
            )
        return est

    @property
    def _n_features_out(self) -> int:
        """Number of output features (hidden units), for get_feature_names_out."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

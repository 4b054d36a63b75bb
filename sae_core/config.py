"""Validated settings of a sparse autoencoder and its training.

One dataclass, :class:`SAEConfig`, is the single place where hyper-parameters are
checked. The scikit-learn estimator builds one in ``fit`` (so ``__init__`` only stores
arguments, as scikit-learn requires) and the pipeline builds one from the ``train``
section of ``params.yaml``. Every check raises ``ValueError`` with a one-line message
that names the parameter, the allowed range and the value received.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, NoReturn

FIRE_THRESHOLD = 1e-3
"""An activation above this counts as the unit having fired (Gao et al. 2024)."""

PENALTIES = ("kl", "l1", "topk")
SOLVERS = ("lbfgs", "adam")
DTYPES = ("float32", "float64")
PRECISIONS = ("full", "tf32", "bf16")
LOADERS = ("auto", "memory", "stream")
INITS = ("auto", "uniform", "tied")
PRE_BIASES = ("auto", "zero", "mean")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any) -> int | None:
    """A size as bytes: an integer, or a string such as '4GiB', '512 MB', '2e9'; None if
    it is neither (the caller reports it)."""
    if is_int(value):
        return int(value) if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
    if m is None or m.group(2) not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def invalid_setting(name: str, allowed: str, value: Any, owner: str = "") -> NoReturn:
    """Raise the one-line error of a setting out of range: "[Owner.]name must be allowed;
    got value" (every config class of sae_core reports this way)."""
    prefix = f"{owner}." if owner else ""
    raise ValueError(f"{prefix}{name} must be {allowed}; got {value!r}")


def is_int(value: Any) -> bool:
    """An integer setting: Python or numpy integers (GridSearchCV grids), not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real setting, Python or numpy, not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class SAEConfig:
    """Hyper-parameters of one sparse-autoencoder fit.

    The objective (Ng, CS294A) for ``penalty="kl"``::

        J = (1/m) sum_i 0.5 ||x_hat_i - x_i||^2
          + (weight_decay/2) (||W1||_F^2 + ||W2||_F^2)
          + beta * sum_j KL(rho || rho_hat_j)

    ``penalty="l1"`` replaces the KL term by ``l1_coefficient * (1/m) sum_i ||a_i||_1`` on
    ReLU units with unit-norm decoder columns; ``penalty="topk"`` keeps the ``k`` largest
    pre-activations per example (Gao et al. 2024), optionally with the AuxK loss.

    L1 and TopK start by default as Gao et al. do (``init="tied"``, ``pre_bias="mean"``):
    the decoder bias b2, which is subtracted before the encoder, is the training data's
    mean, and the encoder is the decoder's transpose. Without that (the exercise's start,
    ``init="uniform"``, ``pre_bias="zero"``) on inputs that are not centred (the
    exercise's patches have mean 0.5) each unit's pre-activation is dominated by an
    offset 0.5 sum_i W1_ji that is the same for every example: the same few units win
    every TopK selection, and units with a negative offset never pass the ReLU. On the
    natural-image exercise only 18 of 25 units (97 of 256 at k=8) can ever be selected at
    initialisation. With that start and a decayed encoder (the code before, commit
    55424cc), TopK k=5 ended with 14 of 25 latents dead (L-BFGS) and 8 of 25 (Adam +
    AuxK), L1 at 0.15 with 16 of 25, and the 64-256, k=8 Adam setting with 206 of 256;
    with these defaults none is dead in any of them (``benchmarks/penalties.py``).
    """

    n_components: int = 25
    """Number of hidden units s (>= 1)."""
    penalty: str = "kl"
    """Sparsity penalty: 'kl' (sigmoid units), 'l1' (ReLU) or 'topk' (ReLU on the k largest)."""
    rho: float = 0.01
    """Target average activation of each hidden unit, in (0, 1) (KL only)."""
    beta: float = 3.0
    """Weight of the KL sparsity term, >= 0 (KL only)."""
    weight_decay: float = 1e-4
    """lambda: weight of (1/2)(||W1||^2 + ||W2||^2), >= 0 (KL only). Biases are not
    decayed. L1 and TopK carry no weight decay: their decoder columns are unit-norm by
    construction, and under Adam a decay of the encoder drives the rows of latents that
    are not selected to 0 (see :attr:`effective_weight_decay`)."""
    l1_coefficient: float = 1e-3
    """Weight of the L1 activation penalty, >= 0 (L1 only)."""
    k: int | None = None
    """Active units per example for TopK, 1 <= k <= n_components; None means n_components // 5."""
    aux_k: int | None = None
    """AuxK: how many dead latents reconstruct the residual (TopK only); None turns it off."""
    aux_coefficient: float = 1.0 / 32.0
    """Weight of the AuxK loss, >= 0 (Gao et al. use 1/32)."""
    dead_window: int = 100_000
    """A latent that has not fired (> 1e-3) on this many consecutive training examples is
    dead for AuxK (Adam); the full-batch L-BFGS solver uses the whole batch instead."""
    init: str = "auto"
    """Initial weights: 'uniform' (the exercise's: W1 and W2 independent, uniform in
    +/- sqrt(6 / (n + s + 1)), b1 = 0), 'tied' (decoder columns random unit-norm
    directions, encoder W1 = W2^T, b1 = 0: Gao et al. 2024; L1/TopK only) or 'auto'
    ('uniform' for KL, 'tied' for L1/TopK)."""
    pre_bias: str = "auto"
    """Start of the decoder bias b2, which L1/TopK subtract before encoding: 'zero', or
    'mean' (the training data's mean, computed in float64 at the start of a fit, block by
    block for a stream; a resumed fit keeps its own; L1/TopK only), or 'auto' ('zero' for
    KL, whose b2 is the sigmoid output's bias; 'mean' for L1/TopK)."""
    solver: str = "lbfgs"
    """'lbfgs' (full batch, as in the original exercise) or 'adam' (mini-batch)."""
    max_iter: int = 400
    """L-BFGS iterations, or Adam epochs (as scikit-learn's MLP counts them), >= 1."""
    tol: float = 1e-9
    """L-BFGS stops when the loss changes by less than tol * max(|loss|, 1), >= 0."""
    lbfgs_history: int = 100
    """Number of (s, y) correction pairs L-BFGS keeps, >= 1 (minFunc's default 100; the
    exercise's 400 iterations converge in about half the evaluations that 10 pairs need)."""
    batch_size: int = 256
    """Adam mini-batch size, >= 1."""
    learning_rate: float = 1e-3
    """Adam step size, > 0."""
    dtype: str = "float32"
    """'float32' (default, fast) or 'float64' (for gradient checks and reference runs)."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    random_state: int | None = 0
    """Seed of the initial weights and of the mini-batch order; None draws a fresh seed."""
    precision: str = "full"
    """Matrix products in the full precision of ``dtype`` ('full'), or, on a GPU, in TF32
    ('tf32': float32 storage, 10-bit mantissa products, compute capability >= 8.0), or
    under bfloat16 autocast ('bf16', Adam only: products and activations in bfloat16,
    parameters, Adam state and loss sums in float32). Both need dtype='float32'; see
    :mod:`sae_core.device` for the checks and the tolerances against 'full'."""
    loader: str = "auto"
    """Adam's data path: 'memory' (the whole X on the device, gathered per batch),
    'stream' (batches gathered from X where it lies, e.g. a memory-mapped patch store,
    by a reader thread, a window ahead) or 'auto' (stream when X at ``dtype`` exceeds
    ``memory_budget``). Both give the same model for the same seed."""
    memory_budget: int | str = "4GiB"
    """'auto' streams data larger than this: bytes, or a string such as '4GiB' or '500MB'."""

    def __post_init__(self) -> None:
        if not is_int(self.n_components) or self.n_components < 1:
            invalid_setting("n_components", "an integer >= 1", self.n_components)
        if self.penalty not in PENALTIES:
            invalid_setting("penalty", f"one of {', '.join(PENALTIES)}", self.penalty)
        if not is_real(self.rho) or not 0.0 < self.rho < 1.0:
            invalid_setting("rho", "a number in the open interval (0, 1)", self.rho)
        for name in ("beta", "weight_decay", "l1_coefficient", "aux_coefficient", "tol"):
            value = getattr(self, name)
            if not is_real(value) or value < 0:
                invalid_setting(name, "a finite number >= 0", value)
        if self.k is not None and (
            not is_int(self.k) or not 1 <= self.k <= self.n_components
        ):
            invalid_setting("k", f"an integer in [1, n_components={self.n_components}] or None",
                            self.k)
        if self.aux_k is not None and (
            not is_int(self.aux_k) or not 1 <= self.aux_k <= self.n_components
        ):
            invalid_setting("aux_k", f"an integer in [1, n_components={self.n_components}] or None",
                            self.aux_k)
        for name in ("dead_window", "max_iter", "lbfgs_history", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                invalid_setting(name, "an integer >= 1", value)
        if self.init not in INITS:
            invalid_setting("init", f"one of {', '.join(INITS)}", self.init)
        if self.pre_bias not in PRE_BIASES:
            invalid_setting("pre_bias", f"one of {', '.join(PRE_BIASES)}", self.pre_bias)
        if self.penalty == "kl" and self.init == "tied":
            invalid_setting("init", "'auto' or 'uniform' for penalty='kl' (the exercise's "
                            "initialisation)", self.init)
        if self.penalty == "kl" and self.pre_bias == "mean":
            invalid_setting("pre_bias", "'auto' or 'zero' for penalty='kl' (its b2 is the "
                            "sigmoid output's bias, not subtracted before encoding)",
                            self.pre_bias)
        if self.solver not in SOLVERS:
            invalid_setting("solver", f"one of {', '.join(SOLVERS)}", self.solver)
        if self.aux_k is not None and self.solver != "adam":
            # AuxK treats the main model's residual as a constant (a stop-gradient), so
            # its gradient is not the derivative of the loss a line search compares
            invalid_setting("aux_k", "None unless solver='adam' (AuxK's stop-gradient defeats the "
                            "L-BFGS line search)", self.aux_k)
        if not is_real(self.learning_rate) or self.learning_rate <= 0:
            invalid_setting("learning_rate", "a finite number > 0", self.learning_rate)
        if self.dtype not in DTYPES:
            invalid_setting("dtype", f"one of {', '.join(DTYPES)}", self.dtype)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            invalid_setting("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if self.precision not in PRECISIONS:
            invalid_setting("precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        if self.precision != "full" and self.dtype != "float32":
            invalid_setting("precision", "'full' unless dtype='float32'", self.precision)
        if self.precision == "bf16" and self.solver != "adam":
            # a line search compares losses that bfloat16 rounding makes noisy
            invalid_setting("precision", "'full' or 'tf32' unless solver='adam' (bfloat16 "
                            "losses are too noisy for the L-BFGS line search)", self.precision)
        if self.loader not in LOADERS:
            invalid_setting("loader", f"one of {', '.join(LOADERS)}", self.loader)
        if self.loader == "stream" and self.solver != "adam":
            invalid_setting("loader", "'auto' or 'memory' unless solver='adam' (L-BFGS "
                            "needs the whole batch at every step)", self.loader)
        if parse_bytes(self.memory_budget) is None:
            invalid_setting("memory_budget", "bytes >= 0, or a size such as '4GiB'",
                            self.memory_budget)
        if self.random_state is not None and (
            not is_int(self.random_state) or self.random_state < 0
        ):
            invalid_setting("random_state", "an integer >= 0 or None", self.random_state)

        # numpy scalars (from np.arange grids) pass the checks; store plain Python numbers
        # so the settings serialise to JSON (checkpoints, model files)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                plain = int(value) if isinstance(value, numbers.Integral) else float(value)
                object.__setattr__(self, f.name, plain)

    @property
    def effective_k(self) -> int:
        """k for TopK: the configured value, or n_components // 5 (at least 1)."""
        return self.k if self.k is not None else max(1, self.n_components // 5)

    @property
    def effective_init(self) -> str:
        """'uniform' or 'tied': the configured value, or the penalty's default for 'auto'."""
        if self.init != "auto":
            return self.init
        return "uniform" if self.penalty == "kl" else "tied"

    @property
    def effective_pre_bias(self) -> str:
        """'zero' or 'mean': the configured value, or the penalty's default for 'auto'."""
        if self.pre_bias != "auto":
            return self.pre_bias
        return "zero" if self.penalty == "kl" else "mean"

    @property
    def effective_weight_decay(self) -> float:
        """lambda of the objective: ``weight_decay`` for Ng's model (KL), 0 for L1/TopK.

        Weight decay is Ng's alone. L1/TopK: the loss does not depend on the norms of
        W2's columns (the decoder is W2 / ||W2||), and decaying the encoder kills latents
        under Adam: a latent the selection leaves out gets no gradient but lambda W1_j,
        which Adam scales to full-size steps towards 0, so it never wins again (51 of 256
        dead at 64-256, k=8, against none without; benchmarks/penalties.py)."""
        return self.weight_decay if self.penalty == "kl" else 0.0

    @property
    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)

    @property
    def sigmoid_output(self) -> bool:
        """Ng's model (KL) has sigmoid units and needs inputs in [0, 1]; L1/TopK are linear out."""
        return self.penalty == "kl"

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the settings."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SAEConfig:
        """Build from a dict (e.g. a params.yaml section); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

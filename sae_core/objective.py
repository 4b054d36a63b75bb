"""The training objective J(theta; X) and its gradient.

Two implementations with one interface, ``objective(theta, X) -> Evaluation``:

* :class:`AutogradObjective` builds J from the pure terms in :mod:`sae_core.penalties`
  and differentiates with autograd. It serves every penalty.
* :class:`FusedKLObjective` is the hand-derived gradient of Ng's sigmoid/KL model (the
  back-propagation of the CS294A notes) written as six matrix products and a few in-place
  elementwise passes into buffers allocated once. It is the fast path of the exercise
  and is tested against the autograd version and against central differences.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core import model as M
from sae_core import penalties as P
from sae_core.config import SAEConfig

FIRE_THRESHOLD = 1e-3
"""An activation above this counts as the unit having fired (Gao et al. 2024)."""


class Evaluation(NamedTuple):
    """J at theta: ``loss`` (0-d), ``grad`` (same shape as theta), ``terms`` (4,) holding
    reconstruction, weight_decay, sparsity, auxiliary, and ``fired`` (s,) bool: units
    that fired (> 1e-3) on at least one example of X, or None where nothing needs it
    (only the AuxK bookkeeping of TopK models does)."""

    loss: torch.Tensor
    grad: torch.Tensor
    terms: torch.Tensor
    fired: torch.Tensor | None


TERM_NAMES = ("reconstruction", "weight_decay", "sparsity", "auxiliary")


def _sigmoid_backward(grad: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = grad * y * (1 - y), y = sigmoid(z): autograd's own fused kernel, one pass."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, y, grad_input=out)


def loss_terms(
    theta: torch.Tensor,
    X: torch.Tensor,
    config: SAEConfig,
    dead: torch.Tensor | None = None,
) -> tuple[P.LossTerms, torch.Tensor]:
    """All loss terms of ``config``'s model at ``theta`` on X (m, n); differentiable.

    ``dead`` (s,) bool marks latents that feed the AuxK term (TopK with ``aux_k``).
    Returns the terms and the hidden activations A (m, s).
    """
    n = X.shape[1]
    p = M.unpack(theta, n, config.n_components)
    Z = M.pre_activation(p, X, config.penalty)
    A = M.activation(Z, config.penalty, config.effective_k)
    D = M.decoder_matrix(p, config.penalty)
    X_hat = torch.addmm(p.b2, A, D.t())
    if config.penalty == "kl":
        X_hat = torch.sigmoid(X_hat)
    zero = X.new_zeros((), dtype=torch.float64)
    recon = P.reconstruction_error(X_hat, X)
    decay = P.weight_decay_term(config.weight_decay, p.W1, p.W2)
    if config.penalty == "kl":
        sparsity = P.kl_sparsity(A, config.rho, config.beta)
    elif config.penalty == "l1":
        sparsity = P.l1_sparsity(A, config.l1_coefficient)
    else:
        sparsity = zero
    aux = zero
    if config.penalty == "topk" and config.aux_k is not None and dead is not None:
        aux = config.aux_coefficient * P.auxk_loss(X - X_hat, Z, D, dead, config.aux_k)
    total = recon + decay + sparsity + aux
    return P.LossTerms(total, recon, decay, sparsity, aux), A


class AutogradObjective:
    """J and dJ/dtheta for any penalty, by autograd over :func:`loss_terms`.

    For TopK with AuxK on a full batch, a unit is dead when it fired on no example of X
    in the previous evaluation; pass ``dead`` explicitly for mini-batch training.
    """

    def __init__(self, config: SAEConfig) -> None:
        self.config = config

    def __call__(
        self, theta: torch.Tensor, X: torch.Tensor, dead: torch.Tensor | None = None
    ) -> Evaluation:
        th = theta.detach().requires_grad_(True)
        if dead is None and self.config.penalty == "topk" and self.config.aux_k is not None:
            with torch.no_grad():
                p = M.unpack(th, X.shape[1], self.config.n_components)
                A0 = M.encode(p, X, "topk", self.config.effective_k)
                dead = ~(A0 > FIRE_THRESHOLD).any(dim=0)
        terms, A = loss_terms(th, X, self.config, dead)
        terms.total.backward()
        stacked = torch.stack(
            [terms.reconstruction, terms.weight_decay, terms.sparsity, terms.auxiliary]
        ).detach()
        fired = None
        if self.config.penalty == "topk" and self.config.aux_k is not None:
            fired = (A.detach() > FIRE_THRESHOLD).any(dim=0)
        return Evaluation(terms.total.detach(), th.grad, stacked, fired)


class FusedKLObjective:
    """Ng's sigmoid/KL objective with its hand-derived gradient, no autograd.

    With A = sigmoid(W1 X^T + b1) (s, m), H = sigmoid(W2 A + b2) (n, m) and
    rho_hat = mean over examples of A (s,)::

        delta3 = (H - X^T) * H * (1 - H)                                   (n, m)
        delta2 = (W2^T delta3 + beta (-rho/rho_hat + (1-rho)/(1-rho_hat))) * A * (1 - A)  (s, m)
        dW2 = delta3 A^T / m + lambda W2,   db2 = sum_i delta3_i / m
        dW1 = delta2 X / m + lambda W1,     db1 = sum_i delta2_i / m

    Speed (this is the inner loop of the exercise): examples are columns, as in the
    original MATLAB code, and every bias rides along as an extra column of its weight
    matrix against a row of ones appended to X, A and delta3. Each of the five products
    then is one GEMM with no bias broadcast, and the bias gradients come out of the
    weight-gradient GEMMs as their last column. The (m, *) buffers are allocated once per
    batch size; the transposed, augmented copy of X is made once per data tensor.
    """

    def __init__(self, config: SAEConfig) -> None:
        if config.penalty != "kl":
            raise ValueError(f"FusedKLObjective needs penalty='kl'; got {config.penalty!r}")
        self.config = config
        self._source: torch.Tensor | None = None
        self._source_version = -1
        self._Xa = self._A = self._H = self._D = self._E = None

    def _prepare(self, X: torch.Tensor) -> None:
        if X is self._source and X._version == self._source_version:
            return
        m, n = X.shape
        s = self.config.n_components
        Xa = X.new_empty(n + 1, m)  # [X^T; 1]
        Xa[:n] = X.t()
        Xa[n] = 1.0
        if self._A is None or self._A.shape[1] != m or self._A.dtype != X.dtype \
                or self._A.device != X.device:
            self._A = X.new_empty(s + 1, m)  # [A; 1]
            self._A[s] = 1.0
            self._D = X.new_empty(n + 1, m)  # [delta3; 1]
            self._D[n] = 1.0
            self._H = X.new_empty(n, m)
            self._E = X.new_empty(s, m)
        self._Xa, self._source, self._source_version = Xa, X, X._version

    def __call__(
        self, theta: torch.Tensor, X: torch.Tensor, dead: torch.Tensor | None = None
    ) -> Evaluation:
        cfg = self.config
        m, n = X.shape
        s = cfg.n_components
        rho, beta, lam = cfg.rho, cfg.beta, cfg.weight_decay
        self._prepare(X)
        Xa, A_aug, H, D_aug, E = self._Xa, self._A, self._H, self._D, self._E
        A, D, Xt = A_aug[:s], D_aug[:n], Xa[:n]
        p = M.unpack(theta, n, s)
        grad = torch.empty_like(theta)
        g = M.unpack(grad, n, s)

        torch.mm(torch.cat([p.W1, p.b1[:, None]], dim=1), Xa, out=A).sigmoid_()
        torch.mm(torch.cat([p.W2, p.b2[:, None]], dim=1), A_aug, out=H).sigmoid_()
        # Scalars are accumulated in float64 even when the matrices are float32: one
        # float32 dot over the m*n squared errors is off by ~2e-6 relative, more than the
        # loss decrease per L-BFGS step on the plateaus of this objective, and the line
        # search then stalls. Row-wise dots (pairwise-summed) then a float64 sum are as
        # fast as the single dot and good to ~1e-9.
        rho_hat = A.mean(dim=1, dtype=torch.float64)

        torch.sub(H, Xt, out=D)  # x_hat - x
        recon = 0.5 * torch.linalg.vecdot(D, D).sum(dtype=torch.float64) / m
        weights = theta[: 2 * s * n].double()  # W1 and W2 are adjacent in theta
        decay = 0.5 * lam * torch.dot(weights, weights)
        sparsity = beta * P.kl_divergence(rho, rho_hat).sum()

        _sigmoid_backward(D, H, out=D)  # D <- delta3 = D * H * (1 - H), one pass
        G2 = torch.mm(D, A_aug.t())  # (n, s+1): [sum_i delta3_i a_i^T | sum_i delta3_i]
        sparse_grad = (beta * (-rho / rho_hat + (1.0 - rho) / (1.0 - rho_hat))).to(X.dtype)
        torch.mm(torch.cat([p.W2.t(), sparse_grad[:, None]], dim=1), D_aug, out=E)
        _sigmoid_backward(E, A, out=E)  # E <- delta2 = E * A * (1 - A)
        G1 = torch.mm(E, Xa.t())  # (s, n+1): [sum_i delta2_i x_i^T | sum_i delta2_i]

        inv_m = 1.0 / m
        torch.add(G1[:, :n] * inv_m, p.W1, alpha=lam, out=g.W1)
        torch.add(G2[:, :s] * inv_m, p.W2, alpha=lam, out=g.W2)
        torch.mul(G1[:, n], inv_m, out=g.b1)
        torch.mul(G2[:, s], inv_m, out=g.b2)

        terms = torch.stack([recon, decay, sparsity, torch.zeros_like(recon)])
        return Evaluation(recon + decay + sparsity, grad, terms, None)


def make_objective(config: SAEConfig) -> AutogradObjective | FusedKLObjective:
    """The fastest exact objective for ``config``: fused for KL, autograd otherwise."""
    if config.penalty == "kl":
        return FusedKLObjective(config)
    return AutogradObjective(config)

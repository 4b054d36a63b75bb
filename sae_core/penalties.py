"""Loss terms as small pure functions of tensors (differentiable with autograd).

Notation: m examples, n inputs, s hidden units; X and X_hat are (m, n), A is (m, s).
Every term is a 0-d float64 tensor (sums are accumulated in float64 even for float32
inputs: the loss is compared across line-search steps at a precision float32 sums over
millions of values do not have); :class:`LossTerms` names them so that training history,
metrics and plots all speak of the same four numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossTerms(NamedTuple):
    """The decomposition of the objective: total = reconstruction + weight_decay + sparsity
    + auxiliary (the AuxK term of TopK models, 0 otherwise)."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    weight_decay: torch.Tensor
    sparsity: torch.Tensor
    auxiliary: torch.Tensor


def reconstruction_error(X_hat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(1/m) sum_i 0.5 ||x_hat_i - x_i||^2."""
    diff = X_hat - X
    return 0.5 * (diff * diff).sum(dtype=torch.float64) / X.shape[0]


def weight_decay_term(weight_decay: float, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """(lambda / 2) (||W1||_F^2 + ||W2||_F^2) of Ng's model; biases are not decayed (the
    L1/TopK models carry no weight decay: ``SAEConfig.effective_weight_decay``)."""
    f64 = torch.float64
    total = (W1 * W1).sum(dtype=f64) + (W2 * W2).sum(dtype=f64)
    return 0.5 * weight_decay * total


def kl_divergence(rho: float, rho_hat: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(rho || q) between Bernoulli(rho) and Bernoulli(q), q = rho_hat in (0, 1):

        KL(rho || q) = rho log(rho / q) + (1 - rho) log((1 - rho) / (1 - q))
    """
    return rho * torch.log(rho / rho_hat) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - rho_hat))


def kl_sparsity(A: torch.Tensor, rho: float, beta: float) -> torch.Tensor:
    """beta * sum_j KL(rho || rho_hat_j), rho_hat_j = (1/m) sum_i A_ij (sigmoid units)."""
    return beta * kl_divergence(rho, A.mean(dim=0, dtype=torch.float64)).sum()


def l1_sparsity(A: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient * (1/m) sum_i ||a_i||_1 (ReLU units, so |a| = a)."""
    return coefficient * A.abs().sum(dtype=torch.float64) / A.shape[0]


def auxk_loss(
    residual: torch.Tensor, Z: torch.Tensor, decoder: torch.Tensor, dead: torch.Tensor, aux_k: int
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the dead latents' aux_k largest pre-activations, ReLU'd,
    try to reconstruct the main model's residual e = x - x_hat (treated as a constant)::

        e_hat = D relu(topk_aux(z restricted to dead units)),   L = ||e - e_hat||^2 / ||e||^2

    residual (m, n), Z (m, s), decoder D (n, s), dead a bool mask (s,). 0 with no dead unit.

    Shapes never depend on how many latents are dead (the top min(aux_k, s) are taken;
    live latents, at -inf, come out as 0), so nothing here waits for the device.
    """
    masked = Z.masked_fill(~dead, float("-inf"))
    values, indices = torch.topk(masked, min(aux_k, Z.shape[1]), dim=1, sorted=False)
    codes = torch.zeros_like(Z).scatter_(1, indices, torch.relu(values))
    e = residual.detach()
    e_hat = codes @ decoder.t()
    f64 = torch.float64
    loss = ((e - e_hat) ** 2).sum(dtype=f64) / (e * e).sum(dtype=f64).clamp_min(1e-12)
    return loss * dead.any()  # 0 with no dead latent

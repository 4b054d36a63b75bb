"""Central-difference gradient checking (the UFLDL exercise's computeNumericalGradient)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sae_core.config import SAEConfig
from sae_core.device import resolve_device
from sae_core.model import init_theta
from sae_core.objective import AutogradObjective, FusedKLObjective


def numerical_gradient(
    fun: Callable[[torch.Tensor], float], theta: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """g_i = (J(theta + eps e_i) - J(theta - eps e_i)) / (2 eps), one coordinate at a time."""
    theta = theta.detach().clone()
    grad = torch.empty_like(theta)
    for i in range(theta.numel()):
        old = float(theta[i])
        theta[i] = old + eps
        plus = fun(theta)
        theta[i] = old - eps
        minus = fun(theta)
        theta[i] = old
        grad[i] = (plus - minus) / (2.0 * eps)
    return grad


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a + b||, the exercise's criterion (below 1e-9 in float64)."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(a + b))


def check_gradient(
    config: SAEConfig, X: np.ndarray, *, seed: int = 0, eps: float = 1e-4, fused: bool = False
) -> float:
    """Relative difference between the analytic gradient of ``config``'s objective on X
    (autograd, or the fused KL gradient with ``fused=True``) and central differences,
    in float64 at the exercise's initial point, on ``config.device``."""
    device = resolve_device(config.device)
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)
    theta = init_theta(
        Xt.shape[1], config.n_components, seed=seed, dtype=torch.float64, device=device
    )
    # a non-zero bias start, so bias gradients are checked away from the symmetric point
    gen = torch.Generator().manual_seed(seed + 1)
    n_weights = 2 * Xt.shape[1] * config.n_components
    bias = 0.1 * torch.randn(theta.numel() - n_weights, generator=gen, dtype=torch.float64)
    theta[n_weights:] = bias.to(device)
    objective = FusedKLObjective(config) if fused else AutogradObjective(config)
    analytic = objective(theta, Xt).grad
    numeric = numerical_gradient(lambda th: float(objective(th, Xt).loss), theta, eps)
    return relative_difference(numeric, analytic)

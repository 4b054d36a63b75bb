"""The sparse autoencoder: parameters, encoder and decoder.

All parameters live in one flat vector ``theta`` (the layout of the UFLDL exercise)::

    theta = [ W1 (s*n) | W2 (n*s) | b1 (s) | b2 (n) ]

and ``W1, W2, b1, b2`` are views into it, so a full-batch optimiser (L-BFGS) works on
``theta`` and its gradient directly, with no packing or unpacking per evaluation.

Two model families share these shapes (x in R^n, s hidden units):

``penalty="kl"`` (Ng's sparse autoencoder, sigmoid units, inputs in [0, 1])::

    a     = sigmoid(W1 x + b1)                       (s,)
    x_hat = sigmoid(W2 a + b2)                       (n,)

``penalty="l1"`` / ``"topk"`` (modern SAEs: ReLU code, linear decoder with unit-norm
columns, decoder bias subtracted before encoding)::

    z     = W1 (x - b2) + b1                         (s,)
    a     = relu(z)            (l1)
    a     = relu(topk_k(z))    (topk: all but the k largest entries set to 0)
    x_hat = D a + b2,  D[:, j] = W2[:, j] / ||W2[:, j]||   (n,)

The decoder is normalised by re-parameterisation rather than by projecting after each
step: the L1 penalty cannot be lowered by shrinking codes and growing decoder columns,
and any optimiser (L-BFGS included, whose curvature pairs a projection would corrupt)
sees a smooth objective.

Initialisation (:func:`init_theta`): ``"uniform"`` is the exercise's (KL's default);
``"tied"`` (L1/TopK's default, Gao et al. 2024) draws unit-norm decoder columns and sets
W1 = W2^T, so every unit starts as a matched filter of its own decoder direction. With
the decoder bias b2 set to the data mean (:func:`set_pre_bias`) the pre-activations of
all units start centred on the same footing: no unit is selected or silenced by an
offset shared by every example.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Params(NamedTuple):
    """Views of the flat parameter vector. Shapes: W1 (s, n), W2 (n, s), b1 (s,), b2 (n,)."""

    W1: torch.Tensor
    W2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor


def n_parameters(n_features: int, n_components: int) -> int:
    """Length of theta: 2 s n + s + n."""
    return 2 * n_features * n_components + n_components + n_features


def unpack(theta: torch.Tensor, n_features: int, n_components: int) -> Params:
    """Split flat ``theta`` into views (no copy); gradients flow back into ``theta``."""
    n, s = n_features, n_components
    sn = s * n
    return Params(
        W1=theta[:sn].view(s, n),
        W2=theta[sn : 2 * sn].view(n, s),
        b1=theta[2 * sn : 2 * sn + s],
        b2=theta[2 * sn + s :],
    )


INITS = ("uniform", "tied")


def init_theta(
    n_features: int,
    n_components: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    init: str = "uniform",
) -> torch.Tensor:
    """Starting parameters; biases 0.

    ``init="uniform"``: the exercise's, weights uniform in +/- sqrt(6 / (n + s + 1)).
    ``init="tied"``: decoder columns W2[:, j] drawn uniformly on the unit sphere
    (normalised Gaussians), encoder W1 = W2^T (unit-norm rows).

    Drawn in float64 on the CPU from a seeded generator, then cast and moved, so the
    same seed gives the same starting point on every device and in every dtype.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    n, s = n_features, n_components
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(n_parameters(n, s), dtype=torch.float64)
    if init == "uniform":
        r = math.sqrt(6.0 / (n + s + 1))
        theta[: 2 * s * n] = torch.rand(2 * s * n, generator=gen, dtype=torch.float64) * (2 * r) - r
    else:
        p = unpack(theta, n, s)
        D = torch.randn(n, s, generator=gen, dtype=torch.float64)
        D /= D.norm(dim=0, keepdim=True).clamp_min(1e-12)
        p.W2.copy_(D)
        p.W1.copy_(D.t())
    return theta.to(device=device, dtype=dtype)


def set_pre_bias(theta: torch.Tensor, n_features: int, n_components: int,
                 value: torch.Tensor) -> None:
    """b2 = value (n,) in place: the decoder bias, which L1/TopK subtract before encoding
    (set to the data mean at the start of a fit, so the encoder sees centred inputs)."""
    with torch.no_grad():
        unpack(theta, n_features, n_components).b2.copy_(value)


def decoder_matrix(p: Params, penalty: str) -> torch.Tensor:
    """Effective decoder D, shape (n, s): W2 itself (KL) or W2 with unit-norm columns."""
    if penalty == "kl":
        return p.W2
    return p.W2 / p.W2.norm(dim=0, keepdim=True).clamp_min(1e-12)


def pre_activation(p: Params, X: torch.Tensor, penalty: str) -> torch.Tensor:
    """z = W1 x + b1 (KL) or W1 (x - b2) + b1 (L1/TopK); X (m, n) -> (m, s)."""
    if penalty == "kl":
        return torch.addmm(p.b1, X, p.W1.t())
    return torch.addmm(p.b1, X - p.b2, p.W1.t())


def topk_relu(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row of z (m, s), ReLU them, zero the rest."""
    values, indices = torch.topk(z, k, dim=1, sorted=False)
    return torch.zeros_like(z).scatter_(1, indices, torch.relu(values))


def activation(z: torch.Tensor, penalty: str, k: int) -> torch.Tensor:
    """Hidden activations a from pre-activations z, shape (m, s)."""
    if penalty == "kl":
        return torch.sigmoid(z)
    if penalty == "l1":
        return torch.relu(z)
    return topk_relu(z, k)


def encode(p: Params, X: torch.Tensor, penalty: str, k: int) -> torch.Tensor:
    """Hidden activations a for inputs X (m, n) -> (m, s)."""
    return activation(pre_activation(p, X, penalty), penalty, k)


def decode(p: Params, A: torch.Tensor, penalty: str) -> torch.Tensor:
    """Reconstruction x_hat from activations A (m, s) -> (m, n)."""
    out = torch.addmm(p.b2, A, decoder_matrix(p, penalty).t())
    return torch.sigmoid(out) if penalty == "kl" else out


"""Adam over the model's one flat parameter vector, with weight decay on the weights alone.

The parameters are one vector theta = [W1, W2, b1, b2] (:mod:`sae_core.model`) that the
objective reads in place. torch's fused Adam updates that vector as two leaf tensors
sharing its memory: the weights (the first 2 s n values) with ``weight_decay=lambda``
and the biases (s + n values) with none. The fused kernel adds lambda W to the gradient
while it reads W for the update anyway, so the objective leaves the decay out of its
gradient (``make_objective(decay_in_optimizer=True)``). Folded into the objective's
gradient GEMMs instead (``addmm(W, ..., beta=lambda)``), the decay costs a copy of each
weight matrix and a read of it per step: 0.3-0.4 ms of a 10 ms step of a 784-1024
model at batch 256 on two CPU cores (``benchmarks/adam_matmul.py``).

This is torch's Adam ``weight_decay`` (L2: the step of the full gradient of J, whose
decay term is (lambda/2)(||W1||^2 + ||W2||^2)), not AdamW's decoupled decay.
"""

from __future__ import annotations

import torch


class FlatAdam:
    """Fused Adam (learning rate ``lr``) on a copy of ``theta`` (P,), whose first
    ``n_weights`` values are decayed with ``weight_decay``.

    ``param`` is the flat vector being trained; :meth:`step` takes its gradient (P,).
    The moments and step count round-trip through :meth:`state` / :meth:`load_state`
    as flat tensors, and through pickle (the two leaves share ``param``'s memory, which
    pickle would not keep, so they are rebuilt on load)."""

    def __init__(self, theta: torch.Tensor, n_weights: int, lr: float,
                 weight_decay: float) -> None:
        self.param = theta.detach().clone()
        self.n_weights = int(n_weights)
        self._build(float(lr), float(weight_decay))

    def _build(self, lr: float, weight_decay: float) -> None:
        k = self.n_weights
        # detach() of a slice: a leaf that shares param's memory, so the fused update
        # writes straight into the vector the objective reads
        self._weights = self.param[:k].detach().requires_grad_(True)
        self._biases = self.param[k:].detach().requires_grad_(True)
        self._optimizer = torch.optim.Adam(
            [{"params": [self._weights], "weight_decay": weight_decay},
             {"params": [self._biases], "weight_decay": 0.0}],
            lr=lr, fused=True,  # one pass over parameters, gradient and moments
        )

    def step(self, grad: torch.Tensor) -> None:
        """One Adam step with gradient ``grad`` (P,), without the decay term's lambda W."""
        k = self.n_weights
        self._weights.grad = grad[:k]
        self._biases.grad = grad[k:]
        self._optimizer.step()

    def state(self) -> tuple[dict[str, torch.Tensor], float | None]:
        """({'exp_avg', 'exp_avg_sq'} as flat (P,) tensors, step count), or ({}, None)
        before the first step."""
        states = [self._optimizer.state.get(p) for p in (self._weights, self._biases)]
        if not all(states):
            return {}, None
        moments = {key: torch.cat([st[key] for st in states])
                   for key in ("exp_avg", "exp_avg_sq")}
        return moments, float(states[0]["step"])

    def load_state(self, moments: dict[str, torch.Tensor], step: float | None) -> None:
        """Restore what :meth:`state` returned (nothing to restore when ``step`` is None)."""
        if step is None:
            return
        k = self.n_weights
        for leaf, part in ((self._weights, slice(None, k)), (self._biases, slice(k, None))):
            self._optimizer.state[leaf] = {
                # fused Adam keeps its step count as a float32 on the device
                "step": torch.tensor(step, dtype=torch.float32, device=self.param.device),
                "exp_avg": moments["exp_avg"][part].to(self.param).clone(),
                "exp_avg_sq": moments["exp_avg_sq"][part].to(self.param).clone(),
            }

    def __getstate__(self) -> dict:
        moments, step = self.state()
        weights = self._optimizer.param_groups[0]
        return {"param": self.param, "n_weights": self.n_weights, "lr": weights["lr"],
                "weight_decay": weights["weight_decay"], "moments": moments, "step": step}

    def __setstate__(self, state: dict) -> None:
        self.param, self.n_weights = state["param"], state["n_weights"]
        self._build(state["lr"], state["weight_decay"])
        self.load_state(state["moments"], state["step"])

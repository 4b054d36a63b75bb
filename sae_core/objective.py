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

import itertools
import math
import threading
import weakref
from typing import NamedTuple

import numpy as np
import torch

from sae_core import model as M
from sae_core import penalties as P
from sae_core.config import FIRE_THRESHOLD, SAEConfig
from sae_core.device import bf16_autocast


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
    if config.effective_weight_decay:
        decay = P.weight_decay_term(config.effective_weight_decay, p.W1, p.W2)
    else:
        decay = zero
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
    ``decay_in_optimizer``: the gradient leaves out weight decay's lambda W (the loss
    and its terms keep it), for an optimizer that adds it itself (see
    :func:`make_objective`).
    """

    def __init__(self, config: SAEConfig, decay_in_optimizer: bool = False) -> None:
        self.config = config
        self.decay_in_optimizer = decay_in_optimizer

    def close(self) -> None:
        """Nothing to release (the fused objective's counterpart frees buffers)."""

    def __call__(
        self, theta: torch.Tensor, X: torch.Tensor, dead: torch.Tensor | None = None
    ) -> Evaluation:
        th = theta.detach().requires_grad_(True)
        if dead is None and self.config.penalty == "topk" and self.config.aux_k is not None:
            with torch.no_grad():
                p = M.unpack(th, X.shape[1], self.config.n_components)
                A0 = M.encode(p, X, "topk", self.config.effective_k)
                dead = ~(A0 > FIRE_THRESHOLD).any(dim=0)
        with bf16_autocast(self.config.precision, X.device):
            terms, A = loss_terms(th, X, self.config, dead)
        if self.decay_in_optimizer:
            # the other terms' sum, not total - decay: the decay's gradient would be
            # added and taken away again, which need not cancel to the bit
            (terms.reconstruction + terms.sparsity + terms.auxiliary).backward()
        else:
            terms.total.backward()
        stacked = torch.stack(
            [terms.reconstruction, terms.weight_decay, terms.sparsity, terms.auxiliary]
        ).detach()
        fired = None
        if self.config.penalty == "topk" and self.config.aux_k is not None:
            fired = (A.detach() > FIRE_THRESHOLD).any(dim=0)
        return Evaluation(terms.total.detach(), th.grad, stacked, fired)


class _Worker:
    """One persistent thread that runs the calls handed to it, one at a time, with
    single-threaded BLAS. Two bare locks hand a call over and its result back: a round
    trip costs about half of a ThreadPoolExecutor submit/result (future, queue and
    condition variable), and the objective makes two per evaluation."""

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._call = None
        self._result: tuple[bool, object] = (True, None)
        self._thread = threading.Thread(target=self._loop, name="saeflow-objective",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            self._go.acquire()
            call = self._call
            if call is None:
                return
            try:
                self._result = (True, call())
            except BaseException as exc:  # handed back to the caller by result()
                self._result = (False, exc)
            call = self._call = None  # hold no buffers between calls
            self._done.release()

    def submit(self, call) -> None:
        self._call = call
        self._go.release()

    def result(self):
        self._done.acquire()
        ok, value = self._result
        self._result = (True, None)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._call = None
        self._go.release()
        self._thread.join()


def _close_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()
    workers.clear()


class _Shard:
    """Buffers for the examples of one column range of the augmented data [X^T; 1]."""

    def __init__(self, Xa: torch.Tensor, n_components: int) -> None:
        n1, m = Xa.shape
        s = n_components
        self.m = m
        self.Xa = Xa  # (n+1, m): [X^T; 1], contiguous
        self.A = Xa.new_empty(s + 1, m)  # [A; 1]
        self.A[s] = 1.0
        self.D = Xa.new_empty(n1, m)  # [delta3; 1]
        self.D[n1 - 1] = 1.0
        self.H = Xa.new_empty(n1 - 1, m)
        self.E = Xa.new_empty(s, m)
        self.G1 = Xa.new_empty(s, n1)  # [delta2 X | sum delta2]
        self.G2T = Xa.new_empty(s + 1, n1 - 1)  # [A; 1] delta3^T = G2^T

    def hidden(self, W1a: torch.Tensor) -> torch.Tensor:
        """A = sigmoid(W1 X^T + b1) into the buffer; returns sum_i a_i (s,) in A's dtype.

        torch sums a row pairwise (relative error ~1e-7 in float32, far below what the
        KL term or its gradient can notice) and 5x faster than when it widens every
        value to float64; the block sums are then added in float64."""
        s = self.E.shape[0]
        A = torch.mm(W1a, self.Xa, out=self.A[:s]).sigmoid_()
        return A.sum(dim=1)

    def backward(
        self, W2a: torch.Tensor, W2Ta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction and back-propagation for this shard's columns.

        Returns (sum of squared errors in float64, G1 = [delta2 X | sum delta2] (s, n+1),
        G2 = [delta3 A^T | sum delta3] (n, s+1)), all un-normalised sums over the shard.
        """
        s = self.E.shape[0]
        n = self.H.shape[0]
        H = torch.mm(W2a, self.A, out=self.H).sigmoid_()
        D = torch.sub(H, self.Xa[:n], out=self.D[:n])  # x_hat - x
        # Row-wise dots (pairwise-summed) then a float64 sum: as fast as one dot, and
        # ~1e-9 accurate where a single float32 dot over m*n values is off by ~2e-6 -
        # more than the loss decrease per L-BFGS step on this objective's plateaus.
        sq = torch.linalg.vecdot(D, D).sum(dtype=torch.float64)
        _sigmoid_backward(D, H, out=D)  # delta3 = D * H * (1 - H), one pass
        # G2 = D A^T, computed as (A D^T)^T: MKL runs the (s+1) x m by m x n product
        # ~1.5x faster than the n x m by m x (s+1) one
        G2 = torch.mm(self.A, D.t(), out=self.G2T).t()
        E = torch.mm(W2Ta, self.D, out=self.E)
        _sigmoid_backward(E, self.A[:s], out=E)  # delta2 = E * A * (1 - A)
        G1 = torch.mm(E, self.Xa.t(), out=self.G1)
        return sq, G1, G2


class FusedKLObjective:
    """Ng's sigmoid/KL objective with its hand-derived gradient, no autograd.

    With A = sigmoid(W1 X^T + b1) (s, m), H = sigmoid(W2 A + b2) (n, m) and
    rho_hat = mean over examples of A (s,)::

        delta3 = (H - X^T) * H * (1 - H)                                   (n, m)
        delta2 = (W2^T delta3 + beta (-rho/rho_hat + (1-rho)/(1-rho_hat))) * A * (1 - A)  (s, m)
        dW2 = delta3 A^T / m + lambda W2,   db2 = sum_i delta3_i / m
        dW1 = delta2 X / m + lambda W1,     db1 = sum_i delta2_i / m

    (without the lambda terms under ``decay_in_optimizer``, see :func:`make_objective`).

    Two evaluations, by the size of the data:

    - **Full batches on the CPU** (the exercise's L-BFGS; at least 1.5 blocks of
      ``BLOCK_COLUMNS`` examples): examples are columns, as in the original MATLAB
      code, and every bias rides along as an extra column of its weight matrix against
      a row of ones appended to X, A and delta3. Each of the five products then is one
      GEMM with no bias broadcast, and the bias gradients come out of the weight-gradient
      GEMMs as their last column. The transposed, augmented copy of X and the buffers
      are made once per data tensor. The examples are cut into fixed blocks (the
      partition depends on m alone) and ``workers`` threads evaluate the blocks, each
      with single-threaded BLAS (the caller sets ``torch.set_num_threads(1)`` around the
      fit, see :class:`sae_core.train.Trainer`). Skinny products like these (inner
      dimension 26 or 65) scale poorly inside one BLAS call, and independent blocks keep
      every core busy through the elementwise passes too. Block results are summed in
      block order, so the bytes out do not depend on the number of threads or cores.
    - **One block** (Adam's mini-batches, small data, every GPU evaluation):
      :meth:`_evaluate_block`, examples as rows and five in-place GEMMs with the biases,
      1/m and the decay folded into ``addmm``; a per-batch transposed copy of X and
      augmented copies of the weights would cost as much as the products' own time
      outside them.

    Scalars (the loss terms; rho_hat across blocks) are accumulated in float64
    whatever the dtype.
    """

    BLOCK_COLUMNS = 5000

    def __init__(self, config: SAEConfig, workers: int = 1, reuse_grad: bool = False,
                 decay_in_optimizer: bool = False) -> None:
        if config.penalty != "kl":
            raise ValueError(f"FusedKLObjective needs penalty='kl'; got {config.penalty!r}")
        self.config = config
        self.workers = max(1, int(workers))
        self.reuse_grad = reuse_grad
        self.decay_in_optimizer = decay_in_optimizer
        self._grad: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._source_version = -1
        self._parts: list[_Shard] = []
        self._pool: list[_Worker] = []
        self._finalizer: weakref.finalize | None = None
        self._lanes = 1
        self._weight_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._block_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict:
        # never pickle the cached data copy, its buffers or the thread pool
        return {"config": self.config, "workers": self.workers,
                "reuse_grad": self.reuse_grad, "decay_in_optimizer": self.decay_in_optimizer,
                "_grad": None, "_source": None,
                "_source_version": -1, "_parts": [], "_pool": [], "_finalizer": None,
                "_lanes": 1, "_weight_buffers": None, "_block_cache": {}}

    def close(self) -> None:
        """Release the buffers and the worker threads."""
        _close_workers(self._pool)
        self._parts, self._source, self._weight_buffers = [], None, None
        self._block_cache, self._grad = {}, None

    def _prepare(self, X: torch.Tensor) -> None:
        if X is self._source and X._version == self._source_version:
            return
        m, n = X.shape
        k = self._blocks(X)
        bounds = [round(i * m / k) for i in range(k + 1)]
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            Xa = X.new_empty(n + 1, hi - lo)  # [X^T; 1]
            Xa[:n] = X[lo:hi].t()
            Xa[n] = 1.0
            parts.append(_Shard(Xa, self.config.n_components))
        self._parts, self._source, self._source_version = parts, X, X._version
        n_threads = min(self.workers, k)
        self._lanes = n_threads
        if n_threads > 1 and self._finalizer is None:
            # stop the threads when the objective is collected without close()
            self._finalizer = weakref.finalize(self, _close_workers, self._pool)
        while len(self._pool) < n_threads - 1:
            self._pool.append(_Worker())

    def _map(self, fn, *args) -> list:
        """fn(block, *args) for every block, in block order: blocks are dealt round-robin
        to this thread and the workers, each thread running its blocks in order."""
        parts = self._parts
        n = self._lanes
        if n == 1:
            return [fn(part, *args) for part in parts]

        def run(lane: int) -> list:
            return [fn(part, *args) for part in parts[lane::n]]

        workers = self._pool[: n - 1]
        for lane, worker in enumerate(workers, start=1):
            worker.submit(lambda lane=lane: run(lane))
        lanes, errors = [], []
        # collect every worker's result before raising, so that none is left mid-call
        for call in [lambda: run(0)] + [w.result for w in workers]:
            try:
                lanes.append(call())
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        out = [None] * len(parts)
        for lane, results in enumerate(lanes):
            out[lane::n] = results
        return out

    def __call__(
        self, theta: torch.Tensor, X: torch.Tensor, dead: torch.Tensor | None = None
    ) -> Evaluation:
        if self._blocks(X) == 1:
            return self._evaluate_block(theta.detach(), X)
        self._prepare(X)
        # a diverging fit (rho_hat at 0 or 1) makes inf/NaN here: the trainer reports
        # the non-finite loss in one line, so numpy's warnings would only be noise
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return self._evaluate_host(theta.detach(), X.shape[0])

    def _blocks(self, X: torch.Tensor) -> int:
        """How many column blocks X (m, n) is cut into: m / BLOCK_COLUMNS rounded on the
        CPU (at least 1), one on a GPU."""
        if X.device.type != "cpu":
            return 1
        return max(1, round(X.shape[0] / self.BLOCK_COLUMNS))

    def _evaluate_host(self, theta: torch.Tensor, m: int) -> Evaluation:
        """The CPU evaluation: the block products in torch, everything else (bias
        columns, rho_hat, the sparsity column, the scalar terms, the gradient assembly)
        in numpy on views of the same memory. These are ~40 operations on arrays of at
        most a few thousand values: numpy runs each in ~1 us where a torch call costs
        ~5-10 us, which adds up to a sixth of an evaluation at the exercise's size."""
        cfg = self.config
        s, n = cfg.n_components, self._parts[0].H.shape[0]
        rho, beta, lam = cfg.rho, cfg.beta, cfg.weight_decay
        sn = s * n
        t = theta.numpy()
        W1, W2 = t[:sn].reshape(s, n), t[sn : 2 * sn].reshape(n, s)
        b1, b2 = t[2 * sn : 2 * sn + s], t[2 * sn + s :]
        W1a, W2a, W2Ta = self._weights(theta.dtype, s, n)
        w1a, w2a, w2ta = W1a.numpy(), W2a.numpy(), W2Ta.numpy()
        w1a[:, :n] = W1
        w1a[:, n] = b1
        w2a[:, :s] = W2
        w2a[:, s] = b2
        # the one transposing copy: torch's blocked kernel, 2x numpy's strided loop
        W2Ta[:, :n].copy_(theta[sn : 2 * sn].view(n, s).t())

        sums = [a.numpy() for a in self._map(_Shard.hidden, W1a)]
        rho_hat = sums[0].astype(np.float64)
        for a in sums[1:]:
            rho_hat += a
        rho_hat /= m
        w2ta[:, n] = beta * (-rho / rho_hat + (1.0 - rho) / (1.0 - rho_hat))
        results = self._map(_Shard.backward, W2a, W2Ta)

        sq = math.fsum(float(r[0]) for r in results)
        G1 = results[0][1].numpy()  # (s, n + 1)
        G2T = results[0][2].t().numpy()  # (s + 1, n)
        if len(results) > 1:  # summed in block order, into copies (the views are buffers)
            G1, G2T = G1.copy(), G2T.copy()
            for r in results[1:]:
                G1 += r[1].numpy()
                G2T += r[2].t().numpy()

        grad = self._grad_for(theta)
        g = grad.numpy()
        inv_m = 1.0 / m
        gW1 = g[:sn].reshape(s, n)
        gW2 = g[sn : 2 * sn].reshape(n, s)
        np.multiply(G1[:, :n], inv_m, out=gW1)
        np.multiply(G2T[:s].T, inv_m, out=gW2)
        if not self.decay_in_optimizer:
            gW1 += lam * W1
            gW2 += lam * W2
        np.multiply(G1[:, n], inv_m, out=g[2 * sn : 2 * sn + s])
        np.multiply(G2T[s], inv_m, out=g[2 * sn + s :])

        recon = 0.5 * sq / m
        decay = float(weight_decay_value(theta, n, s, lam))
        kl = rho * np.log(rho / rho_hat) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - rho_hat))
        sparsity = beta * float(kl.sum())
        loss = recon + decay + sparsity
        terms = torch.tensor([recon, decay, sparsity, 0.0], dtype=torch.float64)
        return Evaluation(torch.tensor(loss, dtype=torch.float64), grad, terms, None)

    def _weights(
        self, dtype: torch.dtype, s: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented weight matrices [W1 | b1], [W2 | b2], [W2^T | sparsity term],
        allocated once per dtype and shape and filled on every evaluation."""
        w = self._weight_buffers
        if w is None or w[0].dtype != dtype or w[0].shape != (s, n + 1):
            w = self._weight_buffers = (
                torch.empty(s, n + 1, dtype=dtype),
                torch.empty(n, s + 1, dtype=dtype),
                torch.empty(s, n + 1, dtype=dtype),
            )
        return w

    def _evaluate_block(self, theta: torch.Tensor, X: torch.Tensor) -> Evaluation:
        """The evaluation of one block X (m, n) in torch ops on X's device: every
        evaluation on a GPU, and on the CPU a mini-batch or data under 1.5 blocks.

        Examples are rows here, as X comes: each of the five products is one GEMM that
        reads its operands in place (a transpose is a BLAS flag, not a copy), the biases
        and the sparsity term ride in ``addmm`` as broadcast rows, and the weight
        gradients come out of ``addmm`` with 1/m and the decay folded in::

            A  = sigmoid(X W1^T + b1)                (m, s)
            H  = sigmoid(A W2^T + b2)                (m, n)
            D3 = (H - X) * H * (1 - H)               (m, n)
            D2 = (D3 W2 + sparsity) * A * (1 - A)    (m, s)
            dW2 = D3^T A / m + lambda W2             (n, s)
            dW1 = D2^T X / m + lambda W1             (s, n)

        so that a step costs the five products and a few passes over (m, s) and
        (m, n) arrays. With ``decay_in_optimizer`` the decay is left to Adam's fused
        update (``beta=0``: the GEMM neither copies nor reads a weight matrix), which
        reads the weights anyway: nothing then passes over the weights but the decay's
        value and Adam's own update. The work
        arrays are kept between calls of the same m (fresh ones cost page faults)."""
        cfg = self.config
        m, n = X.shape
        s = cfg.n_components
        rho, beta, lam = cfg.rho, cfg.beta, cfg.weight_decay
        p = M.unpack(theta, n, s)
        A, H, D, E = self._block_buffers(X)
        inv_m = 1.0 / m

        torch.addmm(p.b1, X, p.W1.t(), out=A).sigmoid_()
        # column sums of at most a few thousand rows: float32 is exact enough for
        # rho_hat (see _Shard.hidden); the KL algebra below is in float64
        rho_hat = A.sum(dim=0).double() * inv_m
        sparse_grad = (beta * (-rho / rho_hat + (1.0 - rho) / (1.0 - rho_hat))).to(X.dtype)
        torch.addmm(p.b2, A, p.W2.t(), out=H).sigmoid_()
        torch.sub(H, X, out=D)  # x_hat - x
        # row norms, squared and added in float64: as accurate as _Shard.backward's row
        # dots, without their (m, n) temporary
        sq = torch.linalg.vector_norm(D, dim=1).double().square().sum()
        _sigmoid_backward(D, H, out=D)  # delta3

        grad = self._grad_for(theta)
        g = M.unpack(grad, n, s)
        grad_lam = 0.0 if self.decay_in_optimizer else lam  # lambda W in the gradient
        torch.addmm(p.W2, D.t(), A, beta=grad_lam, alpha=inv_m, out=g.W2)
        torch.sum(D, dim=0, out=g.b2).mul_(inv_m)
        torch.addmm(sparse_grad, D, p.W2, out=E)
        _sigmoid_backward(E, A, out=E)  # delta2
        torch.addmm(p.W1, E.t(), X, beta=grad_lam, alpha=inv_m, out=g.W1)
        torch.sum(E, dim=0, out=g.b1).mul_(inv_m)

        recon = 0.5 * sq * inv_m
        decay = weight_decay_value(theta, n, s, lam)
        sparsity = beta * P.kl_divergence(rho, rho_hat).sum()
        terms = torch.stack([recon, decay, sparsity, torch.zeros_like(recon)])
        return Evaluation(recon + decay + sparsity, grad, terms, None)

    def _grad_for(self, theta: torch.Tensor) -> torch.Tensor:
        """The gradient's tensor: a fresh one, or with ``reuse_grad`` the one of the
        previous call (Adam consumes each gradient in its step; a fresh 6 MB tensor per
        step of a 784-1024 model costs ~2 ms of page faults on its first write)."""
        if not self.reuse_grad:
            return torch.empty_like(theta)
        g = self._grad
        if g is None or (g.shape, g.dtype, g.device) != (theta.shape, theta.dtype, theta.device):
            g = self._grad = torch.empty_like(theta)
        return g

    def _block_buffers(self, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Work arrays A (m, s), H (m, n), D (m, n), E (m, s) for X's shape, dtype and
        device: the last two shapes are kept (an epoch's batches and its shorter last
        one)."""
        m, n = X.shape
        key = (m, n, X.dtype, X.device)
        cache = self._block_cache
        if key not in cache:
            s = self.config.n_components
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[key] = (X.new_empty(m, s), X.new_empty(m, n), X.new_empty(m, n),
                          X.new_empty(m, s))
        return cache[key]


def weight_decay_value(theta: torch.Tensor, n: int, s: int, weight_decay: float) -> torch.Tensor:
    """(lambda / 2)(||W1||_F^2 + ||W2||_F^2) of theta's n-s-n model, a 0-d float64 tensor.

    W1 and W2 are adjacent in theta, so their 2 s n values are read as 2 s rows of n:
    each row's norm is reduced in theta's dtype, its square added in float64: ~1e-8
    relative in float32, where one float32 norm over all of them is off by ~1e-5. A
    single read with no temporary: 0.2 ms for a 784-1024 model, where widening the
    weights to float64 first takes 2 ms, a tenth of an Adam step."""
    rows = torch.linalg.vector_norm(theta[: 2 * s * n].view(2 * s, n), dim=1)
    return 0.5 * weight_decay * rows.double().square().sum()


def make_objective(config: SAEConfig, workers: int = 1, reuse_grad: bool = False,
                   decay_in_optimizer: bool = False) -> AutogradObjective | FusedKLObjective:
    """The fastest exact objective for ``config``: fused for KL (evaluated on ``workers``
    threads; ``reuse_grad``: one gradient tensor for every call, for a caller that
    consumes each gradient before the next call, as Adam does), autograd otherwise (and
    under bf16 autocast, which the fused kernels' preallocated float32 buffers do not
    take).

    ``decay_in_optimizer``: the gradient is that of J minus the decay term, (lambda/2)
    (||W1||^2 + ||W2||^2); the caller's optimizer adds lambda W1, lambda W2 itself, as
    torch's Adam does with ``weight_decay=lambda`` on the weights alone (L2, not AdamW's
    decoupled decay: the same update as with the full gradient). The loss and its terms
    are J's in full either way."""
    if config.penalty == "kl" and config.precision != "bf16":
        return FusedKLObjective(config, workers=workers, reuse_grad=reuse_grad,
                                decay_in_optimizer=decay_in_optimizer)
    return AutogradObjective(config, decay_in_optimizer=decay_in_optimizer)

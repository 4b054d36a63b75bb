"""Limited-memory BFGS with a strong-Wolfe line search, on one flat torch tensor.

Why not ``torch.optim.LBFGS`` or ``scipy.optimize``: the solver state here is a plain
dataclass of tensors and numbers (so a checkpoint holds all of it and a resumed run
reproduces an uninterrupted one bit for bit), it never leaves the device of the
parameters, and it keeps the curvature pairs in one preallocated (2 history, N) matrix.

The algorithm: L-BFGS in the compact form of Byrd, Nocedal & Schnabel (1994), a
strong-Wolfe line search with cubic interpolation (Nocedal & Wright Alg. 3.5/3.6), and
minFunc's choices: first step min(1, 1/||g||_1), initial Hessian scaling
gamma = s'y / y'y, pairs with s'y <= 1e-10 skipped, memory forgotten when the line
search fails once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dtrtrs

Evaluate = Callable[[torch.Tensor], tuple[float, torch.Tensor, Any]]
"""x -> (f(x), grad f(x), anything the caller wants back for the accepted point)."""


@dataclass
class LBFGSState:
    """Everything the solver needs to continue.

    ``pairs`` (2 * history, N) holds the correction pairs as a ring buffer on the
    parameters' device: rows ``[0, history)`` are the steps s_i, rows
    ``[history, 2 history)`` the gradient changes y_i, so one matrix-vector product gives
    both S g and Y g; the newest pair sits in slot ``head - 1``. ``SY[i, j] = s_i'y_j``
    and ``YY[i, j] = y_i'y_j`` (k x k, float64, host memory) are in chronological order,
    oldest first. ``proj`` caches ``pairs @ g`` (float64, host) for the current g, or is
    empty when it must be recomputed.
    """

    x: torch.Tensor
    f: float
    g: torch.Tensor
    pairs: torch.Tensor
    SY: np.ndarray
    YY: np.ndarray
    proj: np.ndarray = field(default_factory=lambda: np.zeros(0))
    head: int = 0
    gamma: float = 1.0
    n_iter: int = 0
    n_evals: int = 1
    stop_reason: str | None = None

    @property
    def n_pairs(self) -> int:
        return self.SY.shape[0]

    def slots(self) -> np.ndarray:
        """Ring-buffer slot of each stored pair, oldest first."""
        h = self.pairs.shape[0] // 2
        return (self.head - self.n_pairs + np.arange(self.n_pairs)) % h

    def forget(self) -> None:
        """Drop the curvature memory (the next direction is steepest descent)."""
        self.SY = np.zeros((0, 0))
        self.YY = np.zeros((0, 0))
        self.proj = np.zeros(0)
        self.head, self.gamma = 0, 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "x": self.x, "g": self.g, "pairs": self.pairs,
            "SY": torch.from_numpy(self.SY), "YY": torch.from_numpy(self.YY),
            "proj": torch.from_numpy(self.proj),
        }

    def scalars(self) -> dict[str, Any]:
        return {
            "f": self.f,
            "head": self.head,
            "gamma": self.gamma,
            "n_iter": self.n_iter,
            "n_evals": self.n_evals,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> LBFGSState:
        """Inverse of tensors()/scalars(); SY and YY go back to host numpy arrays."""
        host = {
            k: np.array(tensors[k].cpu().numpy(), dtype=np.float64) for k in ("SY", "YY", "proj")
        }
        return cls(**{**tensors, **host}, **scalars)


@dataclass
class _Point:
    t: float
    f: float
    g: torch.Tensor
    gtd: float
    x: torch.Tensor | None = None
    extra: Any = None


def _cubic_minimum(a: _Point, b: _Point, lo: float, hi: float) -> float:
    """Minimiser of the cubic through (t, f, f') at a and b, clipped to [lo, hi]."""
    if not (math.isfinite(a.f) and math.isfinite(b.f)) or a.t == b.t:
        return 0.5 * (lo + hi)
    d1 = a.gtd + b.gtd - 3.0 * (a.f - b.f) / (a.t - b.t)
    d2_sq = d1 * d1 - a.gtd * b.gtd
    if d2_sq < 0:
        return 0.5 * (lo + hi)
    d2 = math.sqrt(d2_sq)
    if a.t <= b.t:
        t = b.t - (b.t - a.t) * ((b.gtd + d2 - d1) / (b.gtd - a.gtd + 2.0 * d2))
    else:
        t = a.t - (a.t - b.t) * ((a.gtd + d2 - d1) / (a.gtd - b.gtd + 2.0 * d2))
    if not math.isfinite(t):
        return 0.5 * (lo + hi)
    return min(max(t, lo), hi)


class LBFGS:
    """Minimise ``evaluate`` from ``x0``; drive it with :meth:`start` and :meth:`step`."""

    def __init__(
        self,
        evaluate: Evaluate,
        history: int = 20,
        tol: float = 1e-9,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_line_search: int = 25,
    ) -> None:
        self.evaluate = evaluate
        self.history = history
        self.tol = tol
        self.c1 = c1
        self.c2 = c2
        self.max_line_search = max_line_search

    def start(self, x0: torch.Tensor) -> tuple[LBFGSState, Any]:
        """Evaluate at x0; the state to pass to :meth:`step`, and x0's extra."""
        f, g, extra = self.evaluate(x0)
        if not math.isfinite(f):
            raise FloatingPointError(f"the loss is {f} at the initial point")
        state = LBFGSState(
            x=x0.clone(), f=f, g=g, pairs=x0.new_zeros(2 * self.history, x0.numel()),
            SY=np.zeros((0, 0)), YY=np.zeros((0, 0)),
        )
        return state, extra

    def _direction(self, st: LBFGSState) -> torch.Tensor:
        """d = -H g with H the L-BFGS inverse-Hessian approximation, in compact form
        (Byrd, Nocedal & Schnabel 1994, eq. 3.1)::

            H g = gamma g + S w1 - gamma Y w2,   w2 = R^-1 S'g,
            w1 = R^-T ((D + gamma Y'Y) w2 - gamma Y'g)

        with S, Y (N, k) the pairs oldest first, R the upper triangle of S'Y and D its
        diagonal. One product with the (2h, N) pair matrix on the device (two when the
        cached ``pairs @ g`` is stale) and k x k algebra in float64 numpy on the host
        (microseconds, where a torch call costs ~10 us), whatever k, instead of the 4k
        vector operations of the two-loop recursion, which dominate an iteration's cost
        for k = 100 and small N.
        """
        k = st.n_pairs
        if k == 0:
            return st.g.neg()
        h, gamma = self.history, st.gamma
        slots = st.slots()
        if st.proj.size == 0:
            st.proj = (st.pairs @ st.g).double().cpu().numpy()  # [S g; Y g] by slot
        Sg, Yg = st.proj[slots], st.proj[h + slots]
        # R = triu(S'Y): LAPACK's trtrs reads only the upper triangle of what it is given,
        # so S'Y goes in as it is (np.triu's masked copy took a sixth of this function)
        R = st.SY
        w2, _ = dtrtrs(R, Sg, lower=0)
        # einsum, not YY @ w2: OpenBLAS runs a gemv this size on all its threads, whose
        # spinning afterwards takes the cores from the objective's workers
        rhs = st.SY.diagonal() * w2 + gamma * np.einsum("ij,j->i", st.YY, w2) - gamma * Yg
        w1, _ = dtrtrs(R, rhs, lower=0, trans=1)
        coef = np.zeros(2 * h)  # per slot; empty slots get 0
        coef[slots] = w1
        coef[h + slots] = -gamma * w2
        c = torch.from_numpy(coef).to(device=st.g.device, dtype=st.g.dtype)
        return torch.addmv(st.g, st.pairs.t(), c, beta=gamma).neg_()

    def _store_pair(
        self, st: LBFGSState, s: torch.Tensor, y: torch.Tensor, g_new: torch.Tensor, ys: float
    ) -> None:
        """Put (s, y) in the oldest slot, extend S'Y and Y'Y by a row and a column, and
        leave ``proj = pairs @ g_new`` for the next direction.

        One pass over the pair matrix gives pairs @ s, pairs @ y and pairs @ g_new (as a
        3 x N by N x 2h product: MKL runs the N x 3 orientation 7x slower). pairs @ y is
        computed, not taken as pairs @ g_new - pairs @ g_old: in float32 that difference
        cancels when the step is short.
        """
        h, j = self.history, st.head
        st.pairs[j].copy_(s)
        st.pairs[h + j].copy_(y)
        rows = torch.mm(torch.stack([s, y, g_new]), st.pairs.t()).double().cpu().numpy()
        with_s, with_y = rows[0], rows[1]  # [S s; Y s], [S y; Y y] by slot
        st.proj = rows[2]  # [S g_new; Y g_new]
        keep = 1 if st.n_pairs == h else 0  # when full, the oldest pair was overwritten
        st.head = (j + 1) % h
        k = st.n_pairs - keep + 1
        SY = np.empty((k, k))
        YY = np.empty((k, k))
        SY[:-1, :-1] = st.SY[keep:, keep:]
        YY[:-1, :-1] = st.YY[keep:, keep:]
        slots = (st.head - k + np.arange(k)) % h
        SY[-1, :] = with_s[h + slots]  # s_new'y_i
        SY[:, -1] = with_y[slots]  # s_i'y_new
        YY[-1, :] = YY[:, -1] = with_y[h + slots]
        st.SY, st.YY = SY, YY
        st.gamma = ys / YY[-1, -1]

    def step(self, st: LBFGSState) -> tuple[bool, Any]:
        """One iteration in place. Returns (go_on, extra of the accepted point)."""
        d = self._direction(st)
        gtd = float(torch.dot(st.g, d))
        if not gtd < 0:  # not a descent direction: forget the curvature, go downhill
            st.forget()
            d = st.g.neg()
            gtd = float(torch.dot(st.g, d))
        if gtd == 0:
            st.stop_reason = "gradient is zero"
            return False, None
        if st.n_pairs == 0:
            t = min(1.0, 1.0 / float(st.g.abs().sum()))
        else:
            t = 1.0
        point, n_evals = self._line_search(st, d, t, gtd)
        st.n_evals += n_evals
        if point is None and st.n_pairs > 0:
            # the curvature memory may be stale (float32 noise near a minimum): forget
            # it and try once more along the steepest descent, as minFunc does
            st.forget()
            d = st.g.neg()
            gtd = float(torch.dot(st.g, d))
            t = min(1.0, 1.0 / float(st.g.abs().sum()))
            point, n_evals = self._line_search(st, d, t, gtd)
            st.n_evals += n_evals
        if point is None:
            st.stop_reason = "line search found no lower loss (converged to numerical precision)"
            return False, None

        s = point.x - st.x
        y = point.g - st.g
        ys = float(torch.dot(y, s))
        if ys > 1e-10:
            self._store_pair(st, s, y, point.g, ys)
        else:
            st.proj = np.zeros(0)  # g changes: the cached projection is stale
        f_old = st.f
        st.x, st.f, st.g = point.x, point.f, point.g
        st.n_iter += 1
        if abs(f_old - st.f) <= self.tol * max(abs(f_old), abs(st.f), 1.0):
            st.stop_reason = f"loss changed by less than tol={self.tol:g}"
            return False, point.extra
        return True, point.extra

    def _try(self, st: LBFGSState, d: torch.Tensor, t: float) -> _Point:
        x = torch.add(st.x, d, alpha=t)
        f, g, extra = self.evaluate(x)
        return _Point(t, f, g, float(torch.dot(g, d)), x, extra)

    def _line_search(
        self, st: LBFGSState, d: torch.Tensor, t: float, gtd0: float
    ) -> tuple[_Point | None, int]:
        """Strong-Wolfe step along d: f(x+td) <= f + c1 t g'd and |g(x+td)'d| <= c2 |g'd|.

        Returns the accepted point (or the best point with sufficient decrease when the
        budget runs out; None if there is none) and the number of evaluations used.
        """
        f0 = st.f
        armijo = self.c1 * gtd0
        curvature = -self.c2 * gtd0
        prev = _Point(0.0, f0, st.g, gtd0, st.x)
        evals = 0
        lo = hi = None
        while evals < self.max_line_search:
            cur = self._try(st, d, t)
            evals += 1
            if not math.isfinite(cur.f) or cur.f > f0 + t * armijo or (
                evals > 1 and cur.f >= prev.f
            ):
                lo, hi = prev, cur
                break
            if abs(cur.gtd) <= curvature:
                return cur, evals
            if cur.gtd >= 0:
                lo, hi = cur, prev
                break
            t_next = _cubic_minimum(prev, cur, t + 0.01 * (t - prev.t), 10.0 * t)
            prev, t = cur, t_next
        else:
            return (prev if prev.t > 0 else None), evals

        # zoom: lo has sufficient decrease and the lowest loss so far; the minimiser
        # lies between lo and hi.
        while evals < self.max_line_search:
            a, b = sorted((lo.t, hi.t))
            width = b - a
            if width * float(d.abs().max()) < 1e-12:
                break
            t = _cubic_minimum(lo, hi, a, b)
            if min(t - a, b - t) < 0.1 * width:  # too close to an end: bisect instead
                t = 0.5 * (a + b)
            cur = self._try(st, d, t)
            evals += 1
            if not math.isfinite(cur.f) or cur.f > f0 + t * armijo or cur.f >= lo.f:
                hi = cur
            else:
                if abs(cur.gtd) <= curvature:
                    return cur, evals
                if cur.gtd * (hi.t - lo.t) >= 0:
                    hi = lo
                lo = cur
        return (lo if lo.t > 0 else None), evals

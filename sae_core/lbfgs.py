"""Limited-memory BFGS with a strong-Wolfe line search, on one flat torch tensor.

Why not ``torch.optim.LBFGS`` or ``scipy.optimize``: the solver state here is a plain
dataclass of tensors and numbers (so a checkpoint holds all of it and a resumed run
reproduces an uninterrupted one bit for bit), it never leaves the device of the
parameters, and it keeps the curvature pairs in two preallocated (history, N) matrices.

The algorithm is Nocedal & Wright's (Alg. 7.4 two-loop recursion, Alg. 3.5/3.6 line
search with cubic interpolation), with minFunc's choices: first step min(1, 1/||g||_1),
initial Hessian scaling gamma = s'y / y'y, pairs with s'y <= 1e-10 skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Evaluate = Callable[[torch.Tensor], tuple[float, torch.Tensor, Any]]
"""x -> (f(x), grad f(x), anything the caller wants back for the accepted point)."""


@dataclass
class LBFGSState:
    """Everything the solver needs to continue.

    ``pairs`` (2 * history, N) holds the correction pairs as a ring buffer: rows
    ``[0, history)`` are the steps s_i, rows ``[history, 2 history)`` the gradient
    changes y_i, so one matrix-vector product gives both S g and Y g. ``SY[i, j] =
    s_i'y_j`` and ``YY[i, j] = y_i'y_j`` (float64, (history, history)) are updated as
    pairs arrive, slot-indexed like the rows of ``pairs``; they live in host memory.
    """

    x: torch.Tensor
    f: float
    g: torch.Tensor
    pairs: torch.Tensor
    SY: torch.Tensor
    YY: torch.Tensor
    n_pairs: int = 0
    head: int = 0
    gamma: float = 1.0
    n_iter: int = 0
    n_evals: int = 1
    stop_reason: str | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "g": self.g, "pairs": self.pairs, "SY": self.SY, "YY": self.YY}

    def scalars(self) -> dict[str, Any]:
        return {
            "f": self.f,
            "n_pairs": self.n_pairs,
            "head": self.head,
            "gamma": self.gamma,
            "n_iter": self.n_iter,
            "n_evals": self.n_evals,
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> LBFGSState:
        """Inverse of tensors()/scalars(); SY and YY always go to host memory."""
        host = {k: tensors[k].to("cpu", torch.float64) for k in ("SY", "YY")}
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
        n = x0.numel()
        h = self.history
        small = torch.zeros(h, h, dtype=torch.float64)  # host memory: see _direction
        state = LBFGSState(
            x=x0.clone(), f=f, g=g, pairs=x0.new_zeros(2 * h, n), SY=small, YY=small.clone()
        )
        return state, extra

    def _direction(self, st: LBFGSState) -> torch.Tensor:
        """d = -H g with H the L-BFGS inverse-Hessian approximation, in compact form
        (Byrd, Nocedal & Schnabel 1994, eq. 3.1)::

            H g = gamma g + S w1 - gamma Y w2,   w2 = R^-1 S'g,
            w1 = R^-T ((D + gamma Y'Y) w2 - gamma Y'g)

        with S, Y (N, k) the pairs oldest first, R the upper triangle of S'Y and D its
        diagonal. Four matrix-vector products and a k x k triangular solve, whatever
        the history length, instead of the 4k vector operations of the two-loop
        recursion (which dominate the iteration's cost for k = 100 and small N).
        """
        if st.n_pairs == 0:
            return st.g.neg()
        h, k, gamma = self.history, st.n_pairs, st.gamma
        # The k x k algebra runs in float64 on the host; only the two products with
        # the (2h, N) pair matrix touch the parameters' device. (Not numpy: its BLAS
        # threads would spin against torch's on a small machine.)
        order = (st.head - k + torch.arange(k)) % h  # slots, oldest first
        proj = (st.pairs @ st.g).double().cpu()  # [S g; Y g] over all slots
        Sg, Yg = proj[order, None], proj[h + order, None]
        SY = st.SY[order][:, order]
        R = SY.triu()
        w2 = torch.linalg.solve_triangular(R, Sg, upper=True)
        rhs = SY.diagonal()[:, None] * w2 + gamma * (st.YY[order][:, order] @ w2)
        w1 = torch.linalg.solve_triangular(R.t(), rhs - gamma * Yg, upper=False)
        coef = torch.zeros(2 * h, dtype=torch.float64)  # per slot; unused slots get 0
        coef[order] = w1[:, 0]
        coef[h + order] = -gamma * w2[:, 0]
        c = coef.to(device=st.g.device, dtype=st.g.dtype)
        return torch.addmv(st.g, st.pairs.t(), c, beta=gamma).neg_()

    def _store_pair(self, st: LBFGSState, s: torch.Tensor, y: torch.Tensor, ys: float) -> None:
        """Put (s, y) in the oldest slot and update the slot-indexed S'Y and Y'Y."""
        h, j = self.history, st.head
        st.pairs[j].copy_(s)
        st.pairs[h + j].copy_(y)
        # two matrix-vector products: a (2h, N) x (N, 2) GEMM is 8x slower in MKL
        with_s = (st.pairs @ s).double().cpu()  # [S s_j; Y s_j]
        with_y = (st.pairs @ y).double().cpu()  # [S y_j; Y y_j]
        st.SY[j, :] = with_s[h:]  # s_j'y_i
        st.SY[:, j] = with_y[:h]  # s_i'y_j
        st.YY[j, :] = with_y[h:]
        st.YY[:, j] = with_y[h:]
        st.n_pairs = min(st.n_pairs + 1, h)
        st.head = (j + 1) % h
        st.gamma = ys / float(with_y[h + j])

    def step(self, st: LBFGSState) -> tuple[bool, Any]:
        """One iteration in place. Returns (go_on, extra of the accepted point)."""
        d = self._direction(st)
        gtd = float(torch.dot(st.g, d))
        if not gtd < 0:  # not a descent direction: forget the curvature, go downhill
            st.n_pairs, st.head, st.gamma = 0, 0, 1.0
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
            st.n_pairs, st.head, st.gamma = 0, 0, 1.0
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
            self._store_pair(st, s, y, ys)
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

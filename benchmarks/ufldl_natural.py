"""UFLDL sparse-autoencoder exercise: saeflow against a plain numpy/scipy reference.

Both minimise the same objective (64-25-64, rho 0.01, lambda 1e-4, beta 3) on the same
10,000 8x8 patches of 1/f-whitened built-in photographs, from the same initial point:

* reference: the exercise's sparseAutoencoderCost written in numpy (float64, examples as
  columns, hand-written back-propagation) driven by scipy's L-BFGS-B for 400 iterations,
  timed at each BLAS thread setting (1 and 2 threads), the best one counted;
* saeflow: ``SparseAutoencoder(...).fit`` with its defaults (float32, fused gradient,
  L-BFGS with 100 correction pairs), a callback noting when the loss first reaches the
  reference's final objective.

Each contestant runs in its own fresh process (so numpy's, scipy's and torch's thread
pools never compete), alternating, ``--repeats`` times; the best time of each counts.
Prints both final objectives and the ratio reference wall time / saeflow time-to-reach,
and writes the 25 learned filters as a PNG.

    python benchmarks/ufldl_natural.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_HIDDEN, RHO, LAMBDA, BETA, MAX_ITER, N_PATCHES = 25, 0.01, 1e-4, 3.0, 400, 10_000


def reference_cost(theta, visible, hidden, lam, rho, beta, data):
    """The exercise's sparseAutoencoderCost, line for line in numpy. data: (visible, m)."""
    import numpy as np

    W1 = theta[: hidden * visible].reshape(hidden, visible)
    W2 = theta[hidden * visible : 2 * hidden * visible].reshape(visible, hidden)
    b1 = theta[2 * hidden * visible : 2 * hidden * visible + hidden]
    b2 = theta[2 * hidden * visible + hidden :]
    m = data.shape[1]
    a2 = 1.0 / (1.0 + np.exp(-(W1 @ data + b1[:, None])))
    a3 = 1.0 / (1.0 + np.exp(-(W2 @ a2 + b2[:, None])))
    rho_hat = a2.mean(axis=1)
    kl = np.sum(rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat)))
    cost = (
        0.5 * np.sum((a3 - data) ** 2) / m
        + lam / 2 * (np.sum(W1**2) + np.sum(W2**2))
        + beta * kl
    )
    delta3 = (a3 - data) * a3 * (1 - a3)
    sparsity_delta = beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))
    delta2 = (W2.T @ delta3 + sparsity_delta[:, None]) * a2 * (1 - a2)
    W1grad = delta2 @ data.T / m + lam * W1
    W2grad = delta3 @ a2.T / m + lam * W2
    b1grad = delta2.sum(axis=1) / m
    b2grad = delta3.sum(axis=1) / m
    grad = np.concatenate([W1grad.ravel(), W2grad.ravel(), b1grad, b2grad])
    return cost, grad


def patches():
    from sae_core.patches import natural_patches

    return natural_patches(N_PATCHES, 8, seed=0)


def initial_theta():
    import torch

    from sae_core.model import init_theta

    return init_theta(64, N_HIDDEN, seed=0, dtype=torch.float64).numpy()


def reference_fit(data, theta0, hidden: int, lam: float, rho: float, beta: float,
                  max_iter: int, threads: int) -> dict:
    """scipy's L-BFGS-B on :func:`reference_cost` from theta0 for at most ``max_iter``
    iterations, BLAS limited to ``threads``. data: (visible, m) float64, examples as
    columns. Returns the final objective f, the seconds of the minimisation alone,
    iterations nit and evaluations nfev."""
    import scipy.optimize
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        start = time.perf_counter()
        result = scipy.optimize.minimize(
            reference_cost,
            theta0,
            args=(data.shape[0], hidden, lam, rho, beta, data),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter},
        )
        seconds = time.perf_counter() - start
    return {"f": float(result.fun), "seconds": seconds, "nit": int(result.nit),
            "nfev": int(result.nfev), "threads": threads}


def worker_reference(threads: int) -> dict:
    X = patches().T.copy()  # (64, m): examples as columns, as in the exercise
    return reference_fit(X, initial_theta(), N_HIDDEN, LAMBDA, RHO, BETA, MAX_ITER, threads)


def worker_saeflow(target: float, filters_png: str | None) -> dict:
    import torch

    from sae_core import SparseAutoencoder
    from sae_core.train import Callback

    X = patches()

    class Clock(Callback):
        def __init__(self) -> None:
            self.reached = None

        def on_iteration_end(self, trainer) -> None:
            if self.reached is None and trainer.history[-1]["loss"] <= target:
                self.reached = (time.perf_counter() - start, trainer.iteration)

    clock = Clock()
    sae = SparseAutoencoder(
        N_HIDDEN, rho=RHO, beta=BETA, weight_decay=LAMBDA, max_iter=MAX_ITER,
        random_state=0, device="cpu", callbacks=[clock],
    )
    start = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - start
    if filters_png:
        from sae_core.plots import filter_grid_figure, save_figure

        save_figure(filter_grid_figure(sae.components_, (8, 8), title="saeflow: 25 filters, "
                                       "natural patches (rho 0.01, beta 3)"), filters_png)
    rho_hat = sae.transform(X).mean(axis=0)
    return {
        "f": sae.history_[-1]["loss"],
        "seconds": seconds,
        "nit": sae.n_iter_,
        "reach_seconds": clock.reached[0] if clock.reached else None,
        "reach_iteration": clock.reached[1] if clock.reached else None,
        "threads": torch.get_num_threads(),
        "rho_hat_min": float(rho_hat.min()),
        "rho_hat_max": float(rho_hat.max()),
    }


def run_worker(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "reference":
            res = worker_reference(int(rest[0]))
        else:
            res = worker_saeflow(float(rest[0]), rest[1] if len(rest) > 1 else None)
        print(json.dumps(res))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; {args.repeats} alternating rounds, best time counts")
    by_threads = {t: run_worker("reference", str(t)) for t in (1, 2)}
    for t, r in by_threads.items():
        print(f"  reference, {t} BLAS thread(s): {r['seconds']:.3f} s, f = {r['f']:.6f}")
    best_threads = min(by_threads, key=lambda t: by_threads[t]["seconds"])
    refs = [by_threads[best_threads]]
    target = refs[0]["f"]
    png = str(out / "ufldl_natural_filters.png")
    runs = [run_worker("saeflow", repr(target), png)]
    for _ in range(args.repeats - 1):
        refs.append(run_worker("reference", str(best_threads)))
        runs.append(run_worker("saeflow", repr(target)))

    ref = min(refs, key=lambda r: r["seconds"])
    reached = [r for r in runs if r["reach_seconds"] is not None]
    best = min(reached, key=lambda r: r["reach_seconds"]) if reached else runs[0]
    ratio = ref["seconds"] / best["reach_seconds"] if reached else float("nan")
    gap = (best["f"] - ref["f"]) / ref["f"]
    summary = {
        "reference": {**ref, "all_seconds": [r["seconds"] for r in refs]},
        "saeflow": {**best, "all_reach_seconds": [r["reach_seconds"] for r in runs],
                    "all_seconds": [r["seconds"] for r in runs]},
        "speedup_to_reference_objective": ratio,
        "final_objective_gap": gap,
    }
    print(f"reference (numpy + scipy L-BFGS-B, float64, {ref['threads']} thread(s)): "
          f"f = {ref['f']:.6f} after {ref['nit']} iterations / {ref['nfev']} evaluations, "
          f"{ref['seconds']:.3f} s")
    print(f"saeflow   (torch float32, {best['threads']} thread(s)): f = {best['f']:.6f} after "
          f"{best['nit']} iterations, {best['seconds']:.3f} s; reached the reference's f at "
          f"iteration {best['reach_iteration']} in {best['reach_seconds']:.3f} s")
    print(f"rho_hat per unit (saeflow): [{best['rho_hat_min']:.4f}, {best['rho_hat_max']:.4f}]"
          f" for target {RHO}")
    print(f"final objective: saeflow {100 * gap:+.2f}% vs reference")
    print(f"speed-up (reference wall time / saeflow time to reach it): {ratio:.2f}x")
    print(f"filters: {png}")
    (out / "ufldl_natural.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

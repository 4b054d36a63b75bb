"""GPU checks and timings, for a machine with CUDA (run where one is lent).

Correctness on the device (gradients, determinism, resume, every penalty and solver) and
throughput of the device path against the same code on the host CPU, in one run:

    PYTHONPATH=. python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

Prints one line per check and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core import SAEConfig, SparseAutoencoder
from sae_core.gradcheck import check_gradient
from sae_core.model import init_theta
from sae_core.objective import AutogradObjective, FusedKLObjective
from sae_core.patches import natural_patches
from sae_core.train import Callback

RESULTS: dict = {}


def report(name: str, ok: bool, **numbers) -> None:
    RESULTS[name] = {"ok": bool(ok), **numbers}
    detail = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in numbers.items())
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_fit(device: str, X: np.ndarray, **kw) -> tuple[SparseAutoencoder, float]:
    sae = SparseAutoencoder(device=device, **kw)
    sync(device)
    start = time.perf_counter()
    sae.fit(X)
    sync(device)
    return sae, time.perf_counter() - start


def count_syncs(device: str, fn) -> int:
    """Host-device synchronisations during fn() (torch's sync debug mode, as warnings)."""
    if not device.startswith("cuda"):
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def scale_checks(dev: str, dry_run: bool) -> None:
    """Issue 14 on the device: no sync per batch, streamed == in memory, TF32 / bf16
    against float32, and the large shapes."""
    from sae_core.patch_store import read_patch_store, write_patch_store
    from sae_core.train import Trainer

    rng = np.random.default_rng(1)
    m = 20_000 if dry_run else 400_000
    X = rng.uniform(0.05, 0.95, size=(m, 192)).astype(np.float32)
    # a) syncs per epoch do not grow with the batches: 1 epoch of m / 256 batches
    cfg = SAEConfig(n_components=256, solver="adam", batch_size=256, max_iter=1, device=dev)
    trainer = Trainer(cfg, 192)
    data = trainer.as_data(X)
    trainer.fit_adam(data, epochs=1)  # warm-up
    syncs = count_syncs(dev, lambda: trainer.fit_adam(data, epochs=1))
    report("Adam loop: host-device syncs in an epoch of many batches", syncs <= 8,
           syncs=syncs, batches=-(-m // 256))
    # b) streamed from a patch store == from memory, and its throughput
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.arrow")
        write_patch_store(path, X, X[:0], {"patch_size": 8}, "0" * 64)
        rows = read_patch_store(path).rows("train")
        fits = {}
        for loader in ("memory", "stream"):
            sae, secs = timed_fit(dev, rows, n_components=1024, solver="adam",
                                  batch_size=4096, max_iter=2, loader=loader)
            fits[loader] = (sae, m * 2 / secs)
        same = np.array_equal(fits["memory"][0].components_, fits["stream"][0].components_)
        ratio = fits["stream"][1] / fits["memory"][1]
        report("streamed == in memory on the device, and its throughput", same and ratio >= 0.8,
               same=same, streamed=fits["stream"][1], in_memory=fits["memory"][1], ratio=ratio)
    # c) TF32 and bf16 against float32 (device.py states the tolerances)
    if not dry_run:
        full, _ = timed_fit(dev, X, n_components=1024, solver="adam", batch_size=4096,
                            max_iter=3)
        for precision, tol in (("tf32", 0.01), ("bf16", 0.03)):
            sae, secs = timed_fit(dev, X, n_components=1024, solver="adam", batch_size=4096,
                                  max_iter=3, precision=precision)
            rel = abs(sae.history_[-1]["loss"] / full.history_[-1]["loss"] - 1)
            report(f"{precision} loss within {tol:g} of float32", rel <= tol, rel=rel,
                   examples_per_s=3 * m / secs)
    # d) large batches and dictionaries
    for s_hidden, batch in ((4096, 8192), (16384, 4096)):
        if dry_run and s_hidden > 4096:
            continue
        sae, secs = timed_fit(dev, X[: 4 * batch] if dry_run else X, n_components=s_hidden,
                              penalty="topk", k=32, solver="adam", batch_size=batch,
                              max_iter=1)
        active = sae.transform(X[:4096]) > 0
        report(f"TopK 192-{s_hidden}, batch {batch}: exactly k active",
               bool(np.all(active.sum(1) == 32)), seconds=secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every step on the CPU with small sizes (tests this script)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: nothing to check here")
        return
    dev = "cpu" if args.dry_run else "cuda"
    rows = 4_000 if args.dry_run else 200_000
    RESULTS["device"] = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    RESULTS["cpu_threads"] = torch.get_num_threads()
    print(f"device: {RESULTS['device']}, torch {torch.__version__}, "
          f"host threads {torch.get_num_threads()}", flush=True)

    # 1. gradients on the device, float64
    Xs = natural_patches(100, 8, seed=1)
    cfg = SAEConfig(n_components=25, dtype="float64", device=dev)
    Xt = torch.tensor(Xs, device=dev)
    th = init_theta(64, 25, seed=0, dtype=torch.float64, device=dev)
    g_fused = FusedKLObjective(cfg)(th, Xt).grad
    g_auto = AutogradObjective(cfg)(th, Xt).grad
    rel = float((g_fused - g_auto).norm() / g_auto.norm())
    report("fused KL gradient == autograd on cuda (float64)", rel < 1e-12, rel=rel)
    small = natural_patches(50, 4, seed=1)
    for penalty in ("kl", "l1", "topk"):
        c = SAEConfig(n_components=6, penalty=penalty, dtype="float64", device=dev, k=2,
                      l1_coefficient=1e-2)
        diff = check_gradient(c, small)
        report(f"central differences, {penalty}, cuda float64", diff < 1e-9, rel=diff)

    # 2. the exercise on the GPU and on the host, same settings and data
    X = natural_patches(10_000, 8, seed=0)
    kw = dict(n_components=25, rho=0.01, beta=3.0, weight_decay=1e-4, max_iter=400)
    timed_fit(dev, X[:500], **{**kw, "max_iter": 5})  # warm-up (CUDA context, kernels)
    gpu, t_gpu = timed_fit(dev, X, **kw)
    cpu, t_cpu = timed_fit("cpu", X, **kw)
    rho_hat = gpu.transform(X).mean(0)
    f_gpu, f_cpu = gpu.history_[-1]["loss"], cpu.history_[-1]["loss"]
    report("exercise 64-25-64, 400 L-BFGS iterations",
           abs(f_gpu - f_cpu) / f_cpu < 0.01 and rho_hat.min() >= 0.005 and rho_hat.max() <= 0.02,
           gpu_seconds=t_gpu, cpu_seconds=t_cpu, loss_gpu=f_gpu, loss_cpu=f_cpu,
           rho_hat_min=float(rho_hat.min()), rho_hat_max=float(rho_hat.max()))

    # 3. determinism and resume on the device
    a, _ = timed_fit(dev, X, **{**kw, "max_iter": 60})
    b, _ = timed_fit(dev, X, **{**kw, "max_iter": 60})
    report("same seed, same weights on cuda (L-BFGS)",
           np.array_equal(a.components_, b.components_),
           max_abs_diff=float(np.abs(a.components_ - b.components_).max()))

    class Stop(Callback):
        def on_iteration_end(self, trainer):
            if trainer.iteration == 33:
                raise KeyboardInterrupt

    with tempfile.TemporaryDirectory() as tmp:
        ck = os.path.join(tmp, "ck.safetensors")
        try:
            SparseAutoencoder(device=dev, checkpoint_path=ck, checkpoint_every=10,
                              callbacks=[Stop()], **{**kw, "max_iter": 60}).fit(X)
        except KeyboardInterrupt:
            pass
        resumed = SparseAutoencoder(device=dev, checkpoint_path=ck, checkpoint_every=10,
                                    **{**kw, "max_iter": 60}).fit(X)
    report("interrupted + resumed == uninterrupted on cuda",
           np.array_equal(a.components_, resumed.components_),
           max_abs_diff=float(np.abs(a.components_ - resumed.components_).max()))

    # 4. every penalty with Adam on the device (after a warm-up: CUDA loads kernels lazily)
    timed_fit(dev, X[:2000], n_components=64, solver="adam", max_iter=1, batch_size=256)
    for penalty in ("kl", "l1", "topk"):
        extra = {"aux_k": 8, "dead_window": 2000, "k": 5} if penalty == "topk" else {}
        sae, secs = timed_fit(dev, X, n_components=64, penalty=penalty, solver="adam",
                              max_iter=5, batch_size=256, learning_rate=3e-3, **extra)
        h = sae.history_
        nnz = float((sae.transform(X) > 0).sum(1).max())
        ok = h[-1]["loss"] < h[0]["loss"] and (penalty != "topk" or nnz <= 5)
        report(f"adam {penalty} on cuda", ok, first=h[0]["loss"], last=h[-1]["loss"],
               seconds=secs, max_active=nnz)

    # 5. throughput: a large model, device against host, same code
    rng = np.random.default_rng(0)
    big = rng.uniform(0.0, 1.0, size=(rows, 784)).astype(np.float32)
    for solver, extra in (("adam", {"batch_size": 4096, "max_iter": 2}),
                          ("lbfgs", {"max_iter": 20})):
        row = {}
        for device in (dev, "cpu"):
            n = big if device == dev else big[: rows // 10]  # the host gets a tenth
            timed_fit(device, n[:2000], n_components=1024, solver=solver,
                      **{**extra, "max_iter": 1})
            sae, secs = timed_fit(device, n, n_components=1024, solver=solver, **extra)
            row[device] = len(n) * sae.n_iter_ / secs  # example-passes per second
        report(f"{solver} 784-1024-784 throughput (example passes/s)", True,
               cuda=row[dev], cpu=row["cpu"], speedup=row[dev] / row["cpu"])

    scale_checks(dev, args.dry_run)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2) + "\n")
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and not v["ok"]]
    print(f"{len(failed)} check(s) failed" + (f": {failed}" if failed else ""))


if __name__ == "__main__":
    main()

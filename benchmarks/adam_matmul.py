"""Adam throughput of saeflow against the same matrix products alone, on this device.

One Adam step of an n-s-n sigmoid/KL autoencoder on a mini-batch X (b, n) costs five
matrix products; everything else (sigmoids, the KL term, Adam's update, the batch
gather) is elementwise work on arrays no larger than their outputs:

    forward   A = X W1^T          (b, n) x (n, s)
              X_hat = A W2^T      (b, s) x (s, n)
    backward  dW2 = delta3^T A    (n, b) x (b, s)
              delta2 = delta3 W2  (b, n) x (n, s)
              dW1 = delta2^T X    (s, b) x (b, n)

(no gradient with respect to the input is needed). The limit is those five ``torch.mm``
calls in a loop over preallocated tensors of the same dtype and precision, nothing else,
converted to examples per second (b per loop). saeflow's rate: ``SparseAutoencoder(s,
solver="adam", batch_size=b, max_iter=E, device=...)`` fitted on random X (uniform in
[0, 1], float32) in one process: after a warm-up fit on a few batches, a fit of E = 1 epoch
and one of E = 1 + ``--epochs`` epochs; the difference of their times is ``--epochs``
epochs of steady-state training (set-up, validation and the first epoch cancel), and
rows * epochs / difference is the rate. Ratio = saeflow / matmul alone.

Cases: on the CPU, 784-1024-784 at batch 256 (float32; target ratio >= 0.80). Where CUDA
is present also 784-4096-784 at batch 8192 on the GPU in float32 (saeflow's default
precision: no ``precision`` argument passed), ``precision="tf32"`` and
``precision="bf16"`` (target >= 0.50; the limit then runs in TF32 or on bfloat16
tensors). A precision that saeflow does not accept (TypeError or ValueError) is recorded
as "unsupported". Without CUDA the GPU cases are recorded as skipped, with the reason.

saeflow and the limit each run in a fresh process, alternating, ``--repeats`` times; the
best rate of each counts. ``--quick``: one round. ``--threads N`` sets torch's CPU
threads in both (default: torch's own choice, one per core). Run it on an idle machine:
with another process on one of two cores, two-thread BLAS calls run 4-6x slower and the
numbers mean little (the load averages before and after are recorded). On 2 idle cores
the default takes about 1.5 minutes.

    python benchmarks/adam_matmul.py [--repeats 2] [--epochs 2] [--cpu-rows 65536]
                                     [--cuda-rows 1048576] [--threads N] [--quick]
                                     [--out benchmarks/results]
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

N = 784
# (device, hidden units s, batch b, precision, target ratio)
CASES = (
    ("cpu", 1024, 256, "float32", 0.80),
    ("cuda", 4096, 8192, "float32", 0.50),
    ("cuda", 4096, 8192, "tf32", 0.50),
    ("cuda", 4096, 8192, "bf16", 0.50),
)
MATMUL_SECONDS = 2.0  # length of one timed stretch of the matmul loop


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker_saeflow(device: str, s: int, b: int, precision: str, rows: int,
                   epochs: int) -> dict:
    import numpy as np
    import torch

    from sae_core import SparseAutoencoder

    X = np.random.default_rng(0).random((rows, N), dtype=np.float32)
    kw = dict(solver="adam", batch_size=b, random_state=0, device=device)
    if precision != "float32":  # the default needs no option: works before it exists
        kw["precision"] = precision

    def timed_fit(data, max_iter: int) -> tuple[float, SparseAutoencoder]:
        sae = SparseAutoencoder(s, max_iter=max_iter, **kw)
        sync(device)
        start = time.perf_counter()
        sae.fit(data)
        sync(device)
        return time.perf_counter() - start, sae

    try:  # warm-up: kernels, CUDA context, thread pools
        timed_fit(X[: 4 * b], 1)
    except (TypeError, ValueError) as exc:
        if precision == "float32":
            raise
        return {"unsupported": f"{type(exc).__name__}: {exc}"}
    t1, _ = timed_fit(X, 1)
    tk, sae = timed_fit(X, 1 + epochs)
    return {
        "examples_per_s": rows * epochs / (tk - t1),
        "seconds_1_epoch": t1,
        f"seconds_{1 + epochs}_epochs": tk,
        "rows": rows,
        "timed_epochs": epochs,
        "final_loss": sae.history_[-1]["loss"],
        "threads": torch.get_num_threads(),
    }


def worker_matmul(device: str, s: int, b: int, precision: str) -> dict:
    import torch

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device=device, dtype=dtype)

    X, D3 = rand(b, N), rand(b, N)
    W1, W2 = rand(s, N) * 0.01, rand(N, s) * 0.01
    A, X_hat, D2 = rand(b, s), rand(b, N), rand(b, s)
    dW1, dW2 = rand(s, N), rand(N, s)

    def steps(k: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(k):
            torch.mm(X, W1.t(), out=A)
            torch.mm(A, W2.t(), out=X_hat)
            torch.mm(D3.t(), A, out=dW2)
            torch.mm(D3, W2, out=D2)
            torch.mm(D2.t(), X, out=dW1)
        sync(device)
        return time.perf_counter() - start

    steps(5)  # warm-up
    k = max(10, round(10 * MATMUL_SECONDS / steps(10)))
    best = min(steps(k) for _ in range(3))
    return {"examples_per_s": b * k / best, "steps": k, "seconds": best,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def run_worker(*args: str, threads: int = 0) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--worker", *args],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(device: str, s: int, b: int, precision: str, target: float, rows: int,
             args: argparse.Namespace) -> dict:
    case = {"name": f"{device} {N}-{s}-{N}, batch {b}, {precision}", "device": device,
            "n": N, "s": s, "batch": b, "precision": precision, "target": target}
    shape = (device, str(s), str(b), precision)
    sae_runs, mm_runs = [], []
    for _ in range(args.repeats):
        sae_runs.append(run_worker("saeflow", *shape, str(rows), str(args.epochs),
                                   threads=args.threads))
        if "unsupported" in sae_runs[-1]:
            return {**case, "unsupported": sae_runs[-1]["unsupported"]}
        mm_runs.append(run_worker("matmul", *shape, threads=args.threads))
    sae = max(sae_runs, key=lambda r: r["examples_per_s"])
    mm = max(mm_runs, key=lambda r: r["examples_per_s"])
    ratio = sae["examples_per_s"] / mm["examples_per_s"]
    return {
        **case,
        "saeflow": {**sae, "all_examples_per_s": [r["examples_per_s"] for r in sae_runs]},
        "matmul": {**mm, "all_examples_per_s": [r["examples_per_s"] for r in mm_runs]},
        "ratio": ratio,
        "passed": ratio >= target,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after the first)")
    ap.add_argument("--cpu-rows", type=int, default=65_536)
    ap.add_argument("--cuda-rows", type=int, default=1_048_576)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        kind, device, s, b, precision, *rest = args.worker
        if kind == "saeflow":
            res = worker_saeflow(device, int(s), int(b), precision, int(rest[0]), int(rest[1]))
        else:
            res = worker_matmul(device, int(s), int(b), precision)
        print(json.dumps(res))
        return 0

    from benchmarks.machine import machine_record

    machine = machine_record()
    load_before = os.getloadavg()
    print(f"machine: {machine['cpu_model']}, {machine['cores_usable']} usable CPUs, CUDA: "
          f"{machine['cuda_device'] or 'none'}; {args.repeats} alternating round(s), best "
          "rate counts", flush=True)
    cases = []
    for device, s, b, precision, target in CASES:
        if device == "cuda" and not machine["cuda_device"]:
            cases.append({"name": f"{device} {N}-{s}-{N}, batch {b}, {precision}",
                          "device": device, "s": s, "batch": b, "precision": precision,
                          "target": target,
                          "skipped": "no CUDA device: torch.cuda.is_available() is False"})
            continue
        rows = args.cpu_rows if device == "cpu" else args.cuda_rows
        cases.append(run_case(device, s, b, precision, target, rows, args))
        c = cases[-1]
        if "unsupported" in c:
            print(f"  {c['name']}: unsupported ({c['unsupported']})", flush=True)
        else:
            print(f"  {c['name']}: saeflow {c['saeflow']['examples_per_s']:,.0f} examples/s, "
                  f"matmul alone {c['matmul']['examples_per_s']:,.0f} examples/s, ratio "
                  f"{c['ratio']:.2f} (target >= {target:.2f}: "
                  f"{'pass' if c['passed'] else 'FAIL'})", flush=True)
    for c in cases:
        if "skipped" in c:
            print(f"  {c['name']}: skipped ({c['skipped']})")
    summary = {
        "task": "Adam (KL penalty) examples/s of saeflow against its five GEMMs alone",
        "repeats": args.repeats,
        "quick": args.quick,
        "timed_epochs": args.epochs,
        "machine": machine,
        # other work on the machine slows BLAS threads badly: the 1/5/15-minute load
        # averages before and after tell whether these numbers were measured alone
        "load_average_before_after": [*load_before, *os.getloadavg()],
        "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adam_matmul.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out / 'adam_matmul.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
solver="adam", batch_size=b, max_iter=1 + E, device=...)`` fitted on random X (uniform
in [0, 1], float32; ``--cpu-rows`` / ``--cuda-rows`` rows) in one process, each epoch
timed by a training callback; the first epoch warms up (kernels, buffers, thread pools)
and the fastest of the other E = ``--epochs`` counts, rows / its seconds. The limit is
timed the same way: after a warm-up, the fastest of E stretches of rows / b loops. Both
sides thus take the best of E equal stretches of work: on a shared machine, where a
neighbour's burst slows a stretch by 20-30%, the best stretch is the machine's own rate
for either. Ratio = saeflow / matmul alone.

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

    python benchmarks/adam_matmul.py [--repeats 2] [--epochs 4] [--cpu-rows 32768]
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


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker_saeflow(device: str, s: int, b: int, precision: str, rows: int,
                   epochs: int) -> dict:
    import numpy as np
    import torch

    from sae_core import SparseAutoencoder
    from sae_core.train import Callback

    X = np.random.default_rng(0).random((rows, N), dtype=np.float32)
    kw = dict(solver="adam", batch_size=b, random_state=0, device=device)
    if precision != "float32":  # the default needs no option: works before it exists
        kw["precision"] = precision

    class EpochClock(Callback):
        """Wall-clock time at the start of the fit and at the end of every epoch (the
        trainer reads the epoch's loss sums there, so the device has finished it)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_fit_start(self, trainer) -> None:
            self.times.append(time.perf_counter())

        def on_iteration_end(self, trainer) -> None:
            self.times.append(time.perf_counter())

    clock = EpochClock()
    sae = SparseAutoencoder(s, max_iter=1 + epochs, callbacks=[clock], **kw)
    try:
        sae.fit(X)
    except (TypeError, ValueError) as exc:
        if precision == "float32":
            raise
        return {"unsupported": f"{type(exc).__name__}: {exc}"}
    seconds = np.diff(clock.times)[1:]  # epoch 1 is the warm-up
    return {
        "examples_per_s": rows / float(seconds.min()),
        "epoch_seconds": [round(float(t), 4) for t in seconds],
        "rows": rows,
        "timed_epochs": epochs,
        "final_loss": sae.history_[-1]["loss"],
        "threads": torch.get_num_threads(),
    }


def worker_matmul(device: str, s: int, b: int, precision: str, rows: int,
                  epochs: int) -> dict:
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

    k = -(-rows // b)  # the steps of one of saeflow's epochs
    steps(k)  # warm-up, as saeflow's first epoch
    seconds = [steps(k) for _ in range(epochs)]
    return {"examples_per_s": b * k / min(seconds), "steps": k,
            "stretch_seconds": [round(t, 4) for t in seconds],
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
        mm_runs.append(run_worker("matmul", *shape, str(rows), str(args.epochs),
                                  threads=args.threads))
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
    ap.add_argument("--epochs", type=int, default=4,
                    help="timed epochs / stretches after the warm-up; the fastest counts")
    ap.add_argument("--cpu-rows", type=int, default=32_768)
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
            res = worker_matmul(device, int(s), int(b), precision, int(rest[0]), int(rest[1]))
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

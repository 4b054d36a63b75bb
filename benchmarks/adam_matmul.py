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

The matrix products are not all an Adam step must do. A third worker, the **floor**,
times the work no implementation of this model's Adam step can leave out, on
preallocated tensors in a bare loop: the gather of b random rows (``index_select``),
the five products, the elementwise passes of the maths (the two sigmoids, X_hat - X,
the two sigmoid derivatives, the column sums of A, delta3 and delta2 that give rho_hat
and the bias gradients) and torch's fused Adam update over all 2 s n + s + n
parameters. Left out of it, though the model needs them: adding the biases, the weight
decay and the loss's value. floor / matmul is thus an upper bound on the ratio any
implementation built on torch's kernels can reach on this machine ("ceiling"), and
saeflow / floor what saeflow's own code costs on top of that work.

Cases: on the CPU, 784-1024-784 at batch 256 (float32; target ratio >= 0.80). Where CUDA
is present also 784-4096-784 at batch 8192 on the GPU in float32 (saeflow's default
precision: no ``precision`` argument passed), ``precision="tf32"`` and
``precision="bf16"`` (target >= 0.50; the limit then runs in TF32 or on bfloat16
tensors). A precision that saeflow does not accept (TypeError or ValueError) is recorded
as "unsupported". Without CUDA the GPU cases are recorded as skipped, with the reason.

saeflow, the limit and the floor each run in a fresh process, in turn, ``--repeats``
times; the best rate of each counts. ``--quick``: one round. ``--threads N`` sets torch's
CPU threads in all three (default: torch's own choice, one per core). Run it on an idle machine:
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


def bare_setup(device: str, precision: str):
    """(dtype, rand) for the bare loops: the compute dtype of ``precision`` (TF32 set on
    or off for CUDA matmuls) and a seeded maker of uniform tensors on the device, in that
    dtype unless told another."""
    import torch

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device=device, dtype=dt)

    return dtype, rand


def best_stretch(steps, b: int, rows: int, epochs: int, dtype) -> dict:
    """Time ``steps(k)``, one epoch's k = rows / b steps of a bare loop: a warm-up stretch,
    as saeflow's first epoch, then the fastest of ``epochs`` stretches counts."""
    import torch

    k = rows // b  # whole batches (--cpu-rows and --cuda-rows are multiples of b)
    steps(k)
    seconds = [steps(k) for _ in range(epochs)]
    return {"examples_per_s": b * k / min(seconds), "steps": k,
            "stretch_seconds": [round(t, 4) for t in seconds],
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def worker_matmul(device: str, s: int, b: int, precision: str, rows: int,
                  epochs: int) -> dict:
    import torch

    dtype, rand = bare_setup(device, precision)
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

    return best_stretch(steps, b, rows, epochs, dtype)


def worker_floor(device: str, s: int, b: int, precision: str, rows: int,
                 epochs: int) -> dict:
    import torch

    dtype, rand = bare_setup(device, precision)
    data = rand(rows, N)
    W1, W2 = rand(s, N) * 0.01, rand(N, s) * 0.01
    X, A, X_hat, D3, D2 = rand(b, N), rand(b, s), rand(b, N), rand(b, N), rand(b, s)
    dW1, dW2 = rand(s, N), rand(N, s)
    col_A, col_D3, col_D2 = rand(s), rand(N), rand(s)
    # the parameters and Adam's moments are float32 whatever the compute dtype, as
    # saeflow's are; torch's public fused Adam, as saeflow calls it
    theta = (rand(2 * s * N + s + N, dt=torch.float32) * 0.01).requires_grad_(True)
    theta.grad = rand(theta.numel(), dt=torch.float32) * 1e-3
    adam = torch.optim.Adam([theta], lr=1e-3, fused=True)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(1)).to(device)
    sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input

    def steps(k: int) -> float:
        sync(device)
        start = time.perf_counter()
        for i in range(k):
            torch.index_select(data, 0, order[i * b : (i + 1) * b], out=X)
            torch.mm(X, W1.t(), out=A).sigmoid_()
            torch.sum(A, 0, out=col_A)
            torch.mm(A, W2.t(), out=X_hat).sigmoid_()
            torch.sub(X_hat, X, out=D3)
            sigmoid_backward(D3, X_hat, grad_input=D3)
            torch.mm(D3.t(), A, out=dW2)
            torch.sum(D3, 0, out=col_D3)
            torch.mm(D3, W2, out=D2)
            sigmoid_backward(D2, A, grad_input=D2)
            torch.mm(D2.t(), X, out=dW1)
            torch.sum(D2, 0, out=col_D2)
            adam.step()
        sync(device)
        return time.perf_counter() - start

    return best_stretch(steps, b, rows, epochs, dtype)


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
    shape = (device, str(s), str(b), precision, str(rows), str(args.epochs))
    runs: dict[str, list[dict]] = {"saeflow": [], "matmul": [], "floor": []}
    for _ in range(args.repeats):
        for kind, done in runs.items():
            done.append(run_worker(kind, *shape, threads=args.threads))
            if "unsupported" in done[-1]:
                return {**case, "unsupported": done[-1]["unsupported"]}
    best = {kind: max(done, key=lambda r: r["examples_per_s"]) for kind, done in runs.items()}
    rate = {kind: r["examples_per_s"] for kind, r in best.items()}
    ratio = rate["saeflow"] / rate["matmul"]
    return {
        **case,
        **{kind: {**best[kind], "all_examples_per_s": [r["examples_per_s"] for r in done]}
           for kind, done in runs.items()},
        "ratio": ratio,
        # each round's own saeflow / matmul: their spread is the machine's noise
        "round_ratios": [a["examples_per_s"] / m["examples_per_s"]
                         for a, m in zip(runs["saeflow"], runs["matmul"], strict=True)],
        "ceiling": rate["floor"] / rate["matmul"],
        "saeflow_vs_floor": rate["saeflow"] / rate["floor"],
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
    for flag, rows, b in (("--cpu-rows", args.cpu_rows, CASES[0][2]),
                          ("--cuda-rows", args.cuda_rows, CASES[1][2])):
        if rows <= 0 or rows % b:
            ap.error(f"{flag} {rows}: must be a positive multiple of the batch size {b}")
    if args.quick:
        args.repeats = 1
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        kind, device, s, b, precision, *rest = args.worker
        worker = {"saeflow": worker_saeflow, "matmul": worker_matmul,
                  "floor": worker_floor}[kind]
        res = worker(device, int(s), int(b), precision, int(rest[0]), int(rest[1]))
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
                  f"{'pass' if c['passed'] else 'FAIL'}; rounds "
                  + "/".join(f"{r:.2f}" for r in c["round_ratios"])
                  + f"); floor {c['floor']['examples_per_s']:,.0f} examples/s: ceiling "
                  f"{c['ceiling']:.2f}, saeflow / floor {c['saeflow_vs_floor']:.2f}",
                  flush=True)
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

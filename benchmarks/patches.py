"""Random patch sampling: saeflow against scikit-learn's route, and a plain copy.

Task: 1,000,000 random 8x8 patches of the ten built-in photographs, 1/f-whitened
(``load_natural_images`` + ``whiten_1f``), one image per patch drawn at random
(``default_rng(0).integers(10, size=n)``: the same per-image counts for every contestant).

* sklearn: for each image ``extract_patches_2d(img, (8, 8), max_patches=k_i,
  random_state=i)``, then ``np.concatenate`` and reshape to (n, 64);
* saeflow: ``sample_random_patches(images, n, 8, seed=0)`` -> (n, 64) float32, once with
  one thread (``n_threads=1``) and once with its default (up to 4 threads);
* copy: ``np.copy`` of an (n, 64) float32 array, the lower limit for producing the output.

Two image dtypes: float64 (the whitened images as ``whiten_1f`` returns them; sklearn's
output is then float64, saeflow's float32) and float32 (images cast first: both outputs
float32, the same bytes to write).

Every measurement runs in a fresh process (alternating contestants, ``--repeats`` rounds).
In it: the first call is timed ("cold": a pipeline samples once per process, so the cost of
fresh memory pages counts), then two more calls, the best kept ("warm"). Before the first
call each process touches and frees 1 GiB and resets its peak-RSS counter (see
``warm_page_pool``), so that every contestant faults its pages in from the same state.
Peak memory of the first call: ``ru_maxrss`` after it minus ``ru_maxrss`` after set-up
(images loaded), and, separately, the tracemalloc peak of one more call (numpy reports its
buffers to tracemalloc, so this counts every array the call allocates, the output
included). Both are divided by the output's size. The best time of each contestant over
the rounds counts.

    python benchmarks/patches.py [--repeats 3] [--n 1000000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATCH = 8
SEED = 0
CONTESTANTS = ("sklearn", "saeflow-1thread", "saeflow", "copy")


def worker(name: str, image_dtype: str, n: int) -> dict:
    import gc
    import resource
    import tracemalloc

    import numpy as np
    from sklearn.feature_extraction.image import extract_patches_2d

    from sae_core.data import load_natural_images
    from sae_core.patches import sample_random_patches, whiten_1f

    images = [whiten_1f(img).astype(image_dtype) for img in load_natural_images()]
    counts = np.bincount(
        np.random.default_rng(SEED).integers(len(images), size=n), minlength=len(images)
    )

    if name == "sklearn":

        def run():
            parts = [
                extract_patches_2d(img, (PATCH, PATCH), max_patches=int(k), random_state=i)
                for i, (img, k) in enumerate(zip(images, counts, strict=True))
            ]
            return np.concatenate(parts).reshape(n, PATCH * PATCH)

    elif name.startswith("saeflow"):
        threads = 1 if name == "saeflow-1thread" else None

        def run():
            return sample_random_patches(images, n, PATCH, SEED, n_threads=threads)

    else:
        src = np.ones((n, PATCH * PATCH), dtype=np.float32)

        def run():
            return np.copy(src)

    gc.collect()
    pool_warmed = warm_page_pool()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run()
    cold = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shape, dtype, nbytes = out.shape, str(out.dtype), out.nbytes
    if name.startswith("saeflow"):  # same patches as the exercise's sampler (spot check)
        from sae_core.patches import sample_patches

        ref = sample_patches([img.astype(np.float64) for img in images], 1000, PATCH, SEED)
        small = sample_random_patches(images, 1000, PATCH, SEED, n_threads=threads)
        assert np.array_equal(small, ref.astype(np.float32))
    del out
    warm = []
    for _ in range(2):
        gc.collect()
        t0 = time.perf_counter()
        out = run()
        warm.append(time.perf_counter() - t0)
        del out
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    out = run()
    traced_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return {
        "contestant": name,
        "image_dtype": image_dtype,
        "page_pool_warmed": pool_warmed,
        "cold_s": cold,
        "warm_s": min(warm),
        "rss_peak_extra_bytes": (rss1 - rss0) * 1024,  # ru_maxrss is in KiB on Linux
        "tracemalloc_peak_bytes": traced_peak,
        "out_shape": list(shape),
        "out_dtype": dtype,
        "out_nbytes": nbytes,
    }


def warm_page_pool() -> bool:
    """Touch and free 1 GiB, then reset the peak-RSS counters (/proc/self/clear_refs "5").

    numpy asks for transparent huge pages for large arrays; where the kernel must first
    compact memory to find them ('defrag = madvise'), the first large allocations of a
    process can stall for a time that depends on what ran before. Freeing 1 GiB of huge
    pages first gives every contestant the same start. Returns False (and does nothing)
    where the peak counters cannot be reset, so that ru_maxrss stays meaningful."""
    import numpy as np

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    scratch = np.ones(1 << 30, dtype=np.uint8)
    del scratch
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return True


def run_worker(name: str, image_dtype: str, n: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--images", image_dtype, "--n", str(n)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", choices=CONTESTANTS)
    ap.add_argument("--images", default="float64", choices=("float64", "float32"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.images, args.n)))
        return 0

    import numpy as np
    import sklearn

    runs = []
    for image_dtype in ("float64", "float32"):
        for r in range(args.repeats):
            for name in CONTESTANTS:
                res = run_worker(name, image_dtype, args.n)
                res["round"] = r
                runs.append(res)
                print(
                    f"  [{image_dtype} images, round {r}] {name:16s} cold {res['cold_s']:.3f} s"
                    f"  warm {res['warm_s']:.3f} s", flush=True,
                )
    summary: dict = {}
    for image_dtype in ("float64", "float32"):
        rows = {}
        for name in CONTESTANTS:
            mine = [x for x in runs if x["contestant"] == name and x["image_dtype"] == image_dtype]
            out_bytes = mine[0]["out_nbytes"]
            rows[name] = {
                "best_cold_s": min(x["cold_s"] for x in mine),
                "best_warm_s": min(x["warm_s"] for x in mine),
                "out_dtype": mine[0]["out_dtype"],
                "out_mb": out_bytes / 2**20,
                "rss_peak_extra_over_out": max(x["rss_peak_extra_bytes"] for x in mine) / out_bytes,
                "tracemalloc_peak_over_out": max(x["tracemalloc_peak_bytes"] for x in mine)
                / out_bytes,
            }
        ratios = {}
        for sf in ("saeflow-1thread", "saeflow"):
            for kind in ("cold", "warm"):
                key = f"best_{kind}_s"
                ratios[f"sklearn/{sf} ({kind})"] = rows["sklearn"][key] / rows[sf][key]
                ratios[f"{sf}/copy ({kind})"] = rows[sf][key] / rows["copy"][key]
        summary[image_dtype] = {"contestants": rows, "ratios": ratios}

    print(f"\n{args.n:,} random {PATCH}x{PATCH} patches, best of {args.repeats} fresh processes")
    for image_dtype, s in summary.items():
        print(f"\nimages {image_dtype}:")
        print(f"  {'':16s} {'cold s':>8s} {'warm s':>8s} {'out':>14s} "
              f"{'rss peak/out':>13s} {'traced peak/out':>16s}")
        for name, row in s["contestants"].items():
            print(
                f"  {name:16s} {row['best_cold_s']:8.3f} {row['best_warm_s']:8.3f} "
                f"{row['out_mb']:7.0f} MB {row['out_dtype'][:7]:>4s} "
                f"{row['rss_peak_extra_over_out']:13.2f} {row['tracemalloc_peak_over_out']:16.2f}"
            )
        for k, v in s["ratios"].items():
            print(f"  {k:34s} {v:6.2f}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": f"{args.n} random {PATCH}x{PATCH} patches of the 10 built-in photos, whitened",
        "repeats": args.repeats,
        "machine": {
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
        },
        "memory_note": "rss: ru_maxrss after the first call minus after set-up; traced: "
        "tracemalloc peak of one call (numpy buffers); both over the output's bytes",
        "summary": summary,
        "runs": runs,
    }
    (out_dir / "patches.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {out_dir / 'patches.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

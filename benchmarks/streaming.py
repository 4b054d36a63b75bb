"""Training streamed from the memory-mapped patch store against training from memory, on
10 million 8x8x3 patches, and the patch store written with bounded memory.

Protocol, in one run:

1. a folder of 40 colour PNG images (512x512x3, made from the ten built-in photographs:
   each channel the photograph shifted by a few pixels, so the channels correlate as in
   real colour images), read by ``saeflow ingest`` (an ``image_folder`` source);
2. ``saeflow patches`` cuts ``--n`` random 8x8x3 patches (1/f whitening per channel,
   UFLDL normalisation, no held-out split) into the patch store: wall time and peak RSS
   (``/usr/bin/time``), against the store's size;
3. one Adam epoch of a 192-``--hidden``-192 KL sparse autoencoder (batch ``--batch``)
   over every training patch, each in a fresh process: ``loader="stream"`` (batches
   gathered from the mapped file by the prefetching loader, pages released as it goes)
   and ``loader="memory"`` (the store's values used in place as one tensor, so every page
   stays resident once read, as a float32 array in RAM would). Both read the store from
   the page cache (it was just written). Timed: the fit alone (examples/s); peak RSS of
   the process (``ru_maxrss``).

Targets (issue 14, CPU): streamed peak RSS under 2 GB; streamed throughput at least 70%
of in-memory (80% on a GPU). Writes ``benchmarks/results/streaming.json``.

    python benchmarks/streaming.py [--n 10000000] [--hidden 256] [--batch 1024]
        [--workdir DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_IMAGES = 40
SHIFTS = ((0, 0), (1, 2), (3, 1))  # per-channel offsets of the photograph, pixels


def make_images(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    from sae_core.data import load_natural_images

    folder.mkdir(parents=True, exist_ok=True)
    photos = load_natural_images()
    for i in range(N_IMAGES):
        img = photos[i % len(photos)]
        img = np.rot90(img, k=i // len(photos))
        lo, hi = float(img.min()), float(img.max())
        grey = (img - lo) / (hi - lo)
        rgb = np.stack([np.roll(grey, (dy + i % 3, dx), axis=(0, 1)) for dy, dx in SHIFTS], -1)
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(folder / f"img{i:03d}.png")


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of cmd under /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss * 1024, proc.stdout


def worker(store: str, loader: str, hidden: int, batch: int) -> None:
    import resource

    from sae_core import SparseAutoencoder
    from sae_core.patch_store import read_patch_store

    rows = read_patch_store(store).rows("train")
    sae = SparseAutoencoder(hidden, solver="adam", batch_size=batch, max_iter=1,
                            loader=loader, device="cpu", random_state=0)
    start = time.perf_counter()
    sae.fit(rows)
    seconds = time.perf_counter() - start
    m = rows.shape[0]
    print(json.dumps({"loader": loader, "examples": m, "seconds": seconds,
                      "examples_per_s": m / seconds, "loss": sae.history_[-1]["loss"],
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      * 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--workdir", default=None, help="where the images and the store go "
                    "(default: a temporary folder, removed afterwards)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", nargs=2, metavar=("STORE", "LOADER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.hidden, args.batch)
        return 0

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="saeflow-streaming-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAEFLOW_TRACKING": "off"}
    saeflow = [sys.executable, "-m", "flows.cli"]
    try:
        make_images(work / "images")
        (work / "params.yaml").write_text(
            "ingest:\n  sources:\n    - {type: image_folder, path: images}\n"
            "  labeled_sources:\n    - {type: builtin_digits}\n"
            f"patches:\n  patch_size: 8\n  n_patches: {args.n}\n  whitening: 1f\n"
            "  normalisation: ufldl\n  heldout_fraction: 0.0\n  seed: 0\n")
        data = ["--images", "images.parquet", "--images-manifest", "images.json"]
        subprocess.run([*saeflow, "ingest", "--params", "params.yaml", *data,
                        "--labeled", "labeled.parquet", "--labeled-manifest", "labeled.json"],
                       cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        wall, rss, _ = timed([*saeflow, "patches", "--params", "params.yaml",
                              "--images", "images.parquet", "--patches", "patches.arrow",
                              "--transform", "transform.safetensors"], work, env)
        store_bytes = (work / "patches.arrow").stat().st_size
        write = {"seconds": wall, "peak_rss_bytes": rss, "store_bytes": store_bytes,
                 "patches_per_s": args.n / wall}
        print(f"saeflow patches: {args.n:,} patches, {store_bytes / 2**30:.2f} GiB store, "
              f"{wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        runs = {}
        for loader in ("stream", "memory"):
            _, _, out = timed([sys.executable, __file__, "--hidden", str(args.hidden),
                               "--batch", str(args.batch), "--worker",
                               str(work / "patches.arrow"), loader], work, env)
            runs[loader] = json.loads(out.strip().splitlines()[-1])
            r = runs[loader]
            print(f"{loader:6s}: {r['examples_per_s']:,.0f} examples/s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, loss {r['loss']:.6f}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = runs["stream"]["examples_per_s"] / runs["memory"]["examples_per_s"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "device": "cpu"},
        "n_patches": args.n, "model": f"192-{args.hidden}-192 kl, Adam batch {args.batch}",
        "write": write,
        "streamed": runs["stream"], "in_memory": runs["memory"],
        "throughput_ratio": ratio,
        "same_loss": runs["stream"]["loss"] == runs["memory"]["loss"],
        "targets": {"streamed_peak_rss_bytes_below": 2 * 10**9, "throughput_ratio_min": 0.70},
    }
    print(f"streamed / in-memory throughput {ratio:.2f} (target >= 0.70); streamed peak "
          f"RSS {runs['stream']['peak_rss_bytes'] / 1e9:.2f} GB (target < 2 GB); same loss: "
          f"{result['same_loss']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dead latents, FVU and L0 per penalty, before and after the L1/TopK start of issue 15.

Before: the exercise's start for every penalty (``init="uniform"``: W1 and W2 independent
and uniform, ``pre_bias="zero"``: b2 = 0). After: the library's defaults, which for L1 and
TopK are Gao et al.'s start (``init="tied"``: W1 = W2^T with unit-norm columns;
``pre_bias="mean"``: b2, subtracted before encoding, at the training data's mean), and no
weight decay on their encoder. KL (Ng's model) is unchanged by design: one run, shown on
both sides.

Cases, on the natural-image exercise (natural_patches(10_000, 8, seed=0), 25 latents)
and at width (natural_patches(200_000, 8, seed=0), 64 -> 256 latents, k = 8, Adam, batch
1024, 5 epochs: the setting of issue 15's comparison with ``overcomplete``):

    kl          KL, rho 0.01, beta 3, L-BFGS 400 (the exercise)
    l1          L1 at l1_coefficient 0.15 (L0 close to KL's L0 > rho), L-BFGS 400
    topk_lbfgs  TopK k = 5, L-BFGS 400
    topk_adam   TopK k = 5, Adam + AuxK (aux_k 12, dead_window 20,000), 30 epochs
    topk_width  TopK 256 latents, k = 8, Adam, batch 1024, 5 epochs

Statistics (:func:`sae_core.stats.sparsity_stats`, on the training patches): dead =
units that never exceed 1e-3; FVU = SSE / SST over the whole set; L0 = mean number of
units above 1e-3 per example. For KL, whose sigmoid units are never exactly 0, L0 is
also given with the threshold rho = 0.01 ("L0 > rho"): the mean number of units above
their target activation, the figure L1's L0 is compared with.

Targets (issue 15): topk_adam at most 2 dead and FVU no worse than KL's; l1 at most 2
dead; topk_width at most 10% dead (25 of 256) and FVU below 0.22.

``RECORDED_HEAD`` holds the same cases measured once with the code of commit 55424cc
(before this change: the exercise's start and, for L1/TopK, weight decay on W1, which no
setting selects any more); they are printed beside the rest.

    python benchmarks/penalties.py [--quick] [--only CASE[,CASE]] [--out benchmarks/results]

Writes penalties.json and penalties.md under --out. About 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_record  # noqa: E402

BEFORE = {"init": "uniform", "pre_bias": "zero"}
EXERCISE = "exercise"
WIDTH = "width"

# key: (title, data, settings, quick overrides)
CASES = {
    "kl": ("KL (rho 0.01, beta 3), L-BFGS", EXERCISE, {"penalty": "kl"}, {"max_iter": 100}),
    "l1": ("L1 (0.15), L-BFGS", EXERCISE, {"penalty": "l1", "l1_coefficient": 0.15},
           {"max_iter": 100}),
    "topk_lbfgs": ("TopK k=5, L-BFGS", EXERCISE, {"penalty": "topk", "k": 5},
                   {"max_iter": 100}),
    "topk_adam": ("TopK k=5, Adam + AuxK", EXERCISE,
                  {"penalty": "topk", "k": 5, "solver": "adam", "max_iter": 30,
                   "aux_k": 12, "dead_window": 20_000}, {"max_iter": 10}),
    "topk_width": ("TopK 64-256, k=8, Adam, batch 1024, 5 epochs", WIDTH,
                   {"n_components": 256, "penalty": "topk", "k": 8, "solver": "adam",
                    "batch_size": 1024, "max_iter": 5}, {"max_iter": 2}),
}

RECORDED_HEAD: dict[str, dict] = {
    "kl": {"dead": 0, "n_components": 25, "fvu": 0.6638344822074977, "l0": 23.1603,
           "l0_above_rho": 2.9042},
    "l1": {"dead": 16, "n_components": 25, "fvu": 0.6752061921336713, "l0": 1.4323},
    "topk_lbfgs": {"dead": 14, "n_components": 25, "fvu": 0.595625175277361, "l0": 4.9947},
    "topk_adam": {"dead": 8, "n_components": 25, "fvu": 0.7174356683785101, "l0": 5.0},
    "topk_width": {"dead": 206, "n_components": 256, "fvu": 0.554162066119494, "l0": 8.0},
}
"""The cases measured once with commit 55424cc's code (``git archive 55424cc sae_core``
first on the path, the same settings and statistics): the code before this change."""


def data(kind: str, quick: bool):
    from sae_core.patches import natural_patches

    if kind == EXERCISE:
        return natural_patches(10_000, 8, seed=0)
    return natural_patches(50_000 if quick else 200_000, 8, seed=0)


def measure(X, settings: dict) -> dict:
    from sae_core import SparseAutoencoder
    from sae_core.stats import sparsity_stats

    kw = {"n_components": 25, "device": "cpu", **settings}
    start = time.perf_counter()
    sae = SparseAutoencoder(**kw).fit(X)
    seconds = time.perf_counter() - start
    st = sparsity_stats(sae, X)
    out = {"dead": st.dead_units, "n_components": kw["n_components"], "fvu": st.fvu,
           "l0": st.l0_mean, "seconds": seconds, "iterations": sae.n_iter_}
    if kw.get("penalty", "kl") == "kl":
        out["l0_above_rho"] = sparsity_stats(sae, X, fire_threshold=sae.rho).l0_mean
    return out


def targets(cases: dict) -> dict:
    """{case: (text, passed)} for the targets of issue 15 that these cases carry."""
    out = {}
    kl = cases.get("kl", {}).get("after")
    if "topk_adam" in cases:
        a = cases["topk_adam"]["after"]
        ok = a["dead"] <= 2 and (kl is None or a["fvu"] <= kl["fvu"])
        out["topk_adam"] = ("<= 2 dead, FVU <= KL's", ok)
    if "l1" in cases:
        a = cases["l1"]["after"]
        out["l1"] = ("<= 2 dead, L0 near KL's L0 > rho", a["dead"] <= 2)
    if "topk_width" in cases:
        a = cases["topk_width"]["after"]
        ok = a["dead"] <= 0.10 * a["n_components"] and a["fvu"] < 0.22
        out["topk_width"] = ("<= 10% dead, FVU < 0.22", ok)
    return out


def fmt(r: dict | None) -> str:
    if not r:
        return "-"
    text = f"{r['dead']}/{r['n_components']} dead, FVU {r['fvu']:.3f}, L0 {r['l0']:.2f}"
    if "l0_above_rho" in r:
        text += f" (L0 > rho {r['l0_above_rho']:.2f})"
    return text


def table(record: dict) -> str:
    lines = ["| case | before (init uniform, b2 0) | after (defaults) | at 55424cc "
             "(recorded) | target | result |", "|---|---|---|---|---|---|"]
    for c in record["cases"].values():
        target, ok = c.get("target") or ("", None)
        result = "-" if ok is None else ("pass" if ok else "FAIL")
        lines.append(f"| {c['title']} | {fmt(c['before'])} | {fmt(c['after'])} | "
                     f"{fmt(c.get('recorded_head'))} | {target} | {result} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer iterations and 50,000 patches at width (targets not checked)")
    ap.add_argument("--only", default="", help="comma-separated cases: " + ", ".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    keys = [k for k in args.only.split(",") if k] or list(CASES)
    unknown = sorted(set(keys) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")

    import torch

    torch.manual_seed(0)
    arrays = {}
    cases = {}
    for key in keys:
        title, kind, settings, quick = CASES[key]
        settings = {**settings, **(quick if args.quick else {})}
        if kind not in arrays:
            arrays[kind] = data(kind, args.quick)
        X = arrays[kind]
        after = measure(X, settings)
        # KL has one start (the exercise's): its "before" is the same run
        before = after if settings["penalty"] == "kl" else measure(X, {**settings, **BEFORE})
        cases[key] = {"title": title, "data": kind, "n_examples": int(X.shape[0]),
                      "settings": settings, "before": before, "after": after,
                      "recorded_head": None if args.quick else RECORDED_HEAD.get(key)}
        print(f"{key:11s} before: {fmt(before)} ({before['seconds']:.1f} s)\n"
              f"{'':11s} after:  {fmt(after)} ({after['seconds']:.1f} s)", flush=True)
    if not args.quick:
        for key, (text, ok) in targets(cases).items():
            cases[key]["target"] = [text, ok]
    record = {"quick": args.quick, "machine": machine_record(), "before_settings": BEFORE,
              "cases": cases}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "penalties.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    md = table(record)
    (out / "penalties.md").write_text(
        "# Dead latents per penalty, before and after (benchmarks/penalties.py)\n\n"
        + md + "\n")
    print("\n" + md)
    print(f"\nwrote {out / 'penalties.json'} and {out / 'penalties.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``saeflow`` command line.

Heavy libraries (torch, scikit-learn) are imported inside the commands, never at module
level, so ``saeflow --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(f"saeflow {version('saeflow')}")
    return 0


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    """Central-difference check of every penalty's gradient, in float64."""
    from sae_core.config import SAEConfig
    from sae_core.gradcheck import check_gradient
    from sae_core.patches import natural_patches

    X = natural_patches(args.samples, args.patch, seed=0)
    worst = 0.0
    for penalty in ("kl", "l1", "topk"):
        cfg = SAEConfig(n_components=args.hidden, penalty=penalty, dtype="float64",
                        k=max(1, args.hidden // 3), l1_coefficient=1e-2)
        paths = [("autograd", False)] + ([("fused", True)] if penalty == "kl" else [])
        for name, fused in paths:
            diff = check_gradient(cfg, X, fused=fused)
            worst = max(worst, diff)
            print(f"{penalty:5s} {name:9s} ||g_num - g|| / ||g_num + g|| = {diff:.3e}")
    ok = worst < 1e-9
    print("gradient check " + ("passed" if ok else "FAILED") + f" (worst {worst:.3e}, limit 1e-9)")
    return 0 if ok else 1


def _cmd_exercise(args: argparse.Namespace) -> int:
    """The UFLDL exercise end to end on the built-in natural images."""
    import time

    from sae_core import SparseAutoencoder
    from sae_core.io import write_json
    from sae_core.patches import natural_patches
    from sae_core.plots import save_filter_grid
    from sae_core.stats import sparsity_stats

    out = Path(args.out)
    if args.store:
        from sae_core.patch_store import read_patch_store

        store = read_patch_store(args.store)
        X = store.train
        side = store.patch_shape[0]
        print(f"training on {X.shape[0]} patches of {args.store}")
    else:
        side = 8
        print(f"sampling {args.patches} 8x8 patches from the built-in natural images ...")
        X = natural_patches(args.patches, 8, seed=args.seed)
    if len(store.patch_shape if args.store else (8, 8)) != 2 or X.shape[1] != side * side:
        raise ValueError(f"{args.store}: the exercise needs grayscale square patches")
    sae = SparseAutoencoder(25, rho=0.01, beta=3.0, weight_decay=1e-4, max_iter=args.iterations,
                            random_state=args.seed)
    start = time.perf_counter()
    sae.fit(X)
    seconds = time.perf_counter() - start
    last = sae.history_[-1]
    stats = sparsity_stats(sae, X)
    rho_hat = stats.rho_hat
    sae.save(out / "model")
    write_json(out / "sparsity.json", stats.metrics())
    save_filter_grid(out / "filters.png", sae.components_, (side, side),
                     title="25 filters learned on natural patches (rho 0.01, beta 3)")
    n = X.shape[1]
    print(f"trained {n}-25-{n} for {sae.n_iter_} L-BFGS iterations in {seconds:.2f} s")
    print(f"loss {last['loss']:.5f} = reconstruction {last['reconstruction']:.5f} "
          f"+ weight decay {last['weight_decay']:.5f} + sparsity {last['sparsity']:.5f}")
    m = stats.metrics()
    print(f"rho_hat per unit in [{rho_hat.min():.4f}, {rho_hat.max():.4f}] (target 0.01); "
          f"{100 * m['frac_units_near_target']:.0f}% of units within [rho/2, 2 rho]; "
          f"{m['dead_units']} dead; FVU {m['fvu']:.3f}")
    print(f"model:   {out / 'model'}\nfilters: {out / 'filters.png'}\n"
          f"metrics: {out / 'sparsity.json'}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    """params.yaml's ingest.sources -> one Parquet dataset and its JSON manifest."""
    from flows.params import load_params, section
    from sae_core.dataset import write_dataset
    from sae_core.sources import ingest

    cfg = section(load_params(args.params), "ingest", args.params)
    unknown = sorted(set(cfg) - {"sources"})
    if unknown:
        raise ValueError(f"{args.params}: unknown key(s) in ingest: {', '.join(unknown)}")
    root = Path(args.params).resolve().parent
    # everything is read and checked before anything is written
    images = ingest(cfg.get("sources") or [], root=root, data_dir=root / args.data_dir)
    manifest = write_dataset(args.out, args.manifest, images)
    shapes = ", ".join(f"{k} x{v}" for k, v in sorted(manifest.get("shapes", {}).items()))
    print(f"ingested {len(images)} images ({shapes}) -> {args.out}")
    if images.skipped:
        print(f"skipped {len(images.skipped)} non-image file(s); listed in {args.manifest}")
    return 0


def _cmd_patches(args: argparse.Namespace) -> int:
    """A dataset + params.yaml's patches section -> the patch store and the fitted transform."""
    from flows.params import load_params, section
    from sae_core.dataset import read_dataset
    from sae_core.io import sha256_file
    from sae_core.patch_store import write_patch_store
    from sae_core.patches import PatchConfig, make_patches

    config = PatchConfig.from_dict(section(load_params(args.params), "patches", args.params))
    images = read_dataset(args.dataset)
    # compute everything first: a bad setting or image writes nothing
    train, heldout, transform = make_patches(images.images, config)
    write_patch_store(args.out, train, heldout, config.to_dict(), sha256_file(args.dataset))
    transform.save(args.transform)
    print(f"{train.shape[0]} training and {heldout.shape[0]} held-out patches of "
          f"{train.shape[1]} values -> {args.out}; transform -> {args.transform}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeflow",
        description="Sparse-autoencoder feature-learning experiments.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("gradcheck", help="check every penalty's gradient by central differences")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--patch", type=int, default=4, help="patch side (inputs = patch**2)")
    p.add_argument("--hidden", type=int, default=6)
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("ingest", help="read the sources of params.yaml into a Parquet dataset")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument("--manifest", required=True, help="JSON manifest to write")
    p.add_argument("--data-dir", default="data", help="where downloads go (relative to params)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("patches", help="cut, whiten and normalise patches of a dataset")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dataset", required=True, help="Parquet dataset written by ingest")
    p.add_argument("--out", required=True, help="patch store (Arrow IPC) to write")
    p.add_argument("--transform", required=True, help="fitted transform (safetensors) to write")
    p.set_defaults(func=_cmd_patches)

    p = sub.add_parser("exercise", help="run the UFLDL sparse-autoencoder exercise")
    p.add_argument("--out", default="outputs/exercise", help="output folder")
    p.add_argument("--patches", type=int, default=10_000,
                   help="patches to sample from the built-in images (without --store)")
    p.add_argument("--store", help="train on this patch store (from `saeflow patches`)")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_exercise)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:
        if args.debug:
            raise
        print(f"saeflow: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        detail = " ".join(str(exc).split())
        print(f"saeflow: error: unexpected {type(exc).__name__}: {detail} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

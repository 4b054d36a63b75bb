"""scikit-learn's RBM-on-digits protocol: raw pixels, BernoulliRBM, dictionary learning and
saeflow's convolutional SAE features, on one split, in one run.

Protocol (SCIENCE.md; scikit-learn's "Restricted Boltzmann Machine features for digit
classification" example, with the default logistic-regression tolerance instead of its
``tol=1``, which stops at once and predicts one class):

* the 1,797 8x8 digits "nudged" to 8,985 (the original and 1-pixel shifts up, left, right,
  down), each pixel min-max scaled to [0, 1] across the set (``minmax_scale``), split
  ``train_test_split(test_size=0.2, random_state=0)``: 7,188 train, 1,797 test;
* every classifier is ``LogisticRegression(solver="newton-cg")`` (the example's solver,
  default tol 1e-4), C=100 on raw pixels and C=6000 on learned features;
* raw pixels: the 64 scaled pixels;
* BernoulliRBM(n_components=100, learning_rate=0.06, n_iter=10, random_state=0) on the
  training pixels, its hidden probabilities as features (the example's settings);
* MiniBatchDictionaryLearning(n_components=100, alpha=1.0, batch_size=256, max_iter=10
  epochs, fit_algorithm="lars", transform_algorithm="lasso_cd", transform_alpha=0.5,
  random_state=0) on the training pixels; the sparse codes standardised. Chosen from a small
  sweep on this split (lasso_lars/lasso_cd/omp codes, alpha 0.1-1, positive codes, 10-30
  epochs: 0.86-0.934); this is the best of it;
* saeflow (Coates, Lee & Ng 2011 style): a 16-100-16 KL sparse autoencoder (rho 0.01,
  beta 3, lambda 1e-4, L-BFGS 400 iterations) fitted on 20,000 random 4x4 patches of the
  *training* digits (no whitening, no normalisation: the scaled pixels are already in
  [0, 1]); its sigmoid activations at every position of each digit zero-padded by 2
  pixels (9x9 positions), sum-pooled over the four quadrants: 400 features, standardised.
  Run through :func:`sae_core.score.score`, which also gives the raw-pixel row (same split).

Second, the pipeline's default ``score`` stage: the exercise's natural-image SAE (64-25-64 KL,
rho 0.01, beta 3, lambda 1e-4, L-BFGS 400, on 10,000 8x8 patches of the 1/f-whitened
built-in photographs, PatchConfig defaults) scored with ``ScoreConfig()`` on the plain
(not nudged) digits, for split seeds 0-4: features vs raw pixels on each same split.

Also measured: the throughput of the convolutional encoding (FLOP/s of its matrix
products, 2 m d s for m patch positions) against torch float32 matmuls timed in the same
run: one of the encoding's own shape (m, d) @ (d, s) and a square 2048^3 one.

Threads: torch uses ``--threads`` (default 2, the cores of the reference machine);
numpy/scipy BLAS (scikit-learn's RBM, dictionary learning, logistic regression) is held to
1 thread with threadpoolctl: on 2 busy cores two BLAS threads fight (measured: RBM +
newton-cg logistic regression 2.0 s with 1 thread, 11.6 s with 2).

    python benchmarks/digits_protocol.py [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RAW_C, FEATURE_C, TEST_SIZE, SEED = 100.0, 6000.0, 0.2, 0


def example_data():
    """The example's own preprocessing (scipy convolve nudging + minmax_scale), to check
    that saeflow's nudge_images / per-pixel scaling give the same matrix."""
    import numpy as np
    from scipy.ndimage import convolve
    from sklearn import datasets
    from sklearn.preprocessing import minmax_scale

    X, y = datasets.load_digits(return_X_y=True)
    X = np.asarray(X, "float32")
    vectors = [
        [[0, 1, 0], [0, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [1, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 1], [0, 0, 0]],
        [[0, 0, 0], [0, 0, 0], [0, 1, 0]],
    ]

    def shift(x, w):
        return convolve(x.reshape((8, 8)), mode="constant", weights=w).ravel()

    X = np.concatenate([X] + [np.apply_along_axis(shift, 1, X, v) for v in vectors])
    return minmax_scale(X, feature_range=(0, 1)), np.concatenate([y] * 5)


def logistic(C):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(solver="newton-cg", C=C)


def fit_eval(name, make_features, clf, Xtr, ytr, Xte, yte):
    """Fit feature learner + classifier on train, score on test; seconds of the fit."""
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.perf_counter()
    Ftr, transform = make_features(Xtr)
    clf.fit(Ftr, ytr)
    seconds = time.perf_counter() - t0
    pred = clf.predict(transform(Xte))
    return {
        "method": name,
        "accuracy": float(accuracy_score(yte, pred)),
        "macro_f1": float(f1_score(yte, pred, average="macro")),
        "fit_seconds": seconds,
        "n_features": int(Ftr.shape[1]),
    }


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput(estimator, transform, images, pad, threads):
    """FLOP/s of conv_features' encoding vs torch float32 matmuls (best of 3 each)."""
    import numpy as np
    import torch

    from sae_core.features import conv_features

    kw = dict(transform=transform, stride=1, pool_grid=(2, 2), pool="sum", pad=pad)
    _, stats = conv_features(estimator, images, return_stats=True, **kw)
    seconds = best_of(lambda: conv_features(estimator, images, **kw))
    s, d = estimator.components_.shape
    m = int(stats.flops // (2 * d * s))
    gen = torch.Generator().manual_seed(0)
    A = torch.rand(m, d, generator=gen)
    B = torch.rand(d, s, generator=gen)
    same = best_of(lambda: A @ B)
    n = 2048
    P = torch.rand(n, n, generator=gen)
    Q = torch.rand(n, n, generator=gen)
    P @ Q  # warm-up
    square = best_of(lambda: P @ Q)
    return {
        "images": int(images.shape[0]),
        "positions_per_image": int(stats.grid[0] * stats.grid[1]),
        "patch_dim": int(d),
        "units": int(s),
        "flops": float(stats.flops),
        "conv_features_seconds": seconds,
        "conv_features_flops_per_second": stats.flops / seconds,
        "matmul_same_shape": f"({m}, {d}) @ ({d}, {s})",
        "matmul_same_shape_flops_per_second": 2.0 * m * d * s / same,
        "matmul_square_2048_flops_per_second": 2.0 * n**3 / square,
        "torch_threads": threads,
        "ratio_to_same_shape_matmul": (stats.flops / seconds) / (2.0 * m * d * s / same),
        "ratio_to_square_matmul": (stats.flops / seconds) / (2.0 * n**3 / square),
        "images_per_second": images.shape[0] / seconds,
        "check_finite": bool(np.isfinite(stats.flops)),
    }


def default_pipeline(images, labels, seeds=(0, 1, 2, 3, 4)):
    """ScoreConfig() with the default natural-image SAE, on each split seed."""
    import numpy as np

    from sae_core import SparseAutoencoder
    from sae_core.patches import PatchConfig, make_patches
    from sae_core.readers import read_builtin_natural
    from sae_core.score import ScoreConfig, score

    t0 = time.perf_counter()
    train, _, transform = make_patches(read_builtin_natural().images, PatchConfig())
    sae = SparseAutoencoder(25, rho=0.01, beta=3.0, weight_decay=1e-4, max_iter=400,
                            device="cpu", random_state=0).fit(train)
    sae_seconds = time.perf_counter() - t0
    runs = []
    for seed in seeds:
        config = ScoreConfig(random_state=seed)
        runs.append(score(sae, images, labels, config, transform=transform).metrics())
    acc = np.array([r["accuracy"] for r in runs])
    raw = np.array([r["raw_accuracy"] for r in runs])
    return {
        "score_config": ScoreConfig().to_dict(),
        "sae_seconds": sae_seconds,
        "split_seeds": list(seeds),
        "per_seed": runs,
        "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
        "raw_accuracy_mean": float(raw.mean()), "raw_accuracy_std": float(raw.std()),
        "features_win_on": int((acc > raw).sum()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (BLAS: 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import numpy as np
    import sklearn
    import torch
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import BernoulliRBM
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from sae_core import SparseAutoencoder
    from sae_core.patches import PatchConfig
    from sae_core.readers import read_builtin_digits
    from sae_core.score import ScoreConfig, nudge_images, scale_images, score

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        # the data, checked against the example's own preprocessing
        ds = read_builtin_digits()
        images, labels = np.stack(ds.images), ds.labels
        Xn, yn = nudge_images(images, labels)
        Xn = scale_images(Xn, "per_pixel")
        X, y = example_data()  # float32, the example's own arrays, for the sklearn peers
        assert np.array_equal(yn, y)
        data_diff = float(np.abs(Xn.reshape(len(Xn), -1) - X).max())
        assert data_diff < 1e-6, data_diff
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=TEST_SIZE, random_state=SEED)

        # saeflow (and the raw-pixel row, on the same split)
        config = ScoreConfig(
            nudge=True, scaling="per_pixel", test_size=TEST_SIZE, random_state=SEED,
            solver="newton-cg", C=FEATURE_C, raw_C=RAW_C, standardize=True,
            image_scale=1.0, whitening="none", pad=2, stride=1, pool_grid=(2, 2), pool="sum",
        )
        patch_config = PatchConfig(
            patch_size=4, n_patches=20_000, whitening="none", normalisation="none", seed=SEED
        )
        sae = SparseAutoencoder(100, rho=0.01, beta=3.0, weight_decay=1e-4, max_iter=400,
                                device="cpu", random_state=SEED)
        result = score(sae, images, labels, config, patch_config=patch_config, device="cpu")
        assert np.array_equal(result.split.test, np.sort(
            train_test_split(np.arange(len(y)), test_size=TEST_SIZE, random_state=SEED)[1]))
        m = result.metrics()
        rows.append({"method": "raw pixels (C=100)", "accuracy": m["raw_accuracy"],
                     "macro_f1": m["raw_macro_f1"], "fit_seconds": m["raw_fit_seconds"],
                     "n_features": m["n_raw_features"]})

        # BernoulliRBM, the example's settings
        rbm = BernoulliRBM(n_components=100, learning_rate=0.06, n_iter=10, random_state=SEED)

        def rbm_features(Xa):
            return rbm.fit_transform(Xa), rbm.transform

        rows.append(fit_eval("BernoulliRBM 100 (C=6000)", rbm_features, logistic(FEATURE_C),
                             Xtr, ytr, Xte, yte))

        # MiniBatchDictionaryLearning, settings documented above
        dl = MiniBatchDictionaryLearning(
            n_components=100, alpha=1.0, batch_size=256, max_iter=10, fit_algorithm="lars",
            transform_algorithm="lasso_cd", transform_alpha=0.5, random_state=SEED,
        )

        def dl_features(Xa):
            dl.fit(Xa)
            return dl_transform(Xa), dl_transform

        def dl_transform(Xa):
            with warnings.catch_warnings():  # lasso_cd reports float32 duality gaps
                warnings.simplefilter("ignore", ConvergenceWarning)
                return dl.transform(Xa)

        rows.append(fit_eval(
            "MiniBatchDictionaryLearning 100 (std, C=6000)", dl_features,
            make_pipeline(StandardScaler(), logistic(FEATURE_C)), Xtr, ytr, Xte, yte,
        ))

        rows.append({
            "method": "saeflow KL SAE 100, 4x4 conv, quadrant sum (std, C=6000)",
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "fit_seconds": m["sae_fit_seconds"] + m["feature_seconds"] + m["fit_seconds"],
            "n_features": m["n_features"],
            "sae_fit_seconds": m["sae_fit_seconds"], "feature_seconds": m["feature_seconds"],
            "classifier_seconds": m["fit_seconds"],
        })

        default = default_pipeline(images, labels)
        speed = throughput(result.estimator, result.transform, Xn, config.pad, args.threads)
    total = time.perf_counter() - start

    width = max(len(r["method"]) for r in rows)
    print(f"{'method':<{width}}  accuracy  macro-F1  fit s  features")
    for r in rows:
        print(f"{r['method']:<{width}}  {r['accuracy']:8.4f}  {r['macro_f1']:8.4f}  "
              f"{r['fit_seconds']:5.1f}  {r['n_features']:8d}")
    print(f"\nsaeflow: SAE fit {m['sae_fit_seconds']:.1f} s, features {m['feature_seconds']:.2f} s,"
          f" classifier {m['fit_seconds']:.1f} s; n_train {m['n_train']}, n_test {m['n_test']}")
    print("\ndefault score stage (natural-image SAE 64-25-64, ScoreConfig()), plain digits:")
    print("seed  accuracy  raw_accuracy  macro-F1  raw_macro-F1")
    for seed, r in zip(default["split_seeds"], default["per_seed"], strict=True):
        print(f"{seed:4d}  {r['accuracy']:8.4f}  {r['raw_accuracy']:12.4f}  {r['macro_f1']:8.4f}"
              f"  {r['raw_macro_f1']:12.4f}")
    print(f"mean  {default['accuracy_mean']:8.4f}  {default['raw_accuracy_mean']:12.4f}   "
          f"(features win on {default['features_win_on']}/{len(default['split_seeds'])})\n")
    print(
        f"conv encoding: {speed['images']} images x {speed['positions_per_image']} positions, "
        f"d={speed['patch_dim']}, s={speed['units']}: "
        f"{speed['conv_features_flops_per_second'] / 1e9:.2f} GFLOP/s "
        f"({speed['images_per_second']:.0f} images/s) | torch float32 matmul "
        f"{speed['matmul_same_shape']}: "
        f"{speed['matmul_same_shape_flops_per_second'] / 1e9:.2f} GFLOP/s, 2048^3: "
        f"{speed['matmul_square_2048_flops_per_second'] / 1e9:.2f} GFLOP/s "
        f"({args.threads} torch threads)"
    )
    print(f"total {total:.1f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "protocol": {
            "data": "sklearn digits, nudged 5x (8985), per-pixel min-max to [0, 1]",
            "split": {"test_size": TEST_SIZE, "random_state": SEED,
                      "n_train": m["n_train"], "n_test": m["n_test"]},
            "classifier": "LogisticRegression(solver='newton-cg', default tol)",
            "raw_C": RAW_C, "feature_C": FEATURE_C,
            "max_abs_diff_vs_example_preprocessing": data_diff,
        },
        "saeflow_config": {"score": config.to_dict(), "patches": patch_config.to_dict(),
                           "sae": {k: v for k, v in sae.get_params().items()
                                   if k != "callbacks"}},
        "results": rows,
        "default_score_stage": default,
        "throughput": speed,
        "threads": {"torch": args.threads, "blas": 1},
        "total_seconds": total,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "sklearn": sklearn.__version__, "numpy": np.__version__},
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    (out / "digits_protocol.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

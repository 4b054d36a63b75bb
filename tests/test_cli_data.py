"""`saeflow ingest` and `saeflow patches`: outputs, determinism, and bad input handling
(one-line error naming the input, non-zero exit, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from sae_core.patch_store import read_patch_store
from sae_core.transform import PatchTransform


def write_params(tmp_path: Path, sources: str, patches: str = "") -> Path:
    text = "ingest:\n  sources:\n" + sources
    text += "patches:\n  patch_size: 4\n  n_patches: 500\n  heldout_fraction: 0.2\n" + patches
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def run_ingest(params: Path, out: Path) -> int:
    return main(["ingest", "--params", str(params), "--images", str(out / "images.parquet"),
                 "--images-manifest", str(out / "manifest.json")])


def run_patches(params: Path, out: Path) -> int:
    return main(["patches", "--params", str(params), "--images", str(out / "images.parquet"),
                 "--patches", str(out / "patches.arrow"), "--transform",
                 str(out / "t.safetensors")])


def png(path: Path, mode: str = "L", size: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("saeflow: error:")
    for part in parts:
        assert part in err, (part, err)
    return err


def test_ingest_then_patches_writes_outputs_deterministically(tmp_path):
    for i in range(3):
        png(tmp_path / "photos" / ("cats" if i % 2 else "dogs") / f"{i}.png", seed=i)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    params = write_params(
        tmp_path, "    - {type: image_folder, path: photos, labels: subfolders}\n"
    )
    out1, out2 = tmp_path / "a", tmp_path / "b"
    for out in (out1, out2):
        assert run_ingest(params, out) == 0
        assert run_patches(params, out) == 0
    for name in ("images.parquet", "manifest.json", "patches.arrow", "t.safetensors"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    store = read_patch_store(out1 / "patches.arrow")
    assert (store.n_train, store.n_heldout) == (400, 100)
    assert store.train.shape[1] == 16
    assert 0.1 <= store.train.min() and store.train.max() <= 0.9
    # the saved transform re-applies the fitted normalisation
    t = PatchTransform.load(out1 / "t.safetensors")
    assert t.n_features == 16
    assert "notes.txt" in (out1 / "manifest.json").read_text()


@pytest.mark.parametrize(
    ("sources", "setup", "expected"),
    [
        ("    - {type: idx, path: missing.gz}\n", None, ["missing.gz", "not found"]),
        ("    - {type: numpy, path: nan.npy}\n", "nan", ["nan.npy", "NaN"]),
        ("    - {type: image_folder, path: photos}\n", "corrupt", ["bad.png"]),
        ("    - {type: image_folder, path: empty}\n", "empty", ["empty"]),
        ("    - {type: image_folder, path: photos}\n", "mixed", ["photos"]),
        ("    - {type: nosuch}\n", None, ["source type must be one of"]),
        ("", None, ["ingest.sources is empty"]),
    ],
)
def test_ingest_bad_input_one_line_error_nothing_written(tmp_path, capsys, sources, setup,
                                                          expected):
    if setup == "nan":
        arr = np.zeros((2, 8, 8), dtype=np.float32)
        arr[1, 3, 3] = np.nan
        np.save(tmp_path / "nan.npy", arr)
    elif setup == "corrupt":
        png(tmp_path / "photos" / "good.png")
        (tmp_path / "photos" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup == "mixed":
        png(tmp_path / "photos" / "gray.png", "L")
        png(tmp_path / "photos" / "rgb.png", "RGB")
    params = write_params(tmp_path, sources)
    out = tmp_path / "out"
    assert run_ingest(params, out) == 2
    one_line_error(capsys, *expected)
    assert not out.exists() or not any(out.iterdir())


def test_patches_larger_than_images_is_refused_and_writes_nothing(tmp_path, capsys):
    png(tmp_path / "photos" / "small.png", size=6)
    params = write_params(tmp_path, "    - {type: image_folder, path: photos, labels: null}\n")
    out = tmp_path / "out"
    assert run_ingest(params, out) == 0
    capsys.readouterr()
    params.write_text(params.read_text().replace("patch_size: 4", "patch_size: 8"))
    assert run_patches(params, out) == 2
    one_line_error(capsys, "6")
    assert not (out / "patches.arrow").exists() and not (out / "t.safetensors").exists()


def test_bad_patch_setting_names_the_field(tmp_path, capsys):
    png(tmp_path / "photos" / "a.png")
    params = write_params(tmp_path, "    - {type: image_folder, path: photos, labels: null}\n",
                          "  normalisation: zscore\n")
    out = tmp_path / "out"
    assert run_ingest(params, out) == 0
    capsys.readouterr()
    assert run_patches(params, out) == 2
    one_line_error(capsys, "normalisation")


def test_missing_params_file(tmp_path, capsys):
    assert run_ingest(tmp_path / "nope.yaml", tmp_path / "out") == 2
    one_line_error(capsys, "nope.yaml", "not found")


def test_exit_status_of_the_real_command(tmp_path):
    params = write_params(tmp_path, "    - {type: numpy, path: missing.npy}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", "--params", str(params),
         "--images", str(tmp_path / "o.parquet"), "--images-manifest", str(tmp_path / "m.json")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.npy" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_ingest_bytes_do_not_depend_on_the_checkout_folder(tmp_path):
    outs = []
    for name in ("checkout1", "checkout2"):
        root = tmp_path / name
        png(root / "photos" / "a" / "x.png")
        (root / "photos" / "a" / "readme.txt").write_text("skip me")
        params = write_params(root, "    - {type: image_folder, path: photos}\n")
        assert run_ingest(params, root / "out") == 0
        outs.append(root / "out")
    for f in ("images.parquet", "manifest.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    assert str(tmp_path) not in (outs[0] / "manifest.json").read_text()


def test_data_modules_do_not_import_torch():
    # the data commands should not pay torch's start-up: sae_core's top level is lazy
    code = ("import sys, sae_core.dataset, sae_core.sources, sae_core.patches, "
            "sae_core.patch_store, sae_core.readers; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"


def test_exercise_trains_on_a_patch_store(tmp_path, capsys):
    png(tmp_path / "photos" / "a.png", size=32)
    params = write_params(tmp_path, "    - {type: image_folder, path: photos, labels: null}\n")
    out = tmp_path / "out"
    assert run_ingest(params, out) == 0 and run_patches(params, out) == 0
    rc = main(["exercise", "--patches", str(out / "patches.arrow"), "--iterations", "3",
               "--out", str(tmp_path / "ex")])
    assert rc == 0
    assert "trained 16-25-16 for 3 L-BFGS iterations" in capsys.readouterr().out
    assert (tmp_path / "ex" / "filters.png").is_file()
    metrics = json.loads((tmp_path / "ex" / "sparsity.json").read_text())
    assert metrics["rho"] == 0.01 and metrics["n_examples"] == 400
    assert (tmp_path / "ex" / "model" / "model.safetensors").is_file()

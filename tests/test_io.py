"""Files: model save/load (safetensors + JSON, never pickle), checkpoints, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from sae_core import SparseAutoencoder, io
from sae_core.outputs import OutputKind

ANY = OutputKind("a test output", lambda path: True)
"""A kind that every existing file is (these tests are about the writes themselves)."""


def fit(X, **kw):
    kw.setdefault("device", "cpu")
    return SparseAutoencoder(**kw).fit(X)


FITTED_ATTRIBUTES = ("components_", "intercept_hidden_", "decoder_", "intercept_visible_")


@pytest.fixture
def saved(tmp_path, small_X):
    sae = fit(small_X, n_components=5, max_iter=8)
    folder = tmp_path / "model"
    sae.save(folder)
    return sae, folder


def _fix_sha(folder: Path) -> None:
    """Make config.json's sha256 match the (modified) weights file again."""
    cfg_path = folder / io.MODEL_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["weights_sha256"] = io.sha256_file(folder / io.MODEL_WEIGHTS)
    cfg_path.write_text(json.dumps(cfg))


# ----------------------------------------------------------------- round trip
@pytest.mark.parametrize("penalty", ["kl", "l1", "topk"])
def test_save_load_round_trip(tmp_path, small_X, penalty):
    sae = fit(small_X, n_components=5, max_iter=8, penalty=penalty, k=2)
    sae.save(tmp_path / "m")
    back = SparseAutoencoder.load(tmp_path / "m")
    assert np.array_equal(back.transform(small_X), sae.transform(small_X))
    assert np.array_equal(back.reconstruct(small_X), sae.reconstruct(small_X))
    for name in FITTED_ATTRIBUTES:
        assert np.array_equal(getattr(back, name), getattr(sae, name)), name
        assert getattr(back, name).dtype == getattr(sae, name).dtype
    assert back.n_iter_ == sae.n_iter_
    assert back.stop_reason_ == sae.stop_reason_
    assert back.history_ == sae.history_
    assert back.n_features_in_ == sae.n_features_in_
    expected = {k: v for k, v in sae.get_params().items() if k != "callbacks"}
    got = {k: v for k, v in back.get_params().items() if k != "callbacks"}
    assert got == expected


def test_model_folder_holds_exactly_two_files(saved):
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["weights_sha256"] == io.sha256_file(folder / "model.safetensors")
    assert cfg["shapes"]["W1"] == [5, 16]


def test_save_is_deterministic(tmp_path, saved):
    sae, folder = saved
    sae.save(tmp_path / "again")
    for name in ("config.json", "model.safetensors"):
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_save_unfitted_raises(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        SparseAutoencoder(3).save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------- broken model folders
def test_tampered_weights_detected_by_sha(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256"):
        SparseAutoencoder.load(folder)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_missing_file_named(saved, missing):
    _, folder = saved
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=re.escape(missing) + ".*not found"):
        SparseAutoencoder.load(folder)


def test_missing_folder_named(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*not found"):
        SparseAutoencoder.load(tmp_path / "nowhere")


def test_garbage_weights_named(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(os.urandom(16) + b"garbage" * 50)
    with pytest.raises(ValueError, match=r"model\.safetensors"):  # sha mismatch
        SparseAutoencoder.load(folder)
    _fix_sha(folder)
    with pytest.raises(io.FileFormatError, match=r"model\.safetensors.*not a readable"):
        SparseAutoencoder.load(folder)


def test_garbage_config_named(saved):
    _, folder = saved
    (folder / "config.json").write_bytes(b"\x00\x01{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        SparseAutoencoder.load(folder)


def test_invalid_params_in_config_named(saved):
    _, folder = saved
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["params"]["rho"] = 5.0
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*invalid params.*rho"):
        SparseAutoencoder.load(folder)


def test_unknown_param_in_config_named(saved):
    _, folder = saved
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["params"]["hidden"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*invalid params"):
        SparseAutoencoder.load(folder)


def test_wrong_format_version_named(saved):
    _, folder = saved
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*format_version"):
        SparseAutoencoder.load(folder)


def test_shape_mismatch_named(saved):
    _, folder = saved
    io.save_tensors(folder / "model.safetensors",
                    {"W1": np.zeros((2, 2)), "b1": np.zeros(2), "W2": np.zeros((2, 2)),
                     "b2": np.zeros(2)}, {"format_version": 1}, ANY)
    _fix_sha(folder)
    with pytest.raises(ValueError, match=r"model\.safetensors.*'W1'"):
        SparseAutoencoder.load(folder)


def test_non_finite_weights_named(saved):
    sae, folder = saved
    arrays = {"W1": sae.components_.copy(), "b1": sae.intercept_hidden_,
              "W2": sae.decoder_, "b2": sae.intercept_visible_}
    arrays["W1"][0, 0] = np.nan
    io.save_tensors(folder / "model.safetensors", arrays, {"format_version": 1}, ANY)
    _fix_sha(folder)
    with pytest.raises(ValueError, match=r"model\.safetensors.*NaN or Inf"):
        SparseAutoencoder.load(folder)


class _Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_never_unpickles(tmp_path, saved):
    _, folder = saved
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Exploit(marker))
    # sanity: this payload does run code when unpickled
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    (folder / "model.safetensors").write_bytes(payload)
    _fix_sha(folder)  # so the file is parsed, not rejected by its checksum
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        SparseAutoencoder.load(folder)
    assert not marker.exists()

    # a torch.save-style zip of a pickle is refused the same way
    import torch

    torch.save({"x": _Exploit(marker)}, folder / "model.safetensors")
    _fix_sha(folder)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        SparseAutoencoder.load(folder)
    assert not marker.exists()


# ----------------------------------------------------------------- tensors files
def test_save_load_tensors_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2, 3])}
    meta = {"x": 1, "nested": {"y": [1.5, None]}}
    io.save_tensors(tmp_path / "t.safetensors", arrays, meta, ANY)
    got, got_meta = io.load_tensors(tmp_path / "t.safetensors")
    assert got_meta == meta
    assert set(got) == {"a", "b"}
    for k, v in arrays.items():
        assert np.array_equal(got[k], v) and got[k].dtype == v.dtype


def test_load_tensors_without_metadata(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(io.FileFormatError, match=r"plain\.safetensors.*metadata"):
        io.load_tensors(tmp_path / "plain.safetensors")


def test_load_tensors_missing(tmp_path):
    with pytest.raises(io.FileFormatError, match=r"absent\.safetensors.*not found"):
        io.load_tensors(tmp_path / "absent.safetensors")


def test_file_format_error_is_value_error():
    assert issubclass(io.FileFormatError, ValueError)


# ----------------------------------------------------------------- atomic writes
class Boom(Exception):
    pass


def test_atomic_path_on_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(Boom), io.atomic_path(target, ANY) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("partial")
        raise Boom
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_on_exception_keeps_old_target(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(Boom), io.atomic_path(target, ANY) as tmp:
        tmp.write_text("new")
        raise Boom
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_success_replaces_target(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with io.atomic_path(target, ANY) as tmp:
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_write_json_stable_bytes(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"z": 1, "y": "text"}}
    io.write_json(tmp_path / "one.json", obj, ANY)
    first = (tmp_path / "one.json").read_bytes()
    io.write_json(tmp_path / "one.json", obj, ANY)
    assert (tmp_path / "one.json").read_bytes() == first
    # key order of the input does not matter
    io.write_json(tmp_path / "two.json", dict(reversed(list(obj.items()))), ANY)
    assert (tmp_path / "two.json").read_bytes() == first
    assert first.endswith(b"\n")
    assert io.read_json(tmp_path / "one.json") == obj


def test_read_json_errors_name_file(tmp_path):
    with pytest.raises(io.FileFormatError, match=r"nope\.json.*not found"):
        io.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(io.FileFormatError, match=r"bad\.json.*not valid JSON"):
        io.read_json(tmp_path / "bad.json")


def test_sha256_file(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"abc")
    assert io.sha256_file(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()


def _tree_digest(root):
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("make", ["user_folder", "user_file", "foreign_config", "symlink"])
def test_a_model_never_replaces_what_is_not_a_model(tmp_path, make):
    """`SparseAutoencoder.save` / the train stage at a path holding the user's own files:
    one line naming the path, and every byte left as it was."""
    from sae_core.io import save_model

    target = tmp_path / "results"
    if make == "user_folder":
        (target / "sub").mkdir(parents=True)
        (target / "notes.txt").write_text("my notes")
        (target / "sub" / "data.csv").write_text("1,2\n")
    elif make == "user_file":
        target.write_text("not a folder")
    elif make == "foreign_config":
        target.mkdir()
        (target / "config.json").write_text('{"mine": true}')
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere")
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"results: exists and is (a file, )?not a saeflow "
                       r"model folder.*nothing was written") as info:
        save_model(target, {"W": np.zeros((2, 2), np.float32)}, {})
    assert "\n" not in str(info.value)
    assert _tree_digest(tmp_path) == before


def test_a_model_folder_is_replaced_by_a_new_model(tmp_path):
    from sae_core.io import load_model, save_model

    save_model(tmp_path / "m", {"W": np.zeros((2, 2), np.float32)}, {})
    save_model(tmp_path / "m", {"W": np.ones((2, 2), np.float32)}, {})
    arrays, _ = load_model(tmp_path / "m")
    assert arrays["W"].sum() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

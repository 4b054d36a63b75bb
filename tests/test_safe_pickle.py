"""The restricted unpickler: CIFAR batches load, anything that could run code is refused."""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import ClassVar

import numpy as np
import pytest

from sae_core.safe_pickle import UnsafePickleError, load_restricted


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING opcodes), like cPickle did."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_str8(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle as Python 2 + numpy 1 wrote CIFAR: str as bytes, numpy.core."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def batch() -> dict:
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    return {b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": data,
            b"filenames": [b"a.png", b"b.png"]}  # fmt: skip


class Evil:
    """Unpickling calls os.system(command): it would create the marker file."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvilOpen:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_python2_cifar_batch_loads_with_str_keys():
    raw = py2_pickle(batch())
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"U\x04data" in raw
    out = load_restricted(io.BytesIO(raw))
    assert set(out) == {"batch_label", "labels", "data", "filenames"}
    assert out["data"].dtype == np.uint8 and np.array_equal(out["data"], batch()[b"data"])
    assert out["labels"] == [3, 7] and out["filenames"] == [b"a.png", b"b.png"]


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_python3_pickles_of_arrays_and_scalars(protocol):
    obj = {b"data": np.arange(6, dtype=np.uint8), "x": np.float32(1.5), "t": (1, 2.0, None)}
    if protocol == 2:  # Python 3 writes bytes via _codecs.encode at protocol 2: refused
        with pytest.raises(UnsafePickleError, match=r"_codecs.encode"):
            load_restricted(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        return
    if protocol >= 5:  # arrays at protocol 5 use numpy's _frombuffer: not on the list
        obj.pop(b"data")
    out = load_restricted(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
    assert out["x"] == np.float32(1.5) and out["t"] == (1, 2.0, None)


@pytest.mark.parametrize("dumps", [py2_pickle, lambda obj: pickle.dumps(obj, protocol=4)])
def test_os_system_in_a_batch_is_refused_and_never_runs(tmp_path, dumps):
    marker = tmp_path / "marker"
    evil = batch()
    evil[b"labels"] = Evil(f"touch {marker}")
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt|os)\.system") as info:
        load_restricted(io.BytesIO(dumps(evil)))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_builtins_open_and_eval_are_refused(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(UnsafePickleError, match=r"refused global (io|builtins)\.open"):
        load_restricted(io.BytesIO(pickle.dumps({"data": EvilOpen(str(marker))})))
    payload = b"cbuiltins\neval\n(S'open(\"" + str(marker).encode() + b'", "w")\'\ntR.'
    with pytest.raises(UnsafePickleError, match=r"refused global builtins.eval"):
        load_restricted(io.BytesIO(payload))
    py2 = b"c__builtin__\ngetattr\n(c__builtin__\nlist\nS'append'\ntR."
    with pytest.raises(UnsafePickleError, match=r"getattr"):
        load_restricted(io.BytesIO(py2))
    assert not marker.exists()


def test_other_numpy_globals_are_refused():
    with pytest.raises(UnsafePickleError, match=r"refused global numpy.load"):
        load_restricted(io.BytesIO(b"cnumpy\nload\n(S'x.npy'\ntR."))


def test_corrupt_pickle_is_a_one_line_value_error():
    raw = pickle.dumps({b"data": np.zeros(10, np.uint8)}, protocol=4)
    with pytest.raises(ValueError, match=r"not a valid pickle") as info:
        load_restricted(io.BytesIO(raw[: len(raw) // 2]))
    assert not isinstance(info.value, UnsafePickleError)
    assert "\n" not in str(info.value)


def test_the_malicious_payload_does_run_under_plain_pickle(tmp_path):
    """The control for the refusals above: unrestricted pickle.loads runs the command."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps({b"labels": Evil(f"touch {marker}")}, protocol=4))
    assert marker.exists()

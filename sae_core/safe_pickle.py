"""A restricted unpickler for CIFAR-10/100 python batches (and nothing else).

A pickle is a program: unpickling ``os.system`` or ``builtins.eval`` runs it. CIFAR's
"python version" batches are pickles of a dict of numpy arrays, lists and byte strings,
so :func:`load_restricted` admits only the globals such a dict needs and refuses every
other one with :class:`UnsafePickleError` before anything is called:

- ``builtins`` dict, list, tuple, str, bytes, int, float, bool (Python 2's ``__builtin__``
  is mapped onto ``builtins``); most of these, and None, come from opcodes, not globals;
- the numpy reconstruction entry points: ``numpy.core.multiarray._reconstruct`` and
  ``numpy._core.multiarray._reconstruct`` (an ndarray), ``numpy.ndarray``,
  ``numpy.dtype``, and ``numpy.core.multiarray.scalar`` /
  ``numpy._core.multiarray.scalar`` (a numpy scalar). Both module spellings (numpy 1 and
  numpy 2) resolve to the installed numpy's functions.

The batches were written by Python 2 (``cPickle``, protocol 2): their ``str`` keys and
pixel buffers load as ``bytes`` with ``encoding="bytes"``, and the top-level dict's bytes
keys are decoded (latin-1) to ``str``, so a batch reads as ``{"data": ..., "labels": ...}``.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np


class UnsafePickleError(ValueError):
    """A pickle names a global outside the allow-list; the message names the global."""


def _multiarray() -> Any:
    # numpy 2 moved numpy.core to numpy._core; numpy.core.* still imports but warns.
    try:
        from numpy._core import multiarray

        if hasattr(multiarray, "_reconstruct"):
            return multiarray
    except ImportError:
        pass
    from numpy.core import multiarray

    return multiarray


def _allowed() -> dict[tuple[str, str], Any]:
    ma = _multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    # no builtins: containers and scalars are built by pickle opcodes, and a callable
    # such as bytes(10**11) would let a tiny file exhaust memory
    return allowed


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` returns only allow-listed objects."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id")


def load_restricted(fileobj: IO[bytes]) -> object:
    """Unpickle one object from a binary file object with the allow-list above.

    ``encoding="bytes"``: Python 2 ``str`` values load as ``bytes``. If the result is a
    dict, its ``bytes`` keys become ``str`` (latin-1). A refused global raises
    :class:`UnsafePickleError` ("refused global os.system"); a malformed or truncated
    pickle raises ``ValueError`` ("not a valid pickle (...)"); both on one line.
    """
    try:
        obj = RestrictedUnpickler(fileobj, encoding="bytes").load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a corrupt pickle raises almost any type; report them as one
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"not a valid pickle ({detail})") from None
    if isinstance(obj, dict):
        obj = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj

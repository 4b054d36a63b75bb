"""Device, dtype and matrix-product precision selection."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device when one is present, else the CPU; otherwise
    the named device, which must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """'float32' or 'float64' as a torch dtype."""
    return DTYPES[name]


def to_tensor(array, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array (m, n) as a tensor on ``device`` in ``dtype``. A read-only array (a
    view of a memory-mapped patch store) is copied first: torch shares memory with the
    arrays it wraps and does not support read-only ones."""
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device, dtype)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not Linux
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device lacks (a one-line ValueError), or warn where it works
    only emulated.

    * 'tf32' needs a CUDA device of compute capability >= 8.0 (TF32 tensor cores); it is
      refused anywhere else (the CPU has no TF32 products).
    * 'bf16' on CUDA needs ``torch.cuda.is_bf16_supported()``; on a CPU without native
      bfloat16 (AVX512-BF16/AMX) it runs emulated, slower than float32: a warning.
    """
    if precision == "full":
        return
    if precision == "tf32":
        if device.type != "cuda":
            raise ValueError(f"precision='tf32' needs a CUDA GPU of compute capability >= 8.0; "
                             f"the device is {device}")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"precision='tf32' needs compute capability >= 8.0; {device} has "
                             f"{major}.{minor}")
    elif precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision='bf16': {device} does not support bfloat16")
        if device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("precision='bf16' on a CPU without native bfloat16 (no avx512_bf16 "
                          "or amx_bf16): emulated, slower than 'full'", stacklevel=3)
    else:
        raise ValueError(f"precision must be one of full, tf32, bf16; got {precision!r}")


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 products for the duration of a fit ('tf32'; torch's global switches, restored
    afterwards); nothing for 'full' and 'bf16' (bf16 autocast is the objective's).

    Tolerance against 'full' (float32): a TF32 product carries a relative error of about
    2^-11 per term, so losses agree to ~1e-3 relative and a fit to the same loss within
    ~1%; :func:`bf16_autocast` gives about 2^-8, losses within ~1e-2 relative and a fit
    within ~3% (the figure the tests check on the CPU)."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bf16_autocast(precision: str, device: torch.device):
    """bfloat16 autocast on ``device`` for 'bf16' (products and activations in bfloat16,
    parameters and reductions in float32), else a context that does nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

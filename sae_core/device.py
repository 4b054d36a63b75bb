"""Device and dtype selection."""

from __future__ import annotations

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

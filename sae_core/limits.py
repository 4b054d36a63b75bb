"""How much an input may make saeflow allocate: a file's header declares its data's size,
and data that would not fit in the memory available is refused before anything is
allocated or read (a small compressed file must not claim gigabytes). Standard library
only."""

from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; elsewhere the
    physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class TooLargeError(ValueError):
    """A file whose header declares more data than the memory available."""


def check_declared_size(where: object, nbytes: int, what: str = "data") -> None:
    """Refuse, before allocating, data whose header declares more bytes than the memory
    available: a small compressed file must not claim gigabytes."""
    free = available_memory()
    if nbytes > free:
        raise TooLargeError(f"{where}: declares {nbytes / 2**30:.1f} GiB of {what}, more than "
                         f"the {free / 2**30:.1f} GiB of memory available")

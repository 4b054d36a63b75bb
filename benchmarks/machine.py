"""The "machine" record every benchmark result carries: where the numbers were measured.

    python benchmarks/machine.py      # prints the record of this machine as JSON
"""

from __future__ import annotations

import json
import os
import platform


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_record() -> dict:
    """platform, CPU model (/proc/cpuinfo), cores (all, and usable by this process), RAM,
    Python, torch version and the CUDA device's name (None without CUDA or torch)."""
    record = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "python": platform.python_version(),
        "torch": None,
        "cuda_device": None,
    }
    try:
        import torch
    except ImportError:
        return record
    record["torch"] = torch.__version__
    if torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(0)
    return record


if __name__ == "__main__":
    print(json.dumps(machine_record(), indent=2))

"""The machine a benchmark runs on: thread counts, the memory allocator, the report header.

``--malloc keep`` (the default) sets glibc's trim and mmap thresholds to 1 GiB, so that memory
freed by one timed case stays with the process and no case pays the page faults another left;
why this matters is in ``docs/performance.md`` ("The memory allocator").
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import numpy as np
import torch

import fgo_geoopt

__all__ = ["machine_info", "set_malloc", "set_threads", "thread_counts"]


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and numba (numba cannot exceed its start-up maximum)."""
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:  # the library falls back to torch ops without numba
        return
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def set_malloc(mode: str) -> str:
    """Apply ``--malloc`` (see the module docstring); returns what was done, for the report."""
    if mode not in ("keep", "default"):
        raise ValueError(f"malloc must be 'keep' or 'default', got {mode!r}")
    if mode == "default":
        return "glibc defaults" if platform.libc_ver()[0] == "glibc" else "system allocator"
    if platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator left as it is"
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    ok = mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    return "glibc, trim and mmap thresholds 1 GiB" if ok else "glibc refused mallopt: defaults"


def thread_counts() -> dict[str, int]:
    """The threads torch and numba (when installed) use now, for the report header."""
    threads = {"torch": torch.get_num_threads()}
    try:
        import numba

        threads["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    return threads


def machine_info(device: torch.device) -> dict[str, Any]:
    """Date, CPU model, core count and library versions for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import geoopt

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "geoopt": getattr(geoopt, "__version__", "?"),
        "fgo_geoopt": fgo_geoopt.__version__,
        "numpy": np.__version__,
        # Other processes on the machine skew every time; the load says how much.
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

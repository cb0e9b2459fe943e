"""Peak resident memory of a piece of code, from Linux's /proc (benchmarks).

`use_fixed_mmap_threshold` re-runs the script with glibc's mmap threshold
fixed at 128 KiB, so that every larger buffer goes back to the system when
freed: a repeated run then counts its buffers again instead of reusing what
an earlier run left in malloc's arenas. `reset_peak` then `peak_above` give
the peak RSS of what ran in between, above the RSS before it.
"""

from __future__ import annotations

import os
import sys


def use_fixed_mmap_threshold() -> None:
    """Re-executes the script with ``MALLOC_MMAP_THRESHOLD_`` set (once)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Resets the kernel's peak-RSS mark; returns the RSS now, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_above(before: int) -> int:
    """Bytes of peak RSS since `reset_peak` above `before`."""
    return _status("VmHWM") - before

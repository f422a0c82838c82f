"""This process's peak resident memory, measured the way that survives fork + exec.

``getrusage().ru_maxrss`` is wrong for a child started from a big parent: Linux carries the
pre-exec high-water mark of the forked (or vforked) address space into the child, so a fresh
worker spawned by a 1 GiB test process reports at least 1 GiB. ``VmHWM`` in /proc/self/status
belongs to the current address space only.
"""

from __future__ import annotations

import resource
from pathlib import Path

KIB = 1024


def peak_rss_bytes(status: Path = Path("/proc/self/status")) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB

"""Memory: the container's limit, the process's RSS, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_CGROUP_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
#: cgroup v1 reports "no limit" as a huge number near 2**63.
_NO_LIMIT = 1 << 60


def memory_limit(configured: int | None = None, cgroup_files: tuple[Path, ...] = _CGROUP_FILES) -> int | None:
    """The memory limit in bytes: the configured one (the Job fills it from the downward API), else the
    cgroup's, else None when nothing limits the process."""
    if configured:
        return configured
    for path in cgroup_files:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _NO_LIMIT:
            return int(raw)
    return None


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


class PeakRss:
    """Tracks the highest RSS seen at the points where it is sampled."""

    def __init__(self) -> None:
        self.peak = rss_bytes()

    def sample(self) -> int:
        current = rss_bytes()
        self.peak = max(self.peak, current)
        return current


def _load_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc keeps them otherwise)."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)

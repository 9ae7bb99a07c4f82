"""Memory: the container's limit, the process's RSS, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
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


def _load_glibc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist only in glibc
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_glibc()


_M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena limit


def limit_malloc_arenas(environ: dict[str, str] | None = None, default: int = 2) -> None:
    """Honour ``MALLOC_ARENA_MAX``, or apply ``default`` when it is unset (laptop runs).

    glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed in one
    is not reused by the others: with embedding threads the heap only grows. glibc reads the variable
    itself at start; ``mallopt`` sets the same limit for a process started without it.
    """
    environ = dict(os.environ) if environ is None else environ
    if "MALLOC_ARENA_MAX" in environ or _libc is None:
        return
    _libc.mallopt(_M_ARENA_MAX, default)


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc keeps them otherwise)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)

"""Memory: the container's limit, the process's RSS, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
#: cgroup v1 reports "no limit" as a huge number near 2**63.
_NO_LIMIT = 1 << 60


def cgroup_limit_files(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> list[Path]:
    """The limit files of this process's own memory cgroup and of each of its ancestors, v2 and v1.

    The files at the mount root are the root cgroup's (unlimited) whenever the process sits in a nested
    cgroup, as under a container runtime without a cgroup namespace: ``/proc/self/cgroup`` names the
    right folder. Inside a cgroup namespace that path is ``/`` and this reduces to the root files.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    own = {"v2": "/", "v1": "/"}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            own["v2"] = path
        elif "memory" in controllers.split(","):
            own["v1"] = path
    files = [folder / "memory.max" for folder in _self_and_ancestors(root, own["v2"])]
    files += [folder / "memory.limit_in_bytes" for folder in _self_and_ancestors(root / "memory", own["v1"])]
    return files


def _self_and_ancestors(mount: Path, path: str) -> list[Path]:
    parts = [part for part in path.split("/") if part]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def memory_limit(configured: int | None = None, cgroup_files: Sequence[Path] | None = None) -> int | None:
    """The memory limit in bytes: the configured one (the Job fills it from the downward API), else the
    strictest of the process's cgroups (its own and its ancestors'), else None when nothing limits it."""
    if configured:
        return configured
    limits = []
    for path in cgroup_limit_files() if cgroup_files is None else cgroup_files:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _NO_LIMIT:
            limits.append(int(raw))
    return min(limits, default=None)


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def anonymous_bytes() -> int:
    """Resident memory only the process can give back: RSS less its file-backed pages.

    The shared libraries (~75 MB) and the embedded store's memory-mapped files are counted in RSS, but a
    cgroup at its limit reclaims those pages instead of killing; heap, arenas and tensors it cannot. This is
    what runs into the limit, so it is what the memory budget is compared with.
    """
    info = psutil.Process().memory_info()
    return int(info.rss - info.shared)


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

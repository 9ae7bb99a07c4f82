from __future__ import annotations

import mmap
from pathlib import Path

from importer.memory import PeakRss, anonymous_bytes, cgroup_limit_files, memory_limit, release_memory, rss_bytes


def test_the_configured_limit_wins_then_cgroup_v2_then_v1(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text(str(512 << 20))
    assert memory_limit(None, (v2, v1)) == 512 << 20
    v2.write_text(f"{256 << 20}\n")
    assert memory_limit(None, (v2, v1)) == 256 << 20
    assert memory_limit(1 << 30, (v2, v1)) == 1 << 30


def test_no_limit_is_none(tmp_path: Path) -> None:
    unlimited_v1 = tmp_path / "memory.limit_in_bytes"
    unlimited_v1.write_text("9223372036854771712")
    assert memory_limit(None, (tmp_path / "absent", unlimited_v1)) is None


def test_releasing_memory_returns_freed_heap_pages_to_the_system() -> None:
    """Freed blocks pinned between live ones stay in the process until malloc_trim gives their pages back."""
    peak = PeakRss()
    pairs = [(bytearray(100_000), bytearray(1000)) for _ in range(1000)]  # ~100 MB, each big block pinned
    grown = peak.sample()
    pinned = [small for _, small in pairs]
    del pairs
    assert peak.sample() > grown - (20 << 20)  # free() alone returns (almost) nothing
    release_memory()
    assert peak.sample() < grown - (60 << 20)
    assert len(pinned) == 1000 and peak.peak >= grown


def test_the_limit_comes_from_the_process_own_nested_cgroup_not_the_root(tmp_path: Path) -> None:
    """cgroup v1 nested as this machine has it: the root's file says unlimited, the process's own says 512 MiB."""
    root = tmp_path / "sys-fs-cgroup"
    own = root / "memory" / "jobs" / "run-1"
    own.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "jobs" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    (own / "memory.limit_in_bytes").write_text(f"{512 << 20}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("5:devices:/\n4:memory:/jobs/run-1\n1:cpu:/\n0::/\n")

    files = cgroup_limit_files(proc, root)

    assert own / "memory.limit_in_bytes" in files
    assert memory_limit(None, files) == 512 << 20
    (own / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited itself: the parent's limit holds
    assert memory_limit(None, cgroup_limit_files(proc, root)) == 1 << 30


def test_cgroup_v2_own_path(tmp_path: Path) -> None:
    root = tmp_path / "sys-fs-cgroup"
    (root / "kubepods" / "pod-a").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "kubepods" / "pod-a" / "memory.max").write_text(f"{300 << 20}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod-a\n")
    assert memory_limit(None, cgroup_limit_files(proc, root)) == 300 << 20


def test_the_budget_counts_what_the_kernel_cannot_reclaim_not_mapped_files(tmp_path: Path) -> None:
    """A mapped file's pages (the store's, the libraries') are in RSS but not held: a cgroup reclaims them."""
    size = 64 << 20
    mapped_file = tmp_path / "mapped"
    mapped_file.write_bytes(b"\1" * size)
    rss, held = rss_bytes(), anonymous_bytes()
    with mapped_file.open("rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[offset] for offset in range(0, size, mmap.PAGESIZE)) == size // mmap.PAGESIZE
        assert rss_bytes() > rss + (48 << 20)
        assert anonymous_bytes() < held + (16 << 20)
    heap = bytearray(b"\1" * size)  # written, so every page is resident
    assert anonymous_bytes() > held + (48 << 20)
    assert len(heap) == size

from __future__ import annotations

from pathlib import Path

from importer.memory import PeakRss, memory_limit, release_memory


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

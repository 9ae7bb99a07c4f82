"""The build cache only counts a build as finished when its marker and every binary are in place.

Compiling Kubernetes takes a quarter of an hour or more, so the tests below that build stand in shell scripts
for the compiled binaries (the ``compiles`` fixture): they test which sets are built, how, and under which
locks, not the compile itself (that is measured by hand: README, "First-time builds").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from localcluster import build


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return build.cache_dir()


@pytest.fixture
def compiles(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Instead of fetching and compiling Kubernetes: record the binaries asked for, leave stand-ins for them."""
    asked: list[tuple[str, ...]] = []

    def stand_in(workdir: Path, binaries: tuple[str, ...]) -> Path:
        asked.append(binaries)
        out = workdir / "src" / "_output" / "bin"
        _write_executables(out, binaries)
        return out

    monkeypatch.setattr(build, "_compile_from_source", stand_in)
    return asked


def _write_executables(folder: Path, names: tuple[str, ...]) -> None:
    folder.mkdir(parents=True)
    for name in names:
        path = folder / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)


def _install_fake_binaries(cache: Path) -> None:
    _write_executables(cache / "bin", build.BINARIES)


def _write_marker(cache: Path) -> None:
    (cache / build.MARKER_NAME).write_text(json.dumps({"binaries": list(build.BINARIES)}))


def test_cache_lives_under_xdg_cache_home(cache: Path, tmp_path: Path) -> None:
    assert cache == tmp_path / "reflection-operator" / "k8s-v1.20.2"
    assert build.bin_dir() == cache / "bin"


def test_binaries_without_a_marker_are_a_half_finished_build(cache: Path) -> None:
    _install_fake_binaries(cache)
    assert not build.is_built()


def test_marker_and_all_binaries_make_a_finished_build(cache: Path) -> None:
    _install_fake_binaries(cache)
    _write_marker(cache)
    assert build.is_built()
    assert build.ensure_built() == cache / "bin"  # found in the cache: nothing is built


def test_a_missing_binary_or_a_broken_marker_means_rebuild(cache: Path) -> None:
    _install_fake_binaries(cache)
    _write_marker(cache)
    (cache / "bin" / "kubectl").unlink()
    assert not build.is_built()
    kubectl = cache / "bin" / "kubectl"
    kubectl.write_text("#!/bin/sh\n")
    kubectl.chmod(0o755)
    assert build.is_built()
    (cache / build.MARKER_NAME).write_text("{not json")
    assert not build.is_built()


def test_a_fresh_machine_compiles_both_sets_once_each_into_its_own_folder(
    cache: Path, compiles: list[tuple[str, ...]]
) -> None:
    control_plane, node = build.ensure_all_built()
    assert compiles == [build.BINARIES + build.NODE_BINARIES]
    assert (control_plane, node) == (build.bin_dir(), build.bin_dir(build.NODE_BINARIES))
    assert build.is_built() and build.is_built(build.NODE_BINARIES)
    assert sorted(p.name for p in control_plane.iterdir()) == sorted(build.BINARIES)
    assert sorted(p.name for p in node.iterdir()) == sorted(build.NODE_BINARIES)
    for folder in (build.cache_dir(), build.cache_dir(build.NODE_BINARIES)):  # nothing half-finished or left over
        assert sorted(p.name for p in folder.iterdir()) == sorted(["bin", "build.lock", build.MARKER_NAME])


def test_only_the_missing_set_is_compiled(cache: Path, compiles: list[tuple[str, ...]]) -> None:
    build.ensure_built()
    assert compiles == [build.BINARIES]
    build.ensure_all_built()
    assert compiles == [build.BINARIES, build.NODE_BINARIES]
    build.ensure_all_built()
    assert len(compiles) == 2  # both in the cache: nothing is compiled
    (build.bin_dir() / "kube-scheduler").unlink()
    build.ensure_all_built()
    assert compiles[2:] == [build.BINARIES]


def test_the_locks_are_always_taken_control_plane_first(
    cache: Path, compiles: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[Path] = []
    real_lock = build._exclusive_lock

    @contextmanager
    def recording_lock(path: Path) -> Iterator[None]:
        taken.append(path)
        with real_lock(path):
            yield

    monkeypatch.setattr(build, "_exclusive_lock", recording_lock)
    build._ensure((build.NODE_BINARIES, build.BINARIES))  # asked for in the other order
    assert taken == [build.cache_dir() / "build.lock", build.cache_dir(build.NODE_BINARIES) / "build.lock"]
    assert compiles == [build.BINARIES + build.NODE_BINARIES]


def test_a_build_finished_while_waiting_for_the_lock_is_not_done_again(
    cache: Path, compiles: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_lock = build._exclusive_lock
    checked = threading.Event()  # set once the waiting call has found no build and goes for the lock

    @contextmanager
    def signalling_lock(path: Path) -> Iterator[None]:
        checked.set()
        with real_lock(path):
            yield

    monkeypatch.setattr(build, "_exclusive_lock", signalling_lock)
    cache.mkdir(parents=True)
    with ThreadPoolExecutor(1) as pool:
        with real_lock(cache / "build.lock"):  # another process is building the control plane
            waiting = pool.submit(build.ensure_built)
            assert checked.wait(timeout=10)
            _install_fake_binaries(cache)  # ... and finishes while this one waits for the lock
            _write_marker(cache)
        assert waiting.result(timeout=10) == cache / "bin"
    assert compiles == []
